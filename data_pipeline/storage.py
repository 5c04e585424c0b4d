"""Storage URIs: the one place that turns a location into a pyarrow filesystem and a path (DESIGN.md §3).

A URI is a local path (``/data/x``, ``runs/x``, ``file:///data/x``) or ``s3://bucket/prefix``. S3 honours
``endpoint_url`` (the job's ``data`` config) over ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, any
S3 API), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and credentials from the standard AWS chain
(environment, shared files, instance or pod identity) — no code elsewhere builds S3 clients.

Every operation goes through ``retrying``: transient failures (connection refused or reset, timeouts, throttling,
5xx) are retried a bounded number of times with exponential backoff, then raised as a ``DataError`` naming the
URI; permanent ones (no such bucket or key, access denied) are raised at once.
"""

from __future__ import annotations

import gc
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from dlmoe.errors import DataError

T = TypeVar("T")

ATTEMPTS = 4
BASE_DELAY_S = 0.25
_TRANSIENT = ("connection", "timed out", "timeout", "throttl", "slowdown", "slow down", "service unavailable",
              "internal error", "503", "500", "502", "504", "reset by peer", "broken pipe", "temporarily")
_PERMANENT = ("nosuchbucket", "bucket does not exist", "access denied", "accessdenied", "forbidden",
              "invalidaccesskeyid", "signaturedoesnotmatch")


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI as the user wrote it (for messages)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def child(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), f"{self.uri.rstrip('/')}/{name}")


def release_s3() -> None:
    """Shut pyarrow's S3 subsystem down before the interpreter does; once, as a process ends (no S3 location can be
    used after it). Left to pyarrow's own exit handler, the AWS SDK's threads can be torn down while still running
    — seen: ``dlmoe data verify s3://…`` printing its result, then aborting (SIGABRT, "terminate called without an
    active exception") in about 1 run of 10 on busy cores, 0 of 40 with this call."""
    gc.collect()  # filesystems held only by reference cycles are released first
    pafs.finalize_s3()


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint in force: the explicit one, else the standard AWS environment variables."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def resolve(uri: str, *, endpoint_url: str | None = None) -> Location:
    """Turn ``uri`` into a ``Location``; an unsupported scheme or a malformed S3 URI is a ``DataError``."""
    if not uri:
        raise DataError("empty storage URI")
    if uri.startswith("s3://"):
        bucket_and_key = uri[len("s3://"):].strip("/")
        if not bucket_and_key or bucket_and_key.startswith("/"):
            raise DataError(f"malformed S3 URI '{uri}': expected s3://bucket/prefix")
        endpoint = s3_endpoint(endpoint_url)
        options: dict[str, object] = {
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "connect_timeout": 5.0, "request_timeout": 30.0,
            # Our own bounded retries (with the URI in the error) replace the SDK's long default loop.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            options["endpoint_override"] = rest if rest else endpoint
            options["scheme"] = scheme if rest else "https"
        return Location(pafs.S3FileSystem(**options), bucket_and_key, uri)
    if "://" in uri and not uri.startswith("file://"):
        raise DataError(f"unsupported URI scheme in '{uri}': use a local path or s3://bucket/prefix")
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return Location(pafs.LocalFileSystem(), str(Path(local).expanduser().resolve()), uri)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    text = str(exc).lower()
    if any(marker in text for marker in _PERMANENT):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError) and any(m in text for m in _TRANSIENT)


class StorageUnavailable(DataError):
    """Storage that kept failing with transient errors (refused connections, timeouts, 5xx): it may come back."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it wraps (Ray's task errors carry theirs as ``cause``), is a transient
    storage failure: an outage worth waiting out rather than a missing object or a refusal."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StorageUnavailable) or (not isinstance(current, DataError) and _is_transient(current)):
            return True
        cause = getattr(current, "cause", None)
        pending += [current.__cause__, current.__context__, cause if isinstance(cause, BaseException) else None]
    return False


def retrying(op: Callable[[], T], *, uri: str, what: str, attempts: int = ATTEMPTS,
             base_delay: float = BASE_DELAY_S) -> T:
    """Run ``op``; retry transient storage failures with exponential backoff, then raise ``DataError``."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except DataError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                raise DataError(f"cannot {what} {uri}: {_describe(exc)}") from exc
            if attempt == attempts:
                raise StorageUnavailable(f"cannot {what} {uri}: still failing after {attempts} attempts "
                                         f"({_describe(exc)})") from exc
            time.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        return f"the bucket does not exist ({text})"
    return text


def exists(loc: Location) -> bool:
    """Whether the object or folder exists; a missing S3 bucket is an error, not a missing object."""
    info = retrying(lambda: loc.fs.get_file_info(loc.path), uri=loc.uri, what="inspect")
    if info.type != pafs.FileType.NotFound:
        return True
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        bucket_info = retrying(lambda: loc.fs.get_file_info(bucket), uri=loc.uri, what="inspect")
        if bucket_info.type == pafs.FileType.NotFound:
            raise DataError(f"cannot use {loc.uri}: the bucket '{bucket}' does not exist")
    return False


def read_bytes(loc: Location) -> bytes:
    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as stream:
            return bytes(stream.read())

    return retrying(read, uri=loc.uri, what="read")


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object. S3 puts are atomic; a local file is written beside and renamed into place."""
    def write() -> None:
        if loc.is_s3:
            with loc.fs.open_output_stream(loc.path) as stream:
                stream.write(data)
            return
        loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
        staging = f"{loc.path}.partial-{os.getpid()}"
        with loc.fs.open_output_stream(staging) as stream:
            stream.write(data)
        loc.fs.move(staging, loc.path)

    retrying(write, uri=loc.uri, what="write")


def delete(loc: Location) -> None:
    """Remove a file, or a folder and everything under it (nothing when neither exists)."""
    def remove() -> None:
        kind = loc.fs.get_file_info(loc.path).type
        if kind == pafs.FileType.Directory:
            loc.fs.delete_dir(loc.path)
        elif kind != pafs.FileType.NotFound:
            loc.fs.delete_file(loc.path)

    retrying(remove, uri=loc.uri, what="delete")


def upload(local: Path, loc: Location, skip: tuple[str, ...] = ()) -> None:
    """Copy a local file, or every file of a local folder but those named in ``skip``, to ``loc``."""
    local_fs = pafs.LocalFileSystem()

    def copy() -> None:
        if local.is_file():
            pafs.copy_files(str(local), loc.path, source_filesystem=local_fs, destination_filesystem=loc.fs)
            return
        loc.fs.create_dir(loc.path, recursive=True)
        for path in sorted(local.rglob("*")):
            if path.is_file() and path.name not in skip:
                relative = path.relative_to(local).as_posix()
                loc.fs.create_dir(posixpath.dirname(posixpath.join(loc.path, relative)), recursive=True)
                pafs.copy_files(str(path), posixpath.join(loc.path, relative), source_filesystem=local_fs,
                                destination_filesystem=loc.fs)

    retrying(copy, uri=loc.uri, what="write")


def list_files(loc: Location, suffixes: tuple[str, ...] = ()) -> list[tuple[Location, int]]:
    """Files under ``loc`` (recursively; ``loc`` itself when it is a file) with their sizes, sorted by path."""
    def listing() -> list[pafs.FileInfo]:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{loc.path} does not exist")
        return list(loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)))

    infos = retrying(listing, uri=loc.uri, what="list")
    files = sorted((i for i in infos if i.type == pafs.FileType.File and (not suffixes or i.path.endswith(suffixes))),
                   key=lambda i: i.path)
    out = []
    for info in files:
        relative = posixpath.relpath(info.path, loc.path) if info.path != loc.path else ""
        out.append((loc.child(relative) if relative else loc, int(info.size or 0)))
    return out
