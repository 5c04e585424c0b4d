"""Which Ray cluster our commands join (the Ray Data jobs and `dlmoe train` alike): the one in force, or a local one
when none is running or the one this machine last recorded has gone; Ray Data kept quiet.

Their steps return a ``DataError``'s message in an ``error`` column instead of raising it: Ray wraps an
exception raised in a task (``RayTaskError``, Ray Data's ``UserCodeException``) and the wrapper does not keep the
original, while users should see the message that names the shard or file.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path


def ensure_ray() -> None:
    """Connect to the Ray cluster in force (``RAY_ADDRESS``), or start a local one; keep Ray Data's logs quiet."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=ray_address(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def ray_address() -> str | None:
    """What ``ray.init`` should join: ``None`` lets Ray find the cluster in force (``RAY_ADDRESS``, or the one
    ``ray start`` last recorded on this machine); ``"local"`` starts a fresh one when that record names a cluster
    that no longer answers (one that crashed or was killed), where ``ray.init`` would wait on it and fail."""
    from ray._common.utils import get_ray_address_file

    if os.environ.get("RAY_ADDRESS"):
        return None
    record = Path(get_ray_address_file(None))
    recorded = record.read_text().strip() if record.is_file() else ""
    if not recorded:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        warnings.warn(f"the Ray cluster recorded in {record} ({recorded}) does not answer; starting a local one",
                      stacklevel=2)
        return "local"
    return None
