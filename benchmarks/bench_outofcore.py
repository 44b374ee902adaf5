"""Out-of-core engine figures: peak memory and wall time of each streamed stage, each stage in its own process
(peak RSS from ``wait4``, the kernel's count for that process alone).

    python benchmarks/bench_outofcore.py demo                      # bundled SmolLM2-135M, the demo job's settings
    python benchmarks/bench_outofcore.py big --model /tmp/rand4g --nsamples 32 --seqlen 512 --memory-budget 64MB
    python benchmarks/bench_outofcore.py dtype                     # bf16 vs float32 statistics and ratios
    python benchmarks/bench_outofcore.py malloc                    # the heap bound (dlp.resources) on vs off

``big`` prunes a (random-initialised, see random_model.py) checkpoint with Wanda + DLP 70 % end to end with the
real ``dlp prune`` command, then checks the output: its layout validates, a meta-device skeleton loads it, and
one block runs forward on it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))  # as the Makefile and the tests


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run one command; its return code and stdout (stderr is shown when it fails)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    return {"rc": proc.returncode, "stdout": proc.stdout}


def dlp(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def stage(name: str, cmd: list[str], env: dict | None = None) -> dict:
    """One stage in a fresh interpreter; a tiny wrapper process reports the peak RSS of its only child."""
    wrapper = [sys.executable, "-c", _WRAPPER, json.dumps(cmd)]
    result = run(wrapper, env)
    figures = json.loads(result["stdout"].strip().splitlines()[-1])
    figures["stage"] = name
    print(json.dumps({k: v for k, v in figures.items() if k != "stdout"}), flush=True)
    return figures


_WRAPPER = r"""
import json, os, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
out, err = p.communicate()
import resource
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
if p.returncode:
    sys.stderr.write(err[-3000:])
last = out.strip().splitlines()[-1] if out.strip() else "{}"
print(json.dumps({"rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(rss / 1024, 1),
                  "result": json.loads(last) if last.startswith("{") else last}))
sys.exit(p.returncode)
"""


def demo(args) -> None:
    """The demo job's settings (configs/demo.yaml) as the library commands, one process per stage."""
    work = Path(tempfile.mkdtemp(prefix="dlp-ooc-demo-"))
    calib = ["--calibration", "c4", "--nsamples", "32", "--seqlen", "512", "--seed", "0"]
    try:
        rows = [stage("statistics + rates (dlp ratios)", dlp("ratios", *calib, "--sparsity", "0.7", "--json")),
                stage("prune: statistics + Wanda sequential + write (dlp prune)",
                      dlp("prune", *calib, "--sparsity", "0.7", "--out", str(work / "pruned"), "--json")),
                stage("evaluate: perplexity, 64 x 512 (dlp ppl)",
                      dlp("ppl", "--model", str(work / "pruned"), "--seqlen", "512", "--max-windows", "64", "--json"))]
        summary(rows, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def big(args) -> None:
    src = Path(args.model)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out = Path(args.out or tempfile.mkdtemp(prefix="dlp-ooc-big-")) / "pruned"
    cmd = dlp("prune", "--model", str(src), "--calibration", args.calibration, "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--sparsity", "0.7", "--allocation", "dlp", "--method", "wanda",
              "--mode", args.mode, "--out", str(out), "--json")
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget, "--spill-dir", str(out.parent / "spill")]
    row = stage(f"statistics + rates + Wanda {args.mode} + write, {args.nsamples} x {args.seqlen}", cmd)
    row["checkpoint_gb"] = round(size / 1e9, 3)
    row["peak_rss_share_of_checkpoint"] = round(row["peak_rss_mib"] * 2**20 / size, 3)
    report = row.get("result") or {}
    if isinstance(report, dict):
        row["achieved_sparsity"] = report.get("achieved_sparsity")
        row["achieved_per_block"] = [round(a, 4) for a in report.get("achieved_per_block", [])]
    row["loads"] = stage("output check: validate, meta-load, one block forward",
                         [sys.executable, str(Path(__file__)), "check", str(out)])
    print(json.dumps(row, indent=1))
    if not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)


def check(args) -> None:
    """Open the pruned output for streaming (validates every shard), run block 0 on a few tokens."""
    import torch

    from dlp.engine import CalibrationEngine
    from dlp.perplexity import _NoVisitor
    from dlp.streaming import open_streamed

    with open_streamed(args.folder) as sm:
        ids = torch.randint(0, sm.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        final = CalibrationEngine.over(sm, ids).walk(_NoVisitor(), blocks=range(1))
        states = final.all()
        first = measured_sparsity_of_block(sm, 0)
        print(json.dumps({"shards": len(sm.reader.files), "block0_output_finite": bool(torch.isfinite(states).all()),
                          "block0_sparsity": round(first, 4)}))


def measured_sparsity_of_block(sm, index: int) -> float:
    import torch

    z = t = 0
    with sm.weights.block(index, torch.device("cpu")):
        for lin in sm.layout.linears(index).values():
            z += int((lin.weight == 0).sum())
            t += lin.weight.numel()
    return z / t


def dtype(args) -> None:
    """Per-block statistics and DLP ratios of the bundled model computed in bf16 vs float32 (same windows)."""
    calib = ["--calibration", args.calibration, "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--json"]
    rows = {}
    for dt in ("float32", "bfloat16"):
        for stat in ("median", "mean"):
            r = stage(f"ratios {dt} {stat}", dlp("ratios", *calib, "--dtype", dt, "--statistic", stat))
            rows[(dt, stat)] = r["result"]
    out = {}
    for stat in ("median", "mean"):
        f, b = rows[("float32", stat)], rows[("bfloat16", stat)]
        s_f = [x[stat] for x in f["block_statistics"]]
        s_b = [x[stat] for x in b["block_statistics"]]
        out[stat] = {"max_rel_diff_statistic": max(abs(x - y) / abs(x) for x, y in zip(s_f, s_b)),
                     "max_abs_diff_ratio": max(abs(x - y) for x, y in zip(f["sparsity"], b["sparsity"])),
                     "same_block_order": sorted(range(len(s_f)), key=s_f.__getitem__) == sorted(range(len(s_b)), key=s_b.__getitem__)}
    print(json.dumps(out, indent=1))


def malloc(args) -> None:
    """Statistics of the bundled model with the heap bound (default) and without (DLP_MALLOC_DEFAULT=1)."""
    calib = ["--calibration", "c4", "--nsamples", "32", "--seqlen", "512", "--seed", "0", "--json"]
    rows = [stage("statistics, heap bounded", dlp("ratios", *calib)),
            stage("statistics, glibc default", dlp("ratios", *calib), env={"DLP_MALLOC_DEFAULT": "1"})]
    summary(rows, args.json)


def summary(rows: list[dict], as_json: str | None) -> None:
    print(f"{'stage':<60} {'wall s':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['stage']:<60} {r['wall_s']:>8} {r['peak_rss_mib']:>13}")
    if as_json:
        Path(as_json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--json")
    b = sub.add_parser("big")
    b.add_argument("--model", required=True)
    b.add_argument("--calibration", default="c4")
    b.add_argument("--nsamples", type=int, default=8)
    b.add_argument("--seqlen", type=int, default=256)
    b.add_argument("--mode", default="sequential")
    b.add_argument("--memory-budget")
    b.add_argument("--out")
    b.add_argument("--keep", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("folder")
    t = sub.add_parser("dtype")
    t.add_argument("--calibration", default="wikitext2-valid")
    m = sub.add_parser("malloc")
    m.add_argument("--json")
    args = ap.parse_args()
    os.chdir(ROOT)
    {"demo": demo, "big": big, "check": check, "dtype": dtype, "malloc": malloc}[args.cmd](args)


if __name__ == "__main__":
    main()
