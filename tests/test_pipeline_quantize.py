"""The compress flow with a ``quantization:`` section on a tiny random Llama: the quantized variant is registered
with its zeros intact after quantize -> export -> load-back and lineage naming its pruned parent; a rerun serves
the quantize stage from the store; bad settings fail in one line, exit 2, before any weight is read. Tiny
models test plumbing, never quality."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.test_pipeline_cli import cli  # noqa: F401 (fixture)
from tests.test_pipeline_flow import Runner, tiny_job, tiny_model  # noqa: F401 (fixture)

pytest_plugins = ["tests.conftest_pipeline"]

QUANT = {"bits": 4, "group_size": 32, "method": "gptq"}


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory, prefect_harness):
    """One completed quantized run in a module-wide workdir: (Runner, summary, computed stages)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("pipeline-quantize")
    runner = Runner(tiny_model, root / "work", root / "trace.txt")
    summary = runner.run(mp, quantization=QUANT)
    first = runner.computed()
    mp.undo()
    return runner, summary, first


def _folder(uri: str) -> Path:
    assert uri.startswith("file://")
    return Path(uri.removeprefix("file://"))


def test_quantized_variant_keeps_the_zeros_and_names_its_parent(quantized):
    from dlp.export import load_dequantized
    from dlp.models import load_model
    from dlp.quantize import block_zeros
    from pipeline.registry import get_client

    runner, s, first = quantized
    assert "quantize" in first and {"prune", "evaluate", "register"} <= first
    q = s["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32 and q["zeros_loaded"] == q["zeros_parent"] > 0
    assert q["bytes_on_disk"] < 0.6 * q["parent_bytes"]
    assert s["checkpoint_uri"] == s["stages"]["quantize"]["uri"] and s["variant"].endswith("-w4g32-gptq")
    # independently: the stored packed checkpoint, loaded back by transformers, has the pruned parent's zeros
    pruned = _folder(s["stages"]["prune"]["uri"])
    dense = load_dequantized(_folder(s["checkpoint_uri"]))
    back = block_zeros(dense)
    assert back == block_zeros(load_model(str(pruned), dtype="float32")[0]) and back[0] == q["zeros_parent"]
    client = get_client(None, runner.workdir)
    version = client.get_model_version(s["registered_name"], s["version"])
    tags = version.tags
    assert tags["dlp.quantized"] == "True" and tags["dlp.quantize_key"] == q["key"]
    assert tags["dlp.prune_key"] == q["parent_key"] == pruned.parent.name  # prune/<key>/checkpoint
    assert tags["dlp.parent_artifact_uri"] == q["parent_uri"] == s["stages"]["prune"]["uri"] and tags["dlp.artifact_uri"] == s["checkpoint_uri"]
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["sparsity.loaded_back"] == q["sparsity_loaded"] and metrics["sparsity.zeros_kept"] == 1.0
    assert metrics["bytes_on_disk"] == q["bytes_on_disk"] and metrics["quant.bits"] == 4.0
    assert metrics["ppl.quantized"] == s["pruned_ppl"] > 1
    # the registered version is the packed checkpoint itself, and loads through MLflow with the same zeros
    import mlflow
    import torch

    net = mlflow.transformers.load_model(s["model_uri"], return_type="components")["model"]
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(net(x).logits.float(), dense(x).logits.float())


def test_rerun_serves_quantize_from_the_store(quantized, monkeypatch):
    runner, s1, _ = quantized
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s2 = runner.run(monkeypatch, quantization=QUANT)
    assert runner.computed() == set()
    assert s2["stages"]["quantize"]["state"] == "Cached" and s2["stages"]["evaluate"]["state"] == "Cached"
    assert s2["version"] == s1["version"] and s2["variant_key"] == s1["variant_key"]
    assert s2["quantization"] == s1["quantization"] and s2["pruned_ppl"] == s1["pruned_ppl"]
    from cli.pipeline_commands import format_summary

    assert "quantized: W4A16, group 32, gptq" in format_summary(s2)


def test_recover_then_quantize_chains_on_the_recovered_checkpoint(quantized, monkeypatch):
    """prune -> recover -> quantize in one job: quantize takes the recovered checkpoint (its parent), every zero of
    the pruned model survives both, and the variant is a version of its own."""
    from tests.test_pipeline_flow import RECOVERY

    runner, s1, _ = quantized
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = runner.run(monkeypatch, quantization=QUANT, recovery=RECOVERY)
    assert {"recover", "quantize", "evaluate", "register"} <= runner.computed()
    assert "prune" not in runner.computed() and s["stages"]["prune"]["state"] == "Cached"
    q, rec = s["quantization"], s["recovery"]
    assert q["parent_stage"] == "recover" and q["parent_key"] == rec["key"] and rec["exact"]
    assert q["zeros_loaded"] == q["zeros_parent"] == s1["quantization"]["zeros_parent"]
    assert s["variant"].endswith("-lora4-w4g32-gptq") and s["version"] != s1["version"]


@pytest.mark.parametrize("setting, needle", [
    ("quantization.bits=3", "'quantization.bits' (set by override): expected one of 4, 8, got 3"),
    ("quantization.group_size=48", "group size 48 does not divide in_features 64"),
])
def test_bad_quantization_is_one_line_exit_2_before_any_weight(cli, tiny_model, tmp_path, monkeypatch, setting,  # noqa: F811
                                                               needle):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = tiny_job(tiny_model, tmp_path / "work", quantization=QUANT)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out, err, secs = cli("compress", "--config", str(tmp_path / "job.yaml"), "--set", setting)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    work = tmp_path / "work"  # preflight made the store's folder: nothing in it, and Prefect never started
    assert secs < 15 and not list((work / "artifacts").rglob("*")) and not (work / "prefect").exists()
