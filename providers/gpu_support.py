"""Which GPUs the launched job can use, and which driver/CUDA generation an image needs for them.

The job (remote_job/) is CUDA-only: torch's CUDA build plus bitsandbytes. An AMD (ROCm) or other
non-NVIDIA offer would boot, bill and then fail, so adapters refuse it for `launch` with
`OfferUnavailable`, which the launcher treats as "next offer" (planner/launch/launcher.py `_provision`
catches CapacityError). Architecture facts, with sources:
- Blackwell B200/B300/GB200 is sm_100; RTX PRO 6000 / RTX 50xx is sm_120: CUDA 12.8 is the first toolkit
  that targets them (NVIDIA CUDA 12.8 release notes, "added support for ... Blackwell (SM_100, SM_120)").
- Volta V100 is sm_70: NVIDIA's 580 driver branch is the last to support Volta ("CUDA 13.0 drops ... Volta",
  CUDA 13.0 release notes); AWS's current Base OSS DLAMI ships driver 595 and lists no P3 among its
  supported instances (DLAMI release notes, supported_ec2_instances: G4dn ... P6-B300).
"""

from __future__ import annotations

import re

from ftplan.providers.errors import OfferUnavailable

_NON_NVIDIA = re.compile(r"^(amd\b|mi\d{3}|instinct|radeon|gaudi|inferentia|inf\d|trainium|trn\d|tpu)", re.I)
_BLACKWELL = re.compile(r"^(nvidia\s+)?(b200|b300|gb200|gb300|rtx\s*pro\s*(server\s*)?6000|rtx\s*50\d0)\b", re.I)
_VOLTA = re.compile(r"^(nvidia\s+)?(tesla\s+)?v100\b", re.I)


def is_cuda_gpu(gpu: str) -> bool:
    return not _NON_NVIDIA.search(gpu.strip())


def needs_cuda_12_8(gpu: str) -> bool:
    """Blackwell (sm_100 / sm_120): images built for CUDA < 12.8 have no kernels for it."""
    return bool(_BLACKWELL.search(gpu.strip()))


def is_volta(gpu: str) -> bool:
    return bool(_VOLTA.search(gpu.strip()))


def refuse_non_cuda(gpu: str, provider: str) -> None:
    """Raise OfferUnavailable for a GPU the CUDA-only job cannot use (the launcher tries the next offer)."""
    if not is_cuda_gpu(gpu):
        raise OfferUnavailable(
            f"{gpu} is not an NVIDIA GPU and the ftplan job is CUDA-only (torch CUDA build, bitsandbytes); "
            "skipping this offer - pick an NVIDIA GPU (e.g. --gpu H100) to launch", provider=provider,
        )
