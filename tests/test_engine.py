"""The calibration engine on tiny random models of every supported architecture."""
import pytest
import torch
from torch import nn

from dlp.decoder import find_decoder
from dlp.engine import CalibrationEngine, InputCollector
from dlp.errors import DLPError
from dlp.statistics import collect_statistics

from .tiny_models import ARCHS, build, windows


class _Record:
    """A visitor that records every linear's norm2 and changes nothing."""

    def __init__(self):
        self.norm2 = {}

    def collectors(self, index, linears):
        return {n: InputCollector(l.in_features, torch.device("cpu")) for n, l in linears.items()}

    def after_forward(self, index, block, collectors):
        for n, c in collectors.items():
            self.norm2[(index, n)] = c.norm2.clone()
        return False


def _reference_norms(model, ids):
    """Brute force: hooks on every block linear during one ordinary full-model forward."""
    layout = find_decoder(model)
    out, handles = {}, []
    for i in range(layout.num_blocks):
        for n, lin in layout.linears(i).items():
            def hook(_m, args, key=(i, n)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                out[key] = out.get(key, 0) + (x * x).sum(0)
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_reproduces_the_models_own_forward(arch):
    """Captured block inputs + block-by-block micro-batched walking give exactly the activations of the
    model's own forward: checked on the input of every linear of every block."""
    model = build(arch)
    ids = windows(5, 24)
    engine = CalibrationEngine(model, ids, batch_size=2)  # micro-batches 2, 2, 1
    visitor = _Record()
    engine.walk(visitor)
    expected = _reference_norms(model, ids)
    assert set(visitor.norm2) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(visitor.norm2[key], value, rtol=1e-4, atol=1e-5, msg=f"{arch} {key}")
    assert all(v == 1 for v in engine.counters.block_passes.values())  # one forward per block


def test_shared_inputs_are_accumulated_once():
    model = build("llama")
    ids = windows(4, 16)
    engine = CalibrationEngine(model, ids)

    class V(_Record):
        def after_forward(self, index, block, collectors):
            self.shared = collectors
            return False

    v = V()
    engine.walk(v, blocks=range(1))
    c = v.shared
    assert c["self_attn.q_proj"] is c["self_attn.k_proj"] is c["self_attn.v_proj"]
    assert c["mlp.gate_proj"] is c["mlp.up_proj"]
    assert c["self_attn.o_proj"] is not c["self_attn.q_proj"]
    assert c["self_attn.q_proj"].tokens == 4 * 16


def test_statistics_are_independent_of_micro_batch_size():
    model = build("llama")
    ids = windows(6, 16)
    a = collect_statistics(model, ids, batch_size=1)
    b = collect_statistics(model, ids, batch_size=6)
    for k in a.norm2:
        torch.testing.assert_close(a.norm2[k], b.norm2[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(a.blocks, b.blocks):
        assert x["mean"] == pytest.approx(y["mean"], rel=1e-5)
        assert x["median"] == pytest.approx(y["median"], rel=1e-5)


def test_statistics_round_trip(tmp_path):
    model = build("qwen2")
    stats = collect_statistics(model, windows(4, 16))
    path = stats.save(tmp_path / "stats.safetensors")
    back = type(stats).load(path)
    assert back.blocks == stats.blocks and back.nsamples == 4 and back.tokens == 64
    for k in stats.norm2:
        assert torch.equal(back.norm2[k], stats.norm2[k])


def test_statistics_match_their_definition():
    """Block mean/median/outlier ratio recomputed directly from weights and brute-force input norms."""
    model = build("llama")
    ids = windows(4, 16)
    stats = collect_statistics(model, ids)
    ref = _reference_norms(model, ids)
    layout = find_decoder(model)
    for i in range(layout.num_blocks):
        pooled = torch.cat([(lin.weight.detach().abs() * torch.sqrt(ref[(i, n)] / 4)).flatten()
                            for n, lin in layout.linears(i).items()])
        assert stats.blocks[i]["mean"] == pytest.approx(float(pooled.mean()), rel=1e-4)
        assert stats.blocks[i]["median"] == pytest.approx(float(pooled.median()), rel=1e-4)
        share = float((pooled > 5 * pooled.mean()).float().mean() * 100)
        assert stats.blocks[i]["owl_outlier_ratio"] == pytest.approx(share, abs=0.05)


def test_unsupported_architecture_is_named():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def get_input_embeddings(self):
            return None

    with pytest.raises(DLPError, match="unsupported architecture NotADecoder"):
        find_decoder(NotADecoder())
