"""The bundle shipped to the GPU machine: one .tar.gz that unpacks into the run directory.

Layout (the launcher and `remote_job` rely on it; paths in job.json are relative to the run dir):

    job/               the job's .py files (from the installed `remote_job` package)
    job.json           the job config: dataset -> data/<name>, output_dir -> out, stop_file -> STOP
    data/<name>        the dataset (file or folder)
    requirements.txt   pinned job requirements (remote_job/requirements.txt)
    requirements-cuda.txt  what only CUDA machines install (Liger); bootstrap.sh decides
    bootstrap.sh       prepares Python, arms the deadline, runs the job detached-friendly
    <extra files>      e.g. a local model folder referenced from job.json

Archive members carry no owner and a fixed mtime so that the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import tarfile
from pathlib import Path, PurePosixPath

from ftplan import remote_job
from ftplan.planner.errors import UserError

RESERVED = ("job.json", "requirements.txt", "requirements-cuda.txt", "bootstrap.sh", "secrets.env", "train.log", "pid", "exit_code", "STOP")
_MTIME = 1_700_000_000  # fixed: reproducible archives
_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints"}


def job_dir() -> Path:
    """Folder of the installed `remote_job` package (holds train.py, bootstrap.sh, requirements.txt)."""
    return Path(remote_job.__file__).resolve().parent


def _requirements_text() -> str:
    """remote_job/requirements.txt (the job's pins); fallback: the `job` extra of this distribution."""
    pinned = job_dir() / "requirements.txt"
    if pinned.is_file():
        return pinned.read_text()
    reqs = importlib.metadata.requires("ftplan") or []
    lines = [r.split(";")[0].strip() for r in reqs if 'extra == "job"' in r.replace("'", '"')]
    return "\n".join(lines) + "\n"


def _archive_name(name: str) -> str:
    """Validate an archive path given by the caller: relative, no '..', not a reserved file."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or str(p) in (".", ""):
        raise UserError(f"bundle file name '{name}' must be a relative path without '..'; use e.g. 'model/config.json'")
    if str(p) in RESERVED:
        raise UserError(f"bundle file name '{name}' is reserved by ftplan; pick another name")
    return str(p)


def _info(name: str, *, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.mtime = size, mode, kind, _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    tar.addfile(_info(name, size=len(data), mode=mode), io.BytesIO(data))


def _add_path(tar: tarfile.TarFile, name: str, path: Path) -> None:
    """Add a file or a folder (recursively, sorted, following no symlinks out of it)."""
    if path.is_dir():
        tar.addfile(_info(name, mode=0o755, kind=tarfile.DIRTYPE))
        for child in sorted(path.iterdir()):
            if child.name in _SKIP_DIRS or child.is_symlink() and not child.resolve().is_relative_to(path.resolve()):
                continue
            _add_path(tar, f"{name}/{child.name}", child)
    elif path.is_file():
        mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
        with open(path, "rb") as fh:
            tar.addfile(_info(name, size=path.stat().st_size, mode=mode), fh)


def build_bundle(
    job_config: dict, dataset: Path, out_path: Path, *, extra_files: dict[str, Path] | None = None
) -> Path:
    """Write the run bundle to `out_path` (.tar.gz) and return it.

    `job_config` is the job's config; its dataset/output_dir/stop_file are rewritten to the fixed
    layout. `extra_files` maps archive paths to local files or folders; an entry under `job/`
    replaces the packaged file of that name (used to ship a patched or trivial job).
    """
    if not isinstance(job_config, dict):
        raise UserError("the job config must be a JSON object (a dict); check the run's config")
    dataset = Path(dataset)
    if not dataset.exists():
        raise UserError(f"dataset '{dataset}' does not exist; pass an existing .jsonl file or folder")
    extras = {_archive_name(k): Path(v) for k, v in (extra_files or {}).items()}
    for name, path in extras.items():
        if not path.exists():
            raise UserError(f"file '{path}' for bundle entry '{name}' does not exist; check the path")

    config = dict(job_config)
    config.update(dataset=f"data/{dataset.name}", output_dir="out", stop_file="STOP")
    try:
        config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise UserError(f"the job config cannot be written as JSON ({exc}); use plain strings and numbers") from None

    src = job_dir()
    bootstrap = src / "bootstrap.sh"
    job_files = {f"job/{p.name}": p for p in sorted(src.glob("*.py"))}
    job_files.update({k: v for k, v in extras.items() if k.startswith("job/")})
    extras = {k: v for k, v in extras.items() if not k.startswith("job/")}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # gzip with mtime 0 and no file name, level 1 (weights and data hardly compress): reproducible and fast.
    with open(out_path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info("job", mode=0o755, kind=tarfile.DIRTYPE))
        for name, path in sorted(job_files.items()):
            _add_path(tar, name, path)
        _add_bytes(tar, "job.json", config_bytes)
        tar.addfile(_info("data", mode=0o755, kind=tarfile.DIRTYPE))
        _add_path(tar, f"data/{dataset.name}", dataset)
        _add_bytes(tar, "requirements.txt", _requirements_text().encode())
        _add_bytes(tar, "bootstrap.sh", bootstrap.read_bytes(), mode=0o755)
        if (src / "requirements-cuda.txt").is_file():
            _add_path(tar, "requirements-cuda.txt", src / "requirements-cuda.txt")
        for name, path in sorted(extras.items()):
            _add_path(tar, name, path)
    return out_path
