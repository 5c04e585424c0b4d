"""The parallelize step: the model and the job config in, a DeepSpeed engine out (DESIGN.md habit 1).

Lives here: the DeepSpeed configuration (ZeRO stage, precision, batch geometry, clipping), the optimizer and
learning-rate schedule handed to DeepSpeed (schedule.py), and expert parallelism through DeepSpeed AutoEP with the
router statistics our losses need (engine.py). May import torch, deepspeed and ``dlmoe``; the model never imports this.
"""

from dlmoe.parallel.engine import (
    ExpertParallelMoE,
    autoep_section,
    deepspeed_config,
    full_state_dict,
    parallelize,
    params_sha256,
)

__all__ = ["ExpertParallelMoE", "autoep_section", "deepspeed_config", "full_state_dict", "parallelize",
           "params_sha256"]
