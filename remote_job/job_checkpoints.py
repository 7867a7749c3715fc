"""Atomic, resumable checkpoints: checkpoints/checkpoint-<step>/.

A checkpoint is written under a temporary name, finished with a COMPLETE marker, then renamed, so a
preemption mid-write leaves only a `.tmp-*` folder that resume ignores. It holds what is trained
(LoRA weights, or all weights for `full`), optimizer and scheduler state, each rank's RNG state and
the loop position, so a resumed run continues the same data order and reaches the same final step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "COMPLETE"


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def complete_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of finished checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest(out_dir: str) -> str | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(model) -> dict:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save(acc, model, optimizer, scheduler, loop_state: dict, out_dir: str, keep: int, sharded: bool) -> str:
    """Every rank calls this. Returns the final checkpoint path."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    step = loop_state["step"]
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = os.path.join(root, f".tmp-checkpoint-{step}")
    if acc.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    acc.wait_for_everyone()
    os.makedirs(tmp, exist_ok=True)  # another node's disk has no folder from rank 0
    torch.save(_rng_state(), os.path.join(tmp, f"rng-{acc.process_index}.pt"))
    if sharded:
        acc.save_state(os.path.join(tmp, "engine"))  # FSDP / DeepSpeed write their own sharded state
    elif acc.is_main_process:
        save_file(_trainable(acc.unwrap_model(model)), os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    if acc.is_main_process and getattr(acc, "scaler", None) is not None:
        # fp16: the GradScaler's scale and growth tracker, so a resume does not restart at 65536
        torch.save(acc.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
            json.dump(loop_state, fh)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
            fh.write("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _step, path in complete_checkpoints(out_dir)[:-keep] if keep else []:
            shutil.rmtree(path, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(acc, model, optimizer, scheduler, path: str, sharded: bool) -> dict:
    """Restore everything saved by `save`; returns the loop state."""
    import torch
    from safetensors.torch import load_file

    if sharded:
        acc.load_state(os.path.join(path, "engine"))
    else:
        saved = load_file(os.path.join(path, "trainable.safetensors"))
        params = dict(acc.unwrap_model(model).named_parameters())
        missing = [name for name in saved if name not in params]
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match this model (e.g. {missing[0]}); "
                               "start a fresh output_dir or set resume to false")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        # map_location: rank 0 wrote CUDA tensors of cuda:0; loading them there from every rank would put
        # copies and a context on GPU 0. load_state_dict moves each state to its parameter's device.
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                             weights_only=False))
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu",
                                             weights_only=False))
    scaler_file = os.path.join(path, "scaler.pt")
    if getattr(acc, "scaler", None) is not None and os.path.exists(scaler_file):
        acc.scaler.load_state_dict(torch.load(scaler_file, map_location="cpu", weights_only=False))
    rng_file = os.path.join(path, f"rng-{acc.process_index}.pt")
    if os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
        return json.load(fh)
