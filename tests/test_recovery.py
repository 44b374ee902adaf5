"""Recovery fine-tuning (dlp.recovery): the masked merge keeps every zero, a SIGKILLed run resumes to the
same weights, bad input fails in one line before training, and `dlp recover` end to end -- on tiny models."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dlp.adapter_fold import fold_adapter
from dlp.decoder import find_decoder
from dlp.errors import DLPError
from dlp.recovery_merge import cast_keeping_support_, masked_merge_, merge, zero_counts
from dlp.recovery_settings import RecoverySettings
from dlp.recovery_train import add_lora

from . import tiny_models
from .conftest import ROOT
from .test_cli import run  # main() under pytest.raises(SystemExit): (code, stdout, stderr)


def _pruned_tiny(arch: str):
    from dlp.pruning import prune

    model = tiny_models.build(arch, layers=2)
    prune(model, [0.6, 0.6], method="magnitude")
    return model


def _random_adapters(peft_model, seed: int = 1) -> None:
    """B is zero after init; give every adapter a non-zero update so a merge has something to add."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _targets(model) -> tuple[str, ...]:

    return tuple(sorted({n.rsplit(".", 1)[-1] for n in find_decoder(model).linears(0)}))


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_masked_merge_keeps_every_zero_and_plain_merge_does_not(arch):
    model = _pruned_tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = zero_counts(model)
    settings = RecoverySettings(target_modules=_targets(model))
    peft_model = add_lora(model, settings)
    _random_adapters(peft_model)
    deltas = {m.get_base_layer().weight.data_ptr(): m.get_delta_weight("default").clone()
              for m in peft_model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    assert masked_merge_(peft_model) == len(deltas) > 0
    merged = peft_model.unload()
    assert zero_counts(merged) == zeros and sum(zeros.values()) > 0
    for name, w in merged.state_dict().items():
        if w.data_ptr() in deltas:
            kept = before[name] != 0
            assert torch.equal(w == 0, before[name] == 0), name  # the same positions, not just the same count
            assert torch.equal(w[kept], (before[name] + deltas[w.data_ptr()])[kept]), name
        else:
            assert torch.equal(w, before[name]), name

    plain = add_lora(_pruned_tiny(arch), settings)
    _random_adapters(plain)
    assert sum(zero_counts(merge(plain, "plain")).values()) < sum(zeros.values()) // 100


def test_masked_merge_never_cancels_a_kept_weight_to_zero():
    model = _pruned_tiny("llama")
    peft_model = add_lora(model, RecoverySettings(target_modules=("q_proj",)))
    _random_adapters(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.get_base_layer().weight
    i, j = (weight != 0).nonzero()[0].tolist()
    with torch.no_grad():  # make W + delta exactly 0.0 at one kept position
        weight[i, j] = -layer.get_delta_weight("default")[i, j]
    zeros = sum(zero_counts(model).values())  # (names carry peft's base_layer while wrapped)
    kept_value = weight[i, j].item()
    masked_merge_(peft_model)
    assert weight[i, j].item() == kept_value != 0.0
    assert sum(zero_counts(peft_model.unload()).values()) == zeros


def test_mask_aware_training_is_exactly_the_merged_model():
    from dlp.recovery_train import train

    model = _pruned_tiny("llama")
    zeros = zero_counts(model)
    settings = RecoverySettings(steps=3, batch=2, seqlen=32, lr=1e-2, dropout=0.05, target_modules=_targets(model))
    peft_model = add_lora(model, settings)
    state, _ = train(peft_model, tiny_models.windows(6, 32), settings, key="k")
    assert len(state.losses) == 3
    x = tiny_models.windows(2, 32, seed=1)
    with torch.no_grad():
        trained = peft_model(input_ids=x).logits
        merged = merge(peft_model, "masked")
        assert torch.equal(merged(input_ids=x).logits, trained)  # bit for bit: the merge writes the trained weight
    assert zero_counts(merged) == zeros


@pytest.mark.parametrize("change, needle", [
    ({"steps": 0}, "recovery steps must be in [1, inf)"),
    ({"lr": 0.0}, "recovery lr must be in (0, inf)"),
    ({"rank": 0}, "LoRA rank must be in [1, inf)"),
    ({"alpha": -1.0}, "LoRA alpha must be in (0, inf)"),
    ({"dropout": 1.0}, "LoRA dropout must be in [0, 1)"),
    ({"batch": 0}, "recovery batch must be in [1, inf)"),
    ({"seqlen": 1}, "seqlen must be in [2, inf)"),
    ({"save_every": 0}, "save-every must be in [1, inf)"),
    ({"steps": 2.5}, "recovery steps must be an integer"),
    ({"merge": "dense"}, "unknown merge 'dense'"),
    ({"target_modules": ""}, "target modules are empty"),
])
def test_settings_bounds(change, needle):
    with pytest.raises(DLPError, match=None) as err:
        RecoverySettings(**change).validate()
    assert needle in str(err.value)


# ---------------------------------------------------------------- a tiny pruned checkpoint with a real tokenizer
@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    """A tiny random Llama (the SmolLM2 tokenizer), magnitude-pruned to 60 %, saved like `dlp prune` does,
    with a report naming its calibration: C4, 4 x 64, seed 0."""
    import transformers as tf

    from dlp.checkpoint import save_checkpoint
    from dlp.models import resolve_model
    from dlp.pruning import prune

    tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg).eval()
    report = prune(model, [0.6, 0.6], method="magnitude")
    out = tmp_path_factory.mktemp("recovery") / "pruned"
    save_checkpoint(model, tok, out, {**report.to_json(),
                                      "calibration": {"source": "c4", "nsamples": 4, "seqlen": 64, "seed": 0}})
    return out


SMALL = ("--steps", "4", "--batch", "2", "--seqlen", "32", "--save-every", "2")


def test_recover_cli_masked_end_to_end(capsys, pruned_folder, tmp_path):
    import transformers as tf

    out = tmp_path / "recovered"
    code, stdout, err = run(capsys, "recover", "--model", str(pruned_folder), "--out", str(out), *SMALL,
                            "--lr", "1e-2", "--json")
    assert code in (0, None), err
    report = json.loads(stdout)
    assert report["steps"] == 4 and len(report["loss"]) == 4 and report["resumed_from_step"] is None
    assert report["sparsity"]["exact"] and report["sparsity"]["zeros_before"] == report["sparsity"]["zeros_after"] > 0
    assert report["data"]["source"] == "c4" and report["data"]["rule"] == "documents"
    assert report["data"]["disjoint_from"] == {"nsamples": 4, "seqlen": 64, "seed": 0}
    assert {"model.safetensors", "config.json", "tokenizer.json", "dlp_report.json", "recovery_report.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "dlp_report.json").read_text())["recovery"]["sparsity"]["exact"]
    assert not (tmp_path / "recovered.recovery-state").exists()  # the finished run's states are removed
    pruned, recovered = load_file(str(pruned_folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = 0
    for name, w in pruned.items():
        assert torch.equal(recovered[name] == 0, w == 0), name  # every zero where it was, no new one
        changed += int(not torch.equal(recovered[name], w))
    assert changed == 2 * 7  # every block linear of both blocks was updated
    tf.AutoModelForCausalLM.from_pretrained(out)  # loads as a plain HF checkpoint


def test_recover_cli_unmerged_adapter(capsys, pruned_folder, tmp_path):
    import transformers as tf
    from peft import PeftModel

    out = tmp_path / "adapter-run"
    code, stdout, err = run(capsys, "recover", "--model", str(pruned_folder), "--out", str(out), *SMALL,
                            "--merge", "none", "--target-modules", "q_proj,v_proj")
    assert code in (0, None), err
    assert "exact, merge none" in stdout
    pruned, stored = load_file(str(pruned_folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in pruned.items())  # the pruned weights, untouched
    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(out), str(out / "adapter")).eval()
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 2
    # the evaluation view: the adapter folded into a dense copy computes what the unmerged adapter computes
    folded = fold_adapter(out, tmp_path / "folded")
    assert not (folded / "adapter").exists()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        got = tf.AutoModelForCausalLM.from_pretrained(folded).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    changed = {k for k, v in load_file(str(folded / "model.safetensors")).items() if not torch.equal(v, stored[k])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}


def test_recovered_checkpoint_keeps_the_pruned_dtype_and_every_zero(capsys, pruned_folder, tmp_path):
    import transformers as tf

    from dlp.checkpoint import save_checkpoint

    model = tf.AutoModelForCausalLM.from_pretrained(pruned_folder, dtype=torch.bfloat16)
    bf16 = save_checkpoint(model, tf.AutoTokenizer.from_pretrained(pruned_folder), tmp_path / "pruned-bf16",
                           json.loads((pruned_folder / "dlp_report.json").read_text()))
    out = tmp_path / "recovered"
    code, stdout, err = run(capsys, "recover", "--model", str(bf16), "--out", str(out), *SMALL, "--json")
    assert code in (0, None), err
    assert json.loads(stdout)["written"]["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    pruned, recovered = load_file(str(bf16 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name, w in pruned.items():
        assert recovered[name].dtype == torch.bfloat16, name
        assert torch.equal(recovered[name] == 0, w == 0), name


def test_cast_to_float16_never_turns_a_kept_weight_into_a_zero():
    model = _pruned_tiny("llama")
    linear = next(iter(find_decoder(model).linears(0).values()))
    with torch.no_grad():
        linear.weight[0, :3] = torch.tensor([1e-9, -2e-9, 0.0])  # below float16's smallest value, and a zero
    before = zero_counts(model)
    assert cast_keeping_support_(model, torch.float16) == 2
    assert zero_counts(model) == before
    assert linear.weight.dtype == torch.float16 and linear.weight[0, 0] > 0 > linear.weight[0, 1]


@pytest.mark.parametrize("args, needle", [
    (("--steps", "0"), "recovery steps must be in [1, inf)"),
    (("--lr", "0"), "recovery lr must be in (0, inf)"),
    (("--rank", "0"), "LoRA rank must be in [1, inf)"),
    (("--target-modules", "q_proj,c_attn"), "target module 'c_attn' is not a linear of this model's decoder blocks"),
    (("--merge", "fold"), "unknown merge 'fold'"),
    (("--data", "SHORT", "--seqlen", "512"), "has no 512-token window; lower --seqlen or pass --data with more text"),
])
def test_recover_bad_input_one_line_before_training(capsys, monkeypatch, pruned_folder, tmp_path, args, needle):
    import dlp.recovery

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(dlp.recovery, "load_model", no_load)
    short = tmp_path / "short.txt"
    short.write_text("A training text far shorter than one window.\n")
    args = tuple(str(short) if a == "SHORT" else a for a in args)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "recover", "--model", str(pruned_folder), "--out", str(out), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists() and not (tmp_path / "out.recovery-state").exists()


# ---------------------------------------------------------------- resume after SIGKILL
WORKER = """
import os, sys, time, torch
torch.set_num_threads(1)
from dlp.recovery import plan_recovery, run_recovery
from dlp.recovery_settings import RecoverySettings
from dlp.recovery_state import FolderSaver

class Saver(FolderSaver):
    def save(self, step, folder):
        super().save(step, folder)
        if step == int(os.environ.get("HANG_AFTER", "0")):
            print("saved", step, flush=True)
            time.sleep(600)  # the test kills the process here, after a save, mid-training

model, out, states = sys.argv[1:4]
settings = RecoverySettings(steps=6, batch=2, seqlen=32, lr=1e-2, dropout=0.05, save_every=2)
run_recovery(plan_recovery(model, settings), out, saver=Saver(states))
"""


def _worker(pruned, out, states, hang_after=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HANG_AFTER": str(hang_after)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(pruned), str(out), str(states)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_sigkill_mid_training_resumes_to_the_same_weights(pruned_folder, tmp_path):
    straight = _worker(pruned_folder, tmp_path / "straight", tmp_path / "straight-states")
    killed = _worker(pruned_folder, tmp_path / "resumed", tmp_path / "states", hang_after=4)
    assert killed.stdout.readline().strip() == "saved 4"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "resumed").exists()
    assert json.loads((tmp_path / "states" / "latest.json").read_text())["step"] == 4
    resumed = _worker(pruned_folder, tmp_path / "resumed", tmp_path / "states")
    for proc in (straight, resumed):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    a = json.loads((tmp_path / "straight" / "recovery_report.json").read_text())
    b = json.loads((tmp_path / "resumed" / "recovery_report.json").read_text())
    assert a["resumed_from_step"] is None and b["resumed_from_step"] == 4
    assert a["loss"] == b["loss"] and len(a["loss"]) == 6  # bit-equal floats, step by step
    wa = load_file(str(tmp_path / "straight" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-equal merged weights
    pruned = load_file(str(pruned_folder / "model.safetensors"))
    assert sum(not torch.equal(wa[k], pruned[k]) for k in wa) == 2 * 7  # it trained every adapted linear


def test_resume_refuses_a_state_of_other_settings(pruned_folder, tmp_path):
    from dlp.recovery import plan_recovery, run_recovery
    from dlp.recovery_state import FolderSaver

    saver = FolderSaver(tmp_path / "states")
    run_recovery(plan_recovery(pruned_folder, RecoverySettings(steps=2, batch=1, seqlen=32, save_every=1)),
                 tmp_path / "a", saver=saver)
    other = plan_recovery(pruned_folder, RecoverySettings(steps=2, batch=1, seqlen=32, save_every=1, lr=5e-3))
    with pytest.raises(DLPError, match="belongs to another model, settings or training text"):
        run_recovery(other, tmp_path / "b", saver=saver)


# ---------------------------------------------------------------- training text disjoint from calibration
@pytest.mark.parametrize("source", ["c4", "wikitext2-valid"])
def test_training_windows_are_disjoint_from_calibration(smollm, source):
    from dlp import data

    tok = smollm[1]
    text = data.load_text(source)
    calibration = data.calibration_windows(tok, text, 8, 256, 0)
    windows, info = data.training_windows(tok, text, 64, 128, 0, exclude=(8, 256, 0))
    again, _ = data.training_windows(tok, text, 64, 128, 0, exclude=(8, 256, 0))
    assert torch.equal(windows, again) and windows.shape == (64, 128)
    assert info["rule"] == ("documents" if source == "c4" else "token ranges") and info["excluded"] >= 8
    grams = {tuple(w[j : j + 48].tolist()) for w in calibration for j in range(0, 256 - 48 + 1)}
    assert not any(tuple(w[j : j + 48].tolist()) in grams for w in windows for j in range(0, 128 - 48 + 1))
    other, _ = data.training_windows(tok, text, 64, 128, 1, exclude=(8, 256, 0))
    assert not torch.equal(windows, other)
