"""Resume after a hard kill: the compress flow runs in a subprocess, is SIGKILLed inside prune -- after two of its
four blocks are journaled, or after the whole checkpoint is stored but before its manifest -- and the same command
run again completes with the same result as an uninterrupted run (same pruned weights sha256, per-block sparsity
and perplexity). Killed mid-stage, the rerun resumes at the first unfinished block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_pipeline_flow import ROOT, SCRIPT, Runner, computed, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]



def _env(extra: dict[str, str]) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLP_PIPELINE_", "PYTEST_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the test session's server: no startup per process
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory, prefect_harness):
    """The reference: the same job run once without a kill, in this process, in its own workdir."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        return Runner(tiny_model, tmp / "ref-work", tmp / "ref-trace.txt").run(mp, pruning={"alpha": 0.12})
    finally:
        mp.undo()


@pytest.mark.parametrize("kill_at", ["block2", "after_artifact"])
def test_sigkill_during_prune_then_rerun_matches_an_uninterrupted_run(kill_at, uninterrupted, tiny_model, tmp_path,
                                                                     prefect_harness, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ref = uninterrupted

    work = tmp_path / "work"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(tiny_job(tiny_model, work, pruning={"alpha": 0.12})))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    trace = tmp_path / "trace.txt"
    out = tmp_path / "summary.json"

    env = _env({"DLP_PIPELINE_TRACE": str(trace), "DLP_PIPELINE_PAUSE": f"prune:{kill_at}:120"})
    proc = subprocess.Popen([sys.executable, str(script), str(job_file), str(out)], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while f"prune:{kill_at}" not in (trace.read_text() if trace.exists() else ""):
            assert proc.poll() is None, "the flow ended before prune started"
            assert time.monotonic() < deadline, "prune did not start in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-prune: blocks 0-1 journaled, or checkpoint stored without manifest
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert {"statistics", "rates"} <= computed(trace) and "prune" not in computed(trace)

    trace.write_text("")
    done = subprocess.run([sys.executable, str(script), str(job_file), str(out)], env=_env({"DLP_PIPELINE_TRACE": str(trace)}),
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert computed(trace) == {"prune", "evaluate", "register"}  # statistics, rates, baseline were kept
    prune_blocks = [line for line in trace.read_text().splitlines() if line.startswith("prune:block")]
    if kill_at == "block2":  # the rerun walks only the blocks the killed run had not finished
        assert prune_blocks == ["prune:block2", "prune:block3"]
    s = json.loads(out.read_text())
    assert s["weights_sha256"] == ref["weights_sha256"]
    assert [b["achieved"] for b in s["per_block"]] == [b["achieved"] for b in ref["per_block"]]
    assert s["pruned_ppl"] == pytest.approx(ref["pruned_ppl"], rel=1e-6)
    assert s["dense_ppl"] == pytest.approx(ref["dense_ppl"], rel=1e-6)
    assert s["version"] == "1"
