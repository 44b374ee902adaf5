"""Bytes of a 6-variant sweep of the bundled SmolLM2-135M registered in MLflow as masks over the base
(``registry.storage: masks``) vs as dense copies (``dense``), through the real registry code
(:func:`pipeline.registry.log_variant_run` on a SQLite MLflow in --work).

    nice -n 10 .venv/bin/python benchmarks/bench_maskstore.py [--work .dlp-work/bench-maskstore] [--dtype bfloat16]

Variants: magnitude and Wanda (calibrated on --nsamples C4 windows of 512 tokens) at uniform 50 / 60 / 70 %,
saved in --dtype (float32 as bundled, or bfloat16); kept in --work, so a rerun skips the pruning. Prints per variant: bytes of its dense weights, bytes
logged to MLflow as masks (the version's artifacts: pack + MLmodel + config/tokenizer files) and as a dense copy
(the transformers flavor), and the totals with the base checkpoint that the mask store logs once. Then the
newest mask-stored version is loaded back with ``mlflow.pyfunc.load_model`` and its tensors compared by sha256
with the dense variant's (bit-exact or not), with the load time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DLP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

SWEEP = [(m, p) for m in ("magnitude", "wanda") for p in (0.5, 0.6, 0.7)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def variant(work: Path, base, tok, windows, method: str, sparsity: float, dtype: torch.dtype) -> Path:
    """``base`` pruned uniformly at ``sparsity`` with ``method``, saved once under ``work`` in ``dtype``."""
    from dlp.checkpoint import save_checkpoint
    from dlp.pruning import prune

    folder = work / "variants" / f"{method}-{int(sparsity * 100)}-{str(dtype).removeprefix('torch.')}"
    if (folder / "config.json").exists():
        return folder
    model = copy.deepcopy(base)
    t = time.perf_counter()
    report = prune(model, [sparsity] * model.config.num_hidden_layers, method=method,
                   windows=windows if method != "magnitude" else None)
    log(f"pruned {folder.name} in {time.perf_counter() - t:.0f}s: sparsity {report.overall:.4f}")
    save_checkpoint(model.to(dtype), tok, folder, report.to_json())
    return folder


def register(work: Path, storage: str, folders: list[Path], base_dir: Path) -> list[dict]:
    """Each variant registered with ``storage`` in a fresh SQLite MLflow; bytes of each version's artifacts."""
    from pipeline import registry as reg

    root = work / f"mlflow-{storage}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///" + (root / "mlflow.db").as_posix()
    client = reg.get_client()
    rows = []
    for folder in folders:
        t = time.perf_counter()
        res = reg.log_variant_run(registered_name="smollm2-sweep", variant_key=folder.name, checkpoint_dir=folder,
                                  experiment="bench", artifact_location=(root / "mlartifacts").as_uri(),
                                  run_name=folder.name, storage=storage, base_dir=base_dir,
                                  base_source="smollm2-135m", alias=None)
        seconds = time.perf_counter() - t
        model_id = client.get_run(res["run_id"]).data.tags[reg.MODEL_URI_TAG].removeprefix("models:/")
        local = Path(url2pathname(urlparse(client.get_logged_model(model_id).artifact_location).path))
        rows.append({"variant": folder.name, "storage": storage, "bytes": tree_bytes(local), "seconds": seconds,
                     "model_uri": res["model_uri"]})
        log(f"{storage}: {folder.name} logged in {seconds:.1f}s, {rows[-1]['bytes'] / 2**20:.2f} MiB")
    rows.append({"variant": "(base, once)", "storage": storage, "seconds": 0.0,
                 "bytes": tree_bytes(base_dir) if storage == "masks" else 0})  # the folder its base run logs
    return rows


def load_back(work: Path, row: dict, dense: Path) -> dict:
    import mlflow

    from dlp.maskstore import tensor_sha256
    from safetensors import safe_open

    uri = "sqlite:///" + (work / "mlflow-masks" / "mlflow.db").as_posix()
    mlflow.set_tracking_uri(uri)  # the dense registry was the last one configured
    mlflow.set_registry_uri(uri)
    t = time.perf_counter()
    model = mlflow.pyfunc.load_model(row["model_uri"]).unwrap_python_model()
    seconds = time.perf_counter() - t
    state = model.model.state_dict()
    exact = True
    for path in dense.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            exact &= all(tensor_sha256(fh.get_tensor(n)) == tensor_sha256(state[n]) for n in fh.keys())
    return {"variant": row["variant"], "seconds": seconds, "bit_exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / ".dlp-work" / "bench-maskstore")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--nsamples", type=int, default=8, help="C4 calibration windows of 512 tokens (Wanda; the bytes do not depend on it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from dlp import data, models

    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    base, tok, ref = models.load_model("smollm2-135m")
    windows = data.calibration_windows(tok, data.load_text("c4"), args.nsamples, 512, 0)
    folders = [variant(args.work, base, tok, windows, m, p, getattr(torch, args.dtype)) for m, p in SWEEP]
    del base
    masks = register(args.work, "masks", folders, Path(ref.path))
    dense = register(args.work, "dense", folders, Path(ref.path))
    result = {"dtype": args.dtype, "masks": masks, "dense": dense,
              "weights": {f.name: sum(p.stat().st_size for p in f.glob("*.safetensors")) for f in folders},
              "load_back": load_back(args.work, masks[-2], folders[-1])}
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def print_tables(result: dict) -> None:
    masks, dense = result["masks"], result["dense"]
    print(f"\nregistered sweep of SmolLM2-135M ({result['dtype']} variants): MLflow artifact bytes per version")
    print(f"{'variant':<24} {'weights MiB':>12} {'dense MiB':>10} {'masks MiB':>10} {'masks/dense':>12}")
    for m, d in zip(masks[:-1], dense[:-1]):
        w = result["weights"][m["variant"]]
        print(f"{m['variant']:<24} {w / 2**20:>12.1f} {d['bytes'] / 2**20:>10.1f} {m['bytes'] / 2**20:>10.2f} "
              f"{m['bytes'] / d['bytes']:>12.4f}")
    n = len(masks) - 1
    total_d, total_m, base = sum(r["bytes"] for r in dense), sum(r["bytes"] for r in masks[:-1]), masks[-1]["bytes"]
    print(f"{f'{n} variants':<24} {'':>12} {total_d / 2**20:>10.1f} {total_m / 2**20:>10.2f} {total_m / total_d:>12.4f}")
    print(f"{'+ base logged once':<24} {'':>12} {'':>10} {(total_m + base) / 2**20:>10.1f} "
          f"{(total_m + base) / total_d:>12.4f}")
    lb = result["load_back"]
    print(f"\nmlflow.pyfunc.load_model({lb['variant']}): {lb['seconds']:.1f}s (materialise + transformers load), "
          f"tensors equal to the dense variant by sha256: {lb['bit_exact']}")


if __name__ == "__main__":
    main()
