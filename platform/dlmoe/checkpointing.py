"""The training checkpoint format, in one place: what a checkpoint folder holds, how it is checked, saved, found
and resumed.

A checkpoint is one Ray Train checkpoint folder under the run folder ``{checkpoint.storage}/{run_name}/``
(``run_folder``), written by every rank together:

- DeepSpeed's files under the tag folder ``dlmoe/`` (weights, optimizer, schedule; per rank);
- ``dlmoe_state.json`` (rank 0): a ``CheckpointState`` — step, data position, the losses so far, restarts, and
  the settings the checkpoint cannot outlive (``shape``: model geometry, parallel layout, batch, data);
- ``checksums.json.rank{r}`` (every rank): ``algorithm:hex`` of each of that rank's files, xxHash3-128
  (``file_checksum``); lists written before xxHash3 hold bare sha256 digests, which still verify.

The newest checkpoint of a run that verifies is the one resumed; a broken one is skipped with a warning. While a
driver trains the run, ``dlmoe_run.lock`` in the run folder names it (``RunLock``), so a second launch of the same
run name is refused instead of writing checkpoints beside the first.

May import: ``data_pipeline.storage``, ``dlmoe.config``, ``dlmoe.errors``, ``dlmoe.model``; ray and torch only
inside the functions that save and load (the exporter and the CLI read checkpoints without starting Ray).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from data_pipeline import storage
from dlmoe.config import JobConfig
from dlmoe.errors import CheckpointError, ConfigError, DlmoeError
from dlmoe.model import ModelConfig

STATE_FILE = "dlmoe_state.json"
LOCK_FILE = "dlmoe_run.lock"
CHECKSUM_FILE = "checksums.json"
TAG = "dlmoe"  # DeepSpeed's tag: the folder of its files inside a checkpoint
FOLDER_PREFIX = "checkpoint_"  # Ray Train's name for a checkpoint folder in the run folder

CHECKSUM_ALGORITHM = "xxh3_128"
HASHERS: dict[str, Any] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def run_folder(job: JobConfig) -> storage.Location:
    """The run's folder, ``{checkpoint.storage}/{run_name}``: its checkpoints, Ray Train's files, the export."""
    return storage.resolve(job.checkpoint.storage, endpoint_url=job.endpoint_url).child(job.run_name)


def checkpoint_shape(job: JobConfig) -> dict[str, Any]:
    """The settings a checkpoint cannot outlive, keyed by their config keys: model geometry, expert and data
    parallel layout, batch, data."""
    return {"model": job.model.to_model_config().to_json_dict(), "mask_token_id": job.model.mask_token_id,
            "parallel.num_workers": job.parallel.num_workers, "parallel.ep_size": job.parallel.ep_size,
            "parallel.zero_stage": job.parallel.zero_stage, "data.global_batch_size": job.data.global_batch_size,
            "data.seq_len": job.data.seq_len, "data.seed": job.data.seed, "data.uri": job.data.uri,
            "data.tokenizer": job.data.tokenizer, "objective.kind": job.objective.kind}


@dataclass
class CheckpointState:
    """``dlmoe_state.json``: where training stands at a checkpoint. The field names are the file's keys."""

    step: int = 0
    epoch: int = 0
    sample_in_epoch: int = 0  # the next global sample of ``epoch``
    losses: list[float] = field(default_factory=list)  # every step's loss so far
    restarts: int = 0
    checkpoints: list[int] = field(default_factory=list)  # steps checkpointed so far
    interruptions: list[dict[str, Any]] = field(default_factory=list)  # {step, cause}: a checkpoint on preemption
    val_losses: list[list[float]] = field(default_factory=list)  # [step, validation loss]
    shape: dict[str, Any] = field(default_factory=dict)  # ``checkpoint_shape`` of the job that made it
    config_hash: str = ""
    run_name: str | None = None
    flavor: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # ``ObjectiveConfig.recipe``: for the export's dlmoe.json

    @classmethod
    def new(cls, job: JobConfig) -> CheckpointState:
        """The state of a run that has not trained yet."""
        return cls(shape=checkpoint_shape(job), config_hash=job.config_hash(), run_name=job.run_name,
                   flavor=job.model.flavor, recipe=job.objective.recipe())

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> CheckpointState:
        """Parse a state file; ``CheckpointError`` names ``where`` when it is not one."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("step"), int):
                raise ValueError("no integer 'step'")
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where} is not a dlmoe checkpoint state: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def advance(self, step: int, loss: float, *, epoch: int, next_sample: int, interruption: str | None) -> None:
        """Count the finished step ``step`` (1-based): its loss, the data position after it, and the cause of an
        interruption it saw (a checkpoint follows)."""
        self.step, self.epoch, self.sample_in_epoch = step, epoch, next_sample
        self.losses.append(loss)
        if interruption is not None:
            self.interruptions.append({"step": step, "cause": interruption})

    @property
    def ep_size(self) -> int:
        """The expert-parallel size the checkpoint's files were written with."""
        return int(self.shape.get("parallel.ep_size", 1))

    @property
    def tokenizer(self) -> str:
        """The run's ``data.tokenizer``: ``byte`` or a tokenizer.json path."""
        return str(self.shape.get("data.tokenizer", "byte"))

    def model_config(self, where: str) -> ModelConfig:
        """The model the checkpoint holds; ``CheckpointError`` names ``where`` when the state does not say."""
        try:
            return ModelConfig(**self.shape["model"], mask_token_id=self.shape["mask_token_id"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where} does not describe the checkpoint's model: {exc}") from exc

    def changes(self, job: JobConfig) -> list[str]:
        """The checkpoint-bound settings of ``job`` that differ from those this state was made with, as
        ``key: checkpoint OLD, job NEW``; the model field by field (``model.hidden_size: checkpoint 16, job 32``)."""
        changed = []
        for key, new in checkpoint_shape(job).items():
            old = self.shape.get(key)
            if isinstance(new, dict) and isinstance(old, dict):
                changed += [f"{key}.{field}: checkpoint {old.get(field)!r}, job {new.get(field)!r}"
                            for field in sorted(old.keys() | new.keys()) if old.get(field) != new.get(field)]
            elif old != new:
                changed.append(f"{key}: checkpoint {old!r}, job {new!r}")
        return sorted(changed)


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint folder of a run, with its state."""

    step: int
    location: storage.Location
    state: CheckpointState


def file_checksum(path: Path, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``algorithm:hex`` of a checkpoint file, hashed memory-mapped in one call. The lists use xxHash3-128 — a check
    against corrupt or changed files, not a signature — many times faster than sha256."""
    new = HASHERS[algorithm]
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return f"{algorithm}:{new().hexdigest()}"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return f"{algorithm}:{new(view).hexdigest()}"


def checksum_matches(path: Path, recorded: str) -> bool:
    """Whether ``path`` exists and has the checksum a list recorded for it: ``algorithm:hex``, or a bare sha256 hex
    digest (the lists written before xxHash3)."""
    algorithm, _, digest = recorded.rpartition(":")
    algorithm = algorithm or "sha256"
    if algorithm not in HASHERS:
        raise CheckpointError(f"the checksum of {path} is recorded as {algorithm}, which this dlmoe does not know "
                              f"({', '.join(HASHERS)})")
    return path.is_file() and file_checksum(path, algorithm) == f"{algorithm}:{digest}"


def folder_checksums(folder: Path) -> dict[str, str]:
    """The checksum list of every file under ``folder``, by relative path."""
    sums = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKSUM_FILE:
            sums[str(path.relative_to(folder))] = file_checksum(path)
    return sums


def verify_folder(folder: Path, where: str, ranks: int = 1) -> None:
    """Check that a local checkpoint folder has the checksum lists of its ``ranks`` ranks and every file they name;
    ``CheckpointError`` names the first list or file that is missing or does not match."""
    for rank in range(ranks):
        if not (folder / f"{CHECKSUM_FILE}.rank{rank}").is_file():
            raise CheckpointError(f"checkpoint {where}: {CHECKSUM_FILE}.rank{rank} is missing (rank {rank} of "
                                  f"{ranks} did not finish writing it)")
    for sums_file in sorted(folder.glob(f"{CHECKSUM_FILE}.rank*")):
        for name, digest in json.loads(sums_file.read_text()).items():
            if not checksum_matches(folder / name, digest):
                raise CheckpointError(f"checkpoint {where}: {name} is missing or does not match {sums_file.name}")


def find_checkpoints(run: storage.Location) -> list[FoundCheckpoint]:
    """Every checkpoint in the run folder ``run``, newest first."""
    if not storage.exists(run):
        return []
    found = []
    prefix = run.path.rstrip("/") + "/"
    for state_file, _ in storage.list_files(run, (STATE_FILE,)):
        relative = state_file.path[len(prefix):].rsplit("/", 1)[0]
        if "/" in relative or not relative.startswith(FOLDER_PREFIX):
            continue
        state = CheckpointState.from_json(storage.read_bytes(state_file), state_file.uri)
        found.append(FoundCheckpoint(state.step, run.child(relative), state))
    return sorted(found, key=lambda f: (f.step, f.location.path), reverse=True)


def folder_name(step: int) -> str:
    """A new checkpoint folder's name: the step, then the UTC time (a run that reaches a step again after a restart
    writes a folder of its own)."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{FOLDER_PREFIX}step{step:08d}_{stamp}.{int(now % 1 * 1e6):06d}"


def write(engine: Any, state: CheckpointState, rank: int, target: storage.Location,
          gather: Callable[[str], list[str]]) -> list[str]:
    """Write this rank's part of the checkpoint ``target``, every rank together; returns what went wrong on each
    rank (``''`` where nothing did). ``gather`` shares a value with every rank (``all_gather_object``).

    Each rank saves its files in a fresh local folder and copies them to ``target``; rank 0's state file goes last,
    once every rank's files are there, so a folder ``find_checkpoints`` lists is whole. A failed write (storage
    refusing writes, a full disk) leaves the checkpoints before it as they were.
    """
    folder = Path(tempfile.mkdtemp(prefix="dlmoe-ckpt-"))

    def part() -> None:
        engine.save_checkpoint(str(folder), tag=TAG)
        if rank == 0:
            (folder / STATE_FILE).write_text(state.to_json())
        sums = folder_checksums(folder)
        (folder / f"{CHECKSUM_FILE}.rank{rank}").write_text(json.dumps(sums, indent=1))
        storage.upload(folder, target, skip=(STATE_FILE,))

    def attempt(op: Callable[[], None]) -> str:
        try:
            op()
        except (OSError, RuntimeError, DlmoeError) as exc:  # torch.save reports a failed write as RuntimeError
            return f"rank {rank}: {exc}"
        return ""

    try:
        errors = gather(attempt(part))
        if any(errors):
            return errors
        published = attempt(lambda: storage.upload(folder / STATE_FILE, target.child(STATE_FILE))) if rank == 0 else ""
        return [gather(published)[0], *errors[1:]]
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a local scratch folder: what is left of it is of no use


def load(engine: Any, found: FoundCheckpoint) -> CheckpointState:
    """Restore weights, optimizer and schedule from a checkpoint that verifies; return its state."""
    from ray.train import Checkpoint

    checkpoint = Checkpoint(path=found.location.path, filesystem=found.location.fs)
    with checkpoint.as_directory() as directory:
        folder = Path(directory)
        if not (folder / STATE_FILE).is_file():
            raise CheckpointError(f"checkpoint {found.location.uri} has no {STATE_FILE}")
        state = CheckpointState.from_json((folder / STATE_FILE).read_text(), found.location.child(STATE_FILE).uri)
        verify_folder(folder, found.location.uri, int(state.shape.get("parallel.num_workers", 1)))
        load_path, _ = engine.load_checkpoint(str(folder), tag=TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {found.location.uri} holds no DeepSpeed state under tag '{TAG}'")
    return state


def resume(engine: Any, job: JobConfig) -> CheckpointState | None:
    """Load the newest checkpoint of the job's run that verifies (a broken one is skipped with a warning) and
    return its state, counted as one more restart; ``None`` for a run without checkpoints.

    Scanning the run folder rather than asking ``ray.train.get_checkpoint`` also finds a checkpoint Ray had not
    registered when a worker died just after reporting it, and those of an earlier launch of the same run name.
    """
    for found in find_checkpoints(run_folder(job)):
        try:
            state = load(engine, found)
        except CheckpointError as exc:
            warnings.warn(f"skipping a checkpoint that does not verify: {exc}", stacklevel=2)
            continue
        check_resumable(job, state, found.location.uri)
        return dataclasses.replace(state, restarts=state.restarts + 1, config_hash=job.config_hash())
    return None


def check_resumable(job: JobConfig, state: CheckpointState, where: str) -> None:
    """Refuse to resume from a checkpoint whose settings ``job`` would break, naming the changed keys."""
    changed = state.changes(job)
    if changed:
        raise ConfigError(f"run '{job.run_name}' cannot resume: its checkpoint (step {state.step}) was made with "
                          f"other settings ({'; '.join(changed)}); keep them or use a new run_name", key="run_name",
                          source=where)


class RunLock:
    """The run folder's lock, held by the driver that trains the run.

    ``dlmoe_run.lock`` names its holder (host, pid, start) and carries a heartbeat the holder rewrites every
    quarter of ``checkpoint.lock_timeout_s``. A launch that finds a lock whose heartbeat is fresh is refused, naming
    the holder. A lock whose holder is gone — a process of this host that no longer exists, or a heartbeat older than
    the timeout (a driver killed on another node) — is taken over; one whose heartbeats have only just stopped is
    waited on until it is one or the other, so a relaunch right after a crash goes ahead. Object stores have no
    create-if-absent, so two launches in the same second can both pass the check: the lock guards against the
    mistakes people make (a second ``dlmoe train``, a job submitted twice), not against a deliberate race.
    """

    def __init__(self, job: JobConfig, clock: Any = time.time) -> None:
        self.job, self.clock = job, clock
        self.location = run_folder(job).child(LOCK_FILE)
        self.timeout = job.checkpoint.lock_timeout_s
        self.token = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.stop = threading.Event()
        self.beating: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        if not storage.exists(self.location):
            return None
        try:
            found: dict[str, Any] = json.loads(storage.read_bytes(self.location))
            return found
        except ValueError:
            return {}  # a lock being written, or damaged: its holder is unknown, its heartbeat stale

    def _gone(self, found: dict[str, Any]) -> bool:
        """Whether the holder of ``found`` is certainly gone: its heartbeat is past the timeout, or it was a process
        of this host that no longer exists."""
        if self.clock() - float(found.get("heartbeat", 0.0)) > self.timeout:
            return True
        if found.get("host") == self.holder["host"] and isinstance(found.get("pid"), int):
            if found["pid"] == os.getpid():
                return False  # this process holds it for another run launch
            try:
                os.kill(found["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> None:
        """Take the lock, or raise ``ConfigError`` (key ``run_name``) naming the driver that holds it."""
        beat = self.timeout / 4
        while True:
            found = self._read()
            if found is None or self._gone(found):
                break
            age = self.clock() - float(found.get("heartbeat", 0.0))
            if age <= 2 * beat:
                raise ConfigError(f"run '{self.job.run_name}' is being trained by {found.get('host')} pid "
                                  f"{found.get('pid')} since {found.get('started')} (its lock {self.location.uri} "
                                  f"was renewed {age:.0f} s ago); wait for it to end or use another run_name",
                                  key="run_name")
            time.sleep(min(beat, self.timeout - age + 0.1))  # heartbeats have stopped: gone soon, or back
        self._write()
        self.beating = threading.Thread(target=self._beat, name="dlmoe-run-lock", daemon=True)
        self.beating.start()

    def _write(self) -> None:
        storage.write_bytes(self.location, json.dumps({**self.holder, "heartbeat": self.clock()}).encode())

    def _beat(self) -> None:
        while not self.stop.wait(self.timeout / 4):
            try:
                self._write()
            except Exception as exc:  # a storage hiccup must not end training; the next beat tries again
                warnings.warn(f"could not renew the run lock {self.location.uri}: {exc}", stacklevel=1)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still ours)."""
        self.stop.set()
        if self.beating is not None:
            self.beating.join()
        found = self._read()
        if found is not None and found.get("token") == self.token:
            storage.delete(self.location)
