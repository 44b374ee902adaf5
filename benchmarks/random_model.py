"""Random-initialised LLaMA-shaped checkpoints of real sizes, written tensor by tensor (never held whole).

They prove memory and speed, never quality. The vocabulary is SmolLM2's (49,152) and its tokenizer files are
copied in, so the real ``dlp`` commands run on them end to end with real calibration text; everything else has the
named release's shape. Generated into a folder the caller deletes; never committed.

    python benchmarks/random_model.py --shape llama-2-13b --out /tmp/rand13b        # ~26 GB of bf16
    python benchmarks/random_model.py --shape llama-2-7b --layers 8 --out /tmp/rand4g  # ~3.8 GB
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-2-13b": (5120, 13824, 40, 40, 40),
    "llama-2-70b": (8192, 28672, 80, 64, 8),
}
VOCAB = 49152  # SmolLM2's tokenizer, copied in so real text can be used


def config_for(shape: str, layers: int | None, dtype: str) -> dict:
    hidden, inter, n_layers, heads, kv = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers or n_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "dtype": dtype, "bos_token_id": 1,
            "eos_token_id": 2, "rope_theta": 10000.0}


def tensor_specs(cfg: dict, dtype: torch.dtype):
    from dlp.checkpoint_reader import TensorInfo

    h, i, kvd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    specs = [TensorInfo("model.embed_tokens.weight", "", dtype, (VOCAB, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [TensorInfo(p + n, "", dtype, s) for n, s in (
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (kvd, h)),
            ("self_attn.v_proj.weight", (kvd, h)), ("self_attn.o_proj.weight", (h, h)),
            ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i)),
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)))]
    return specs + [TensorInfo("model.norm.weight", "", dtype, (h,)), TensorInfo("lm_head.weight", "", dtype, (VOCAB, h))]


def make(shape: str, out: Path, *, layers: int | None = None, dtype: str = "bfloat16", seed: int = 0) -> Path:
    from dlp.checkpoint_writer import ShardedWriter
    from dlp.models import DTYPES, resolve_model

    cfg = config_for(shape, layers, dtype)
    torch_dtype = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg, torch_dtype)
    writer = ShardedWriter(out, specs)
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            value = torch.ones(spec.shape, dtype=torch_dtype)
        else:
            value = (torch.randn(spec.shape, generator=gen) * 0.02).to(torch_dtype)
        writer.write(spec.name, value)
        del value
    writer.finish(total_parameters=sum(s.numel for s in specs))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer = Path(resolve_model("smollm2-135m").path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder blocks than the release (same block shape)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    make(args.shape, args.out, layers=args.layers, dtype=args.dtype)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(json.dumps({"out": str(args.out), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
