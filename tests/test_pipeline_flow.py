"""The compress flow on a tiny random Llama (real SmolLM2 tokenizer, real C4 / WikiText-2 text): caching by
content key (counted executions), recovery from missing/corrupt artifacts, resume after a failure in evaluate
or register, and what lands in the MLflow registry. Tiny models test plumbing, never quality."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_pipeline"]

BASE_SPARSITY = 0.5

ROOT = Path(__file__).resolve().parents[1]

#: The compress flow in a child process (``python -c SCRIPT.format(root=ROOT) job.json summary.json``).
SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from flows.compress import compress
summary = compress(job=json.loads(open(sys.argv[1]).read()))
open(sys.argv[2], "w").write(json.dumps(summary))
"""


# ============================================================================================ helpers
def make_tiny_model(folder: Path, layers: int = 4, tied: bool = True, max_shard_size: str | None = None) -> Path:
    """A random 4-block Llama (hidden 64) saved with the real SmolLM2 tokenizer (so real text tokenizes)."""
    import torch
    import transformers as tf

    from dlp.models import resolve_model

    tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(folder)
    return folder


def tiny_job(model_dir: Path, workdir: Path, **sections) -> dict:
    job = {
        "name": "tiny",
        "model": {"source": str(model_dir)},
        "calibration": {"source": "c4", "nsamples": 4, "seqlen": 64, "seed": 0},
        "pruning": {"method": "wanda", "allocation": "dlp", "sparsity": BASE_SPARSITY, "alpha": 0.15},
        "evaluation": {"perplexity": {"data": "wikitext2", "seqlen": 64, "max_windows": 2}},
        "registry": {"model_name": "tiny-llama-dlp", "experiment": "dlp-test"},
        "workdir": str(workdir),
    }
    for k, v in sections.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return job


def read_trace(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def computed(path: Path) -> set[str]:
    """Stages whose body computed an artifact since the trace was last cleared."""
    names = {line.split(":")[0] for line in read_trace(path) if line.endswith(":computed")}
    return names - {"perplexity", "zero_shot"}  # parts of baseline/evaluate, which are traced themselves


class Runner:
    """Runs the compress flow in-process and counts stage executions through the trace seam."""

    def __init__(self, model_dir: Path, workdir: Path, trace: Path):
        self.model_dir, self.workdir, self.trace = model_dir, workdir, trace

    def run(self, monkeypatch, fail: str | None = None, **sections):
        from flows.compress import compress

        self.trace.write_text("")
        monkeypatch.setenv("DLP_PIPELINE_TRACE", str(self.trace))
        if fail:
            monkeypatch.setenv("DLP_PIPELINE_FAIL", fail)
        else:
            monkeypatch.delenv("DLP_PIPELINE_FAIL", raising=False)
        try:
            return compress(job=tiny_job(self.model_dir, self.workdir, **sections))
        finally:
            monkeypatch.delenv("DLP_PIPELINE_FAIL", raising=False)

    def computed(self) -> set[str]:
        return computed(self.trace)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-real-tok"))


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory, prefect_harness):
    """One completed run in a module-wide workdir: (Runner, first summary, first-run computed stages)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("pipeline-base")
    runner = Runner(tiny_model, root / "work", root / "trace.txt")
    summary = runner.run(mp)
    first = runner.computed()
    mp.undo()
    return runner, summary, first


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


ALL = {"fetch", "calibration", "statistics", "rates", "prune", "baseline", "evaluate", "register"}


# ============================================================================================ tests
def test_first_run_computes_every_stage_and_returns_the_contract(base):
    _runner, s, first = base
    assert first == ALL
    assert set(s["stages"]) == ALL and not any(st["cached"] for st in s["stages"].values())
    for key in ("registered_name", "version", "model_uri", "alias_uri", "variant_key", "dense_ppl", "pruned_ppl",
                "achieved_sparsity", "target_sparsity", "per_block", "zero_shot", "stages", "base_model"):
        assert key in s
    assert s["registered_name"] == "tiny-llama-dlp" and s["version"] == "1"
    assert s["model_uri"] == "models:/tiny-llama-dlp/1" and s["alias_uri"] == "models:/tiny-llama-dlp@candidate"
    assert s["target_sparsity"] == BASE_SPARSITY and abs(s["achieved_sparsity"] - BASE_SPARSITY) < 0.03
    assert len(s["per_block"]) == 4 and all({"target", "achieved", "statistic"} <= set(b) for b in s["per_block"])
    assert s["dense_ppl"] > 1 and s["pruned_ppl"] > 1 and s["zero_shot"] is None
    assert len(s["base_model"]["fingerprint"]) == 64
    json.dumps(s)  # JSON-able
    for st in ("statistics", "rates", "prune", "evaluate"):
        assert s["stages"][st]["uri"].startswith("file://")


def test_rerun_is_fully_cached_and_registers_nothing_new(base, env):
    runner, s1, _ = base
    s2 = runner.run(env)
    assert runner.computed() == set()
    assert all(st["cached"] for st in s2["stages"].values())
    # one cache: every stage still runs as a Prefect task, served from the store's verified manifests
    assert {s2["stages"][k]["state"] for k in ("calibration", "statistics", "rates", "prune", "evaluate", "baseline")} == {"Cached"}
    assert s2["version"] == s1["version"] and s2["variant_key"] == s1["variant_key"]
    assert s2["pruned_ppl"] == s1["pruned_ppl"] and s2["checkpoint_sha256"] == s1["checkpoint_sha256"]
    s3 = runner.run(env)
    assert s3["stages"]["prune"]["state"] == "Cached" and s3["stages"]["statistics"]["state"] == "Cached"
    from pipeline.registry import get_client

    client = get_client(None, runner.workdir)
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == 1


def test_alpha_change_recomputes_rates_prune_evaluate_register_only(base, env):
    runner, s1, _ = base
    s = runner.run(env, pruning={"alpha": 0.2})
    assert runner.computed() == {"rates", "prune", "evaluate", "register"}
    assert s["version"] == "2" and s["variant_key"] != s1["variant_key"]
    assert s["stages"]["statistics"]["cached"] and not s["stages"]["prune"]["cached"]


def test_calibration_change_recomputes_statistics_and_everything_after(base, env):
    runner, _, _ = base
    runner.run(env, calibration={"seed": 1})
    assert runner.computed() == {"calibration", "statistics", "rates", "prune", "evaluate", "register"}


def test_settings_outside_every_key_recompute_nothing(base, env):
    runner, s1, _ = base
    s = runner.run(env, name="renamed-job")  # the job's free-form name is in no cache key
    assert runner.computed() == set() and s["version"] == s1["version"]


def test_missing_artifact_is_recomputed_with_a_warning(base, env, caplog):
    runner, s1, _ = base
    stats_path = Path(s1["stages"]["statistics"]["uri"].removeprefix("file://"))
    stats_path.unlink()
    with caplog.at_level("WARNING"):
        s = runner.run(env)
    assert runner.computed() == {"statistics"}
    assert stats_path.exists() and s["stages"]["statistics"]["cached"] is False
    assert any("rejected" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def test_corrupt_checkpoint_is_recomputed_to_the_same_weights(base, env, caplog):
    runner, s1, _ = base
    ckpt = Path(s1["checkpoint_uri"].removeprefix("file://"))
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)  # same size, different bytes: only a content hash notices
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        s = runner.run(env)
    assert runner.computed() == {"prune"}  # evaluate/register are keyed on the prune key, not on timings
    assert s["weights_sha256"] == s1["weights_sha256"]
    assert any("corrupted" in r.getMessage() for r in caplog.records)


def test_failure_in_evaluate_then_rerun_does_not_redo_statistics_or_prune(base, env):
    from pipeline.cache import InjectedFailure

    runner, _, _ = base
    with pytest.raises(InjectedFailure):
        runner.run(env, fail="evaluate", pruning={"alpha": 0.1})
    assert {"rates", "prune"} <= runner.computed() and "evaluate" not in runner.computed()
    s = runner.run(env, pruning={"alpha": 0.1})
    assert runner.computed() == {"evaluate", "register"}
    assert s["stages"]["prune"]["cached"] and s["stages"]["statistics"]["cached"]


def test_failure_in_register_keeps_checkpoint_and_metrics_then_only_registers(base, env):
    from pipeline.cache import InjectedFailure
    from pipeline.registry import get_client

    runner, _, _ = base
    client = get_client(None, runner.workdir)
    before = len(client.search_model_versions("name = 'tiny-llama-dlp'"))
    with pytest.raises(InjectedFailure):
        runner.run(env, fail="register", pruning={"alpha": 0.05})
    assert {"rates", "prune", "evaluate"} <= runner.computed()
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == before
    s = runner.run(env, pruning={"alpha": 0.05})
    assert runner.computed() == {"register"}
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == before + 1
    runner.run(env, pruning={"alpha": 0.05})  # idempotent: the same variant never gets a second version
    assert runner.computed() == set()
    assert len(client.search_model_versions("name = 'tiny-llama-dlp'")) == before + 1
    assert str(client.get_model_version_by_alias("tiny-llama-dlp", "candidate").version) == s["version"]


def test_registry_run_has_params_metrics_artifacts_and_lineage(base):
    from mlflow.artifacts import download_artifacts

    from pipeline.registry import get_client

    runner, s1, _ = base
    client = get_client(None, runner.workdir)
    mv = client.get_model_version("tiny-llama-dlp", s1["version"])
    tags = mv.tags
    assert tags["dlp.base_hash"] == s1["base_model"]["fingerprint"]
    assert tags["dlp.method"] == "wanda" and tags["dlp.allocation"] == "dlp" and tags["dlp.alpha"] == "0.15"
    assert tags["dlp.variant_key"] == s1["variant_key"] and tags["dlp.artifact_uri"] == s1["checkpoint_uri"]
    assert len(tags["dlp.calibration_fingerprint"]) == 64 and tags.get("dlp.flow_run_id")
    run = client.get_run(mv.run_id)
    m = run.data.metrics
    assert m["ppl.dense"] == pytest.approx(s1["dense_ppl"]) and m["ppl.pruned"] == pytest.approx(s1["pruned_ppl"])
    assert m["sparsity.achieved"] == pytest.approx(s1["achieved_sparsity"]) and "sparsity.block_00" in m
    assert "time.prune_s" in m and "time.statistics_s" in m
    assert run.data.params["pruning.alpha"] == "0.15" and run.data.params["calibration.nsamples"] == "4"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "sparsity")}
    assert {"sparsity/blocks.json", "sparsity/sparsity.png"} <= files
    cfg = download_artifacts(run_id=run.info.run_id, artifact_path="config/job.yaml", tracking_uri=client.tracking_uri)
    assert "alpha: 0.15" in Path(cfg).read_text()
    source = client.get_model_version_download_uri("tiny-llama-dlp", s1["version"])
    assert source


def test_zero_shot_added_later_reuses_perplexity_and_logs_deltas(base, env):
    from pipeline.registry import get_client

    runner, s1, _ = base
    s = runner.run(env, evaluation={"perplexity": {"data": "wikitext2", "seqlen": 64, "max_windows": 2},
                                    "zero_shot": {"tasks": ["rte"], "limit": 2}})
    trace = read_trace(runner.trace)
    assert "perplexity:computed" not in trace and trace.count("zero_shot:computed") == 2  # dense once + pruned
    assert runner.computed() == {"baseline", "evaluate", "register"}
    zs = s["zero_shot"]
    assert zs is not None and set(zs["tasks"]) == {"rte"}
    assert zs["tasks"]["rte"]["acc"] is not None and zs["tasks"]["rte"]["acc_dense"] is not None
    assert s["pruned_ppl"] == s1["pruned_ppl"]
    client = get_client(None, runner.workdir)
    m = client.get_run(client.get_model_version("tiny-llama-dlp", s["version"]).run_id).data.metrics
    assert "zeroshot.rte.acc" in m and "zeroshot.rte.acc_delta" in m and "zeroshot.mean_acc_delta" in m


def test_engine_progress_says_each_block_once_and_restores_the_logger(caplog):
    """Inside a stage the engine's block lines reach the stage's log through the bridge only (not once more via the
    root logger); overlapping stages (a sweep's threads) leave the logger as they found it."""
    import logging

    from pipeline.cache import engine_progress

    engine_log = logging.getLogger("dlp.engine")
    before = (engine_log.level, engine_log.propagate)
    with caplog.at_level(logging.INFO):
        with engine_progress("prune", every_s=0.0), engine_progress("statistics", every_s=0.0):
            engine_log.info("prune: block %d/%d", 1, 2, extra={"dlp_block": 0, "dlp_blocks": 2})
        assert (engine_log.level, engine_log.propagate) == before
    bridged = [r.getMessage() for r in caplog.records]
    assert "prune: block 1/2" in bridged and "statistics: block 1/2" in bridged
    assert [r.name for r in caplog.records].count("dlp.engine") == 0


# ============================================================================================ recovery (issue 12)
#: A tiny LoRA recovery: 4 steps of one 32-token window, state stored every 2 steps.
RECOVERY = {"steps": 4, "batch": 1, "seqlen": 32, "rank": 2, "alpha": 4.0, "lr": 1e-3,
            "target_modules": ["q_proj", "v_proj"], "save_every": 2}


@pytest.fixture(scope="module")
def recovered(base):
    """The base job plus ``recovery:``, first failing right after the first training state is stored (step 2 of
    4), then again: (runner, base summary, recovered summary, computed stages, trace) of the second run."""
    from pipeline.cache import InjectedFailure

    runner, s1, _ = base
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(InjectedFailure):
        runner.run(mp, fail="recover:state_saved", recovery=RECOVERY)
    summary = runner.run(mp, recovery=RECOVERY)
    out = runner, s1, summary, runner.computed(), read_trace(runner.trace)
    mp.undo()
    return out


def _store_keys(runner: Runner, prefix: str) -> list[str]:
    from pipeline.store import open_store

    return open_store(str(runner.workdir / "artifacts"), workdir=str(runner.workdir)).list_keys(prefix)


def test_recovery_resumes_from_the_stored_state_and_registers_exact_sparsity(recovered):
    from flows.compress import RECOVERY_STAGES
    from pipeline.registry import get_client

    runner, s1, s, computed, trace = recovered
    assert set(s["stages"]) == ALL | set(RECOVERY_STAGES)
    assert computed == {"recover", "evaluate", "register"}  # the pruned model's evaluation is the base run's
    assert trace.count("recover:state_saved") == 1  # resumed at step 2: only the state of step 4 is saved
    assert s["stages"]["recover"]["state"] == "Completed" and s["stages"]["evaluate_pruned"]["state"] == "Cached"
    rec = s["recovery"]
    assert rec["resumed_from_step"] == 2 and not [k for k in _store_keys(runner, "recover") if "/state/" in k]
    assert rec["exact"] and rec["sparsity_after"] == rec["sparsity_before"] == s1["achieved_sparsity"]
    assert s["achieved_sparsity"] == s1["achieved_sparsity"]  # the prune stage's, to the weight
    assert rec["steps"] == 4 and rec["ppl_before"] == s1["pruned_ppl"] and rec["ppl_after"] == s["pruned_ppl"]
    assert "/recover/" in s["checkpoint_uri"] and s["version"] != s1["version"] and s["variant_key"] != s1["variant_key"]
    client = get_client(None, runner.workdir)
    mv = client.get_model_version("tiny-llama-dlp", s["version"])
    assert mv.tags["dlp.recovered"] == "true" and mv.tags["dlp.recovery.rank"] == "2"
    assert mv.tags["dlp.recovery.target_modules"] == "q_proj,v_proj" and mv.tags["dlp.artifact_uri"] == s["checkpoint_uri"]
    assert "dlp.recovered" not in client.get_model_version("tiny-llama-dlp", s1["version"]).tags
    m = client.get_run(mv.run_id).data.metrics
    assert m["recovery.sparsity_after"] == m["recovery.sparsity_before"] == m["sparsity.achieved"]
    assert m["recovery.exact"] == 1.0 and m["recovery.ppl_before"] == rec["ppl_before"]
    assert m["recovery.ppl_after"] == m["ppl.pruned"] == rec["ppl_after"] and m["time.recover_s"] > 0
    assert [h.step for h in client.get_metric_history(mv.run_id, "recovery.loss")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "recovery")}
    assert {"recovery/loss.png", "recovery/report.json"} <= artifacts


def test_recovery_rerun_is_served_from_the_store_and_listed_beside_the_others(recovered, env):
    from cli.pipeline_commands import format_summary
    from pipeline.report import render_html
    from pipeline.variants import format_table, load_variants

    runner, s1, first, _, _ = recovered
    again = runner.run(env, recovery=RECOVERY)
    assert again["stages"]["recover"]["state"] == "Cached" and runner.computed() == set()
    assert again["version"] == first["version"] and again["recovery"] == first["recovery"]
    variants = {str(v.version): v for v in load_variants("tiny-llama-dlp", workdir=runner.workdir)}
    assert variants[first["version"]].recovered and not variants[s1["version"]].recovered
    table = format_table(list(variants.values()))
    assert table.splitlines()[0].rstrip().endswith("recovered") and "lora r2 (ppl" in table
    assert "lora r2 (ppl" in render_html("tiny-llama-dlp", list(variants.values()))
    assert "recovery (LoRA)" in format_summary(again) and "(exact)" in format_summary(again)


def test_unmerged_adapter_is_evaluated_folded_and_logged_beside_the_sparse_model(recovered, env):
    from pipeline.registry import get_client

    runner, s1, masked, _, _ = recovered
    s = runner.run(env, recovery={**RECOVERY, "merge": "none"})
    assert runner.computed() == {"recover", "evaluate", "register"}  # another recovery; the pruned model's eval reused
    rec = s["recovery"]
    assert rec["exact"] and s["achieved_sparsity"] == s1["achieved_sparsity"]  # the stored weights are the pruned ones
    assert rec["ppl_before"] == s1["pruned_ppl"] and rec["ppl_after"] == s["pruned_ppl"] != s1["pruned_ppl"]
    assert s["version"] not in (masked["version"], s1["version"])
    folded = list((runner.workdir / "cache" / "adapter-folded").glob("*/checkpoint/model.safetensors"))
    assert len(folded) == 1  # what the evaluation read: the adapter folded into a dense copy
    client = get_client(None, runner.workdir)
    mv = client.get_model_version("tiny-llama-dlp", s["version"])
    assert mv.tags["dlp.recovery.merge"] == "none" and mv.tags["dlp.recovery.adapter_artifact"] == "adapter"
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= {
        a.path for a in client.list_artifacts(mv.run_id, "adapter")}
