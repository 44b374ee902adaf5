"""The offline demo end to end on the bundled SmolLM2-135M (reduced: 8 x 128 calibration, 8 x 128 perplexity
tokens): statistics, DLP rates, Wanda at 70 %, dense and pruned perplexity, registration, and the registered
version (stored as masks over the base) loads back through ``models:/NAME@candidate``."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.conftest_pipeline"]


@pytest.mark.real
def test_demo_end_to_end_on_smollm2(tmp_path, prefect_harness, monkeypatch):
    import mlflow
    import torch

    from flows.compress import compress
    from pipeline.registry import configure_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = {
        "calibration.nsamples": 8,
        "calibration.seqlen": 128,
        "evaluation.perplexity.seqlen": 128,
        "evaluation.perplexity.max_windows": 8,
        "workdir": str(tmp_path / "work"),
    }
    s = compress(overrides=overrides)  # no job: configs/demo.yaml
    assert s["base_model"]["source"] == "smollm2-135m" and s["registered_name"] == "smollm2-135m-dlp"
    assert s["target_sparsity"] == 0.7 and s["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert len(s["per_block"]) == 30
    targets = [b["target"] for b in s["per_block"]]
    assert max(targets) - min(targets) == pytest.approx(0.3, abs=1e-6)  # DLP: range 2 alpha
    assert s["pruned_ppl"] > s["dense_ppl"] > 1
    assert s["alias_uri"] == "models:/smollm2-135m-dlp@candidate"

    configure_mlflow(None, tmp_path / "work")
    loaded = mlflow.pyfunc.load_model(s["alias_uri"]).unwrap_python_model()  # stored as masks: materialised here
    components = {"model": loaded.model, "tokenizer": loaded.tokenizer}
    tags = mlflow.MlflowClient().get_model_version_by_alias(s["registered_name"], "candidate").tags
    assert tags["dlp.storage"] == "masks" and int(tags["dlp.bytes_stored"]) < 0.05 * int(tags["dlp.bytes_dense"])
    model = components["model"]
    layer = model.model.layers[5].mlp.up_proj.weight
    assert float((layer == 0).float().mean()) == pytest.approx(s["per_block"][5]["achieved"], abs=0.02)
    with torch.no_grad():
        ids = components["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
        assert torch.isfinite(model(ids).logits).all()
