"""The errors dlmoe raises for user mistakes.

Every error names what is wrong and where: the config key and file, the shard, the URI or the resource.
``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class DlmoeError(Exception):
    """Base of every error dlmoe raises on purpose."""


class ConfigError(DlmoeError, ValueError):
    """A configuration value is unknown, mistyped or inconsistent.

    ``key`` is the dotted config key (``model.num_experts``) and ``source`` the file or override it came from.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = []
        if key:
            where.append(f"key '{key}'")
        if source:
            where.append(f"in {source}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class ModelInputError(DlmoeError, ValueError):
    """Inputs handed to the model do not fit its configuration (token ids, sequence length, shapes)."""


class DataError(DlmoeError):
    """A dataset, shard or storage location is missing, corrupt or does not match the job."""


class CheckpointError(DlmoeError):
    """A checkpoint is missing, corrupt or does not match the job."""


class ExportError(DlmoeError):
    """A model cannot be exported or loaded in the Hugging Face format."""


class GenerationError(DlmoeError, ValueError):
    """Generation settings or prompts that cannot be decoded (lengths, schedule, context)."""


class WorkerPreempted(DlmoeError):
    """A worker got SIGTERM; its checkpoint is saved and the worker group stops, for Ray Train to restart."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (storage refusing writes, a full disk) under
    ``checkpoint.on_write_error=fail``; not retried, since a restarted worker group would meet it again."""
