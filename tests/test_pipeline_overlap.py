"""Overlapping runs: a scheduled compress overlapping a manual one is ordinary in operations.

Two identical ``dlp compress`` and a third, different job started at once in one work dir (each boots its own
temporary Prefect server on the work dir's one Prefect database) all finish; the identical pair registers one
version, the different job another, and no half-written artifact is left."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_pipeline_flow import ROOT, tiny_job, tiny_model  # noqa: F401 (fixture)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DLP_PIPELINE_", "PYTEST_", "PREFECT_", "MLFLOW_TRACKING_URI"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _start(job: dict, tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    job_file = tmp_path / f"job-{tag}.json"
    job_file.write_text(json.dumps(job))
    out = tmp_path / f"out-{tag}.json"
    cmd = [sys.executable, "-c", "from cli import main; main()", "compress", "--config", str(job_file), "--json"]
    return subprocess.Popen(cmd, env=_env(), cwd=str(ROOT), stdout=out.open("w"), stderr=subprocess.PIPE, text=True), out


def _finish(runs) -> list[dict]:
    summaries = []
    for proc, out in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.strip().splitlines()[-3:]
        summaries.append(json.loads(out.read_text()))
    return summaries


def _leftovers(workdir: Path) -> list[str]:
    """Temporary files or folders the store leaves while writing (none may stay behind)."""
    art = workdir / "artifacts"
    return sorted(str(p.relative_to(art)) for p in art.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp"))


def _versions(workdir: Path, name: str) -> list[str]:
    from pipeline.registry import get_client

    return sorted(str(mv.version) for mv in get_client(None, str(workdir)).search_model_versions(f"name='{name}'"))


def test_two_identical_and_one_different_compress_at_once_in_one_workdir(tiny_model, tmp_path):
    """Three runs at once (one round of process and server start-ups instead of two): the identical pair shares
    one version, the different job gets its own."""
    work = tmp_path / "work"
    job = tiny_job(tiny_model, work)
    a, b, c = _finish([_start(job, tmp_path, "a"), _start(job, tmp_path, "b"),
                       _start(tiny_job(tiny_model, work, pruning={"allocation": "uniform"}), tmp_path, "c")])
    assert a["variant_key"] == b["variant_key"] != c["variant_key"] and a["version"] == b["version"] != c["version"]
    assert a["checkpoint_sha256"] == b["checkpoint_sha256"] and a["pruned_ppl"] == b["pruned_ppl"]
    assert sorted({a["version"], c["version"]}) == ["1", "2"] and _versions(work, "tiny-llama-dlp") == ["1", "2"]
    assert _leftovers(work) == []
