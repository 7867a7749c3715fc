"""Before the first step: train on the device the machine was rented for, or stop within seconds.

A rented GPU that torch cannot use (CPU-only torch, a CUDA build the driver is too old for, no kernels for
the GPU's architecture) used to turn into a silent CPU run that burned the budget. Here the job checks,
right after importing torch: nvidia-smi lists a GPU (or the config says the offer has one) => torch must
see it, have kernels for its compute capability, load bitsandbytes' CUDA library and run one NF4 matmul
forward and backward. Otherwise DeviceMismatch names the GPU, the driver and torch's CUDA version.
"""

from __future__ import annotations

import torch_select


class DeviceMismatch(RuntimeError):
    """The machine has a GPU the job cannot use; the message says which and why."""


def _cap(major: int, minor: int) -> int:
    return major * 10 + minor


def facts(torch) -> dict:
    """What the summary reports about the device, whatever happens next."""
    gpus = torch_select.query_gpus()
    out = {"gpus_listed": len(gpus), "gpu_name": gpus[0]["name"] if gpus else None,
           "driver_version": gpus[0]["driver"] if gpus else None,
           "torch_version": torch.__version__, "torch_cuda": torch.version.cuda}
    return out


def pick_device(expect_gpu: bool | None, torch, info: dict) -> str:
    """'cuda' or 'cpu'; raises DeviceMismatch when a GPU is there (or promised) and torch cannot use it."""
    want_gpu = info["gpus_listed"] > 0 or bool(expect_gpu)
    if not want_gpu:
        return "cpu"
    gpu = info["gpu_name"] or "the offer's GPU (not listed by nvidia-smi: is the driver loaded?)"
    where = (f"GPU {gpu}, driver {info['driver_version'] or 'unknown'}, torch {info['torch_version']} "
             f"built for CUDA {info['torch_cuda'] or 'none (CPU-only build)'}")
    if not torch.cuda.is_available():
        raise DeviceMismatch(f"this machine has a GPU but torch cannot use it ({where}); install a torch whose "
                             "CUDA the driver supports (bootstrap.sh --plan shows the match)")
    cap = _cap(*torch.cuda.get_device_capability(0))
    archs = [int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()]
    if archs and not torch_select.covers(archs, cap):
        raise DeviceMismatch(f"torch has no kernels for this GPU's compute capability {cap / 10:.1f} ({where}; "
                             f"built for {' '.join(torch.cuda.get_arch_list())})")
    info["gpu_name"] = torch.cuda.get_device_name(0)
    info["compute_capability"] = f"{cap // 10}.{cap % 10}"
    return "cuda"


def check_bitsandbytes_cuda(torch, dtype) -> dict:
    """bitsandbytes' CUDA library loads and one NF4 (double-quant) matmul runs forward and backward."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes import cextension

    if not getattr(cextension.lib, "compiled_with_cuda", False):
        raise DeviceMismatch(f"bitsandbytes loaded no CUDA library (backend {cextension.BNB_BACKEND}) for torch "
                             f"{torch.__version__} / CUDA {torch.version.cuda}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 128, device="cuda", dtype=dtype, generator=gen)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(8, 128, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    y.float().sum().backward()
    ref = x.detach() @ F.dequantize_4bit(packed, state).t()
    err = float((y.detach().float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max()) or 1.0
    ok = x.grad is not None and bool(torch.isfinite(x.grad).all()) and err <= 0.02 * scale
    if not ok:
        raise DeviceMismatch(f"bitsandbytes' NF4 matmul gives wrong results on this GPU (max error {err:.4g} "
                             f"of {scale:.4g})")
    return {"nf4_matmul_max_abs_err": round(err, 6), "bnb_backend": cextension.BNB_BACKEND}


def pick_dtype(precision: str, device_type: str, torch):
    """bf16 only where the GPU has it natively (compute capability >= 8.0); T4/V100 get fp16 (with a
    GradScaler), the CPU fp32. `is_bf16_supported()` alone says True on a T4: it counts emulation."""
    if precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device_type != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability()
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the argument
        native = True
    return torch.bfloat16 if major >= 8 and native else torch.float16


def setup(cfg: dict, torch, accelerator_cls, accelerator_kwargs) -> dict:
    """Device check, precision and the Accelerator: everything that can fail before training starts.
    Raises with `facts` attached to the exception so the caller's summary names the device."""
    info = {"gpus_listed": 0, "gpu_name": None, "driver_version": None, "torch_version": torch.__version__,
            "torch_cuda": torch.version.cuda}
    try:
        info = facts(torch)
        device_type = pick_device(cfg.get("expect_gpu"), torch, info)
        dtype = pick_dtype(cfg["precision"], device_type, torch)
        if device_type == "cuda":
            info.update(check_bitsandbytes_cuda(torch, dtype))
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        # Full fine-tuning keeps fp32 master weights and autocasts; (Q)LoRA keeps the frozen base in 16 bit.
        if cfg["method"] == "full" and dtype != torch.float32:
            load_dtype, mixed = torch.float32, dtype_name
        else:
            load_dtype, mixed = dtype, ("no" if dtype == torch.float32 else dtype_name)
        acc = accelerator_cls(mixed_precision=mixed, **accelerator_kwargs(dtype_name, device_type == "cpu"))
    except Exception as exc:
        exc.device_facts = info  # type: ignore[attr-defined]
        raise
    return {"acc": acc, "device_type": device_type, "dtype": dtype, "dtype_name": dtype_name,
            "load_dtype": load_dtype, "facts": info}


def is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
