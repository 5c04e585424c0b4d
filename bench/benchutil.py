"""Helpers shared by the benchmark scripts: their command line (``--json``) and markdown tables, run a row in a fresh
process, the fp32 matmul peak, CPU contention from other processes, and RSS / allocator controls for peak-memory
readings."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import json
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its module docstring as the help text, and ``--json PATH`` (see ``write_json``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def write_json(path: str | None, results: Any) -> bool:
    """Write ``results`` to ``path`` (a script's ``--json``) as indented JSON; False, writing nothing, without one."""
    if not path:
        return False
    Path(path).write_text(json.dumps(results, indent=2))
    return True


def table_head(*columns: str, align: str) -> str:
    """A markdown table's header row and rule; ``align`` has a letter per column: ``l`` left, ``r`` right."""
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must give l or r for each of the {len(columns)} columns")
    return "| " + " | ".join(columns) + " |\n|" + "".join("---|" if a == "l" else "---:|" for a in align)


def failed_row(label: object, error: str, columns: int) -> str:
    """The table row of a measurement that failed: its label, the error's first line, then empty cells."""
    return f"| {label} | failed: {error.splitlines()[0][:160]} |" + " |" * (columns - 2)


def run_isolated(fn: Callable[..., dict[str, Any]], label: dict[str, Any], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh spawn subprocess; a child that dies is reported as this row's error."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args).result()
        except Exception as exc:  # the child died (e.g. killed for memory): report it, never a number
            return {**label, "error": f"subprocess failed: {type(exc).__name__}: {exc}"}


class CpuContention:
    """How many cores other work used while a region ran: machine busy time (from /proc/stat, steal included)
    minus this process's own CPU time, over the region's wall time (0 = quiet; up to the core count)."""

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def others_cores(self) -> float:
        busy, own, wall = self._snapshot()
        return max(0.0, ((busy - self._start[0]) - (own - self._start[1])) / (wall - self._start[2]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Hand glibc's free heap pages back to the kernel, so that RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_peak_gflops(n: int = 2048, reps: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of an n x n @ n x n ``torch.mm`` on ``device`` in ``dtype`` (one untimed warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a wall clock times it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_step_flops(model: Any, batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward): 6 · active parameters · tokens, plus attention's
    12 · layers · seq_len · hidden · tokens (``active_params`` leaves out the embedding lookup and idle experts)."""
    from dlmoe.model import count_parameters

    config = model.config
    tokens = batch * seq_len
    active = count_parameters(model)["active_params"]
    return float(6 * active * tokens + 12 * config.num_hidden_layers * seq_len * config.hidden_size * tokens)


@contextlib.contextmanager
def one_rank_group(backend: str) -> Iterator[None]:
    """A torch.distributed group of this process alone, set up as a launcher would (DeepSpeed reads RANK,
    LOCAL_RANK and WORLD_SIZE), for running the training stack's engine outside Ray."""
    import torch.distributed as dist

    from data_pipeline.local_s3 import free_port

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ[key] = value
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
