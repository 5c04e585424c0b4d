"""One prepared run of dlmoe's GPU path on a device machine with one GPU: every step under a hard time limit, every
result as JSON under the output folder. ``--smoke`` runs the same plan on this CPU at toy sizes, without installing.

Steps, in order (a failed or timed-out step is recorded and the next one runs):
  env       what the machine is: python, the GPU and driver (nvidia-smi), torch and its CUDA build;
  install   a CUDA torch matching the driver (the image's when it has one; else ``pip install torch==2.13.*``,
            whose size and time are recorded), then what dlmoe needs beyond the image, unpacked from the bundle
            ``bench/gpu_bundle.sh`` prepares (nothing outside the device machine can be reached);
  tests     (a) the unit tests with a CUDA variant (tests/unit/test_cuda.py) and the CPU tests of the same code
            (model, MoE block, objective) under the machine's torch; junit XML to tests.xml;
  gpu_step  (b) bench/gpu_step.py: MFU of the ~1.5B cut through the stack and a plain autocast loop;
  train     (c) ``dlmoe train jobs/tiny.yaml parallel.use_gpu=true`` on one GPU through Ray Train (NCCL), to the
            end, export included (tracking off: MLflow is not on the image and is no part of the GPU path);
  sampler   (d) bench/sampler.py decoding on the GPU.

Files under the output folder (the device tool brings back at most 8): suite.json (the machine, the install, and
per step its command, exit status, seconds, limit and the end of its log), tests.xml, gpu_step.json, train.json
(``dlmoe train --summary-json``), sampler.json and logs.txt (every step's log, each cut to its last 256 KiB).

On the device machine, from the repository root, after ``bash bench/gpu_bundle.sh`` here:
    run(command="python3 bench/gpu_suite.py", carry=["build/gpu_bundle"], timeout_s=600)
The CPU dry run of the whole plan (toy sizes, no install; prints where it wrote):
    .venv/bin/python bench/gpu_suite.py --smoke [--out DIR] [--steps tests,gpu_step,...]
and of the bundle too, made for this machine's Python: ``bash bench/gpu_bundle.sh 3.11 /tmp/b`` then
``--smoke --bundle /tmp/b``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("install", "tests", "gpu_step", "train", "sampler")
# Hard limits in seconds: together with the env probe they stay inside one device call (600 s), so that the
# machine's start plus this run fit in about 12 of the session's 15 device minutes.
LIMITS_S = {"install": 45, "tests": 90, "gpu_step": 150, "train": 200, "sampler": 70}
TORCH_INSTALL_S = 300  # only where the machine has no CUDA torch: a CUDA build and its libraries are ~4 GB
DEADLINE_S = 585
LOG_KEEP = 256 * 1024
TORCH_PIN = "torch==2.13.*"  # pyproject.toml's pin; PyPI's Linux build of it links CUDA 13
ENV_PROBE = """
import json, os, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
        "cpus": os.cpu_count()}
try:
    import torch
except ImportError as exc:
    info["torch_error"] = str(exc)
else:
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                torch_dir=os.path.dirname(torch.__file__))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count)
print(json.dumps(info))
"""
IMPORT_PROBE = """
import json, deepspeed, omegaconf, ray, torch, dlmoe.cli
print(json.dumps({"ray": ray.__version__, "deepspeed": deepspeed.__version__, "omegaconf": omegaconf.__version__,
                  "torch": torch.__version__}))
"""


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def run_step(cmd: list[str], limit_s: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    """``cmd`` in its own process group, killed whole (TERM, then KILL) when it outlives ``limit_s``."""
    started = time.perf_counter()
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    return {"cmd": cmd, "rc": rc, "ok": rc == 0 and not timed_out, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - started, 1), "limit_s": limit_s}


def kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, sig)


def log_tail(log: Path, chars: int) -> str:
    return log.read_bytes()[-chars:].decode(errors="replace") if log.exists() else ""


def probe(python: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([python, "-c", ENV_PROBE], env=env, capture_output=True, text=True, timeout=120)
    info: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {"probe_error": out.stderr[-2000:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        header = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        info["driver_cuda"] = next((line.split("CUDA Version:")[1].split()[0] for line in header.splitlines()
                                    if "CUDA Version:" in line), None)
    return info


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke: bool = args.smoke
        self.bundle: Path | None = args.bundle
        self.steps: list[str] = args.steps
        self.out = Path(args.out)
        self.work = Path(tempfile.mkdtemp(prefix="dlmoe-gpu-suite-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.python = sys.executable
        # A fixed place, so that DeepSpeed's JIT-built ops (cached by source path) survive a rerun.
        self.site = ROOT / "build" / "gpu_site"
        self.started = time.perf_counter()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "platform"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.smoke:
            # This CPU is shared: one torch thread per process keeps the dry run from oversubscribing it.
            self.env["OMP_NUM_THREADS"] = "1"
        self.report: dict[str, Any] = {"mode": "smoke" if self.smoke else "device", "limits_s": LIMITS_S,
                                       "steps": {}}

    def left_s(self) -> float:
        return DEADLINE_S - (time.perf_counter() - self.started)

    def step(self, name: str, *commands: list[str], limit_s: float | None = None) -> dict[str, Any]:
        """Run ``commands`` one after the other under one time limit (the step's, shrunk to the time left)."""
        log = self.logs / f"{name}.log"
        result: dict[str, Any] = {"ok": True, "seconds": 0.0, "runs": []}
        started = time.perf_counter()
        step_limit = limit_s or LIMITS_S[name]
        for cmd in commands:
            limit = min(step_limit - (time.perf_counter() - started), self.left_s())
            if limit < 5:
                result.update(ok=False, error=f"no time left for {cmd[:3]} (step limit {step_limit} s, "
                                              f"suite deadline {DEADLINE_S} s)")
                break
            run = run_step(cmd, limit, self.env, log)
            result["runs"].append(run)
            if not run["ok"]:
                result["ok"] = False
                break
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["log_tail"] = log_tail(log, 3000)
        return result

    # -- the steps ---------------------------------------------------------------------------------------------

    def install(self) -> dict[str, Any]:
        info: dict[str, Any] = {"ok": True}
        if self.smoke and self.bundle is None:
            return {**info, "skipped": "smoke: nothing is installed"}
        env_info = self.report["env"]
        if self.smoke:
            info["torch"] = {"source": "smoke: this machine's", "version": env_info.get("torch"), "seconds": 0.0,
                             "size_mb": 0.0}
        elif env_info.get("cuda_available"):
            info["torch"] = {"source": "image", "version": env_info["torch"], "cuda": env_info["torch_cuda"],
                             "driver_cuda": env_info.get("driver_cuda"), "seconds": 0.0,
                             "size_mb": round(folder_mb(Path(env_info["torch_dir"])), 1)}
        else:
            target = self.work / "torch-site"
            run = self.step("install", [self.python, "-m", "pip", "install", "--quiet", "--no-cache-dir",
                                        "--target", str(target), TORCH_PIN], limit_s=TORCH_INSTALL_S)
            info["torch"] = {"source": f"pip install {TORCH_PIN}", "seconds": run["seconds"], "ok": run["ok"],
                             "size_mb": round(folder_mb(target), 1) if target.exists() else 0.0,
                             "log_tail": run["log_tail"]}
            if not run["ok"]:
                info.update(ok=False, error="no CUDA torch on this machine, and installing one failed (see log_tail)")
                return info
            self.env["PYTHONPATH"] = os.pathsep.join([str(target), self.env["PYTHONPATH"]])
            self.report["env"] = probe(self.python, self.env)
        bundle = self.bundle or ROOT / "build" / "gpu_bundle"
        packed = bundle / "site.tar.xz"
        if not packed.is_file():
            info.update(ok=False, error=f"{packed} is missing: run `bash bench/gpu_bundle.sh` on the development "
                                        "machine and carry build/gpu_bundle with the call")
            return info
        started = time.perf_counter()
        shutil.rmtree(self.site, ignore_errors=True)
        with tarfile.open(packed) as tar:
            tar.extractall(self.site, filter="tar")
        packages = (bundle / "packages.txt").read_text().split()
        info["bundle"] = {"packages": packages, "packed_mb": round(packed.stat().st_size / 2**20, 1),
                          "unpacked_mb": round(folder_mb(self.site), 1),
                          "seconds": round(time.perf_counter() - started, 1)}
        self.env["PYTHONPATH"] = os.pathsep.join([self.env["PYTHONPATH"], str(self.site)])
        # DeepSpeed's ops, JIT-built from the bundle's sources, go to a folder of ours: a step killed mid-build
        # leaves its lock there, not in the user's torch_extensions cache (where every later build would wait on it).
        extensions = ROOT / "build" / "gpu_torch_extensions"
        for stale in extensions.glob("*/*/lock"):
            stale.unlink()
        self.env["TORCH_EXTENSIONS_DIR"] = str(extensions)
        check = subprocess.run([self.python, "-c", IMPORT_PROBE], cwd=ROOT, env=self.env, capture_output=True,
                               text=True, timeout=120)
        if check.returncode != 0:
            info.update(ok=False, error=f"dlmoe does not import with the bundle: {check.stderr[-3000:]}")
        else:
            info["versions"] = json.loads(check.stdout.strip().splitlines()[-1])
        return info

    def tests(self) -> dict[str, Any]:
        files = ["tests/unit/test_cuda.py"]
        if not self.smoke:
            files += ["tests/unit/test_moe.py", "tests/unit/test_model.py", "tests/unit/test_objective.py"]
        xml = self.out / "tests.xml"
        result = self.step("tests", [self.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                                     f"--junitxml={xml}", *files])
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            result["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            result["cuda_tests"] = {case.get("name"): ("skipped" if case.find("skipped") is not None else
                                                       "failed" if case.find("failure") is not None
                                                       or case.find("error") is not None else "passed")
                                    for case in suite.iter("testcase") if case.get("classname", "").endswith(
                                        "test_cuda")}
        return result

    def gpu_step(self) -> dict[str, Any]:
        cmd = [self.python, "bench/gpu_step.py", "--json", str(self.out / "gpu_step.json")]
        return self.step("gpu_step", cmd + (["--smoke"] if self.smoke else []))

    def train(self) -> dict[str, Any]:
        dlmoe = [self.python, "-m", "dlmoe.cli"]
        summary = self.out / "train.json"
        cmd = [*dlmoe, "train", "jobs/tiny.yaml", "tracking.enabled=false", f"checkpoint.storage={self.work}/runs"]
        if not self.smoke:
            result = self.step("train", [*cmd, "parallel.use_gpu=true", "--summary-json", str(summary)])
        else:
            # A toy run of the same launch path on a corpus of a few files, tokenized first.
            corpus = self.work / "corpus"
            corpus.mkdir()
            for i, source in enumerate(sorted((Path(json.__file__).parent).glob("*.py"))):
                (corpus / f"{i}.txt").write_text(source.read_text())
            data = self.work / "data"
            result = self.step("train", [*dlmoe, "tokenize", "--input", str(corpus), "--output", str(data),
                                         "--seq-len", "64"],
                               [*cmd, "model.flavor=debug", "train.steps=4", "train.warmup_steps=1",
                                "checkpoint.every_steps=2", "data.seq_len=64", "data.global_batch_size=4",
                                "data.micro_batch_size=2", "monitor.expert_load_every=2", f"data.uri={data}",
                                "--summary-json", str(summary)])
        if summary.is_file():
            facts = json.loads(summary.read_text())
            export = Path(facts.get("export") or "")
            result["export_files"] = sorted(p.name for p in export.iterdir()) if export.is_dir() else []
            result["ok"] = result["ok"] and bool(result["export_files"])
        return result

    def sampler(self) -> dict[str, Any]:
        cmd = [self.python, "bench/sampler.py", "--json", str(self.out / "sampler.json")]
        return self.step("sampler", cmd + (["--smoke"] if self.smoke else ["--device", "cuda"]))

    # -- the whole run -------------------------------------------------------------------------------------------

    def run(self) -> bool:
        self.out.mkdir(parents=True, exist_ok=True)
        self.report["env"] = probe(self.python, self.env)
        if not self.smoke and not self.report["env"].get("nvidia_smi"):
            self.report["env"]["warning"] = "nvidia-smi not found: no GPU driver on this machine"
        for name in STEPS:
            if name not in self.steps:
                continue
            if name != "install" and not self.report["steps"].get("install", {"ok": True})["ok"]:
                self.report["steps"][name] = {"ok": False, "error": "not run: the install step failed"}
                continue
            started = time.perf_counter()
            result = getattr(self, name)()
            result.setdefault("seconds", round(time.perf_counter() - started, 1))
            self.report["steps"][name] = result
            self.write()
        self.report["total_s"] = round(time.perf_counter() - self.started, 1)
        self.write()
        self.print_table()
        return all(step["ok"] for step in self.report["steps"].values())

    def write(self) -> None:
        (self.out / "suite.json").write_text(json.dumps(self.report, indent=2, default=str))
        with (self.out / "logs.txt").open("w") as sink:
            for log in sorted(self.logs.glob("*.log")):
                sink.write(f"===== {log.stem} =====\n{log_tail(log, LOG_KEEP)}\n")

    def print_table(self) -> None:
        env = self.report["env"]
        print(f"\n{self.report['mode']} run on {env.get('device') or 'CPU'}: python {env.get('python')}, torch "
              f"{env.get('torch')} (CUDA {env.get('torch_cuda')}), driver {env.get('nvidia_smi', '-')}; "
              f"{self.report['total_s']} s; files in {self.out}\n")
        print("| step | ok | seconds | limit s | headline |")
        print("|---|---|---:|---:|---|")
        for name, step in self.report["steps"].items():
            print(f"| {name} | {'yes' if step['ok'] else 'NO'} | {step.get('seconds', 0)} | {LIMITS_S[name]} | "
                  f"{self.headline(name, step)} |")

    def headline(self, name: str, step: dict[str, Any]) -> str:
        if "error" in step:
            return str(step["error"])[:200]
        if any(run["timed_out"] for run in step.get("runs", [])):
            return "timed out"
        path = {"gpu_step": "gpu_step.json", "train": "train.json", "sampler": "sampler.json"}.get(name)
        facts = json.loads((self.out / path).read_text()) if path and (self.out / path).is_file() else {}
        if name == "install":
            if "skipped" in step:
                return str(step["skipped"])
            torch, bundle = step["torch"], step.get("bundle", {})
            return (f"torch {torch.get('version', '?')} from {torch['source']} ({torch['size_mb']} MB, "
                    f"{torch['seconds']} s); bundle {bundle.get('packed_mb')} MB unpacked in {bundle.get('seconds')} s")
        if name == "tests":
            return f"{step.get('counts')}"
        if name == "gpu_step" and facts:
            stack, plain = facts["stack"], facts["plain"]
            return (f"stack {stack['tflops']:.1f} TFLOP/s (MFU vs nominal {stack['mfu_nominal']}), plain "
                    f"{plain['tflops']:.1f}; stack/plain {facts['stack_over_plain']:.3f}")
        if name == "train" and facts:
            return (f"{facts.get('final_step')} steps, {facts.get('tokens_per_second', 0):.0f} tok/s, "
                    f"export {step.get('export_files')}")
        if name == "sampler" and facts:
            return "; ".join(f"{r['row']}: x{r['speedup_batch1']:.2f}" for r in facts["rows"][3:6])
        return f"exit {step.get('runs', [{}])[-1].get('rc')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="dry-run the plan on this CPU at toy sizes")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--bundle", type=Path, help="the folder bench/gpu_bundle.sh wrote (default: build/gpu_bundle); "
                        "with --smoke, install it too (a check of the bundle on a CPU machine of the same Python)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)} (default: all, in that order)")
    args = parser.parse_args()
    args.steps = args.steps.split(",")
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if not args.out:
        if not args.smoke:
            parser.error("no output folder: set OUT (the device tool does) or pass --out DIR")
        args.out = tempfile.mkdtemp(prefix="dlmoe-gpu-suite-out-")
    sys.exit(0 if Suite(args).run() else 1)


if __name__ == "__main__":
    main()
