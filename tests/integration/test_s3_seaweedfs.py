"""The S3 paths against a second, independent S3 implementation — SeaweedFS, a real store whose data survives a
restart: tokenize to it and verify, stream from it across a restart of the endpoint (no sample repeated or
skipped), and train with checkpoints in it through a worker crash, resuming from them."""

from __future__ import annotations

import shutil
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from data_pipeline.shards import verify
from data_pipeline.stream import TokenStream
from data_pipeline.tokenize import TokenizeSpec, run_tokenize
from dlmoe.config import load_job_config
from dlmoe.train.driver import run_training
from tests.integration.seaweedfs import SeaweedS3

pytestmark = pytest.mark.usefixtures("ray_local")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ_LEN = 64


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        server.create_bucket("dlmoe-sw")
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for name in ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "heapq.py", "keyword.py",
                 "numbers.py", "operator.py", "shlex.py", "textwrap.py"):
        shutil.copy(STDLIB / name, corpus / name)
    return corpus


@pytest.fixture(scope="module")
def dataset(seaweed: SeaweedS3, corpus: Path) -> str:
    uri = "s3://dlmoe-sw/tokenized"
    run_tokenize(TokenizeSpec(output=uri, seq_len=SEQ_LEN, inputs=[str(corpus)], unit_bytes=12_000,
                              endpoint_url=seaweed.endpoint), progress=False)
    return uri


def test_tokenize_writes_the_same_dataset_as_locally_and_it_verifies(seaweed: SeaweedS3, dataset: str, corpus: Path,
                                                                     tmp_path: Path) -> None:
    manifest, problems = verify(dataset, endpoint_url=seaweed.endpoint)
    local = run_tokenize(TokenizeSpec(output=str(tmp_path / "local"), seq_len=SEQ_LEN, inputs=[str(corpus)],
                                      unit_bytes=12_000), progress=False)
    assert problems == [] and manifest.rows > 24 * 32
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in local.shards]


def read(dataset: str, endpoint: str, batches: int, during: threading.Thread | None = None) -> list[dict]:
    stream = TokenStream(dataset, global_batch_size=32, seed=5, window_shards=1, endpoint_url=endpoint,
                         max_batches=batches)
    out = []
    for number, batch in enumerate(stream):
        out.append(batch)
        if number == 2 and during is not None:
            during.start()  # the endpoint goes away while windows are still to be read
            time.sleep(1.0)
    return out


def test_the_stream_goes_on_across_a_restart_of_the_endpoint(seaweed: SeaweedS3, dataset: str,
                                                             recwarn: pytest.WarningsRecorder) -> None:
    reference = read(dataset, seaweed.endpoint, batches=24)

    def restart() -> None:
        seaweed.stop(kill=True)
        time.sleep(4.0)
        seaweed.start()

    outage = threading.Thread(target=restart)
    survived = read(dataset, seaweed.endpoint, batches=24, during=outage)
    outage.join(timeout=120)
    indices = np.concatenate([b["sample_index"] for b in survived])
    assert np.array_equal(indices, np.arange(24 * 32))  # no sample repeated or skipped
    for got, expected in zip(survived, reference, strict=True):
        assert np.array_equal(got["input_ids"], expected["input_ids"])
    assert any("the storage looks unavailable" in str(w.message) for w in recwarn)  # the outage was met


def test_checkpoints_in_seaweedfs_survive_a_worker_crash(seaweed: SeaweedS3) -> None:
    job = load_job_config(None, ["run_name=sw", "train.steps=4", "train.warmup_steps=1", "checkpoint.every_steps=2",
                                 "tracking.enabled=false", "checkpoint.storage=s3://dlmoe-sw/runs",
                                 f"data.endpoint_url={seaweed.endpoint}", "fault_injection.rank=1",
                                 "fault_injection.step=3"])
    result = run_training(job, progress=False)
    assert result.final_step == 4 and result.restarts >= 1
    assert result.export == "s3://dlmoe-sw/runs/sw/hf"
    names = {info.base_name for info in seaweed.filesystem().get_file_info(pafs.FileSelector("dlmoe-sw/runs/sw/hf"))}
    assert {"config.json", "tokenizer.json"} <= names
