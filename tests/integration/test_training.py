"""Distributed training on a local Ray (2 CPUs): the default job end to end through the CLI, one worker and two
workers with expert parallelism 2 on the same losses, a killed worker that leaves the final weights bit-identical,
and resuming a run by its name."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from data_pipeline import storage
from data_pipeline.tokenize import TokenizeSpec, run_tokenize
from data_pipeline.tokenizers import byte_tokenizer, load_tokenizer
from dlmoe.checkpointing import LOCK_FILE, find_checkpoints
from dlmoe.cli import main
from dlmoe.config import load_job_config
from dlmoe.errors import ConfigError, DataError, DlmoeError
from dlmoe.export import load_pretrained
from dlmoe.train.driver import TrainingResult, run_training
from dlmoe.train.validation import Validation

pytestmark = pytest.mark.usefixtures("ray_local")
# The equalities below (1 worker = 2, resume = uninterrupted) hold to rounding; the batch, lr and noise are pinned to
# the regime they were written for (the default job's lr 5e-3 on 16 rows grows 1-vs-2-worker rounding past 1e-4).
SHORT = ["train.steps=6", "train.warmup_steps=2", "checkpoint.every_steps=2", "export.enabled=false",
         "tracking.enabled=false", "train.lr=3e-3", "data.global_batch_size=8", "objective.stratified_t=false"]


def train(storage: Path, *overrides: str) -> TrainingResult:
    return run_training(load_job_config(None, [*SHORT, f"checkpoint.storage={storage}", *overrides]), progress=False)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingResult]:
    storage = tmp_path_factory.mktemp("runs")
    return storage, train(storage, "run_name=ep2", "parallel.num_workers=2", "parallel.ep_size=2")


def test_default_job_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # As `make train` runs it: storage relative to the working directory (Ray workers run elsewhere).
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "summary.json"
    assert main(["train", "train.steps=8", "train.warmup_steps=2", "checkpoint.storage=runs",
                 "--no-progress", "--summary-json", str(summary)]) == 0
    tmp_path = tmp_path / "runs"
    out = capsys.readouterr().out
    assert "num_workers: 2" in out and "ep_size: 2" in out  # the resolved config is printed first
    report = json.loads(summary.read_text())
    assert report["run_name"] == "debug" and report["final_step"] == 8 and len(report["losses"]) == 8
    assert report["losses"][-1] < report["losses"][0] and report["restarts"] == 0
    assert len(report["params_sha256"]) == 64 and report["checkpoints"]
    # The default corpus was tokenized once under the storage; the final model was exported with its tokenizer.
    assert (tmp_path / "data" / "stdlib-bytes-128" / "manifest.json").is_file()
    exported = load_pretrained(tmp_path / "debug" / "hf")
    assert exported.config.num_experts == 8
    assert load_tokenizer(tmp_path / "debug" / "hf").special.mask == exported.config.mask_token_id
    assert "sample (prompt 'def ')" in out
    # The held-out tenth of the default corpus: its loss at the end, beside a context-free model's.
    assert report["val_losses"][-1][0] == 8 and 0 < report["unigram_baseline"] < math.log(256)
    assert f"validation loss at step 8: {report['val_losses'][-1][1]:.4f} nats/token; a model that ignores " \
           f"context scores {report['unigram_baseline']:.4f}" in out


def test_one_worker_and_two_with_expert_parallelism_give_the_same_losses(
        tmp_path: Path, ep2_run: tuple[Path, TrainingResult]) -> None:
    one = train(tmp_path, "run_name=one", "parallel.num_workers=1", "parallel.ep_size=1")
    _, two = ep2_run
    assert one.final_step == two.final_step == 6
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
    assert len(set(one.losses)) == 6


def test_a_killed_worker_changes_nothing(ep2_run: tuple[Path, TrainingResult]) -> None:
    storage, clean = ep2_run
    faulty = train(storage, "run_name=faulty", "parallel.num_workers=2", "parallel.ep_size=2",
                   "fault_injection.rank=1", "fault_injection.step=3")
    assert faulty.restarts >= 1 and clean.restarts == 0
    assert faulty.params_sha256 == clean.params_sha256
    assert faulty.losses == clean.losses
    assert (storage / "faulty" / "fault_injected").read_text().startswith("rank 1 given kill at step 3")


def test_a_driver_killed_mid_run_is_relaunched_and_resumes(ep2_run: tuple[Path, TrainingResult]) -> None:
    import ray

    runs, clean = ep2_run
    job = ["run_name=driverkill", "parallel.num_workers=2", "parallel.ep_size=2", "fault_injection.rank=1",
           "fault_injection.step=3", "fault_injection.kind=hang"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with (runs / "driverkill.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "dlmoe.cli", "train", *SHORT, f"checkpoint.storage={runs}",
                                   *job, "--no-progress"], env=env, stdout=log, stderr=subprocess.STDOUT)
    mark = runs / "driverkill" / "fault_injected"
    deadline = time.monotonic() + 300
    while not mark.exists():  # rank 1 stands still at step 3, after the checkpoint of step 2
        assert driver.poll() is None and time.monotonic() < deadline, (runs / "driverkill.log").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert (runs / "driverkill" / LOCK_FILE).is_file()  # left behind by the killed driver: taken over below
    assert [found.step for found in find_checkpoints(storage.resolve(str(runs / "driverkill")))] == [2]
    relaunched = train(runs, *job)
    assert relaunched.final_step == 6 and relaunched.restarts >= 1
    assert relaunched.params_sha256 == clean.params_sha256 and relaunched.losses == clean.losses
    assert not (runs / "driverkill" / LOCK_FILE).exists()


def test_relaunch_resumes_and_a_changed_shape_is_refused(tmp_path: Path) -> None:
    first = train(tmp_path, "run_name=again", "parallel.num_workers=1", "parallel.ep_size=1")
    longer = train(tmp_path, "run_name=again", "parallel.num_workers=1", "parallel.ep_size=1", "train.steps=8")
    assert longer.final_step == 8 and longer.restarts == 1
    assert longer.losses[:6] == first.losses
    with pytest.raises(ConfigError, match=r"cannot resume: its checkpoint \(step 8\) was made with other settings "
                                          r"\(.*model\.hidden_size: checkpoint \d+, job 32"):
        train(tmp_path, "run_name=again", "parallel.num_workers=1", "parallel.ep_size=1", "model.hidden_size=32")


def test_gpus_that_do_not_exist_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2 GPU workers requested, the Ray cluster has 0 GPUs"):
        train(tmp_path, "parallel.num_workers=2", "parallel.ep_size=2", "parallel.use_gpu=true")


def test_checkpoint_holds_the_data_position(ep2_run: tuple[Path, TrainingResult]) -> None:
    storage, _ = ep2_run
    states = sorted((json.loads(p.read_text()) for p in (storage / "ep2").glob("checkpoint_*/dlmoe_state.json")),
                    key=lambda s: s["step"])
    assert [s["step"] for s in states][-1] == 6
    last = states[-1]
    batch = load_job_config(None, SHORT).data.global_batch_size
    assert last["sample_in_epoch"] == 6 * batch and last["epoch"] == 0
    assert last["shape"]["parallel.ep_size"] == 2
    assert torch.tensor(last["losses"]).isfinite().all()


def test_sigterm_saves_a_checkpoint_then_the_run_resumes_from_it(ep2_run: tuple[Path, TrainingResult]) -> None:
    storage, clean = ep2_run
    stopped = train(storage, "run_name=sigterm", "parallel.num_workers=2", "parallel.ep_size=2",
                    "fault_injection.rank=1", "fault_injection.step=2", "fault_injection.kind=sigterm")
    # Checkpoints fall every 2 steps; the SIGTERM during step 3 added one at step 3, and the restart resumed from it
    # (only that checkpoint's state records the interruption).
    assert stopped.interruptions == [{"step": 3, "cause": "sigterm"}]
    assert stopped.restarts == 1
    assert stopped.params_sha256 == clean.params_sha256 and stopped.losses == clean.losses
    assert (storage / "sigterm" / "fault_injected").read_text().startswith("rank 1 given sigterm at step 2")


def test_checkpoints_in_s3_survive_a_crash_and_a_corrupt_one_is_passed_over(
        bucket: str, ep2_run: tuple[Path, TrainingResult]) -> None:
    _, clean = ep2_run
    runs = f"s3://{bucket}/runs"
    two = ("run_name=in-s3", "parallel.num_workers=2", "parallel.ep_size=2")
    crashed = run_training(load_job_config(None, [*SHORT, f"checkpoint.storage={runs}", *two, "export.enabled=true",
                                                  "fault_injection.rank=0", "fault_injection.step=3"]),
                           progress=False)
    assert crashed.restarts >= 1 and crashed.params_sha256 == clean.params_sha256
    assert crashed.export == f"{runs}/in-s3/hf"
    assert storage.exists(storage.resolve(f"{runs}/in-s3/hf/config.json"))

    # Damage the newest checkpoint (step 6): relaunching for 2 more steps resumes from the one before (step 4).
    run = storage.resolve(f"{runs}/in-s3")
    [newest] = [found.location for found in find_checkpoints(run) if found.step == 6]
    weights = newest.child("dlmoe").child("mp_rank_00_model_states.pt")
    storage.write_bytes(weights, b"not a checkpoint")
    longer = run_training(load_job_config(None, [*SHORT, f"checkpoint.storage={runs}", *two, "train.steps=8"]),
                          progress=False)
    assert longer.final_step == 8 and longer.losses[:6] == clean.losses


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[None]:
    """A tmpfs of ``size`` bytes mounted at ``folder`` (a disk that fills up); skips where mounting is not allowed."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"a small disk needs mount (root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("policy", ["fail", "continue"])
def test_a_disk_that_fills_up_leaves_the_checkpoint_before_it_resumable(
        policy: str, ep2_run: tuple[Path, TrainingResult]) -> None:
    runs, clean = ep2_run
    # Room for the checkpoint of step 2 and half of the next: each later write runs out of space.
    size = checkpoint_bytes(next((runs / "ep2").glob("checkpoint_step*"))) * 3 // 2
    name = f"diskfull-{policy}"
    job = [f"run_name={name}", "parallel.num_workers=2", "parallel.ep_size=2",
           f"checkpoint.on_write_error={policy}"]
    with small_disk(runs / name, size):
        if policy == "fail":
            with pytest.raises(DlmoeError) as failed:
                train(runs, *job)
            message = str(failed.value)
            assert f"the checkpoint of step 4 could not be written to {runs / name}/checkpoint_step00000004_" in message
            assert "No space left on device" in message and "the checkpoint of step 2 is intact" in message
        else:  # training goes on past the checkpoint of step 4 (a warning); the run cannot end without the last one
            with pytest.raises(DlmoeError, match=r"checkpoint of step 6 could not be written .* the last checkpoint"):
                train(runs, *job)
        assert [found.step for found in find_checkpoints(storage.resolve(str(runs / name)))] == [2]
        assert [p.name[:len("checkpoint_step00000002")] for p in (runs / name).glob("checkpoint_step*")] == \
            ["checkpoint_step00000002"]  # what was written of a failed checkpoint is removed
        if policy == "continue":
            return
        subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(runs / name)], check=True)
        resumed = train(runs, *job)  # room again: the run resumes from step 2 and ends as the clean one
    assert resumed.final_step == 6 and resumed.restarts == 1
    assert resumed.params_sha256 == clean.params_sha256 and resumed.losses == clean.losses


def test_validation_uses_fixed_noise_and_is_the_same_on_one_worker_and_two(tmp_path: Path) -> None:
    held_out = ["train.eval_every=3", f"data.validation={tmp_path / 'data' / 'stdlib-bytes-128'}"]
    one = train(tmp_path, "run_name=val1", "parallel.num_workers=1", "parallel.ep_size=1", "export.enabled=true",
                *held_out)
    two = train(tmp_path, "run_name=val2", "parallel.num_workers=2", "parallel.ep_size=2", *held_out)
    assert [step for step, _ in one.val_losses] == [3, 6] == [step for step, _ in two.val_losses]
    assert [v for _, v in two.val_losses] == pytest.approx([v for _, v in one.val_losses], rel=1e-4)
    assert one.val_losses[1][1] < one.val_losses[0][1]
    # The same weights give the same value every time: the final model, evaluated again here, twice.
    job = load_job_config(None, [*SHORT, f"checkpoint.storage={tmp_path}", *held_out])
    validation = Validation(job, rank=0, world=1, tokenizer_fingerprint=byte_tokenizer().fingerprint)
    model = load_pretrained(tmp_path / "val1" / "hf")
    again = validation.evaluate(model)
    assert again == validation.evaluate(model)
    assert again == pytest.approx(one.val_losses[1][1], rel=1e-6)


def test_a_validation_set_that_does_not_fit_the_job_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_tokenize(TokenizeSpec(output=str(other), seq_len=64), progress=False)
    with pytest.raises(DataError, match=r"other has seq_len 64, the job expects 128 \(data\.seq_len\)"):
        train(tmp_path, "run_name=badval", "train.eval_every=3", f"data.validation={other}")


def test_heldout_validation_keeps_the_best_checkpoint_by_score(tmp_path: Path) -> None:
    import shutil
    import sysconfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "bisect.py", "copy.py", "heapq.py", "shlex.py", "textwrap.py", "typing.py"):
        shutil.copy(stdlib / name, corpus / name)
    data = tmp_path / "data"
    run_tokenize(TokenizeSpec(output=str(data), seq_len=128, inputs=[str(corpus)], validation_fraction=0.4),
                 progress=False)
    # Kept by the *highest* validation loss with num_to_keep=1: whatever the curve, Ray keeps that checkpoint and
    # (for restarts) the newest one, and deletes the others.
    result = train(tmp_path, "run_name=best", "parallel.num_workers=1", "parallel.ep_size=1", f"data.uri={data}",
                   "data.validation=heldout", "train.eval_every=2", "checkpoint.every_steps=2",
                   "checkpoint.num_to_keep=1", "checkpoint.score_attribute=val_loss", "checkpoint.score_order=max")
    assert [step for step, _ in result.val_losses] == [2, 4, 6]
    worst_step, worst = max(result.val_losses, key=lambda item: item[1])
    assert result.best_score == pytest.approx(worst)
    kept = {found.step: found.location.path for found in find_checkpoints(storage.resolve(str(tmp_path / "best")))}
    assert set(kept) == {worst_step, 6}
    assert Path(result.best_checkpoint).name == Path(kept[worst_step]).name


def test_heldout_needs_a_dataset_that_has_one(tmp_path: Path) -> None:
    default = load_job_config(None, [f"checkpoint.storage={tmp_path}"])  # the default corpus has one
    assert default.data.validation == "heldout"
    assert default.validation_uri == f"{tmp_path}/data/stdlib-bytes-128/validation"
    plain = tmp_path / "plain"
    run_tokenize(TokenizeSpec(output=str(plain), seq_len=128), progress=False)
    with pytest.raises(DataError, match=r"has no held-out set .* --validation-fraction"):
        train(tmp_path, "run_name=noheld", f"data.uri={plain}", "data.validation=heldout", "train.eval_every=2")
    with pytest.raises(ConfigError, match=r"checkpoint.every_steps \(3\) must be a multiple of train.eval_every"):
        load_job_config(None, ["train.eval_every=2", f"data.validation={plain}", "checkpoint.every_steps=3",
                               "checkpoint.score_attribute=val_loss"])


def test_a_validation_set_of_another_tokenizer_is_refused(tmp_path: Path) -> None:
    import json as json_module

    from dlmoe.train.driver import prepare_dataset

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    other = tmp_path / "tokenizer"
    byte_tokenizer().save(other)  # the same vocabulary, but padding with the mask token: another tokenizer
    (other / "tokenizer_config.json").write_text(json_module.dumps(
        {"eos_token": "<|eos|>", "pad_token": "<|mask|>", "mask_token": "<|mask|>"}))
    for name, tokenizer in (("train", None), ("val", str(other))):
        run_tokenize(TokenizeSpec(output=str(tmp_path / name), seq_len=128, inputs=[str(corpus)],
                                  tokenizer=tokenizer), progress=False)
    job = load_job_config(None, [f"data.uri={tmp_path / 'train'}", f"data.validation={tmp_path / 'val'}",
                                 "train.eval_every=2"])
    with pytest.raises(DataError, match=r"dataset .*/val was tokenized with .*not the job's tokenizer"):
        prepare_dataset(job, progress=False)
