"""Pytest fixtures for the pipeline infrastructure (S3 via moto, MLflow on SQLite, Prefect harness, a tiny HF
checkpoint).

Use it as a plugin -- in a test module ``pytest_plugins = ["tests.conftest_pipeline"]`` -- or import it from
``tests/conftest.py`` (``from tests.conftest_pipeline import *``). Import it BEFORE anything imports prefect:
at import time it points ``PREFECT_HOME`` at a fresh temporary folder (unless ``DLP_TEST_KEEP_PREFECT_HOME=1``)
and turns Prefect telemetry off; Prefect reads its settings when it is first imported.

Fixtures:

- ``moto_s3`` (session): a ``ThreadedMotoServer`` on 127.0.0.1 with dummy AWS credentials in the environment;
  yields the endpoint URL.
- ``s3_bucket`` (function): a fresh bucket on that server; sets ``AWS_ENDPOINT_URL_S3`` and
  ``MLFLOW_S3_ENDPOINT_URL`` for the test; yields :class:`S3Bucket` (name, endpoint_url, uri, client).
- ``mlflow_tracking`` (function): MLflow on SQLite in a temp folder (``MLFLOW_TRACKING_URI`` set); yields
  :class:`MlflowTracking` (uri, root, artifact_location).
- ``prefect_harness`` (session): ``prefect_test_harness(server_startup_timeout=60)``; about 12 s to start.
- ``hf_offline`` (function): ``HF_HOME`` in a temp folder, ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``.
- ``tiny_hf_checkpoint`` (session): a random 2-layer Llama (vocab 128, hidden 32) with a WordLevel tokenizer,
  saved with ``save_pretrained``; yields the folder.
- ``pipeline_workdir`` (function): an empty work folder ``tmp_path / "work"``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

# --------------------------------------------------------------------------------------------- Prefect env
if os.environ.get("DLP_TEST_KEEP_PREFECT_HOME") != "1":
    if "prefect" in sys.modules:
        warnings.warn(
            "tests.conftest_pipeline imported after prefect: PREFECT_HOME was not isolated; import it first "
            "(e.g. at the top of tests/conftest.py)",
            stacklevel=1,
        )
    else:
        _prefect_home = tempfile.mkdtemp(prefix="dlp-test-prefect-")
        os.environ["PREFECT_HOME"] = _prefect_home
        os.environ.pop("PREFECT_API_URL", None)  # never talk to a real server from tests
        atexit.register(shutil.rmtree, _prefect_home, ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DO_NOT_TRACK", "true")  # MLflow 3 telemetry checks == "true"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Import prefect now, at collection time: its logging set-up binds the console handler to the current
# sys.stderr. If the first import happened inside a test that swaps the streams (CliRunner, capsys), the
# handler would keep that stream after it is closed, and every later Prefect log line would fail.
# Prefect's console handler is silenced below CRITICAL in tests (flow logs still reach the API and the
# test assertions read states and manifests, not console text): an in-process CLI run under a
# stream-swapping runner can leave that handler on a closed stream, and its write errors then recurse.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
import prefect  # noqa: E402,F401

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}

__all__ = [
    "MlflowTracking",
    "S3Bucket",
    "hf_offline",
    "make_tiny_checkpoint",
    "mlflow_tracking",
    "registry_down_once",
    "moto_s3",
    "pipeline_workdir",
    "prefect_harness",
    "s3_bucket",
    "tiny_hf_checkpoint",
]


# --------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Session-wide moto S3 server on 127.0.0.1 (random port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in DUMMY_AWS_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            mp.delenv(k, raising=False)
        # never read the developer's real AWS config
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@dataclass
class S3Bucket:
    name: str
    endpoint_url: str
    client: Any

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def prefix_uri(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix.strip('/')}"


@pytest.fixture
def s3_bucket(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh, empty bucket per test; S3 endpoint env vars point at the moto server for the test."""
    import boto3

    for k, v in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3)
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    name = f"dlp-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield S3Bucket(name=name, endpoint_url=moto_s3, client=client)


# --------------------------------------------------------------------------------------------- MLflow
@dataclass
class MlflowTracking:
    uri: str
    root: Path
    artifact_location: str


def registry_down_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.register_model`` fails once ("registry down (simulated)"), then works: a crash after logging."""
    import mlflow

    real = mlflow.register_model
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("registry down (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(mlflow, "register_model", flaky)


@pytest.fixture
def mlflow_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowTracking]:
    """MLflow tracking + registry on SQLite in a fresh temp folder (MLFLOW_TRACKING_URI set for the test)."""
    root = tmp_path / "mlflow"
    root.mkdir()
    uri = "sqlite:///" + (root / "mlflow.db").as_posix()  # four slashes: absolute path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    yield MlflowTracking(uri=uri, root=root, artifact_location=(root / "mlartifacts").as_uri())
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


# --------------------------------------------------------------------------------------------- Prefect
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server + database for the whole session (use only in tests that run flows)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


# --------------------------------------------------------------------------------------------- HF
@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return home


def make_tiny_checkpoint(folder: str | os.PathLike[str], *, seed: int = 0, num_hidden_layers: int = 2) -> Path:
    """Save a random tiny Llama + a WordLevel tokenizer to ``folder`` (offline, about a second)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(128 - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


# --------------------------------------------------------------------------------------------- misc
@pytest.fixture
def pipeline_workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture(autouse=True)
def _heal_closed_log_streams():
    """A command run in-process under a stream-swapping runner (CliRunner, capsys) can make Prefect set
    its logging up again, binding its console handlers to that runner's stream; once the runner closes
    it, every later log line fails. After each test, point any handler on a closed stream back at the
    process's stderr."""
    yield
    import logging

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.__stderr__  # not setStream(): it would flush the closed stream
                console = getattr(handler, "console", None)
                if console is not None:
                    console.file = sys.__stderr__
