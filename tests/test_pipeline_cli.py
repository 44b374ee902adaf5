"""``dlp compress`` / ``dlp sweep``: bad input and unreachable services end as ONE line on stderr with exit
code 2, fast and before anything expensive; a tiny run prints its summary as JSON or as a table."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from tests.test_pipeline_flow import tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]


@pytest.fixture
def cli(capsys):
    from cli import app, main
    from cli.pipeline_commands import register

    register(app)
    register(app)  # idempotent

    def run(*args):
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err, time.monotonic() - t0

    return run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_commands_are_registered_once(cli):
    from cli import app

    names = [c.name for c in app.registered_commands]
    assert names.count("compress") == 1 and names.count("sweep") == 1


def test_unreachable_s3_endpoint_fails_fast_with_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    code, out, err, secs = cli("compress", "--storage", "s3://no-such-bucket/x", "--workdir", str(tmp_path / "w"))
    line = _one_error_line(err)
    assert code == 2 and out == "" and secs < 15
    assert "unreachable" in line and "AWS_ENDPOINT_URL_S3" in line


def test_unreachable_mlflow_server_fails_fast_with_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    code, out, err, secs = cli("sweep", "--workdir", str(tmp_path / "w"), "--allocations", "uniform,dlp")
    line = _one_error_line(err)
    assert code == 2 and secs < 15 and "MLflow tracking server" in line and "MLFLOW_TRACKING_URI" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["compress", "--set", "pruning.alhpa=0.2"], "did you mean 'alpha'"),
        (["compress", "--alpha", "big"], "or auto"),
        (["compress", "--set", "pruning.search.budget=0"], "pruning.search.budget"),
        (["compress", "--set", "nonsense"], "KEY=VALUE"),
        (["compress", "--config", "/no/such/job.yaml"], "not found"),
        (["sweep", "--sparsities", "0.5,high"], "comma-separated"),
        (["sweep", "--methods", "pruneit"], "invalid variant"),
        (["compress", "--set", "calibration.source=/no/such/corpus.jsonl"], "neither a file"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, needle, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _out, err, secs = cli(*args, "--workdir", str(tmp_path / "w"))
    assert code == 2 and needle in _one_error_line(err) and secs < 15


def test_compress_json_then_cached_table(cli, tiny_model, tmp_path, prefect_harness, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = tiny_job(tiny_model, tmp_path / "work")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job))
    code, out, err, _ = cli("compress", "--config", str(cfg), "--set", "pruning.alpha=0.1", "--sparsity", "0.45", "--json")
    assert code == 0, err
    s = json.loads(out)  # stdout holds only the JSON summary; progress went to stderr
    assert s["target_sparsity"] == 0.45 and s["version"] == "1" and s["alias_uri"] == "models:/tiny-llama-dlp@candidate"
    assert "a0.1" in s["variant"]
    code, out, err, _ = cli("compress", "--config", str(cfg), "--set", "pruning.alpha=0.1", "--sparsity", "0.45")
    assert code == 0, err
    assert "perplexity" in out and "tiny-llama-dlp version 1" in out and "models:/tiny-llama-dlp@candidate" in out
    assert "prune        yes" in out


def test_missing_offline_data_fails_before_prefect_starts(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DLP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _out, err, secs = cli("compress", "--workdir", str(tmp_path / "w"))
    assert code == 2 and "DLP_DATA_DIR" in _one_error_line(err) and secs < 15
    code, _out, err, secs = cli("compress", "--workdir", str(tmp_path / "w"), "--set", f"data_dir={tmp_path}")
    assert code == 2 and "under the data dir" in _one_error_line(err)
