"""The ``recover`` stage in the compress flow on a tiny random Llama (real tokenizer, real C4 text): a job with
``recovery:`` registers a recovered version (tag ``dlp.recovered=true``, its settings, loss curve, exact
sparsity), a rerun serves recover from the store, the same job without recovery is another version, and bad
recovery input ends as one line with exit status 2 before anything trains. Tiny models test plumbing only."""

from __future__ import annotations

import pytest
import yaml

from tests.test_pipeline_cli import _one_error_line, cli  # noqa: F401 (fixture)
from tests.test_pipeline_flow import Runner, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]

RECOVERY = {"steps": 4, "batch": 1, "seqlen": 32, "rank": 2, "alpha": 4.0, "lr": 1e-3,
            "target_modules": ["q_proj", "v_proj"], "save_every": 2}


@pytest.fixture(scope="module")
def recovered(tiny_model, tmp_path_factory, prefect_harness):
    """A compress run with ``recovery:`` that fails right after the first training state is stored (step 2 of
    4), then the same job again, in a module-wide workdir: (runner, summary, computed stages, trace)."""
    from pipeline.cache import InjectedFailure

    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("pipeline-recover")
    runner = Runner(tiny_model, root / "work", root / "trace.txt")
    with pytest.raises(InjectedFailure):
        runner.run(mp, fail="recover:state_saved", recovery=RECOVERY)
    summary = runner.run(mp, recovery=RECOVERY)
    trace = runner.trace.read_text().split()
    mp.undo()
    return runner, summary, runner.computed(), trace


def test_recovered_variant_is_registered_with_exact_sparsity(recovered):
    from pipeline.registry import get_client

    runner, s, computed, trace = recovered
    assert computed == {"recover", "evaluate", "register"}  # the rest was stored by the failed run
    assert trace.count("recover:state_saved") == 1  # resumed at step 2: only the state of step 4 is saved
    assert s["recovery"]["resumed_from_step"] == 2 and not any(k.startswith("recover/") and "/state" in k
                                                               for k in _store_keys(runner))
    assert s["stages"]["recover"]["state"] == "Completed" and s["stages"]["evaluate_pruned"]["state"] == "Cached"
    rec = s["recovery"]
    prune_sparsity = s["per_block"] and sum(b["achieved"] for b in s["per_block"]) / len(s["per_block"])
    assert rec["exact"] and rec["sparsity_after"] == rec["sparsity_before"] == s["achieved_sparsity"]
    assert abs(rec["sparsity_before"] - prune_sparsity) < 1e-9  # the prune stage's, to the weight
    assert rec["steps"] == 4 and rec["ppl_before"] > 1 and rec["ppl_after"] == s["pruned_ppl"]
    assert s["checkpoint_uri"].endswith("/checkpoint") and "/recover/" in s["checkpoint_uri"]
    client = get_client(None, runner.workdir)
    (mv,) = client.search_model_versions("name = 'tiny-llama-dlp'")
    assert mv.tags["dlp.recovered"] == "true" and mv.tags["dlp.recovery.rank"] == "2"
    assert mv.tags["dlp.recovery.target_modules"] == "q_proj,v_proj" and "/recover/" in mv.tags["dlp.artifact_uri"]
    run = client.get_run(mv.run_id)
    m = run.data.metrics
    assert m["recovery.sparsity_after"] == m["recovery.sparsity_before"] == m["sparsity.achieved"]
    assert m["recovery.exact"] == 1.0 and m["recovery.ppl_before"] == rec["ppl_before"]
    assert m["recovery.ppl_after"] == m["ppl.pruned"] == rec["ppl_after"] and m["time.recover_s"] > 0
    history = client.get_metric_history(mv.run_id, "recovery.loss")
    assert [h.step for h in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "recovery")}
    assert {"recovery/loss.png", "recovery/report.json"} <= artifacts


def _store_keys(runner) -> list[str]:
    from pipeline.store import open_store

    return open_store(str(runner.workdir / "artifacts"), workdir=str(runner.workdir)).list_keys("recover")


def test_store_saver_keeps_the_newest_state_on_s3(s3_bucket, tmp_path):
    from pipeline.cache import StoreSpec
    from pipeline.stages.recover import StoreSaver

    spec = StoreSpec(uri=s3_bucket.prefix_uri("run"), workdir=str(tmp_path / "work"), endpoint_url=s3_bucket.endpoint_url)
    saver = StoreSaver(spec, "k" * 64)
    assert saver.latest() is None
    for step in (2, 4):
        state = tmp_path / f"state-{step}"
        state.mkdir()
        (state / "state.json").write_text(f'{{"step": {step}}}')
        saver.save(step, state)
    local = saver.latest()
    assert (local / "state.json").read_text() == '{"step": 4}'
    keys = spec.open().list_keys(saver.prefix)
    assert any("step-00000004" in k for k in keys) and not any("step-00000002" in k for k in keys)
    saver.clear()
    assert spec.open().list_keys(saver.prefix) == [] and saver.latest() is None


def test_rerun_serves_recover_from_the_store_and_plain_prune_is_another_version(recovered, monkeypatch):
    from pipeline.variants import format_table, load_variants

    runner, first, _, _ = recovered
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    again = runner.run(monkeypatch, recovery=RECOVERY)
    assert again["stages"]["recover"]["state"] == "Cached" and "recover" not in runner.computed()
    assert again["version"] == first["version"] and again["recovery"] == first["recovery"]
    plain = runner.run(monkeypatch)  # same pruned model, no recovery: its evaluation is the cached one
    assert "recover" not in plain["stages"] and plain["version"] != first["version"]
    assert plain["pruned_ppl"] == first["recovery"]["ppl_before"] and runner.computed() == {"register"}
    assert plain["achieved_sparsity"] == first["recovery"]["sparsity_after"]  # the prune stage's, exactly
    variants = {v.version: v for v in load_variants("tiny-llama-dlp", workdir=runner.workdir)}
    assert variants[int(first["version"])].recovered and not variants[int(plain["version"])].recovered
    table = format_table(list(variants.values()))
    assert "recovered" in table.splitlines()[0] and "lora r2 (ppl" in table


@pytest.mark.parametrize("recovery, needle", [
    ({"steps": 0}, "recovery.steps"),
    ({"lr": 0}, "recovery.lr"),
    ({"rank": 0}, "recovery.rank"),
    ({"target_modules": ["q_proj", "c_attn"]}, "target module 'c_attn' is not a linear"),
    ({"seqlen": 4096, "data": "SHORT"}, "has no 4096-token window"),
])
def test_bad_recovery_input_is_one_line_exit_2_before_training(cli, tiny_model, tmp_path, monkeypatch,  # noqa: F811
                                                               recovery, needle):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("DLP_PIPELINE_TRACE", str(trace))
    short = tmp_path / "short.txt"
    short.write_text("A few words of training text.\n")
    rec = {**RECOVERY, **{k: (str(short) if v == "SHORT" else v) for k, v in recovery.items()}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_model, tmp_path / "work", recovery=rec)))
    code, out, err, secs = cli("compress", "--config", str(job))
    assert code == 2 and out == "" and needle in _one_error_line(err) and secs < 15
    assert not trace.exists()  # no stage ran
