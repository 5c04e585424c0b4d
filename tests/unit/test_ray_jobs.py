"""Which Ray cluster `dlmoe train` and the Ray Data jobs join: the one in force, or a fresh local one when the
cluster this machine last recorded has gone (there `ray.init()` would wait minutes on it)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from data_pipeline import ray_jobs
from data_pipeline.ray_jobs import ray_address


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def test_nothing_recorded_lets_ray_decide(record: Path) -> None:
    assert ray_address() is None


def test_a_recorded_cluster_that_answers_is_joined(record: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        record.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert ray_address() is None


def test_a_recorded_cluster_that_is_gone_gives_a_local_one(record: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    record.write_text(f"127.0.0.1:{port}")
    with pytest.warns(UserWarning, match=rf"127.0.0.1:{port}\) does not answer; starting a local one"):
        assert ray_address() == "local"


def test_ray_address_in_the_environment_wins(record: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record.write_text("127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert ray_address() is None


def test_the_ray_data_jobs_start_a_local_ray_when_the_recorded_one_is_gone(record: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        record.write_text(f"127.0.0.1:{closed.getsockname()[1]}")
    joined: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **_: joined.append(address))
    with pytest.warns(UserWarning, match="does not answer"):
        ray_jobs.ensure_ray()
    assert joined == ["local"]
