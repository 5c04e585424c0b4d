"""Expert-load monitoring: the metrics (``metrics``: windows of routed-slot counts per layer, expert and mask-ratio
bucket, their summaries and the versioned ``expert_load`` artifact format) and the read-only dashboard over the
MLflow tracking store (``store``, ``pages``, ``dashboard``; assets in ``static/``).

May import: torch (metrics only), mlflow's client, dlmoe.model.balance and the standard library — never ray or
deepspeed. The dashboard modules do not import torch, so it starts fast and runs beside any MLflow server.
"""
