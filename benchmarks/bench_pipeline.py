"""Benchmark the pipeline: the offline demo (`dlp compress`, first run in a fresh workdir), then the fully
cached re-run; prints wall times, the stages' own compute seconds, and the pipeline overhead around the
engine (wall time minus compute). Each run is a fresh `dlp compress --json` process, as a user runs it
(Python + Prefect + MLflow startup included).

    .venv/bin/python benchmarks/bench_pipeline.py                 # the demo as shipped
    .venv/bin/python benchmarks/bench_pipeline.py --set calibration.nsamples=8 --keep /tmp/bench-work

Targets: first run < 10 min on 2 cores; cached re-run < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "from cli import main; main()"
TARGET_FIRST_S = 600.0
TARGET_CACHED_S = 15.0


def run(workdir: Path, sets: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-c", CLI, "compress", "--workdir", str(workdir), "--json"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    for k in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # everything under the fresh workdir
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"dlp compress failed with exit code {proc.returncode}")
    return wall, json.loads(proc.stdout)


def report(label: str, wall: float, summary: dict) -> dict:
    stages = summary["stages"]
    compute = sum(float(st.get("compute_seconds") or 0.0) for st in stages.values())
    in_flow = float(summary.get("seconds") or 0.0)
    print(f"\n== {label}: wall {wall:.1f}s (flow body {in_flow:.1f}s)")
    print(f"   {'stage':<12} {'cached':<7} {'wall s':>8} {'compute s':>10}")
    for name, st in stages.items():
        print(f"   {name:<12} {'yes' if st['cached'] else 'no':<7} {st['seconds']:>8.2f} {st.get('compute_seconds', 0.0):>10.2f}")
    print(f"   stages' own compute: {compute:.1f}s; pipeline overhead (wall - compute): {wall - compute:.1f}s "
          f"(of which process/Prefect/MLflow startup outside the flow body: {wall - in_flow:.1f}s)")
    return {"wall_s": round(wall, 2), "flow_s": round(in_flow, 2), "compute_s": round(compute, 2),
            "overhead_s": round(wall - compute, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="use (and keep) this workdir instead of a temporary one; it must not exist")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="job override, e.g. calibration.nsamples=8")
    args = ap.parse_args()
    if args.keep and args.keep.exists():
        raise SystemExit(f"{args.keep} exists: the first run needs a fresh workdir")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="dlp-bench-")) / "work"
    print(f"workdir {workdir}; overrides {args.sets or 'none (the demo as shipped)'}; cpus {os.cpu_count()}")
    try:
        w1, s1 = run(workdir, args.sets)
        first = report("first run (fresh workdir)", w1, s1)
        w2, s2 = run(workdir, args.sets)
        cached = report("fully cached re-run", w2, s2)
        assert all(st["cached"] for st in s2["stages"].values()), "re-run recomputed a stage"
        print(f"\nresult: dense ppl {s1['dense_ppl']:.3f}, pruned ppl {s1['pruned_ppl']:.3f}, "
              f"sparsity {s1['achieved_sparsity']:.4f}, {s1['registered_name']} v{s1['version']}")
        print(f"first run  {w1:7.1f}s  target < {TARGET_FIRST_S:.0f}s  {'OK' if w1 < TARGET_FIRST_S else 'MISSED'}")
        print(f"cached run {w2:7.1f}s  target < {TARGET_CACHED_S:.0f}s  {'OK' if w2 < TARGET_CACHED_S else 'MISSED'}")
        print("json " + json.dumps({"first": first, "cached": cached}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
