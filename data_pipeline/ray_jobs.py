"""What the Ray Data jobs share: a quiet local Ray when none is running, and our errors back out of Ray's wrappers.

Ray wraps an exception raised in a task (``RayTaskError``, Ray Data's ``UserCodeException``); users should see
the ``DataError`` that names the shard or file, not the wrapper.
"""

from __future__ import annotations

import logging

from dlmoe.errors import DataError


def ensure_ray() -> None:
    """Connect to the Ray cluster in force (``RAY_ADDRESS``), or start a local one; keep Ray Data's logs quiet."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def data_error_from(exc: BaseException) -> DataError | None:
    """The ``DataError`` somewhere in ``exc``'s chain of causes (Ray keeps the task's exception there)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError):
            return DataError(str(current))
        todo.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None
