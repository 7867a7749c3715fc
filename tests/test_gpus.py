"""The GPU table: every GPU the provider catalogs name resolves, facts are physically sane, lookups are forgiving."""

from __future__ import annotations

import csv
import json

import pytest

from ftplan.catalogs import data_path
from ftplan.planner.errors import UserError
from ftplan.planner.estimate.gpus import load_gpus, resolve_gpu, table_gpus, validate_gpu_entry

# Every AcceleratorName in SkyPilot's catalogs for the five providers (AWS v8, GCP v8, Lambda v8, RunPod v7,
# Paperspace v6 snapshots), plus the cards the issue names. Input data for the check, not expected output.
PROVIDER_NAMES = [
    "A100", "A100-80GB", "A10G", "B200", "B300", "H100", "H200", "L4", "L40S", "RTX PRO Server 6000", "T4", "T4g",
    "V100", "V100-32GB", "H100-MEGA", "P100", "P4", "A10", "A6000", "GH200", "RTX6000", "A4000", "M4000", "P4000",
    "A100-80GB-SXM", "A40", "H100-NVL", "H100-SXM", "H200-SXM", "L40", "MI300X", "RTX3090", "RTX4000-Ada",
    "RTX4090", "RTX6000-Ada", "RTXA4000", "RTXA4500", "RTXA5000", "RTXA6000", "K80", "RTX5090",
]


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_every_catalog_accelerator_is_a_canonical_entry(name):
    assert name in load_gpus()
    assert resolve_gpu(name).name == name


def test_shipped_offer_files_only_name_known_gpus():
    """Whatever the catalog importer ships must join on this table (checked when offer files exist)."""
    files = sorted(data_path("offers").glob("*.csv")) if data_path("offers").is_dir() else []
    names = set()
    for path in files:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                gpu = row.get("gpu") or row.get("AcceleratorName") or row.get("gpu_name")
                if gpu:
                    names.add(gpu)
    unknown = sorted(n for n in names if n not in load_gpus())
    assert unknown == []


@pytest.mark.parametrize(("spelling", "canonical"), [
    ("a100-40gb", "A100"), ("A100 80GB", "A100-80GB"), ("h100-pcie", "H100"), ("H100 SXM", "H100-SXM"),
    ("h100_nvl", "H100-NVL"), ("rtx-4090", "RTX4090"), ("rtx 4000 ada", "RTX4000-Ada"), ("tesla-t4", "T4"),
    ("rtx-a6000", "RTXA6000"), ("rtx-pro-6000", "RTX PRO Server 6000"), ("v100-16gb", "V100"),
])
def test_aliases_and_case_resolve(spelling, canonical):
    assert resolve_gpu(spelling).name == canonical


def test_unknown_gpu_names_the_closest_ones():
    with pytest.raises(UserError) as err:
        resolve_gpu("H10O")
    assert "H100" in str(err.value)
    assert "\n" not in str(err.value)


def test_memory_and_peaks_are_dense_and_physical():
    gpus = load_gpus()
    for gpu in gpus.values():
        assert 0.9 * gpu.memory_gib <= gpu.usable_gib <= gpu.memory_gib, gpu.name
        assert gpu.fp32_tflops <= gpu.fp16_tflops, gpu.name
        if gpu.bf16_tflops:
            assert gpu.bf16_tflops == gpu.fp16_tflops, gpu.name
        if gpu.fp8_tflops:
            assert gpu.fp8_tflops == pytest.approx(2 * gpu.fp16_tflops, rel=0.02), gpu.name
    # Dense, not the sparse headline figures (H100 SXM 1979, A100 624, L4 242).
    assert gpus["H100-SXM"].bf16_tflops < 1000
    assert gpus["A100"].bf16_tflops < 400
    assert gpus["L4"].bf16_tflops < 150
    # True sizes, including the ones the catalogs get wrong or leave out.
    assert {n: gpus[n].memory_gib for n in ("A10G", "T4", "V100", "H100-NVL", "H200", "MI300X")} == {
        "A10G": 24, "T4": 16, "V100": 16, "H100-NVL": 94, "H200": 141, "MI300X": 192}


def test_cards_without_bf16_fall_back_to_fp16():
    for name in ("T4", "V100", "P100"):
        gpu = resolve_gpu(name)
        assert not gpu.supports_bf16
        assert gpu.peak_tflops("bf16-mixed") == gpu.fp16_tflops
    a100 = resolve_gpu("A100")
    assert a100.peak_tflops("fp32") == a100.tf32_tflops


def test_inconsistent_entries_are_rejected():
    entry = json.loads(data_path("gpus.json").read_text())["gpus"][0]
    assert validate_gpu_entry(entry).name == entry["name"]
    with pytest.raises(ValueError, match="supports_bf16"):
        validate_gpu_entry({**entry, "supports_bf16": False})
    with pytest.raises(ValueError, match="memory_gib"):
        validate_gpu_entry({**entry, "memory_gib": -1})
    with pytest.raises(ValueError, match="usable_mib"):
        validate_gpu_entry({**entry, "usable_mib": 10 * 1024 * 1024})


def test_validated_cache_is_used_and_keyed_by_content(tmp_path, monkeypatch):
    """A warm start reads the cached validated entries (no pydantic); an edited file is validated again."""
    import subprocess
    import sys

    from ftplan.planner.estimate import gpus

    monkeypatch.setenv("FTPLAN_CACHE_DIR", str(tmp_path))
    raw = data_path("gpus.json").read_bytes()
    calls = []

    def validate(data):
        calls.append(1)
        return gpus._validated_entries(data)

    first = gpus.read_validated("gpus", raw, validate)
    assert gpus.read_validated("gpus", raw, validate) == first and len(calls) == 1
    edited = raw.replace(b'"usable_mib": 40960', b'"usable_mib": 40000', 1)
    assert edited != raw
    assert gpus.read_validated("gpus", edited, validate) != first and len(calls) == 2
    # A fresh process with a warm cache resolves GPUs without importing pydantic.
    probe = ("import sys; from ftplan.planner.estimate.gpus import resolve_gpu; print(resolve_gpu('a100').usable_gib, "
             "'pydantic' in sys.modules)")
    env = {**__import__("os").environ, "FTPLAN_CACHE_DIR": str(tmp_path / "fresh")}
    cold = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    warm = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert cold.stdout.split() == ["40.0", "True"] and warm.stdout.split() == ["40.0", "False"]


def test_table_lists_each_physical_card_once():
    names = [g.name for g in table_gpus()]
    assert "A6000" not in names and "RTXA6000" in names
    assert len(names) == len(set(names))
    mems = [g.usable_mib for g in table_gpus()]
    assert mems == sorted(mems)


@pytest.mark.parametrize("xdg", [None, "/tmp/ftplan-xdg", "relative/ignored", ""])
def test_cache_dir_equals_platformdirs(monkeypatch, xdg):
    """The cold-start path reads the XDG rule itself; it must stay what platformdirs says."""
    import platformdirs

    from ftplan.planner.estimate.gpus import user_cache_dir

    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert user_cache_dir() == platformdirs.user_cache_dir("ftplan")
