"""The GPU table (`catalogs/gpus.json`): memory, dense peaks, bandwidth, interconnect per GPU type.

Canonical names are SkyPilot's `AcceleratorName` spellings, so offers from the provider catalogs join
on them directly. Lookups are case-insensitive and ignore spaces, '-' and '_' ("h100 sxm" == "H100-SXM").
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ftplan import __version__
from ftplan.catalogs import data_path
from ftplan.planner.errors import UserError


@dataclass(frozen=True)
class GPU:
    """One GPU type. A plain dataclass so a warm start never imports pydantic; the entries are validated
    with pydantic (`_validated_entries`) whenever gpus.json changes."""

    name: str
    aliases: tuple[str, ...]
    vendor: str
    architecture: str
    memory_gib: float       # marketed size
    usable_mib: int         # what the driver reports as total; a job can never use more
    bf16_tflops: float | None
    fp16_tflops: float
    tf32_tflops: float | None
    fp32_tflops: float
    fp8_tflops: float | None
    mem_bandwidth_gbs: float
    supports_bf16: bool
    supports_fp8: bool
    interconnect: str
    interconnect_gbs: float
    same_as: str | None = None  # another provider's spelling of the same card

    @property
    def usable_gib(self) -> float:
        return self.usable_mib / 1024

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for the math a training step runs in under `precision`.

        bf16 on a card without bf16 falls back to fp16 (what Trainer users do on T4/V100); fp32 training
        uses TF32 tensor cores where they exist (PyTorch allows TF32 for matmuls when asked, and every
        recipe that matters does).
        """
        if precision.startswith("bf16"):
            return self.bf16_tflops or self.fp16_tflops
        if precision.startswith("fp16"):
            return self.fp16_tflops
        return max(self.tf32_tflops or 0.0, self.fp32_tflops)


def validate_gpu_entry(entry: dict) -> GPU:
    """One gpus.json entry checked with pydantic (types, ranges, consistency); ValueError if invalid."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class _Entry(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        name: str
        aliases: tuple[str, ...] = ()
        vendor: str
        architecture: str
        memory_gib: float = Field(gt=0)
        usable_mib: int = Field(gt=0)
        bf16_tflops: float | None = Field(default=None, gt=0)
        fp16_tflops: float = Field(gt=0)
        tf32_tflops: float | None = Field(default=None, gt=0)
        fp32_tflops: float = Field(gt=0)
        fp8_tflops: float | None = Field(default=None, gt=0)
        mem_bandwidth_gbs: float = Field(gt=0)
        supports_bf16: bool
        supports_fp8: bool
        interconnect: str
        interconnect_gbs: float = Field(gt=0)
        same_as: str | None = None

        @model_validator(mode="after")
        def _consistent(self) -> _Entry:
            if self.supports_bf16 != (self.bf16_tflops is not None):
                raise ValueError(f"{self.name}: supports_bf16 must match bf16_tflops")
            if self.supports_fp8 != (self.fp8_tflops is not None):
                raise ValueError(f"{self.name}: supports_fp8 must match fp8_tflops")
            if self.usable_mib > self.memory_gib * 1024 * 1.0001:
                raise ValueError(f"{self.name}: usable_mib exceeds memory_gib")
            return self

    return GPU(**_Entry.model_validate(entry).model_dump())


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " -_")


def _validated_entries(raw: bytes) -> list[dict]:
    gpus: dict[str, GPU] = {}
    for item in json.loads(raw)["gpus"]:
        gpu = validate_gpu_entry(item)
        if gpu.name in gpus:
            raise ValueError(f"gpus.json: duplicate GPU {gpu.name}")
        gpus[gpu.name] = gpu
    for gpu in gpus.values():
        if gpu.same_as is not None and gpu.same_as not in gpus:
            raise ValueError(f"gpus.json: {gpu.name}.same_as names unknown GPU {gpu.same_as}")
    _index(gpus)  # rejects names/aliases that collide after normalisation
    return [{**asdict(g), "aliases": list(g.aliases)} for g in gpus.values()]  # as JSON gives it back


def user_cache_dir() -> str:
    """platformdirs.user_cache_dir("ftplan"). On Linux its XDG rule is read here directly: importing
    platformdirs (which imports tempfile, shutil, bz2, lzma) would cost `ftplan estimate` ~15 ms of a
    ~100 ms cold start on every run."""
    if sys.platform.startswith("linux"):
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        return os.path.join(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "ftplan")
    import platformdirs

    return platformdirs.user_cache_dir("ftplan")


def validated_cache_path(kind: str, raw: bytes, code: bytes = b"") -> Path:
    """Where the validated form of a data file lives: the user cache dir, keyed by the sha256 of the file,
    of the validating module's source (`code`) and the ftplan version, so an edit to either validates
    again. FTPLAN_CACHE_DIR overrides the dir."""
    root = os.environ.get("FTPLAN_CACHE_DIR") or user_cache_dir()
    # CRC-32 + length of each part: this key only notices edits (the cache is no trust boundary: whoever can
    # write the data file can write the cache too), and zlib loads in a fraction of OpenSSL's hashlib.
    import zlib

    digest = f"{zlib.crc32(raw):08x}{len(raw):x}-{zlib.crc32(code):08x}{len(code):x}"
    return Path(root) / "validated" / f"{kind}-{__version__}-{digest}.json"


def read_validated(kind: str, raw: bytes, validate, code: bytes = b"") -> list[dict]:
    """`validate(raw)` once per (file content, validating code, version), then the cached JSON: warm
    starts skip pydantic. The cache is a convenience: unreadable or unwritable, the file is validated again."""
    path = validated_cache_path(kind, raw, code)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    entries = validate(raw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(path)
    except OSError:
        pass
    return entries


@lru_cache(maxsize=1)
def load_gpus() -> dict[str, GPU]:
    """All GPU types keyed by canonical name (validated once per gpus.json content, then cached)."""
    raw = data_path("gpus.json").read_bytes()
    entries = read_validated("gpus", raw, _validated_entries, Path(__file__).read_bytes())
    return {e["name"]: GPU(**{**e, "aliases": tuple(e["aliases"])}) for e in entries}


@lru_cache(maxsize=1)
def _lookup() -> dict[str, str]:
    return _index(load_gpus())


def _index(gpus: dict[str, GPU]) -> dict[str, str]:
    index: dict[str, str] = {}
    for gpu in gpus.values():
        for spelling in [gpu.name, *gpu.aliases]:
            key = _key(spelling)
            if index.get(key, gpu.name) != gpu.name:
                raise ValueError(f"gpus.json: '{spelling}' means both {index[key]} and {gpu.name}")
            index[key] = gpu.name
    return index


def resolve_gpu(name: str) -> GPU:
    """GPU by canonical name or alias; UserError naming the closest known names."""
    found = _lookup().get(_key(name or ""))
    if found is not None:
        return load_gpus()[found]
    by_key = {_key(g.name): g.name for g in load_gpus().values() if g.same_as is None}
    import difflib  # only on the error path: it costs the cold start otherwise

    close = [by_key[k] for k in difflib.get_close_matches(_key(name or ""), list(by_key), n=3, cutoff=0.5)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown GPU '{name}'; {hint}see 'ftplan gpus' for the list of GPU types")


def table_gpus() -> list[GPU]:
    """GPU types to show in tables: one row per physical card, smallest memory first."""
    return sorted((g for g in load_gpus().values() if g.same_as is None),
                  key=lambda g: (g.usable_mib, g.bf16_tflops or g.fp16_tflops))
