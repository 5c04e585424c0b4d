"""Running ``dlmoe`` command lines for the bad-input tests: many in one child process (``run_batch``: the imports are
paid once) or each as its own ``python -m dlmoe.cli`` (``run_alone``). Either way the stderr checked is what a user
would see, tracebacks included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The child: each command line through dlmoe.cli.main, its stdout and stderr captured apart; an exception main lets
# through is printed as the interpreter would print it (a traceback, exit status 1), argparse's exit kept.
_BATCH = """
import contextlib, io, json, sys, traceback
from dlmoe.cli import main
cases = json.loads(sys.stdin.read())
results = {}
for name, argv in cases.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print("\\nRESULTS " + json.dumps(results))
"""


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    # A bad-input case must not join a Ray cluster or an MLflow server the machine happens to have.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def run_batch(cases: dict[str, list[str]], cwd: Path, timeout: float = 300) -> tuple[dict[str, Outcome], str]:
    """Every command line of ``cases`` in one child process; their outcomes by name, and the child's own stderr
    (which must hold no traceback either: a logging handler writes to the real stream)."""
    proc = subprocess.run([sys.executable, "-c", _BATCH], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=cwd, env=_env(), timeout=timeout, check=False)
    assert proc.returncode == 0 and "\nRESULTS " in proc.stdout, f"the batch child failed:\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.rpartition("\nRESULTS ")[2])
    return {name: Outcome(**r) for name, r in results.items()}, proc.stderr


def start_alone(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``python -m dlmoe.cli ARGV`` started (``finish`` collects it), so that several run at once."""
    return subprocess.Popen([sys.executable, "-m", "dlmoe.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env())


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> Outcome:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{proc.args!r} ran past {timeout} s:\n{stderr[-3000:]}") from None
    return Outcome(proc.returncode, stdout, stderr)
