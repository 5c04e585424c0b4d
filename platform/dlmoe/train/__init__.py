"""Training loops and what they need: learning-rate schedules (schedule.py) and, until the Ray Train + DeepSpeed
path lands, single-process training on this machine (local.py).

May import: everything in dlmoe, torch, tqdm; later ray and mlflow (rank 0 tracking).
"""
