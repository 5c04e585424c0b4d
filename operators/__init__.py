"""Package ``operators``: the kopf operator for the ``DiffusionTrainingJob`` custom resource.

May import: kopf, kubernetes and the standard library — never torch, ray or deepspeed. Filled by the
"Operator & Helm" issue.
"""
