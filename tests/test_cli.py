"""The ``dlp`` CLI: JSON outputs on a tiny local model, and bad input -> one line, exit 2, no traceback."""
import json
import subprocess
import sys

import pytest
import torch

from cli import main
from dlp.models import resolve_model

from .conftest import DATA_DIR, ROOT


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local safetensors folder."""
    import transformers as tf

    ref = resolve_model("smollm2-135m")
    tok = tf.AutoTokenizer.from_pretrained(ref.path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_ratios_json(capsys, tiny_folder):
    code, out, err = run(capsys, "ratios", "--model", str(tiny_folder), "--calibration", "wikitext2-valid",
                         "--nsamples", "4", "--seqlen", "64", "--sparsity", "0.6", "--alpha", "0.1", "--json")
    assert code in (0, None), err
    result = json.loads(out)
    r = result["sparsity"]
    assert len(r) == 4
    assert sum(r) / 4 == pytest.approx(0.6) and max(r) - min(r) == pytest.approx(0.2)
    assert result["statistic"] == "median" and result["block_passes"] == 1


def test_prune_writes_loadable_checkpoint(capsys, tiny_folder, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run(capsys, "prune", "--model", str(tiny_folder), "--calibration", "c4", "--nsamples", "4",
                         "--seqlen", "64", "--method", "wanda", "--allocation", "owl", "--mode", "sequential",
                         "--out", str(out_dir), "--json")
    assert code in (0, None), err
    summary = json.loads(out)
    assert summary["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)
    import transformers as tf

    back = tf.AutoModelForCausalLM.from_pretrained(out_dir)
    zeros = sum(int((p == 0).sum()) for n, p in back.named_parameters() if "layers" in n and p.dim() == 2)
    total = sum(p.numel() for n, p in back.named_parameters() if "layers" in n and p.dim() == 2)
    assert zeros / total == pytest.approx(0.7, abs=0.01)
    report = json.loads((out_dir / "dlp_report.json").read_text())
    assert report["allocation"]["allocation"] == "owl"
    code, out, err = run(capsys, "ppl", "--model", str(out_dir), "--seqlen", "64", "--max-windows", "3", "--json")
    assert code in (0, None), err
    assert json.loads(out)["windows"] == 3


@pytest.mark.parametrize("args,needle", [
    (["ratios", "--sparsity", "1.2"], "sparsity must be in (0, 1)"),
    (["ratios", "--sparsity", "0"], "sparsity must be in (0, 1)"),
    (["ratios", "--alpha", "0.6"], "alpha must be in"),
    (["ratios", "--alpha", "lots"], "--alpha must be a number"),
    (["ratios", "--nsamples", "0"], "--nsamples must be a positive integer"),
    (["ratios", "--seqlen", "-3"], "--seqlen must be an integer above 1"),
    (["prune", "--pattern", "2-4", "--out", "x"], "cannot parse pattern '2-4'"),
    (["prune", "--method", "random", "--out", "x"], "unknown method 'random'"),
    (["ratios", "--model", "no/such-model-anywhere"], "cannot fetch model 'no/such-model-anywhere'"),
    (["ratios", "--model", "./no-such-folder"], "unknown model './no-such-folder'"),
    (["ppl", "--max-windows", "0"], "--max-windows must be a positive integer"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_bad_data_and_architecture(capsys, tiny_folder, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\nnot json\n')
    cases = [
        (str(short), "too short for seqlen=64"),
        (str(empty), "is empty"),
        (str(broken), "is not valid JSON"),
        (str(tmp_path / "missing.txt"), "is neither a file"),
        (str(tmp_path / "data.csv"), "unsupported data file"),
    ]
    (tmp_path / "data.csv").write_text("a,b\n")
    for source, needle in cases:
        code, _, err = run(capsys, "ratios", "--model", str(tiny_folder), "--calibration", source, "--nsamples", "2",
                           "--seqlen", "64")
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, (source, err)
    # an encoder-decoder model is no decoder-only LM
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    t5_dir = tmp_path / "t5"
    t5.save_pretrained(t5_dir)
    code, _, err = run(capsys, "ratios", "--model", str(t5_dir))
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "unsupported model" in errors[0] and "Traceback" not in err


def test_installed_entry_point_exit_code():
    """The real ``dlp`` executable: a bad flag value exits 2 with one line and no traceback."""
    exe = ROOT / ".venv" / "bin" / "dlp"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli"]
    proc = subprocess.run(cmd + ["ratios", "--sparsity", "1.5"], capture_output=True, text=True, timeout=120,
                          env={"DLP_DATA_DIR": str(DATA_DIR), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: sparsity must be in (0, 1) (e.g. 0.7), got 1.5"


def test_eval_json_on_tiny_model(capsys, tiny_folder):
    code, out, err = run(capsys, "eval", "--model", str(tiny_folder), "--tasks", "rte,arc_easy", "--limit", "3", "--json")
    assert code in (0, None), err
    result = json.loads(out)
    assert set(result["tasks"]) == {"rte", "arc_easy"}
    assert all(t["n_samples"] == 3 and 0.0 <= t["acc"] <= 1.0 for t in result["tasks"].values())
    assert result["mean_acc"] == pytest.approx(sum(t["acc"] for t in result["tasks"].values()) / 2)


@pytest.mark.parametrize("args,needle", [
    (["eval", "--tasks", "boolq,mmlu"], "unknown task(s) mmlu; valid tasks: boolq"),
    (["eval", "--limit", "0"], "--limit must be a positive integer"),
])
def test_eval_bad_input(capsys, args, needle):
    code, _, err = run(capsys, *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
