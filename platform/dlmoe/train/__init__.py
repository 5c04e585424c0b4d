"""Training: ``dlmoe train`` as a Ray Train ``TorchTrainer`` (driver.py), the per-worker loop (worker.py, imported
by the driver only, to hand to Ray), one step and its all-reduce (step.py), the loop's side jobs as components
(hooks.py), preemption (preemption.py), exports while training (exports.py), the validation loss (validation.py)
and the copy language that checks the sampler end to end (copy_task.py). The checkpoint format is
``dlmoe.checkpointing``.

May import: everything in dlmoe, ``data_pipeline``, torch, ray, deepspeed (through ``dlmoe.parallel``), tqdm.
"""
