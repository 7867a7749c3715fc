"""How long a fresh machine spends installing the job's environment: uv vs pip; and the bootstrap's own
sequence (`env_s`) and local weight-fetch path.

    python benchmarks/bootstrap.py [--uv PATH] [--reps 1] [--index-url URL] [--requirements FILE]
                                   [--weights-gib 2]

Per rep and tool: a new venv with torch already in it (untimed, as on a GPU image that ships torch;
here `pip install torch==<this torch>` from the local CPU wheel), then the timed step installs
remote_job/requirements.txt without its torch line, from an empty cache, from the index pip uses here
(pip config: PyPI), through the same TLS trust store. Both tools see only that index: the local wheel
folders in pip's config are turned off for the timed pip step, since uv cannot see them and a fresh
machine has none. torch is excluded from both timed installs: its CUDA build is several GB from PyPI
(and uv would not find the local CPU wheel). Both environments are then checked to import the job's
libraries at the same versions. Prints `uv_s`, `pip_s`, `ratio` (uv_s / pip_s: lower is better), `speedup`.

`env_s` is bootstrap.sh's sequence with uv, timed whole: `uv venv`, the Hub client pins alone (`hub_s`: when
the weights download can start), then the rest (torch again preinstalled, untimed, as above).
`fetch_local_s`/`fetch_local_gib_per_min`: fetch_weights.py's file selection and a copy of a local model
folder (a generated safetensors file of --weights-gib plus its config and tokenizer files) into a fresh
Hub-cache layout (blobs + snapshot links): the machine's own ceiling on the weights' path, the network aside
(the Hub itself cannot be reached from here).
uv does not byte-compile what it installs unless asked (imports compile the modules they load, once);
pip compiles what it installs. `--uv-compile-bytecode` makes uv compile too, but it compiles the whole
environment, the preinstalled torch included: more work than pip does. One rep takes minutes: the
figures move with the machine's load (printed), so compare reps run back to back.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "remote_job" / "requirements.txt"
CHECK = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
         "('transformers', 'peft', 'bitsandbytes', 'accelerate', 'safetensors', 'tokenizers')}))")


def without_torch(src: Path, dest: Path) -> list[str]:
    """Copy the requirements without torch lines; returns the lines dropped."""
    kept, dropped = [], []
    for line in src.read_text(encoding="utf-8").splitlines():
        name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
        (dropped if name == "torch" else kept).append(line)
    dest.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return dropped


def sh(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed:\n{(proc.stdout + proc.stderr)[-2500:]}")
    return proc


def fresh_env(path: Path, torch_version: str) -> Path:
    sh([sys.executable, "-m", "venv", str(path)])
    py = path / "bin" / "python"
    sh([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}"])  # untimed: the image's torch
    return py


def clean_pip_env() -> dict:
    """pip's own settings only: no config files (their local wheel folders), the same trust store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def time_pip(py: Path, reqs: Path, index: str, cert: str | None, cache: Path) -> float:
    cmd = [str(py), "-m", "pip", "install", "-q", "-r", str(reqs), "--index-url", index, "--cache-dir", str(cache)]
    if cert:
        cmd += ["--cert", cert]
    t0 = time.perf_counter()
    sh(cmd, clean_pip_env())
    return time.perf_counter() - t0


def time_uv(uv: str, py: Path, reqs: Path, index: str, cert: str | None, cache: Path, compile_pyc: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    if cert:
        env["SSL_CERT_FILE"] = cert
    cmd = [uv, "pip", "install", "-q", "--python", str(py), "-r", str(reqs), "--index-url", index,
           "--cache-dir", str(cache), "--native-tls"]
    if compile_pyc:
        cmd.append("--compile-bytecode")
    t0 = time.perf_counter()
    sh(cmd, env)
    return time.perf_counter() - t0


def time_env(uv: str, work: Path, torch_version: str, reqs: Path, index: str, cert: str | None) -> dict:
    """bootstrap.sh's order with uv: venv, the Hub client alone, the rest. Seconds per phase."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    if cert:
        env["SSL_CERT_FILE"] = cert
    work.mkdir(parents=True, exist_ok=True)
    hub = work / "requirements-hub.txt"
    lines = reqs.read_text(encoding="utf-8").splitlines()
    hub.write_text("\n".join(x for x in lines if re.match(r"\s*(huggingface[-_]hub|hf[-_]xet)\b", x, re.I)) + "\n")
    scratch = work / "uv-venv-timing"
    t0 = time.perf_counter()
    sh([uv, "venv", "-q", "--python", sys.executable, str(scratch)], env)
    venv_s = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    py = fresh_env(work / "env-venv", torch_version)  # untimed: the image's torch
    common = ["--python", str(py), "--index-url", index, "--cache-dir", str(work / "env-cache"), "--native-tls"]
    t0 = time.perf_counter()
    sh([uv, "pip", "install", "-q", "-r", str(hub), *common], env)
    hub_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh([uv, "pip", "install", "-q", "-r", str(reqs), *common], env)
    rest_s = time.perf_counter() - t0
    shutil.rmtree(work / "env-venv", ignore_errors=True)
    return {"venv_s": venv_s, "hub_s": hub_s, "rest_s": rest_s, "env_s": venv_s + hub_s + rest_s}


def time_local_fetch(work: Path, gib: float) -> float:
    """fetch_weights.select_files over a local model folder, then a copy of the chosen files into a Hub-cache
    layout (content-addressed blobs, snapshot symlinks). Returns seconds."""
    sys.path.insert(0, str(ROOT / "remote_job"))
    import fetch_weights

    src = work / "model"
    src.mkdir()
    block = os.urandom(2**24)  # incompressible, so no filesystem shortcut
    with open(src / "model.safetensors", "wb") as fh:
        for _ in range(max(1, round(gib * 2**30 / len(block)))):
            fh.write(block)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"not chosen when safetensors exist")
    os.sync()
    cache = work / "hub" / "models--local--model"
    t0 = time.perf_counter()
    chosen = fetch_weights.select_files(sorted(os.listdir(src)))
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshots" / "0").mkdir(parents=True)
    for i, name in enumerate(chosen):
        blob = cache / "blobs" / f"{i:040d}"
        shutil.copyfile(src / name, blob)
        (cache / "snapshots" / "0" / name).symlink_to(blob)
    os.sync()
    elapsed = time.perf_counter() - t0
    assert "pytorch_model.bin" not in chosen and "model.safetensors" in chosen
    return elapsed


def find_uv(given: str | None) -> str:
    uv = given or shutil.which("uv")
    if not uv:
        try:
            from uv import find_uv_bin  # the `uv` PyPI package ships the binary
        except ImportError:
            raise SystemExit("error: uv not found; `pip install uv` or pass --uv PATH") from None
        uv = find_uv_bin()
    return uv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", default=None, help="uv binary (default: on PATH, or the uv package's)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--index-url", default="https://pypi.org/simple", help="pip's index here (pip config)")
    parser.add_argument("--requirements", default=str(REQUIREMENTS))
    parser.add_argument("--work-dir", default=None, help="where the venvs go (default: a temp dir, removed)")
    parser.add_argument("--uv-compile-bytecode", action="store_true", help="uv compiles .pyc files, as pip does")
    parser.add_argument("--weights-gib", type=float, default=2.0, help="size of the local weights fetched")
    parser.add_argument("--skip-pip", action="store_true", help="only env_s and the local fetch (no uv vs pip)")
    args = parser.parse_args()
    uv = find_uv(args.uv)
    import importlib.metadata

    torch_version = importlib.metadata.version("torch").split("+")[0]
    cert = os.environ.get("PIP_CERT") or (os.path.exists("/etc/ssl/certs/ca-certificates.crt")
                                          and "/etc/ssl/certs/ca-certificates.crt") or None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ftplan-bootstrap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    reqs = work / "requirements-no-torch.txt"
    dropped = without_torch(Path(args.requirements), reqs)
    times: dict[str, list[float]] = {"uv": [], "pip": []}
    phases: list[dict] = []
    fetches: list[float] = []
    try:
        for rep in range(args.reps):
            phases.append(time_env(uv, work / f"env-{rep}", torch_version, reqs, args.index_url, cert))
            print(f"env rep {rep + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases[-1].items()), flush=True)
            (work / f"fetch-{rep}").mkdir()
            fetches.append(time_local_fetch(work / f"fetch-{rep}", args.weights_gib))
            shutil.rmtree(work / f"fetch-{rep}", ignore_errors=True)
            print(f"local fetch rep {rep + 1}: {args.weights_gib:g} GiB in {fetches[-1]:.2f}s", flush=True)
            if args.skip_pip:
                continue
            order = ("uv", "pip") if rep % 2 == 0 else ("pip", "uv")  # alternate: network drift hits both
            for tool in order:
                base = work / f"{tool}-{rep}"
                py = fresh_env(base / "venv", torch_version)
                cache = base / "cache"
                if tool == "uv":
                    times["uv"].append(time_uv(uv, py, reqs, args.index_url, cert, cache, args.uv_compile_bytecode))
                else:
                    times["pip"].append(time_pip(py, reqs, args.index_url, cert, cache))
                versions = sh([str(py), "-c", CHECK]).stdout.strip()
                print(f"{tool} rep {rep + 1}: {times[tool][-1]:.1f}s -> {versions}", flush=True)
                shutil.rmtree(base, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    env_s = [p["env_s"] for p in phases]
    print(f"env_s: {statistics.median(env_s):.1f}")
    print(f"hub_s: {statistics.median(p['hub_s'] for p in phases):.1f}")
    if args.reps > 1:
        print(f"env_spread_s: {min(env_s):.1f}-{max(env_s):.1f}")
    fetch_s = statistics.median(fetches)
    print(f"fetch_local_s: {fetch_s:.2f}")
    print(f"fetch_local_gib_per_min: {args.weights_gib / fetch_s * 60:.1f}")
    if args.skip_pip:
        print(f"load_average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    uv_s, pip_s = statistics.median(times["uv"]), statistics.median(times["pip"])
    uv_version = sh([uv, "--version"]).stdout.strip()
    pip_version = sh([sys.executable, "-m", "pip", "--version"]).stdout.split(" from ")[0]
    print(f"tools: {uv_version}{' --compile-bytecode' if args.uv_compile_bytecode else ''}; {pip_version}; "
          f"index {args.index_url}; cold cache; torch {torch_version} "
          f"preinstalled, excluded from the timed install ({'; '.join(dropped) or 'no torch line'})")
    print(f"uv_s: {uv_s:.1f}")
    print(f"pip_s: {pip_s:.1f}")
    if args.reps > 1:
        print(f"uv_spread_s: {min(times['uv']):.1f}-{max(times['uv']):.1f}")
        print(f"pip_spread_s: {min(times['pip']):.1f}-{max(times['pip']):.1f}")
    print(f"ratio: {uv_s / pip_s:.3f}")
    print(f"speedup: {pip_s / uv_s:.1f}")
    print(f"load_average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
