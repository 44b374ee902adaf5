"""GPU check for the engine: ``--device cuda`` gives the CPU's statistics, masks and perplexity on tiny
random models of each architecture, and times a larger random Llama-shaped model on the GPU
(statistics vs a plain forward), with the blocks streamed from CPU memory one at a time.

    python benchmarks/device_check.py                 # needs a CUDA device; prints one line per check
    python benchmarks/device_check.py --timing-7b     # + out-of-core timing on a random LLaMA-2-7B-shaped model

``--timing-7b`` writes a random-initialised LLaMA-2-7B-shaped bf16 checkpoint (generated on the device machine,
never shipped; see random_model.py) to a temporary folder, then prunes it end to end from disk with the streamed
engine on the GPU -- statistics, DLP rates at 70 %, sequential Wanda, sharded output -- with 128 x 2048
calibration tokens, printing wall time, peak GPU memory and the ratio to one plain streamed forward.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlp import allocation  # noqa: E402
from dlp.perplexity import perplexity  # noqa: E402
from dlp.pruning import prune  # noqa: E402
from dlp.statistics import collect_statistics  # noqa: E402
from tests.tiny_models import ARCHS, build, windows  # noqa: E402


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    import transformers

    print("transformers", transformers.__version__)
    failures = 0
    ids = windows(8, 64)
    for arch in ARCHS:
        cpu, gpu = build(arch), build(arch)
        s_cpu = collect_statistics(cpu, ids, device="cpu")
        s_gpu = collect_statistics(gpu, ids, device="cuda")
        err = max(abs(a["mean"] - b["mean"]) / a["mean"] for a, b in zip(s_cpu.blocks, s_gpu.blocks))
        r = allocation.dlp(s_cpu, 0.6, 0.1, "median").ratios
        prune(cpu, r, method="sparsegpt", mode="sequential", windows=ids, device="cpu")
        rep = prune(gpu, r, method="sparsegpt", mode="sequential", windows=ids, device="cuda")
        on_cpu = next(gpu.parameters()).device.type == "cpu"  # blocks go back to their home device
        p_cpu = perplexity(cpu, ids.reshape(1, -1), 64, device="cpu")["ppl"]
        p_gpu = perplexity(gpu, ids.reshape(1, -1), 64, device="cuda")["ppl"]
        ok = err < 1e-3 and on_cpu and abs(p_cpu / p_gpu - 1) < 1e-2 and abs(rep.overall - 0.6) < 0.02
        failures += not ok
        print(f"{arch:<9} stats rel.err {err:.1e}  sparsegpt achieved {rep.overall:.3f}  ppl cpu {p_cpu:.2f} "
              f"cuda {p_gpu:.2f}  weights home on cpu: {on_cpu}  {'OK' if ok else 'FAIL'}")

    # a larger random Llama-shaped model: GPU timing of the statistics sweep vs one plain forward
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    big = torch.randint(0, 32000, (64, 2048))
    model.cuda()
    with torch.no_grad():
        model(input_ids=big[:2].cuda(), use_cache=False)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for chunk in big.split(4):
            model(input_ids=chunk.cuda(), use_cache=False)
        torch.cuda.synchronize()
        floor = time.perf_counter() - t
    model.cpu()
    torch.cuda.synchronize()
    t = time.perf_counter()
    stats = collect_statistics(model, big, device="cuda", batch_size=4)
    torch.cuda.synchronize()
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    rates = allocation.dlp(stats, 0.7, 0.15, "median")
    rep = prune(model, rates.ratios, method="wanda", mode="oneshot", stats=stats, device="cuda")
    t_prune = time.perf_counter() - t
    print(f"random Llama 8 x 2048 hidden, fp16, 64 x 2048 tokens: floor (model resident on GPU) {floor:.2f}s; "
          f"statistics (blocks streamed from CPU) {t_stats:.2f}s = {t_stats / floor:.2f}x; rates + one-shot Wanda "
          f"{t_prune:.2f}s; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if "--timing-7b" in sys.argv:
        timing_7b()
    print("FAILURES", failures)
    return 1 if failures else 0


def timing_7b(nsamples: int = 128, seqlen: int = 2048) -> None:
    import shutil
    import tempfile

    from benchmarks.random_model import make
    from dlp.engine import CalibrationEngine
    from dlp.perplexity import _NoVisitor
    from dlp.pruning import prune_checkpoint
    from dlp.streaming import open_streamed

    work = Path(tempfile.mkdtemp(prefix="dlp-7b-"))
    try:
        t = time.perf_counter()
        make("llama-2-7b", work / "src")
        print(f"random LLaMA-2-7B-shaped bf16 checkpoint written in {time.perf_counter() - t:.1f}s")
        ids = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        with open_streamed(work / "src") as sm:
            torch.cuda.synchronize()
            t = time.perf_counter()
            CalibrationEngine.over(sm, ids, device="cuda").walk(_NoVisitor()).close()
            torch.cuda.synchronize()
            floor = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with open_streamed(work / "src") as sm:
            stats = collect_statistics(sm, ids, device="cuda")
            ratios = allocation.dlp(stats, 0.7, 0.15, "median").ratios
            rep = prune_checkpoint(sm, work / "out", ratios, method="wanda", mode="sequential", windows=ids,
                                   device="cuda")
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        print(f"7B-shaped, {nsamples} x {seqlen}: plain streamed forward {floor:.1f}s; statistics + DLP rates + "
              f"sequential Wanda + sharded output {total:.1f}s = {total / floor:.2f}x; achieved {rep.overall:.4f}; "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
