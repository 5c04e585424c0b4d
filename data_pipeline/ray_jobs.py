"""What the Ray Data jobs share: the cluster in force, or a quiet local Ray when none is running.

Their steps return a ``DataError``'s message in an ``error`` column instead of raising it: Ray wraps an
exception raised in a task (``RayTaskError``, Ray Data's ``UserCodeException``) and the wrapper does not keep the
original, while users should see the message that names the shard or file.
"""

from __future__ import annotations

import logging


def ensure_ray() -> None:
    """Connect to the Ray cluster in force (``RAY_ADDRESS``), or start a local one; keep Ray Data's logs quiet."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
