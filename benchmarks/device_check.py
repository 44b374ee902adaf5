"""GPU check for the engine: ``--device cuda`` gives the CPU's statistics, masks and perplexity on tiny
random models of each architecture, and times a larger random Llama-shaped model on the GPU
(statistics vs a plain forward), with the blocks streamed from CPU memory one at a time.

    python benchmarks/device_check.py        # needs a CUDA device; prints one line per check
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
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
