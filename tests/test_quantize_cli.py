"""``dlp quantize``, ``dlp pack`` and ``dlp materialize`` end to end on a tiny pruned model saved as a folder,
and their bad input: one line, exit status 2, before any weight is read."""
from __future__ import annotations

import json

import pytest
import torch

from cli import main
from dlp.models import _sha256_file, resolve_model

from . import tiny_models


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base, pruned): a tiny random Llama with the real SmolLM2 tokenizer, and its Wanda-pruned copy."""
    import transformers as tf

    from dlp import pruning
    from dlp.checkpoint import save_checkpoint

    tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("quant-cli")
    save_checkpoint(model, tok, root / "base", {})
    windows = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    report = pruning.prune(model, [0.6, 0.6], method="wanda", windows=windows)
    save_checkpoint(model, tok, root / "pruned", report.to_json())
    return root / "base", root / "pruned"


@pytest.mark.parametrize("method,bits,compensation", [("gptq", 4, "exact"), ("gptq", 8, "shared"), ("rtn", 8, "exact")])
def test_quantize_writes_a_checkpoint_that_keeps_the_zeros(capsys, folders, tmp_path, method, bits, compensation):
    out = tmp_path / f"{method}{bits}"
    code, stdout, err = run(capsys, "quantize", "--model", folders[1], "--out", out, "--bits", bits,
                            "--group-size", 32, "--method", method, "--compensation", compensation,
                            "--calibration", "c4", "--nsamples", 4, "--seqlen", 64, "--json")
    assert code in (0, None), err
    summary = json.loads(stdout)
    assert summary["sparsity_kept"] is True and summary["sparsity_after"] == summary["sparsity_before"] > 0.5
    assert summary["bytes_on_disk"] < summary["dense_bytes"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["format"] == "pack-quantized"
    assert (out / "tokenizer.json").exists()
    report = json.loads((out / "dlp_report.json").read_text())
    assert report["quantization"]["method"] == method and report["quantization"]["bits"] == bits


def test_pack_and_materialize_round_trip(capsys, folders, tmp_path):
    base, pruned = folders
    code, stdout, err = run(capsys, "pack", "--model", pruned, "--base", base, "--out", tmp_path / "var", "--json")
    assert code in (0, None), err
    info = json.loads(stdout)
    assert info["kinds"] == {"base": 7, "mask": 14} and info["ratio"] < 0.5
    code, stdout, err = run(capsys, "materialize", tmp_path / "var", "--base", base, "--out", tmp_path / "back")
    assert code in (0, None), err
    assert "bit-exact" in stdout
    assert _sha256_file(pruned / "model.safetensors") == _sha256_file(tmp_path / "back" / "model.safetensors")
    assert (tmp_path / "back" / "dlp_report.json").exists() and (tmp_path / "back" / "tokenizer.json").exists()


def _one_error(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("args,needle", [
    (["--bits", 3], "bits must be one of 4, 8"),
    (["--group-size", 48], "group size 48 does not divide in_features 64"),
    (["--group-size", -1], "group size must be in [1, inf)"),
    (["--method", "awq"], "unknown quantization method 'awq'"),
    (["--compensation", "full"], "unknown --compensation 'full'"),
    (["--export-dtype", "int8"], "unknown --export-dtype 'int8'"),
    (["--calibration", "no-such-file.txt"], "is neither a file"),
])
def test_quantize_bad_input(capsys, folders, tmp_path, args, needle):
    code, _, err = run(capsys, "quantize", "--model", folders[1], "--out", tmp_path / "q", "--group-size", 32,
                       "--nsamples", 4, "--seqlen", 64, *args)
    _one_error(code, err, needle)
    assert not (tmp_path / "q").exists()


def test_pack_and_materialize_bad_input(capsys, folders, tmp_path):
    base, pruned = folders
    code, _, err = run(capsys, "materialize", pruned, "--base", base, "--out", tmp_path / "x")
    _one_error(code, err, "is not a mask-stored variant")
    code, _, err = run(capsys, "pack", "--model", tmp_path / "nowhere", "--base", base, "--out", tmp_path / "v")
    _one_error(code, err, "is not a Hugging Face model folder")
    assert run(capsys, "pack", "--model", pruned, "--base", base, "--out", tmp_path / "var")[0] in (0, None)
    code, _, err = run(capsys, "materialize", tmp_path / "var", "--base", pruned, "--out", tmp_path / "back")
    _one_error(code, err, "changed since the variant was packed")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    code, _, err = run(capsys, "materialize", tmp_path / "var", "--base", base, "--out", tmp_path / "full")
    _one_error(code, err, "exists and is not empty")
