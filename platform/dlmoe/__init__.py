"""dlmoe: pretrain and fine-tune Mixture-of-Experts masked-diffusion language models (LLaDA-MoE).

Subpackages: ``model`` (pure torch), ``diffusion`` (objective and sampler), ``parallel`` (DeepSpeed wrapping),
``train`` (training loops), ``export`` (Hugging Face format), ``monitor`` (expert load). ``config`` holds the
typed job configuration, ``checkpointing`` the training checkpoint format, ``errors`` the errors we raise, ``cli``
the ``dlmoe`` command.
"""

__version__ = "0.1.0"
