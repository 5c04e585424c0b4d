"""What ``dlmoe train`` shows while it runs: one progress bar and the run's own warnings, drawn by the driver.

The workers' output (Ray Train's controller and worker logs, DeepSpeed's and torch's notices, MLflow's) stays in
Ray's log files: the driver starts Ray with ``log_to_driver=False`` unless ``--verbose``. What a person needs from
the workers travels through a small actor instead (``ConsoleChannel``): rank 0's progress, and every rank's warnings
raised by dlmoe's own code (a checkpoint skipped, an export that failed, storage or MLflow unavailable). A thread of
the driver takes them every ``POLL_S`` seconds and draws them on stderr: the bar with tqdm, a warning as a line
above it. A restarted worker group starts the same bar again from its resumed step.
"""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import ray

import data_pipeline
from dlmoe.errors import DlmoeError

POLL_S = 0.25
# Warnings raised from files under these folders are dlmoe's own and reach the console; the rest stay in the logs.
OWN_SOURCES = (str(Path(__file__).parents[1]), str(Path(data_pipeline.__file__).parent))


@ray.remote(num_cpus=0)
class ConsoleChannel:
    """The workers' events, in the order each worker sent them, until the driver takes them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def push(self, kind: str, payload: Any) -> None:
        self.events.append((kind, payload))

    def take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events


class DriverConsole:
    """The driver's end: makes the channel (``handle``, for the workers); as a context manager around
    ``trainer.fit()``, draws its events until the block ends, then the last ones, and closes the bar."""

    def __init__(self, *, progress: bool, poll_s: float = POLL_S, file: TextIO = sys.stderr) -> None:
        self.progress, self.poll_s, self.file = progress, poll_s, file
        self.handle: Any = ConsoleChannel.remote()  # type: ignore[attr-defined]
        self.bar: Any = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="dlmoe-console", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> DriverConsole:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stopping.set()
        self.thread.join()
        if self.error is None:
            self.draw(ray.get(self.handle.take.remote()))
        if self.bar is not None:
            self.bar.close()
        ray.kill(self.handle)
        if self.error is not None and kind is None:
            raise DlmoeError(f"the console lost the workers' progress: {self.error}") from self.error

    def _poll(self) -> None:
        try:
            while not self.stopping.wait(self.poll_s):
                self.draw(ray.get(self.handle.take.remote()))
        except Exception as exc:  # raised again by __exit__, on the driver's thread
            self.error = exc

    def draw(self, events: list[tuple[str, Any]]) -> None:
        """Draw the workers' events: ``("bar", (total, description))`` starts the bar (again, after a restart),
        ``("step", description)`` advances it, ``("warning", text)`` prints a line above it."""
        from tqdm import tqdm

        for kind, payload in events:
            if kind == "warning":
                tqdm.write(payload, file=self.file)
            elif not self.progress:
                continue
            elif kind == "bar":
                total, description = payload
                if self.bar is None:
                    self.bar = tqdm(total=total, desc=description, file=self.file, unit="step")
                else:
                    self.bar.reset(total=total)
                    self.bar.set_description(description)
            elif kind == "step":
                self.bar.set_description(payload, refresh=False)
                self.bar.update(1)


class WorkerConsole:
    """A worker's end of the channel: rank 0's progress and the warnings of dlmoe's code (``relay_warnings``)."""

    def __init__(self, handle: Any, rank: int) -> None:
        self.handle, self.rank = handle, rank

    def start_bar(self, total: int, description: str) -> None:
        self.handle.push.remote("bar", (total, description))

    def step(self, description: str) -> None:
        self.handle.push.remote("step", description)

    def relay_warnings(self) -> None:
        """Send the warnings raised from dlmoe's own files to the driver; others go where they went (Ray's logs)."""
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            if filename.startswith(OWN_SOURCES):
                self.handle.push.remote("warning", f"warning (rank {self.rank}): {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
