"""Mask-preserving quantization (dlp.quantize) and the compressed-tensors export (dlp.export) on tiny
models: zeros survive quantize -> export -> load-back, GPTQ beats round-to-nearest on the error it
minimises, and bad settings fail in one line. Tiny random models: structure only, no quality claim."""
from __future__ import annotations

import json

import pytest
import torch

from dlp import export, pruning
from dlp.decoder import find_decoder
from dlp.errors import DLPError
from dlp.quantize import QuantSpec, gptq, quantize, rtn

from . import tiny_models


@pytest.fixture(scope="module")
def pruned_llama():
    model = tiny_models.build("llama", layers=2)
    pruning.prune(model, [0.5, 0.7], method="wanda", windows=tiny_models.windows())
    return model


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _linears(model):
    layout = find_decoder(model)
    return {layout.param_name(i, n): l.weight.detach().clone()
            for i in range(layout.num_blocks) for n, l in layout.linears(i).items()}


@pytest.mark.parametrize("method,bits,compensation", [("rtn", 4, "exact"), ("rtn", 8, "exact"), ("gptq", 4, "exact"),
                                                      ("gptq", 8, "exact"), ("gptq", 4, "shared")])
def test_quantize_keeps_the_mask_and_the_grid(pruned_llama, method, bits, compensation):
    model = _copy(pruned_llama)
    before = _linears(model)
    result = quantize(model, bits=bits, group_size=32, method=method, windows=tiny_models.windows(),
                      compensation=compensation)
    after = _linears(model)
    assert result.zeros_before == result.zeros_after > 0
    for name, W in after.items():
        assert torch.equal(W == 0, before[name] == 0), name  # no zero lost, none added
        scale = result.scales[name].repeat_interleave(32, dim=1)
        codes = W / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
        assert not torch.equal(W, before[name])


def _layer(seed=0, rows=32, cols=128, tokens=2048):
    torch.manual_seed(seed)
    X = torch.randn(tokens, 16) @ torch.randn(16, cols) + 0.1 * torch.randn(tokens, cols)  # correlated inputs
    W = torch.randn(rows, cols)
    return W, X


def test_gptq_error_below_rtn_on_its_calibration_inputs():
    W, X = _layer()
    W[W.abs() < 0.6] = 0  # about half pruned, a different mask in every row
    spec = QuantSpec(4, 32)
    H = X.t() @ X
    results = {"rtn": rtn(W, spec), "shared": gptq(W, H, spec, compensation="shared"),
               "exact": gptq(W, H, spec, compensation="exact")}
    err = {name: float(((q.weight - W) @ X.t()).pow(2).sum()) for name, q in results.items()}
    assert err["exact"] < err["shared"] < 0.5 * err["rtn"], err
    for q in results.values():
        assert torch.equal(q.weight == 0, W == 0)


def test_exact_and_shared_solvers_agree_without_zeros():
    """With nothing pruned every row's restricted Hessian is the full one: the batched per-row solver
    must reproduce plain GPTQ."""
    W, X = _layer(1, rows=8, cols=64)
    spec = QuantSpec(4, 16)
    exact, shared = gptq(W, X.t() @ X, spec, compensation="exact"), gptq(W, X.t() @ X, spec, compensation="shared")
    assert torch.allclose(exact.scale, shared.scale, rtol=1e-4)
    assert (exact.weight != shared.weight).float().mean() < 0.02  # a rare code flips on float ties
    assert torch.allclose(exact.weight, shared.weight, atol=float(shared.scale.max()) + 1e-6)


def test_export_loads_back_with_the_same_weights_and_zeros(pruned_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _copy(pruned_llama)
    result = quantize(model, bits=4, group_size=32, method="gptq", windows=tiny_models.windows())
    info = export.export_compressed(model, None, result, tmp_path / "q4")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert "sparsity_config" not in config and config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32 and group["weights"]["symmetric"]
    assert group["input_activations"] is None
    model.save_pretrained(tmp_path / "dense")
    assert info.bytes_on_disk < 0.5 * export.weight_bytes(tmp_path / "dense")
    back = export.load_dequantized(tmp_path / "q4")
    assert pruning.measured_sparsity(back) == pruning.measured_sparsity(model)
    ours, theirs = model.state_dict(), back.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # float32 scales: bit-exact round trip
    x = tiny_models.windows(2, 16)
    lazy = AutoModelForCausalLM.from_pretrained(tmp_path / "q4")  # transformers' default: decompress on first forward
    with torch.no_grad():
        assert torch.equal(lazy(x).logits, model(x).logits)


def test_bf16_export_keeps_zeros_and_codes(pruned_llama, tmp_path):
    model = _copy(pruned_llama)
    result = quantize(model, bits=8, group_size=64, method="rtn", scale_dtype=torch.bfloat16)
    export.export_compressed(model, None, result, tmp_path / "q8")
    back = export.load_dequantized(tmp_path / "q8")
    assert back.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert pruning.measured_sparsity(back) == pruning.measured_sparsity(model)
    for name, W in _linears(back).items():
        scale = result.scales[name].to(torch.float32).repeat_interleave(64, dim=1)
        assert torch.equal((W.float() / scale).round(), (_linears(model)[name] / scale).round()), name


@pytest.mark.parametrize("kwargs,needle", [
    (dict(bits=3), "bits must be one of 4, 8"),
    (dict(bits=16), "bits must be one of 4, 8"),
    (dict(group_size=48), "group size 48 does not divide in_features 64"),
    (dict(group_size=0), "group size must be in [1, inf)"),
    (dict(method="awq"), "unknown quantization method 'awq'"),
    (dict(compensation="full"), "unknown GPTQ compensation 'full'"),
    (dict(method="gptq", windows=None), "GPTQ needs calibration windows"),
])
def test_bad_settings_fail_in_one_line(pruned_llama, kwargs, needle):
    args = dict(bits=4, group_size=32, method="rtn")
    args.update(kwargs)
    model = _copy(pruned_llama)
    before = _linears(model)
    with pytest.raises(DLPError) as err:
        quantize(model, **args)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in _linears(model).items())  # nothing touched
