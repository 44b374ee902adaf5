"""Recovery benchmark on the bundled SmolLM2-135M: Wanda + DLP at 70 % (the demo job: C4 32 x 512 seed 0,
alpha 0.15, median, sequential), then LoRA recovery for each step budget; WikiText-2 perplexity and the exact
count of zero weights before and after, for each way of keeping the adapter:

- ``masked``: mask-aware LoRA, masked merge (the default: every zero kept);
- ``unmerged``: plain LoRA, adapter kept beside the pruned weights (the Wanda/OWL recipe);
- ``plain merge``: the same plain adapter merged in full (densifies);
- ``masked merge of a plain adapter``: the same plain adapter merged through the mask (what a masked merge
  without mask-aware training gives).

Each training run is ``dlp recover`` in its own process under ``/usr/bin/time -v`` (wall time, peak RSS).
Results are cached in the work folder, so an interrupted benchmark continues where it stopped.

    nice -n 10 .venv/bin/python benchmarks/bench_recovery.py [--budgets 60,240] [--eval-windows 16] \\
        [--work .dlp-work/bench-recovery] [--threads N] [--all-variants-at first|every]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CALIBRATION = {"source": "c4", "nsamples": 32, "seqlen": 512, "seed": 0}


class Results:
    """A JSON file of finished measurements, written after each one."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))
        return value


def prune_demo(out: Path) -> dict:
    """Wanda + DLP 70 % like configs/demo.yaml, through the library; the checkpoint as `dlp prune` writes it."""
    from dlp import allocation, data
    from dlp.checkpoint import save_checkpoint
    from dlp.models import load_model
    from dlp.pruning import prune
    from dlp.statistics import collect_statistics

    start = time.perf_counter()
    net, tok, ref = load_model("smollm2-135m")
    windows = data.calibration_windows(tok, data.load_text(CALIBRATION["source"]), CALIBRATION["nsamples"],
                                       CALIBRATION["seqlen"], CALIBRATION["seed"])
    stats = collect_statistics(net, windows)
    ratios = allocation.allocate(stats, "dlp", 0.7, alpha=0.15, statistic="median")
    report = prune(net, ratios.ratios, method="wanda", mode="sequential", windows=windows, stats=stats)
    summary = {**report.to_json(), "allocation": ratios.to_json(), "model": ref.source, "calibration": CALIBRATION}
    save_checkpoint(net, tok, out, summary)
    return {"achieved_sparsity": report.overall, "seconds": time.perf_counter() - start}


def evaluate(model, tok, args) -> float:
    from dlp import data
    from dlp.perplexity import perplexity

    ids = data.evaluation_tokens(tok, data.load_text("wikitext2"))
    return perplexity(model, ids, args.eval_seqlen, max_windows=args.eval_windows)["ppl"]


def zeros(model) -> int:
    from dlp.recovery_merge import zero_counts

    return sum(zero_counts(model).values())


def timed_recover(pruned: Path, out: Path, steps: int, merge: str, threads: int) -> dict:
    """`dlp recover` in its own process under /usr/bin/time -v: its report, wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", "from cli import main; main()", "recover",
           "--model", str(pruned), "--out", str(out), "--steps", str(steps), "--merge", merge, "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dlp recover failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": seconds, "peak_rss_mb": rss_kb / 1024, "train_s": report["seconds"]["train"],
            "loss_first": report["loss"][0], "loss_last": report["loss"][-1],
            "zeros_before": report["sparsity"]["zeros_before"], "zeros_after": report["sparsity"]["zeros_after"],
            "prunable": report["sparsity"]["prunable_weights"], "command": " ".join(cmd[2:])}


VARIANTS = ("masked", "unmerged", "plain merge", "masked merge of a plain adapter")


def variants(work: Path, steps: int, res: Results, args, names: tuple[str, ...] = VARIANTS) -> None:
    """Train the adapters ``names`` need for one budget (mask-aware, plain), then measure each way of keeping them."""
    import transformers as tf
    from peft import PeftModel

    from dlp.recovery_merge import masked_merge_

    pruned = work / "pruned"
    for merge in ("masked",) + (("none",) if set(names) - {"masked"} else ()):
        key = f"train/{steps}/{merge}"
        if res.get(key) is None:
            print(f"training {steps} steps, merge {merge} ...", flush=True)
            res.put(key, timed_recover(pruned, work / f"recovered-{steps}-{merge}", steps, merge, args.threads))
    tok = tf.AutoTokenizer.from_pretrained(pruned)
    for name in names:
        key = f"eval/{steps}/{name}"
        if res.get(key) is not None:
            continue
        if name == "masked":
            model = tf.AutoModelForCausalLM.from_pretrained(work / f"recovered-{steps}-masked")
        else:
            folder = work / f"recovered-{steps}-none"
            model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(folder), str(folder / "adapter"))
            stored = zeros(model.base_model.model) if name == "unmerged" else None
            if name == "plain merge":
                model = model.merge_and_unload()
            elif name == "masked merge of a plain adapter":
                masked_merge_(model)
                model = model.unload()
        model.eval()
        t = time.perf_counter()
        ppl = evaluate(model, tok, args)
        z = stored if name == "unmerged" else zeros(model)
        res.put(key, {"ppl": ppl, "zeros": z, "eval_s": time.perf_counter() - t})
        print(f"{steps} steps, {name}: ppl {ppl:.2f}, zeros {z}", flush=True)


def table(res: Results, budgets: list[int], args) -> None:
    before = res.get("before")
    print(f"\nWikiText-2 perplexity, first {args.eval_windows} x {args.eval_seqlen} test tokens; "
          f"pruned: {before['ppl']:.2f}, zeros {before['zeros']} of {before['prunable']}")
    print("| steps | variant | ppl | vs pruned | zero weights | sparsity | exact | train wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps in budgets:
        for name in VARIANTS:
            e, t = res.get(f"eval/{steps}/{name}"), res.get(f"train/{steps}/{'masked' if name == 'masked' else 'none'}")
            if e is None:
                continue
            drop = 1 - e["ppl"] / before["ppl"]
            print(f"| {steps} | {name} | {e['ppl']:.2f} | {-drop:+.1%} | {e['zeros']} | "
                  f"{e['zeros'] / before['prunable']:.6f} | {'yes' if e['zeros'] == before['zeros'] else 'no'} | "
                  f"{t['wall_s']:.0f} | {t['peak_rss_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="60,240", help="comma-separated step budgets (the first: the CPU default)")
    ap.add_argument("--all-variants-at", default="first", choices=("first", "every"),
                    help="measure the four ways of keeping the adapter at the first budget only (the larger "
                         "budgets: the masked default alone), or at every budget")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    ap.add_argument("--work", type=Path, default=ROOT / ".dlp-work" / "bench-recovery")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    res = Results(args.work / "results.json")
    if not (args.work / "pruned" / "model.safetensors").exists():
        print("pruning (Wanda + DLP 70 %, C4 32 x 512) ...", flush=True)
        res.put("prune", prune_demo(args.work / "pruned"))
    if res.get("before") is None:
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(args.work / "pruned")
        tok = tf.AutoTokenizer.from_pretrained(args.work / "pruned")
        from dlp.recovery_merge import prunable_weights

        res.put("before", {"ppl": evaluate(model.eval(), tok, args), "zeros": zeros(model),
                           "prunable": prunable_weights(model)})
    for i, steps in enumerate(budgets):
        variants(args.work, steps, res, args, VARIANTS if i == 0 or args.all_variants_at == "every" else ("masked",))
    table(res, budgets, args)


if __name__ == "__main__":
    main()
