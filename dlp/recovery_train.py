"""The recovery training loop: LoRA adapters (peft) on a pruned model, AdamW on the autoregressive loss.

Plain torch, one optimizer step per batch of windows, the learning rate decaying linearly to zero over the
run (the HF Trainer default the Wanda/OWL recipe used), gradients clipped to norm 1. On the CPU the run is
deterministic for a seed: the adapter's initialisation and dropout draw from the torch generator, which is
seeded once and saved with every training state, so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

from typing import Callable

import torch

from .bounds import RECOVERY_MAX_GRAD_NORM
from .decoder import find_decoder
from .errors import DLPError
from .recovery_merge import make_mask_aware
from .recovery_settings import RecoverySettings
from .recovery_state import StateSaver, TrainingState, read_state, save_with


def check_targets(block_linears: list[str], targets: tuple[str, ...]) -> None:
    """Every target must name a linear inside the decoder blocks (``q_proj`` or a dotted suffix of one)."""
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in block_linears):
            short = sorted({n.rsplit(".", 1)[-1] for n in block_linears})
            raise DLPError(f"target module '{t}' is not a linear of this model's decoder blocks; "
                           f"use some of: {', '.join(short)}")


def add_lora(model, settings: RecoverySettings):
    """Wrap ``model`` with fresh LoRA adapters on the target linears (seeded initialisation); mask-aware for
    the masked merge (see :mod:`dlp.recovery_merge`)."""
    from peft import LoraConfig, get_peft_model

    check_targets(list(find_decoder(model).linears(0)), settings.target_modules)
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if settings.mask_aware:
        make_mask_aware(peft_model)
    return peft_model


def learning_rate(settings: RecoverySettings, step: int) -> float:
    """Linear decay from ``lr`` at step 0 towards 0 at the last step."""
    return settings.lr * (1.0 - step / settings.steps)


def train(model, windows: torch.Tensor, settings: RecoverySettings, *, key: str, saver: StateSaver | None = None,
          device: str = "cpu", log: Callable[[str], None] | None = None) -> tuple[TrainingState, int | None]:
    """Train the adapters of ``model`` (a peft model) on ``windows`` (``[steps * batch, seqlen]``).

    Resumes from ``saver.latest()`` when it holds a state of this run (``key``), and saves one every
    ``settings.save_every`` steps and at the end. Returns the final state and the step it resumed from.
    """
    if windows.shape[0] < settings.windows:
        raise DLPError(f"{windows.shape[0]} training windows for {settings.steps} steps x batch {settings.batch}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    state, resumed = TrainingState(0, []), None
    folder = saver.latest() if saver is not None else None
    if folder is not None:
        state = read_state(folder, model, optimizer, key)
        resumed = state.step
    model.to(device)
    model.train()
    try:
        while state.step < settings.steps:
            _step(model, optimizer, params, windows, settings, state, device)
            if saver is not None and (state.step % settings.save_every == 0 or state.step == settings.steps):
                save_with(saver, model, optimizer, state, key)
            if log is not None:
                log(f"step {state.step}/{settings.steps} loss {state.losses[-1]:.4f}")
    finally:
        model.eval()
    return state, resumed


def _step(model, optimizer, params, windows, settings: RecoverySettings, state: TrainingState, device: str) -> None:
    lo = state.step * settings.batch
    batch = windows[lo : lo + settings.batch].to(device)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(settings, state.step)
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, RECOVERY_MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.losses.append(float(loss.detach()))
