"""Tiny random decoder-only models built from configs, one per supported architecture. They exercise
structure and plumbing only; they never back a quality claim."""
from __future__ import annotations

import torch

VOCAB = 256


def build(arch: str, layers: int = 3, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=256)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "gemma":
        cfg = tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
        cls = tf.GemmaForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, **common)
        cls = tf.Phi3ForCausalLM
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                           vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=256)
        cls = tf.OPTForCausalLM
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, **common)
        cls = tf.GPTNeoXForCausalLM
    else:
        raise KeyError(arch)
    model = cls(cfg).eval()
    return model


ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "opt", "gpt_neox"]


def windows(n: int = 6, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)
