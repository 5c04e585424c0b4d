"""Package ``operators``: the kopf operator for the ``DiffusionTrainingJob`` custom resource (``dlmoe-operator``).

May import: kopf, kubernetes, MLflow's client, yaml and the standard library — never torch, ray or deepspeed, nor
the ``dlmoe`` package (its config pulls in torch): the operator image is slim. tests/unit/test_operator_render.py
checks the wall.

Modules: ``spec`` (the spec checked and typed), ``render`` (children as pure functions), ``status`` (phase,
condition, attempt and balance maths), ``progress`` (MLflow reads), ``kube`` (API calls), ``reconcile`` (one pass),
``handlers`` (kopf entry points), ``__main__`` (the command line).
"""
