"""Which torch a rented machine needs: the image's, or a CUDA wheel matched to its driver and GPU.

Standard library only, Python >= 3.8 syntax: bootstrap.sh runs it with whatever python the image has,
before any venv exists. Three commands:

    python torch_select.py probe            this interpreter: version, venv/pip, torch and what it sees (JSON)
    python torch_select.py plan [opts]      what bootstrap will install and why (JSON), nothing installed
    python torch_select.py fetch-uv DIR     uv from its PyPI wheel (urllib), for images without pip

The rule (`choose_wheel`), in order: (1) the newest wheel whose CUDA the driver supports natively and
whose major version equals the driver's; (2) the wheel of the driver's CUDA major with the lowest CUDA
above it, by CUDA's minor-version compatibility; (3) the newest wheel of an older CUDA major the driver
supports; a wheel qualifies only if it has kernels (SASS) for the GPU's compute capability.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MIN_TORCH = (2, 6)  # transformers 5.x: is_torch_available() is False below 2.6 (utils/import_utils.py)
MIN_PYTHON = (3, 10)  # requirements.txt supports 3.10-3.12; older images get a Python from uv
UV_PYTHON = "3.11"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"

# Driver branch -> newest CUDA it supports natively. Source: NVIDIA CUDA Toolkit Release Notes, Table 3
# "CUDA Toolkit and Corresponding Driver Versions" (Linux x86_64 GA drivers): 11.4 >= 470.42.01,
# 12.0 >= 525.60.13, 12.2 >= 535.54.03, 12.4 >= 550.54.14, 12.6 >= 560.28.03, 12.8 >= 570.26,
# 12.9 >= 575.51.03, 13.0 >= 580.65.06.
DRIVER_CUDA = [
    ((580, 65, 6), (13, 0)), ((575, 51, 3), (12, 9)), ((570, 26), (12, 8)), ((560, 28, 3), (12, 6)),
    ((555, 42, 2), (12, 5)), ((550, 54, 14), (12, 4)), ((545, 23, 6), (12, 3)), ((535, 54, 3), (12, 2)),
    ((530, 30, 2), (12, 1)), ((525, 60, 13), (12, 0)), ((520, 61, 5), (11, 8)), ((515, 43, 4), (11, 7)),
    ((510, 39, 1), (11, 6)), ((495, 29, 5), (11, 5)), ((470, 42, 1), (11, 4)), ((465, 19, 1), (11, 3)),
    ((460, 27, 3), (11, 2)), ((455, 23, 5), (11, 1)), ((450, 51, 5), (11, 0)),
]
# Minor-version compatibility: a CUDA X.y runtime runs on any driver of at least this version for X.
# Source: CUDA Compatibility guide, "Minor Version Compatibility" (11.x >= 450.80.02, 12.x >= 525.60.13).
MINOR_COMPAT_FLOOR = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}

# PyTorch CUDA wheels (download.pytorch.org/whl/<tag>): (tag, CUDA, torch pin, SASS architectures).
# Sources: pytorch/pytorch .ci/manywheel/build_cuda.sh TORCH_CUDA_ARCH_LIST per CUDA version and the
# release compatibility matrix (RELEASE.md): 2.7 ships cu118/cu126/cu128, 2.9 cu126/cu128/cu130; cu128 and
# newer dropped Volta (sm_70), see dev-discuss "Dropping Volta support" and pytorch#172352; F3 of
# shared/research/real-world-checks.md lists PyPI's cu13 build as sm_75..sm_120.
WHEELS = [
    ("cu130", (13, 0), "2.9.1", (75, 80, 86, 90, 100, 120)),
    ("cu128", (12, 8), "2.9.1", (75, 80, 86, 90, 100, 120)),
    ("cu126", (12, 6), "2.9.1", (50, 60, 70, 75, 80, 86, 90)),
    ("cu118", (11, 8), "2.7.1", (50, 60, 70, 75, 80, 86, 90)),
]
# The oldest driver branch that runs each GPU generation at all (NVIDIA driver release notes:
# Hopper needs R520+, Ada R525+, Blackwell R570+).
ARCH_MIN_DRIVER = {100: (570, 0), 120: (570, 0), 90: (520, 0), 89: (525, 0)}

# GPU name -> compute capability, for drivers whose nvidia-smi lacks the compute_cap field (< R510).
# Source: NVIDIA "CUDA GPUs - Compute Capability" table.
NAME_CAPABILITY = [("B200", 100), ("H200", 90), ("H100", 90), ("L40S", 89), ("L40", 89), ("L4", 89),
                   ("RTX 4090", 89), ("A10G", 86), ("A10", 86), ("A40", 86), ("RTX A6000", 86), ("RTX 3090", 86),
                   ("A100", 80), ("A30", 80), ("T4", 75), ("V100", 70), ("P100", 60), ("K80", 37)]

QUERY = "name,driver_version,compute_cap,memory.total"


class SelectError(Exception):
    """No torch build can use this GPU with this driver; the message says what to change."""


# ---------------------------------------------------------------- GPUs
def _version(text: str) -> tuple:
    return tuple(int(p) for p in text.strip().split(".") if p.isdigit())


def parse_gpus(csv_text: str, with_cap: bool = True) -> list:
    """`nvidia-smi --query-gpu=name,driver_version[,compute_cap],memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < (4 if with_cap else 3):
            continue
        name, driver = parts[0], parts[1]
        if with_cap:
            cap, mem = parts[2], parts[3]
            cc = int(round(float(cap) * 10)) if cap.replace(".", "").isdigit() else name_capability(name)
        else:
            mem, cc = parts[2], name_capability(name)
        gpus.append({"name": name, "driver": driver, "compute_cap": cc,
                     "memory_mib": int(float(mem)) if mem.replace(".", "").isdigit() else None})
    return gpus


def name_capability(name: str):
    for key, cc in NAME_CAPABILITY:
        if key.lower() in name.lower():
            return cc
    return None


def query_gpus(smi: str = "nvidia-smi") -> list:
    """The GPUs nvidia-smi lists ([] when there is no nvidia-smi or no GPU)."""
    def run(fields: str):
        try:
            return subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
    proc = run(QUERY)
    if proc is None:
        return []
    if proc.returncode == 0:
        return parse_gpus(proc.stdout)
    # R470 and older: "Field "compute_cap" is not a valid field to query."
    proc = run("name,driver_version,memory.total")
    return parse_gpus(proc.stdout, with_cap=False) if proc is not None and proc.returncode == 0 else []


def driver_cuda(driver: str) -> tuple:
    """Newest CUDA the driver supports natively; () for a driver older than CUDA 11."""
    v = _version(driver)
    for floor, cuda in DRIVER_CUDA:
        if v >= floor:
            return cuda
    return ()


def covers(archs, cc: int) -> bool:
    """SASS for sm_XY runs on any GPU of the same major with minor >= Y (e.g. sm_86 kernels on an L4, 8.9)."""
    return any(a // 10 == cc // 10 and a % 10 <= cc % 10 for a in archs)


def choose_wheel(driver: str, cc: int) -> dict:
    """The PyTorch CUDA wheel for this driver and compute capability (rule in the module docstring)."""
    v, native = _version(driver), driver_cuda(driver)
    need = ARCH_MIN_DRIVER.get(cc) or ARCH_MIN_DRIVER.get(cc // 10 * 10)
    if need and v < need:
        raise SelectError(f"driver {driver} is too old for a compute capability {cc / 10:.1f} GPU "
                          f"(needs R{need[0]}+); pick an image with a newer NVIDIA driver")
    if not native:
        raise SelectError(f"driver {driver} is older than CUDA 11; pick an image with an R525+ NVIDIA driver")
    fits = [w for w in WHEELS if covers(w[3], cc)]
    if not fits:
        raise SelectError(f"no PyTorch CUDA wheel has kernels for compute capability {cc / 10:.1f}")
    same = [w for w in fits if w[1][0] == native[0]]
    steps = (
        ([w for w in same if w[1] <= native], max, "driver supports CUDA {n} natively"),
        ([w for w in same if w[1] > native and v >= MINOR_COMPAT_FLOOR.get(w[1][0], (999,))], min,
         "CUDA {c} runs on driver {d} by CUDA's minor-version compatibility (CUDA {n} natively)"),
        ([w for w in fits if w[1][0] < native[0]], max, "no CUDA {n} wheel covers sm_{cc}; older major"),
    )
    for pool, pick, why in steps:
        if pool:
            tag, cuda, torch, archs = pick(pool, key=lambda w: w[1])
            c, n = ".".join(map(str, cuda)), ".".join(map(str, native))
            return {"variant": tag, "cuda": c, "torch": torch, "spec": f"torch=={torch}+{tag}",
                    "index_url": PYTORCH_INDEX + tag, "archs": [f"sm_{a}" for a in archs],
                    "reason": why.format(c=c, n=n, d=driver, cc=cc)}
    raise SelectError(f"no PyTorch CUDA wheel runs on driver {driver} with compute capability {cc / 10:.1f}; "
                      "pick an image with an R570+ NVIDIA driver")


# ---------------------------------------------------------------- the interpreter
def probe() -> dict:
    """This interpreter and its torch. Never raises: a broken torch is reported, not fatal."""
    import importlib.util

    info = {"python": sys.executable, "version": ".".join(str(v) for v in sys.version_info[:3]),
            "has_ensurepip": importlib.util.find_spec("ensurepip") is not None,
            "has_pip": importlib.util.find_spec("pip") is not None, "torch": None,
            # where the image's packages live: a venv reusing its torch points a .pth file here
            "site_paths": [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))
                           and os.path.isdir(p)]}
    if importlib.util.find_spec("torch") is None:
        return info
    try:
        import torch

        t = {"version": torch.__version__.split("+")[0], "cuda": torch.version.cuda,
             "cuda_available": bool(torch.cuda.is_available()), "archs": [], "capability": None}
        if t["cuda_available"]:
            t["archs"] = list(torch.cuda.get_arch_list())
            major, minor = torch.cuda.get_device_capability(0)
            t["capability"] = major * 10 + minor
        info["torch"] = t
    except Exception as exc:  # noqa: BLE001 - an image's broken torch is a finding, not a crash
        info["torch"] = {"version": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return info


def _ver(text) -> tuple:
    try:
        return tuple(int(p) for p in str(text).split(".")[:2])
    except ValueError:
        return ()


def torch_reusable(t, gpu) -> tuple:
    """(reuse?, why) for an image's torch on this machine (gpu None: no GPU listed)."""
    if not t or not t.get("version"):
        return False, "no torch in the image" if not t else f"the image's torch does not import ({t.get('error')})"
    if _ver(t["version"]) < MIN_TORCH:
        return False, f"the image's torch {t['version']} is older than 2.6 (transformers 5.x disables it)"
    if gpu is None:
        return True, f"no GPU listed; the image's torch {t['version']} runs on the CPU"
    if not t.get("cuda"):
        return False, f"the image's torch {t['version']} is a CPU-only build"
    if not t.get("cuda_available"):
        return False, f"the image's torch {t['version']}+cu{t['cuda']} does not see the GPU (driver {gpu['driver']})"
    cc = gpu["compute_cap"]
    archs = [int(a[3:]) for a in t.get("archs") or [] if a.startswith("sm_") and a[3:].isdigit()]
    if cc is not None and not covers(archs, cc):
        return False, f"the image's torch {t['version']} has no kernels for sm_{cc} ({' '.join(t.get('archs') or [])})"
    return True, f"the image's torch {t['version']}+cu{t['cuda']} sees the GPU and has sm_{cc} kernels"


def make_plan(gpus: list, pythons: list, uv_on_path: bool = False, env=None) -> dict:
    """What bootstrap will do, from nvidia-smi's GPUs and the probes of the image's interpreters."""
    env = os.environ if env is None else env
    gpu = gpus[0] if gpus else None
    plan = {"gpus": gpus, "gpu_count": len(gpus), "driver_cuda": None, "python": None, "image_torch": None,
            "reuse_image_torch": False, "reason": None, "torch": None, "venv": None, "installer": None,
            "error": None}
    if gpu is not None:
        plan["driver_cuda"] = ".".join(map(str, driver_cuda(gpu["driver"]))) or None
    usable = [p for p in pythons if _ver(p.get("version")) >= MIN_PYTHON]
    # Prefer an interpreter whose torch qualifies, then any >= 3.10 (the first found: login-shell PATH order).
    for p in usable:
        ok, why = torch_reusable(p.get("torch"), gpu)
        if ok:
            plan.update(python=p, image_torch=p["torch"], reuse_image_torch=True, reason=why)
            break
    else:
        base = usable[0] if usable else None
        with_torch = next((p for p in pythons if p.get("torch")), None)
        plan["python"] = base
        plan["image_torch"] = with_torch["torch"] if with_torch else None
        plan["reason"] = torch_reusable(plan["image_torch"], gpu)[1]
        try:
            if gpu is None:
                plan["torch"] = {"variant": "cpu", "cuda": None, "torch": "2.9.1", "spec": "torch==2.9.1+cpu",
                                 "index_url": PYTORCH_INDEX + "cpu", "archs": [],
                                 "reason": "no GPU listed by nvidia-smi: the CPU build (no multi-GB CUDA download)"}
            elif gpu["compute_cap"] is None:
                raise SelectError(f"unknown compute capability for '{gpu['name']}'; pick an image with R510+ "
                                  "drivers (nvidia-smi --query-gpu=compute_cap)")
            else:
                plan["torch"] = choose_wheel(gpu["driver"], gpu["compute_cap"])
        except SelectError as exc:
            plan["error"] = str(exc)
        if env.get("FTPLAN_TORCH_INDEX") and plan["torch"]:
            plan["torch"]["index_url"] = env["FTPLAN_TORCH_INDEX"]  # a mirror
    base = plan["python"]
    plan["venv"] = {"python": base["python"] if base else UV_PYTHON,
                    "python_version": base["version"] if base else UV_PYTHON,
                    "downloads_python": base is None,
                    "image_site_paths": base.get("site_paths", []) if plan["reuse_image_torch"] else []}
    if uv_on_path:
        uv = "uv from PATH"
    elif any(p.get("has_pip") for p in pythons):
        uv = "uv via pip install --target"
    else:
        uv = "uv wheel from PyPI (urllib)"
    fallback = "python -m venv + pip" if base and base.get("has_ensurepip") else None
    plan["installer"] = {"uv": uv, "fallback": fallback,
                         "needs_python3_venv": False}
    if base is None and not uv_on_path and not pythons:
        plan["error"] = plan["error"] or "no python3 found on this machine; install python3"
    return plan


# ---------------------------------------------------------------- uv without pip
def fetch_uv(dest: str) -> str:
    """Download uv's manylinux wheel from PyPI and unpack the binary; returns its path."""
    import platform
    import urllib.request
    import zipfile

    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine().lower()]
    index = os.environ.get("FTPLAN_PYPI_JSON", "https://pypi.org/pypi/uv/json")
    with urllib.request.urlopen(index, timeout=60) as resp:
        files = json.load(resp)["urls"]
    wheel = next(f for f in files if f["filename"].endswith(".whl") and "manylinux" in f["filename"]
                 and arch in f["filename"] and "musl" not in f["filename"])
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, wheel["filename"])
    urllib.request.urlretrieve(wheel["url"], path)
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/scripts/uv") or n.endswith("/bin/uv"))
        target = os.path.join(dest, "uv")
        with zf.open(member) as src, open(target, "wb") as out:
            out.write(src.read())
    os.chmod(target, 0o755)
    os.remove(path)
    return target


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else ""
    if cmd == "probe":
        print(json.dumps(probe()))
        return 0
    if cmd == "plan":
        # plan [--uv-on-path] [--deadline=HOW] PROBE_FILE...  (one JSON probe per file; unreadable skipped)
        uv_on_path = "--uv-on-path" in args
        deadline = next((a.split("=", 1)[1] for a in args if a.startswith("--deadline=")), None)
        pythons = []
        for path in [a for a in args[1:] if not a.startswith("--")]:
            try:
                with open(path, encoding="utf-8") as fh:
                    pythons.append(json.load(fh))
            except (OSError, ValueError):
                continue
        plan = make_plan(query_gpus(), pythons, uv_on_path)
        plan["deadline"] = deadline
        print(json.dumps(plan, indent=1))
        return 0
    if cmd == "fetch-uv" and len(args) == 2:
        print(fetch_uv(args[1]))
        return 0
    print("usage: torch_select.py probe | plan [--uv-on-path] [--deadline=HOW] PROBE.json... | fetch-uv DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
