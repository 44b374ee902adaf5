"""The sweep flow: statistics once, variants fanned out through the thread-pool task runner and through
prefect_dask's DaskTaskRunner on a local in-process cluster; every variant registered; a comparison table and
a plot logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_pipeline_flow import computed, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]


def _lines(trace: Path, suffix: str) -> list[str]:
    return [x for x in trace.read_text().split() if x.endswith(suffix)]


def test_expand_variants_drops_alpha_duplicates_and_validates(tmp_path):
    from pipeline.jobconfig import resolve_job
    from flows.sweep import expand_variants
    from pipeline.jobconfig import JobError

    base = resolve_job(tiny_job(Path("/m"), tmp_path))
    vs = expand_variants(base, ["wanda", "sparsegpt"], ["uniform", "owl", "dlp"], [0.6, 0.7], [0.1, 0.15])
    assert len(vs) == 2 * 2 * (1 + 1 + 2)
    assert len({v.variant_name() for v in vs}) == len(vs)
    with pytest.raises(JobError):
        expand_variants(base, ["pruneit"])


def test_sweep_thread_pool_statistics_once_each_variant_registered(tiny_model, tmp_path, prefect_harness, monkeypatch):
    from mlflow.artifacts import download_artifacts

    from flows.sweep import sweep
    from pipeline.registry import get_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("DLP_PIPELINE_TRACE", str(trace))
    work = tmp_path / "work"
    res = sweep(job=tiny_job(tiny_model, work), methods=["wanda"], allocations=["uniform", "dlp"], sparsities=[0.5],
                alphas=[0.1, 0.2])
    assert not res["failed"] and len(res["variants"]) == 3 and res["task_runner"] == "ThreadPoolTaskRunner"
    assert len(_lines(trace, "statistics:computed")) == 1 and len(_lines(trace, "prune:computed")) == 3
    assert len(_lines(trace, "register:computed")) == 3
    assert sorted(int(v["version"]) for v in res["variants"]) == [1, 2, 3]
    assert all(v["dense_ppl"] == res["dense_ppl"] for v in res["variants"])
    assert "uniform" in res["table"] and "dlp" in res["table"]
    client = get_client(None, work)
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == 3
    run = client.get_run(res["sweep_run_id"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "sweep")}
    assert {"sweep/comparison.md", "sweep/comparison.csv", "sweep/ppl_vs_sparsity.png"} <= files
    md = download_artifacts(run_id=run.info.run_id, artifact_path="sweep/comparison.md", tracking_uri=client.tracking_uri)
    assert "wanda-dlp-p0.5-a0.2" in Path(md).read_text()

    # the same sweep again: nothing recomputed, nothing registered, the sweep run reused
    trace.write_text("")
    again = sweep(job=tiny_job(tiny_model, work), methods=["wanda"], allocations=["uniform", "dlp"], sparsities=[0.5],
                  alphas=[0.1, 0.2])
    assert computed(trace) == set() and again["sweep_run_id"] == res["sweep_run_id"]


def test_cli_sweep_through_a_local_dask_cluster(tiny_model, tmp_path, prefect_harness, monkeypatch, capsys):
    """`dlp sweep --dask`: prefect_dask's DaskTaskRunner on a local in-process cluster (1 worker, 2 threads)."""
    import json

    import yaml

    from cli import app, main
    from cli.pipeline_commands import register

    register(app)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("DLP_PIPELINE_TRACE", str(trace))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(tiny_job(tiny_model, tmp_path / "work")))
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--config", str(cfg), "--methods", "wanda,magnitude", "--allocations", "uniform",
              "--sparsities", "0.4", "--dask", "--json"])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err[-2000:]
    res = json.loads(out.out)
    assert not res["failed"] and len(res["variants"]) == 2 and res["task_runner"] == "DaskTaskRunner"
    assert len(_lines(trace, "statistics:computed")) == 1 and len(_lines(trace, "prune:computed")) == 2
    assert {v["variant"] for v in res["variants"]} == {"wanda-uniform-p0.4-unstructured", "magnitude-uniform-p0.4-unstructured"}
    assert all(v["stages"]["prune"]["cached"] is False for v in res["variants"])
