"""Which optimizer the job builds.

`auto` (the default): QLoRA keeps bitsandbytes' paged 8-bit AdamW (its 4-bit base leaves the least
memory, and paging absorbs spikes); LoRA and full fine-tunes use torch's AdamW, whose fused CUDA kernel
updates every parameter in one launch instead of a dozen per-tensor ops per step. torch's AdamW is
fused on CUDA whichever name asked for it. (bitsandbytes' optimizers also run on the CPU, unpaged.)
"""

from __future__ import annotations

OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw")
_BNB = {"paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW"}


def choose(name: str, method: str) -> str:
    """The optimizer that will run: one of OPTIMIZERS other than auto."""
    if name == "auto":
        return "paged_adamw_8bit" if method == "qlora" else "adamw"
    return name


def make(name: str, method: str, params, lr: float, device_type: str):
    """Returns (optimizer, the name chosen)."""
    import torch

    chosen = choose(name, method)
    if chosen == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device_type == "cuda"), chosen
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB[chosen])(params, lr=lr, weight_decay=0.0), chosen
