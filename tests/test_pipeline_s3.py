"""The whole compress flow against a local moto S3 server over HTTP (127.0.0.1): artifacts and Prefect's
persisted results land in the bucket; a second machine-like run (fresh workdir, fresh PREFECT_HOME and
Prefect database, fresh MLflow, same bucket; in a subprocess) reuses every artifact and only registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_pipeline_flow import ROOT, SCRIPT, Runner, computed, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]



def test_s3_store_and_a_second_machine_reuses_the_bucket(tiny_model, tmp_path, s3_bucket, prefect_harness, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store_uri = s3_bucket.prefix_uri("team/dlp")
    runner = Runner(tiny_model, tmp_path / "machine1", tmp_path / "trace1.txt")
    s1 = runner.run(monkeypatch, storage={"uri": store_uri})
    assert runner.computed() >= {"statistics", "prune", "evaluate", "register"}
    assert s1["checkpoint_uri"].startswith(f"s3://{s3_bucket.name}/team/dlp/prune/")

    keys = [o["Key"] for page in s3_bucket.client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket.name)
            for o in page.get("Contents", [])]
    assert any(k.startswith("team/dlp/statistics/") and k.endswith("statistics.safetensors") for k in keys)
    assert any(k.startswith("team/dlp/prune/") and k.endswith("checkpoint/_COMPLETE") for k in keys)
    assert any(k.startswith("team/dlp/prune/") and k.endswith("checkpoint.manifest.json") for k in keys)
    assert any(k.startswith("team/dlp/eval/perplexity/") for k in keys)
    assert not any("_prefect-results" in k for k in keys)  # one cache: Prefect persists nothing in the store
    assert not (tmp_path / "machine1" / "artifacts").exists()

    # machine 2: nothing local is shared -- a new workdir, PREFECT_HOME (own temporary Prefect server), MLflow
    work2 = tmp_path / "machine2"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(tiny_job(tiny_model, work2, storage={"uri": store_uri})))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    trace = tmp_path / "trace2.txt"
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLP_PIPELINE_", "PYTEST_", "PREFECT_API"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home-2"), "DLP_PIPELINE_TRACE": str(trace),
                "AWS_ENDPOINT_URL_S3": s3_bucket.endpoint_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    done = subprocess.run([sys.executable, str(script), str(job_file), str(out)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert computed(trace) == {"register"}  # a fresh registry gets its version; nothing else is recomputed
    s2 = json.loads(out.read_text())
    for stage in ("statistics", "rates", "prune", "baseline", "evaluate"):
        assert s2["stages"][stage]["cached"], stage
        assert s2["stages"][stage]["state"] == "Cached", stage  # served from the S3 manifests
    assert s2["checkpoint_sha256"] == s1["checkpoint_sha256"] and s2["pruned_ppl"] == s1["pruned_ppl"]
    assert s2["version"] == "1" and (work2 / "mlflow.db").exists()
