"""The ``dlmoe`` command: help, info figures, a short single-process training run, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dlmoe.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, check=False)


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("info", "train", "generate"))


def test_info_json_release_figures() -> None:
    result = run_cli("info", "--flavor", "llada-moe-7b-a1b", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total_params"] == pytest.approx(7.36e9, rel=2e-3)
    assert report["active_params"] == pytest.approx(1.4e9, rel=0.01)
    assert report["config"]["num_experts"] == 64
    assert report["config"]["vocab_size"] == 157184
    assert "mask_token_id" not in report["config"]
    assert report["mask_token_id"] == 156895


def test_info_unknown_flavor_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--flavor", "nope"]) == 2
    assert "unknown flavor 'nope'" in capsys.readouterr().err


def test_train_bad_override_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "model.num_experts_per_tok=99"]) == 2
    err = capsys.readouterr().err
    assert "model.num_experts_per_tok" in err and "exceeds" in err
