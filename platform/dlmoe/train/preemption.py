"""Preemption: a checkpoint before the work goes away, whenever there is time for one.

Two notices reach the workers:

- **Ray's preemption notice.** A node being drained — by KubeRay's autoscaler, a spot reclaim, or
  ``ray drain-node --reason PREEMPTION`` — shows in ``ray.train.get_preemption_info()``. The loop saves a
  checkpoint at once and trains on, as Ray recommends: when the node goes, Ray Train restarts the worker group from
  that checkpoint, so at most the steps after the notice are redone.
- **SIGTERM to a worker process** (Kubernetes ending a pod, a kill by hand). Ray's own handler exits at once; ours
  only raises a flag. At the next step boundary every rank saves, and the run stops with ``WorkerPreempted``, which
  Ray Train counts as a failure and restarts from. A step that does not end within ``checkpoint.sigterm_grace_s``
  cannot be waited for: the process then exits as Ray's handler would have.

Python runs signal handlers on a process's main thread, and Ray Train runs the training function on another, so the
handler is installed by the Torch backend when the worker group starts (``TorchWithSigterm``), on each worker's main
thread. Asking Ray for its notice is a barrier across the workers (a few milliseconds), so rank 0's clock picks the
steps that ask — one per ``CHECK_EVERY_S`` at most — and the choice travels, with every rank's SIGTERM flag, in the
all-reduce each step makes anyway.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from ray.train.torch import TorchConfig

# Ray pins no public hook that runs on a worker's main thread; its Torch backend's start hook does (ray 2.60.*).
from ray.train.torch.config import _TorchBackend

CHECK_EVERY_S = 1.0
_TERM = threading.Event()


def install_sigterm_handler(grace_s: float) -> None:
    """On this process's main thread: let SIGTERM ask for a checkpoint and stop instead of exiting at once."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if not _TERM.is_set():
            _TERM.set()
            timer = threading.Timer(grace_s, os._exit, args=(128 + signum,))
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)


def sigterm_received() -> bool:
    return _TERM.is_set()


class _SigtermBackend(_TorchBackend):
    def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler, backend_config.sigterm_grace_s)


@dataclass
class TorchWithSigterm(TorchConfig):
    """Ray Train's Torch process-group setup, plus the SIGTERM handler on every worker."""

    sigterm_grace_s: float = 25.0

    @property
    def backend_cls(self) -> type:
        return _SigtermBackend


class PreemptionWatch:
    """Per rank: the flags a step contributes to the all-reduce, and what the reduced flags call for."""

    FLAGS = 2  # a SIGTERM on some rank; rank 0 asks this step for Ray's notice

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.last_check = time.monotonic()
        self.noticed = False

    def flags(self) -> torch.Tensor:
        due = self.rank == 0 and time.monotonic() - self.last_check >= CHECK_EVERY_S
        return torch.tensor([float(sigterm_received()), float(due)], dtype=torch.float64)

    def event(self, reduced: torch.Tensor) -> str | None:
        """``sigterm`` (save, then stop), ``preemption`` (save, train on) or ``None``, from the flags summed over
        the ranks. Every rank calls it with the same flags, so all ask Ray together or none does."""
        import ray.train

        if reduced[0] > 0:
            return "sigterm"
        if reduced[1] > 0:
            self.last_check = time.monotonic()
            if ray.train.get_preemption_info() is not None and not self.noticed:
                self.noticed = True
                return "preemption"
        return None
