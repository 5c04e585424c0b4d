"""Training: ``dlmoe train`` as a Ray Train ``TorchTrainer`` (driver.py), the per-worker loop with checkpoints and
resume (worker.py), learning-rate schedules (schedule.py) and the copy language that checks the sampler end to end
(copy_task.py).

May import: everything in dlmoe, ``data_pipeline``, torch, ray, deepspeed (through ``dlmoe.parallel``), tqdm.
"""
