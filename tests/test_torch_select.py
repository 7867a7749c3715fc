"""The driver/GPU -> torch wheel table bootstrap.sh follows (remote_job/torch_select.py)."""

from __future__ import annotations

import pytest
from job_helpers import use_job_modules

use_job_modules()
import torch_select  # noqa: E402

DRIVERS = {"470": "470.256.02", "525": "525.147.05", "535": "535.230.02", "550": "550.163.01",
           "570": "570.172.08", "580": "580.82.07"}
GPUS = {"V100": 70, "T4": 75, "A10G": 86, "L4": 89, "A100": 80, "H100": 90, "B200": 100}
# (driver, GPU) -> wheel; None = refused (the driver cannot run that GPU at all).
EXPECTED = {
    "470": {"V100": "cu118", "T4": "cu118", "A10G": "cu118", "L4": None, "A100": "cu118", "H100": None, "B200": None},
    "525": {"V100": "cu126", "T4": "cu126", "A10G": "cu126", "L4": "cu126", "A100": "cu126", "H100": "cu126",
            "B200": None},
    "535": {"V100": "cu126", "T4": "cu126", "A10G": "cu126", "L4": "cu126", "A100": "cu126", "H100": "cu126",
            "B200": None},
    "550": {"V100": "cu126", "T4": "cu126", "A10G": "cu126", "L4": "cu126", "A100": "cu126", "H100": "cu126",
            "B200": None},
    "570": {"V100": "cu126", "T4": "cu128", "A10G": "cu128", "L4": "cu128", "A100": "cu128", "H100": "cu128",
            "B200": "cu128"},
    "580": {"V100": "cu126", "T4": "cu130", "A10G": "cu130", "L4": "cu130", "A100": "cu130", "H100": "cu130",
            "B200": "cu130"},
}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_wheel_for_driver_and_gpu(driver, gpu):
    want = EXPECTED[driver][gpu]
    if want is None:
        with pytest.raises(torch_select.SelectError, match="driver .* too old"):
            torch_select.choose_wheel(DRIVERS[driver], GPUS[gpu])
        return
    wheel = torch_select.choose_wheel(DRIVERS[driver], GPUS[gpu])
    assert wheel["variant"] == want
    assert wheel["index_url"] == f"https://download.pytorch.org/whl/{want}"
    major, minor = (int(x) for x in wheel["torch"].split(".")[:2])
    assert (major, minor) >= (2, 6)
    # the wheel has kernels for the GPU, and its CUDA runs on the driver (natively or by minor-version compat)
    assert torch_select.covers([int(a[3:]) for a in wheel["archs"]], GPUS[gpu])
    cuda = tuple(int(x) for x in wheel["cuda"].split("."))
    native = torch_select.driver_cuda(DRIVERS[driver])
    assert cuda <= native or (cuda[0] == native[0] and "minor-version" in wheel["reason"])


def test_volta_never_gets_a_wheel_without_sm70():
    for driver in DRIVERS.values():
        assert "sm_70" in torch_select.choose_wheel(driver, 70)["archs"]


def test_driver_to_cuda_table():
    assert torch_select.driver_cuda("470.42.01") == (11, 4)
    assert torch_select.driver_cuda("535.54.03") == (12, 2)
    assert torch_select.driver_cuda("535.54.02") == (12, 1)
    assert torch_select.driver_cuda("580.65.06") == (13, 0)
    assert torch_select.driver_cuda("418.67") == ()


def test_nvidia_smi_csv_with_and_without_compute_cap():
    rows = torch_select.parse_gpus("NVIDIA H100 80GB HBM3, 550.54.15, 9.0, 81559\n"
                                   "NVIDIA H100 80GB HBM3, 550.54.15, 9.0, 81559\n")
    assert len(rows) == 2 and rows[0] == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
                                          "compute_cap": 90, "memory_mib": 81559}
    old = torch_select.parse_gpus("Tesla V100-SXM2-16GB, 470.256.02, 16160\n", with_cap=False)
    assert old[0]["compute_cap"] == 70 and old[0]["memory_mib"] == 16160


def _probe(version="3.10.12", torch=None, pip=True, ensurepip=False, path="/usr/bin/python3"):
    return {"python": path, "version": version, "has_pip": pip, "has_ensurepip": ensurepip, "torch": torch,
            "site_paths": ["/opt/pytorch/lib"]}


H100 = {"name": "NVIDIA H100 80GB HBM3", "driver": "550.163.01", "compute_cap": 90, "memory_mib": 81559}


def test_reuse_only_a_new_enough_cuda_torch_that_sees_the_gpu():
    good = {"version": "2.7.1", "cuda": "12.6", "cuda_available": True, "archs": ["sm_80", "sm_90"], "capability": 90}
    assert torch_select.torch_reusable(good, H100)[0]
    assert not torch_select.torch_reusable({**good, "version": "2.4.0"}, H100)[0]
    assert not torch_select.torch_reusable({**good, "cuda": None, "cuda_available": False}, H100)[0]
    assert not torch_select.torch_reusable({**good, "cuda_available": False}, H100)[0]
    assert not torch_select.torch_reusable({**good, "archs": ["sm_75", "sm_80"]}, H100)[0]
    plan = torch_select.make_plan([H100], [_probe("3.12.3", good, path="/opt/pytorch/bin/python3")], env={})
    assert plan["reuse_image_torch"] and plan["torch"] is None
    assert plan["venv"]["python"] == "/opt/pytorch/bin/python3" and plan["venv"]["image_site_paths"] == ["/opt/pytorch/lib"]


def test_plan_downloads_a_python_when_the_image_has_only_an_old_one():
    plan = torch_select.make_plan([H100], [_probe("3.8.10")], env={})
    assert plan["venv"]["downloads_python"] and plan["venv"]["python_version"] == "3.11"
    assert plan["torch"]["variant"] == "cu126" and plan["error"] is None


def test_unknown_capability_is_an_error_naming_the_gpu():
    gpu = {**H100, "name": "Mystery GPU", "compute_cap": None}
    plan = torch_select.make_plan([gpu], [_probe()], env={})
    assert "Mystery GPU" in plan["error"]
