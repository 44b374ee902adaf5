"""MLflow 3 registry helpers on a real SQLite store, and the MLflow preflight check."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline import registry as reg
from pipeline.preflight import PreflightError, check_tracking_uri

pytest_plugins = ["tests.conftest_pipeline"]


LINEAGE = {
    "base_model": "tiny-llama",
    "base_revision": "main",
    "base_hash": "ab" * 32,
    "method": "wanda",
    "allocation": "dlp",
    "statistic": "median",
    "sparsity": 0.7,
    "alpha": 0.15,
    "pattern": "unstructured",
    "calibration_fingerprint": "cd" * 32,
    "flow_run_id": "00000000-0000-0000-0000-000000000001",
    "artifact_uri": "file:///tmp/artifacts/ckpt/abc",
}


def _log(ckpt: Path, key: str, **kw):
    args = dict(
        registered_name="tiny-llama-dlp",
        variant_key=key,
        checkpoint_dir=ckpt,
        params={"pruning": {"alpha": 0.15, "sparsity": 0.7}, "calibration.nsamples": 32},
        metrics={"ppl.wikitext2": 123.4, "sparsity.global": 0.7},
        block_sparsity=[0.62, 0.78],
        block_target=[0.625, 0.775],
        block_statistic=[0.011, 0.019],
        statistic_name="median |W|*||X||",
        lineage=LINEAGE,
        experiment="dlp-test",
        run_name=f"variant-{key}",
        pip_requirements=["torch", "transformers"],
    )
    args.update(kw)
    return reg.log_variant_run(**args)


# --------------------------------------------------------------------------------------------- URIs
def test_default_tracking_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = reg.default_tracking_uri(tmp_path / "w")
    assert uri == f"sqlite:///{(tmp_path / 'w').resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    assert reg.resolve_tracking_uri(None, tmp_path / "w") == uri
    assert reg.default_artifact_location(uri) == (tmp_path / "w" / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert reg.resolve_tracking_uri(None, tmp_path) == "http://mlflow.example:5000"
    assert reg.resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    assert reg.default_artifact_location("http://mlflow.example:5000") is None
    monkeypatch.chdir(tmp_path)
    assert reg.resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{(tmp_path / 'rel.db').resolve()}"


def test_configuring_one_workdir_does_not_redirect_the_next(tmp_path, monkeypatch):
    """MLflow exports the URI it is given to the environment; two jobs with different workdirs in one process
    (a sweep, the watcher, a test session) must still each write into their own registry."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first = reg.configure_mlflow(None, tmp_path / "a")
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    second = reg.configure_mlflow(None, tmp_path / "b")
    assert first != second and second == reg.default_tracking_uri(tmp_path / "b")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/user.db")  # a user's own setting is kept
    assert reg.configure_mlflow(None, tmp_path / "c") == "sqlite:////x/user.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////x/user.db"


def test_lineage_tags():
    tags = reg.lineage_tags({"base_model": "m", "sparsity": 0.7, "alpha": None, "dlp.custom": "x"}, method="wanda")
    assert tags["dlp.base_model"] == "m" and tags["dlp.sparsity"] == "0.7" and tags["dlp.method"] == "wanda"
    assert "dlp.alpha" not in tags and tags["dlp.custom"] == "x"


def test_sparsity_figure_draws_target_achieved_and_statistic(tmp_path):
    from pipeline.variant_logging import BlockProfile, sparsity_figure

    fig = sparsity_figure(BlockProfile([0.6, 0.7, 0.8], [0.6, 0.7, 0.8], [1.0, 2.0, 3.0], "stat"), title="t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["target sparsity", "achieved sparsity", "stat"] and fig.axes[0].get_title() == "t"
    fig.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = sparsity_figure(BlockProfile([0.7] * 30))  # no target/statistic, constant values
    assert len(flat.axes) == 1 and len(flat.axes[0].get_lines()) == 1


def test_ensure_experiment_idempotent(mlflow_tracking, tmp_path):
    loc = (tmp_path / "arts").as_uri()
    a = reg.ensure_experiment("exp-a", loc)
    b = reg.ensure_experiment("exp-a", loc)
    assert a == b
    client = reg.get_client()
    assert client.get_experiment(a).artifact_location == loc
    c = reg.ensure_experiment("exp-b")  # default: mlartifacts beside the SQLite file
    assert client.get_experiment(c).artifact_location == mlflow_tracking.artifact_location


# --------------------------------------------------------------------------------------------- runs
def test_log_variant_run_registers_idempotently(mlflow_tracking, tiny_hf_checkpoint, hf_offline):
    import mlflow

    client = reg.get_client()
    assert reg.find_version_by_variant_key("tiny-llama-dlp", "key-1") is None

    first = _log(tiny_hf_checkpoint, "key-1", documents={"config/job.yaml": "name: j\n", "pipeline/m.json": {"a": [1]}})
    assert first == {"name": "tiny-llama-dlp", "version": "1", "run_id": first["run_id"],
                     "model_uri": "models:/tiny-llama-dlp/1", "alias": "candidate", "reused": False}

    # the run: params, metrics (incl. per-block), artifacts, tags
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "variant-key-1"
    assert run.data.params["pruning.alpha"] == "0.15" and run.data.params["calibration.nsamples"] == "32"
    m = run.data.metrics
    assert m["sparsity.block_00"] == pytest.approx(0.62) and m["sparsity.block_01"] == pytest.approx(0.78)
    assert m["target_sparsity.block_01"] == pytest.approx(0.775) and m["statistic.block_00"] == pytest.approx(0.011)
    assert m["ppl.wikitext2"] == pytest.approx(123.4)
    assert run.data.tags[reg.VARIANT_TAG] == "key-1" and run.data.tags["dlp.method"] == "wanda"
    arts = {a.path for a in client.list_artifacts(first["run_id"], "sparsity")}
    assert arts == {"sparsity/blocks.json", "sparsity/sparsity.png"}
    blocks = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/sparsity/blocks.json")
    assert blocks["achieved_sparsity"] == [0.62, 0.78] and blocks["statistic_name"] == "median |W|*||X||"
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config/job.yaml") == "name: j\n"
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/pipeline/m.json") == {"a": [1]}

    # the version: lineage tags, alias
    mv = client.get_model_version("tiny-llama-dlp", "1")
    for k, v in LINEAGE.items():
        assert mv.tags[f"dlp.{k}"] == str(v)
    assert mv.tags[reg.VARIANT_TAG] == "key-1" and mv.run_id == first["run_id"]
    assert mv.description == "variant-key-1"
    logged = client.get_logged_model(run.data.tags[reg.MODEL_URI_TAG].removeprefix("models:/"))
    assert logged.source_run_id == first["run_id"]
    assert {"name": "tiny-llama-dlp", "version": 1} in json.loads(logged.tags["mlflow.modelVersions"])
    assert str(client.get_model_version_by_alias("tiny-llama-dlp", "candidate").version) == "1"
    assert str(reg.find_version_by_variant_key("tiny-llama-dlp", "key-1").version) == "1"

    # second call with the same key: same version, nothing new
    n_runs = len(client.search_runs([run.info.experiment_id]))
    again = _log(tiny_hf_checkpoint, "key-1")
    assert again["version"] == "1" and again["run_id"] == first["run_id"] and again["reused"] is True
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == n_runs

    # a new variant: version 2, alias moves
    second = _log(tiny_hf_checkpoint, "key-2", lineage={**LINEAGE, "alpha": 0.2})
    assert second["version"] == "2" and second["model_uri"] == "models:/tiny-llama-dlp/2"
    assert str(client.get_model_version_by_alias("tiny-llama-dlp", "candidate").version) == "2"
    assert reg.find_version_by_variant_key("tiny-llama-dlp", "key-2").tags["dlp.alpha"] == "0.2"
    # re-logging the older variant neither creates a version nor moves the alias back
    assert _log(tiny_hf_checkpoint, "key-1")["version"] == "1"
    assert str(client.get_model_version_by_alias("tiny-llama-dlp", "candidate").version) == "2"


def test_logged_model_loads_back(mlflow_tracking, tiny_hf_checkpoint, hf_offline):
    import mlflow

    res = _log(tiny_hf_checkpoint, "key-load")
    comps = mlflow.transformers.load_model("models:/tiny-llama-dlp@candidate", return_type="components")
    assert comps["model"].config.num_hidden_layers == 2
    assert res["model_uri"] == "models:/tiny-llama-dlp/1"


def test_crash_after_logging_reuses_the_run(mlflow_tracking, tiny_hf_checkpoint, hf_offline, monkeypatch):
    from tests.conftest_pipeline import registry_down_once

    registry_down_once(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        _log(tiny_hf_checkpoint, "key-crash")
    client = reg.get_client()
    exp = client.get_experiment_by_name("dlp-test")
    runs_before = client.search_runs([exp.experiment_id])
    assert len(runs_before) == 1

    res = _log(tiny_hf_checkpoint, "key-crash")
    assert res["version"] == "1" and res["run_id"] == runs_before[0].info.run_id and not res["reused"]
    assert len(client.search_runs([exp.experiment_id])) == 1  # the checkpoint was not logged twice


def test_missing_checkpoint_is_a_clear_error(mlflow_tracking, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        _log(tmp_path / "nope", "key-x")
    client = reg.get_client()
    assert client.search_runs([client.get_experiment_by_name("dlp-test").experiment_id]) == []  # no failed run


# --------------------------------------------------------------------------------------------- preflight
def test_preflight_tracking_sqlite(tmp_path):
    assert "SQLite" in check_tracking_uri(reg.default_tracking_uri(tmp_path / "w"))
    assert (tmp_path / "w").is_dir()


def test_preflight_tracking_unreachable_http_is_quick():
    t = time.monotonic()
    with pytest.raises(PreflightError) as e:
        check_tracking_uri("http://127.0.0.1:9", timeout=2)
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and "http://127.0.0.1:9" in msg and "MLFLOW_TRACKING_URI" in msg


def test_preflight_tracking_http_ok_and_errors():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            code = 200 if self.path == "/health" else 404
            if self.server.mode == "auth":
                code = 401
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    srv.mode = "ok"
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        assert "reachable" in check_tracking_uri(url)
        srv.mode = "auth"
        with pytest.raises(PreflightError, match="MLFLOW_TRACKING_TOKEN"):
            check_tracking_uri(url)
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------------------------- Prefect
def test_lineage_picks_up_the_prefect_flow_run_id(prefect_harness):
    from prefect import flow

    @flow
    def tag_flow() -> dict:
        from prefect.runtime import flow_run

        return {"tags": reg.lineage_tags({"method": "wanda"}), "id": str(flow_run.id)}

    out = tag_flow()
    assert out["tags"]["dlp.flow_run_id"] == out["id"] and out["tags"]["dlp.method"] == "wanda"
    # an explicit id wins
    assert reg.lineage_tags({"flow_run_id": "given"})["dlp.flow_run_id"] == "given"
