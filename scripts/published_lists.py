"""Published list prices the importer applies over the SkyPilot snapshot, each with its source and date.

Maintainer data for scripts/import_catalogs.py: every figure here was transcribed from a provider's own page
or price API, as read on the stated date (by the named transcriber where we did not read it ourselves). A
figure without a dated source is not here, and the snapshot's value is kept (with no price_date). Dates are
the day the page was read, never "current". catalogs/offers/SOURCES.md explains each choice.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- RunPod (per GPU-hour)
RUNPOD_PRICING = "https://www.runpod.io/pricing"
_RP_1109 = ("runpod.io/pricing read 2026-11-09 (transcribed: datareceipts/data-receipts "
            "109-gpu-pricing/vendors.json; secure H100 figures also quoted in ftplan issue 21)", "2026-11-09")
_RP_0925 = ("runpod.io/pricing read 2026-09-25 (transcribed: tgarg01/silybench-data derived/csv/gpu_prices.csv; "
            "secure figures also quoted in ftplan issue 21)", "2026-09-25")
_RP_ISSUE = ("ftplan issue 21, quoting RunPod's pricing page (dated 2026-01..2026-11; the read date of this "
             "figure is not stated, the issue's filing date is used)", "2026-12-01")

# catalog GPU -> (secure $/GPU-h, community $/GPU-h or None, (source, date))
RUNPOD_LIST: dict[str, tuple[float | None, float | None, tuple[str, str]]] = {
    "H100-SXM": (3.99, 2.69, _RP_1109),
    "H100": (2.89, 1.99, _RP_1109),           # H100 PCIe
    "H100-NVL": (3.19, 2.59, _RP_1109),
    "A100-80GB": (1.79, 1.19, _RP_1109),      # A100 PCIe 80GB
    "A100-80GB-SXM": (1.79, 1.39, _RP_1109),
    "H200-SXM": (4.59, 3.59, _RP_0925),
    "B200": (6.79, 5.98, _RP_0925),
    "L40S": (1.09, 0.79, _RP_0925),
    "RTX4090": (0.74, 0.34, _RP_0925),
    "RTXA5000": (None, 0.16, _RP_ISSUE),
}

# --------------------------------------------------------------------------- Paperspace (per machine-hour)
PAPERSPACE_SOURCE = ("paperspace.com/pricing read 2026-09-20 (transcribed: api-evangelist/paperspace "
                     "plans/paperspace-plans-pricing.yml; H100 3.09 also quoted in ftplan issue 21)", "2026-09-20")
# machine type -> $/h for one GPU; multi-GPU types (x2, x4, x8) are that many times the single price, as in
# the snapshot (H100x8 = 8 x H100 there).
PAPERSPACE_LIST: dict[str, float] = {
    "H100": 3.09, "A4000": 0.76, "A6000": 1.89, "A5000": 1.38, "V100": 2.30, "V100-32G": 2.30, "P4000": 0.51,
    "GPU+": 0.45,  # the M4000 machine
}
# New machine types (not in the snapshot): type -> GPU. Host vCPUs/RAM are not on the price page: left empty
# (unknown), so --min-vcpus/--min-ram exclude them rather than guess.
PAPERSPACE_NEW: dict[str, str] = {"A6000": "A6000", "A5000": "RTXA5000"}
# Listed on the page but not added: the GPU table has no Quadro RTX4000/RTX5000/P5000/P6000 entry.
# A100-80G is listed at "$1.15**" (a footnoted, conditional price): the snapshot's 3.18 is kept.

# --------------------------------------------------------------------------- Lambda (per GPU-hour)
LAMBDA_SOURCE = ("lambda.ai/instances read 2026-09-20 (transcribed: api-evangelist/lambda-labs "
                 "plans/lambda-labs-plans-pricing.yml)", "2026-09-20")
# instance type -> $/GPU-h as listed; every snapshot type's price equals it (checked by the importer).
LAMBDA_LIST: dict[str, float] = {
    "gpu_8x_b200_sxm6": 6.69, "gpu_8x_h100_sxm5": 3.99, "gpu_8x_a100_80gb_sxm4": 2.79, "gpu_8x_a100": 1.99,
    "gpu_8x_v100": 0.79, "gpu_8x_v100_n": 0.79, "gpu_4x_b200_sxm6": 6.79, "gpu_4x_h100_sxm5": 4.09,
    "gpu_4x_a6000": 1.09, "gpu_2x_b200_sxm6": 6.89, "gpu_2x_h100_sxm5": 4.19, "gpu_1x_b200_sxm6": 6.99,
    "gpu_1x_gh200": 2.29, "gpu_1x_h100_sxm5": 4.29, "gpu_1x_h100_pcie": 3.29, "gpu_1x_a10": 1.29,
    "gpu_1x_rtx6000": 0.69,
    # "repeated $1.99/$1.09 configurations across tabs not listed separately" (the transcription's note):
    "gpu_1x_a100": 1.99, "gpu_1x_a100_sxm4": 1.99, "gpu_2x_a100": 1.99, "gpu_4x_a100": 1.99,
    "gpu_1x_a6000": 1.09, "gpu_2x_a6000": 1.09,
}
# Missing from the snapshot: type -> (GPU, count, vCPUs, RAM GiB) as the page lists it.
LAMBDA_NEW: dict[str, tuple[str, int, int, float]] = {"gpu_4x_b200_sxm6": ("B200", 4, 104, 1440)}

# --------------------------------------------------------------------------- GCP (per GPU-hour, on-demand SKU)
# List price of one GPU's on-demand SKU where the snapshot carries another SKU (flex-start/DWS, about half).
# Derived from Cyclenerd/google-cloud-pricing-cost-calculator pricing.yml (generated 2025-03-06 from the Cloud
# Billing Catalog): machine-type price minus the snapshot's host-VM price (minus bundled local SSD for
# a2-ultragpu/a3-highgpu, 0.041 and 0.36 $/h). Cross-checks against 2026 reads: A100 80GB us-central1 3.928080
# and H100 Americas 9.796551 (a Cloud Billing Catalog fixture in a public scraper's tests), a3-highgpu-1g
# us-central1 10.9791 on 2026-09-26 (tgarg01/silybench-data) = 9.7966 + host 1.1825.
GCP_SOURCE = ("Cloud Billing Catalog on-demand GPU SKU via Cyclenerd/google-cloud-pricing-cost-calculator "
              "pricing.yml (generated 2025-03-06)", "2025-03-06")
GCP_GPU_LIST: dict[tuple[str, str], float] = {
    ("H100", "us-central1"): 9.7966, ("H100", "us-west1"): 9.7966, ("H100", "us-west4"): 11.0343,
    ("H100", "asia-northeast1"): 14.2218, ("H100", "asia-southeast1"): 12.7359,
    ("H100", "australia-southeast1"): 12.2666, ("H100", "northamerica-northeast2"): 10.787,
    ("A100-80GB", "us-central1"): 3.92808, ("A100-80GB", "us-east4"): 4.4283, ("A100-80GB", "europe-west4"): 4.3293,
    ("A100", "asia-northeast1"): 3.10156, ("A100", "asia-northeast3"): 3.10156, ("A100", "asia-southeast1"): 3.10156,
    ("A100", "europe-west4"): 2.93391,
}
# Sold only through reservations, Spot or Flex-start (cloud.google.com/compute/docs/gpus, "Last updated
# 2026-04-06": A4 and A3 Ultra "must reserve capacity ... use Spot VMs, use Flex-start VMs"; a3-highgpu-1g/2g/4g
# "must create instances by using Spot VMs or Flex-start VMs").
GCP_NO_ON_DEMAND = ("a4-highgpu-", "a3-ultragpu-", "a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g")
