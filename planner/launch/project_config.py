"""`ftplan.toml`: the project file that `ftplan init` writes and `ftplan launch` reads.

Precedence: command-line flags > project file > defaults. The file is parsed with `tomllib` and
validated with pydantic, so a typo (`budget_usd = "twenty"`, `mehtod = ...`) is a one-line error that
names the file and the key instead of a surprise at the provider. Secrets never live here: provider
sections name the *environment variable* that holds a key (`api_key_env`), not the key.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ftplan.planner.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - py3.10
    import tomli as tomllib

DEFAULT_FILE = "ftplan.toml"

TEMPLATE = """\
# ftplan project file: `ftplan launch` reads it, command-line flags override it.
# `ftplan launch --dry-run` shows the plan (instance, $/h, hours, total) without starting anything.

[job]
model = "{model}"                # catalog name (e.g. tiny-llama, llama-3.1-8b, mistral-7b)
method = "{method}"                  # qlora | lora | full
dataset = "{dataset}"   # JSON or JSONL: alpaca {{instruction,input,output}}, sharegpt or messages (init ships a 70-record example)
seq_len = 512                      # tokens per example after truncation
batch_size = 4                     # per GPU
grad_accum = 4                     # optimizer step every grad_accum micro-batches
epochs = 1
max_steps = 0                      # 0 = the whole dataset x epochs
learning_rate = 2e-4
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
optimizer = "auto"                 # auto: paged 8-bit AdamW for QLoRA, fused AdamW on CUDA for LoRA/full
gradient_checkpointing = true
checkpoint_every_steps = 50        # also what a budget stop or a spot loss can resume from
seed = 42

[launch]
providers = ["runpod", "lambda", "aws", "gcp", "paperspace"]   # where to look for offers
regions = []                       # empty = any region
spot = "on-demand"                 # on-demand | spot | auto (spot if cheaper)
budget_usd = {budget}                  # hard cap for the whole run, all instances together
on_over_budget = "stop"            # stop (checkpoint, pull, tear down) | continue
spot_recovery = true               # after a spot loss, resume on the next offer within the budget
max_offer_tries = 3                # offers to try when a provider has no capacity
sync_every_min = 10                # pull checkpoints back this often during training
runs_dir = "runs"                  # artifacts land in runs/<run-id>/
grace_minutes = 15                 # after training, the machine waits this long for a pull, then powers off
# bucket = "s3://my-bucket/ftplan"  # the watchdog uploads there when nobody pulled (ftplan pull RUN)
# bucket_env = {{ AWS_ACCESS_KEY_ID = "RUN_BUCKET_KEY_ID", AWS_SECRET_ACCESS_KEY = "RUN_BUCKET_SECRET" }}
#                                  # a scoped bucket key, read from those variables; default: the instance role

# Per-provider settings. Keys are read from the environment variable named here, never from this file.
[providers.local]                  # this machine over SSH (for trying the whole chain on a laptop)
price_hour = 0.0                   # what an hour here is accounted at in `ftplan report`

# [providers.runpod]
# api_key_env = "RUNPOD_API_KEY"
# [providers.lambda]
# api_key_env = "LAMBDA_API_KEY"
# [providers.aws]
# profile = "default"
# [providers.gcp]
# project = "my-project"

# Pin offers instead of picking from the catalog (tried in this order on no capacity):
# [[launch.offers]]
# provider = "lambda"
# instance_type = "gpu_1x_a10"
# gpu = "A10"
# region = "us-east-1"
# price_hour = 0.75
"""


class JobSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = "tiny-llama"
    method: Literal["qlora", "lora", "full"] = "qlora"
    dataset: str | None = None
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int = Field(0, ge=0)
    learning_rate: float = Field(2e-4, gt=0)
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # remote_job/job_config.py's values: checked here, not on the rented machine
    optimizer: Literal["auto", "paged_adamw_8bit", "adamw_8bit", "paged_adamw", "adamw"] = "auto"
    loss: Literal["fused", "chunked", "standard"] = "fused"
    packing: bool = Field(False, strict=True)  # "yes" is a typo, not true
    gradient_checkpointing: bool = True
    checkpoint_every_steps: int = Field(50, gt=0)
    heartbeat_every_s: float = Field(2.0, gt=0)
    seed: int = 42
    throttle_s_per_step: float = Field(0.0, ge=0)  # demos/tests: slow each step down deliberately


class PinnedOffer(BaseModel):
    """An offer named in the project file instead of picked from the catalog (tried in order)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    provider: str
    instance_type: str
    gpu: str
    gpu_count: int = Field(1, gt=0)
    region: str = ""
    zone: str | None = None
    spot: bool = False
    price_hour: float = Field(..., ge=0)
    nodes: int = Field(1, ge=1, le=64)             # > 1: one run on this many machines of the type (issue 13)

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        _check_names([value])
        return value


class LaunchSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    providers: list[str] = ["runpod", "lambda", "aws", "gcp", "paperspace"]
    regions: list[str] = []
    spot: Literal["on-demand", "spot", "auto"] = "on-demand"
    budget_usd: float | None = Field(None, gt=0)
    on_over_budget: Literal["stop", "continue"] = "stop"
    spot_recovery: bool = True
    max_offer_tries: int = Field(3, gt=0)
    sync_every_min: float = Field(10, gt=0)
    runs_dir: str = "runs"
    poll_interval_s: float = Field(2.0, gt=0)
    wait_ready_timeout_s: float = Field(1200, gt=0)
    ssh_connect_timeout_s: float | None = Field(None, gt=0)  # None: the provider's first_boot_s, else 600
    ssh_reconnect_s: float = Field(300, gt=0)       # a connection lost mid-run is retried this long, then it fails
    pull_margin_min: float = Field(10, ge=0)        # budget kept aside for pulling artifacts and teardown
    remote_python: str | None = None
    ssh_cidr: str | None = None                     # AWS/GCP port-22 source range; None = this machine's /32
    offers: list[PinnedOffer] = []                  # pinned offers: skip the catalog, try these in order
    bundle_extra_files: dict[str, str] = {}         # archive path -> local path (see ftplan.planner.remote.bundle)
    bucket: str | None = None                       # s3://BUCKET/PREFIX | gs://BUCKET/PREFIX (see _bucket_url)
    grace_minutes: float = Field(15, ge=0)          # after training, wait this long for a launcher to pull
    poweroff_cmd: str | None = None                 # the watchdog's power-off (default: by provider)
    bucket_env: dict[str, str] = {}                 # machine var -> NAME of the local env var holding a scoped key
    nodes: int | None = Field(None, ge=1, le=64)    # machines in one run; None: the plan decides (1 unless it helps)
    rdzv_port: int = Field(29400, ge=1, le=65535)   # torchrun's c10d rendezvous port on node 0 (several nodes)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        _check_names(value)
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(s3|gs)://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/\S*)?", value):
            raise ValueError(f"{value!r} is not a bucket URL; use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
        return value

    @field_validator("ssh_cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        import ipaddress

        try:
            return str(ipaddress.ip_network(value.strip(), strict=False)) if value else None
        except ValueError:
            raise ValueError(f"'{value}' is not a CIDR block such as 203.0.113.0/24") from None


class ProjectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: JobSection = JobSection()
    launch: LaunchSection = LaunchSection()
    providers: dict[str, dict[str, Any]] = {}
    source: str | None = None  # the file it came from (not a TOML key)

    @field_validator("providers")
    @classmethod
    def _no_inline_secrets(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        _check_names(value)
        for name, section in value.items():
            if not isinstance(section, dict):
                raise ValueError(f"[providers.{name}] must be a table of settings, e.g. [providers.{name}]")
            for key, item in section.items():
                if _looks_secret(key):
                    raise ValueError(
                        f"[providers.{name}] {key}: keys do not belong in the project file; "
                        f"put it in an environment variable and set api_key_env = \"NAME\""
                    )
                if key == "price_hour" and not _is_price(item):
                    raise ValueError(f"[providers.{name}] price_hour = {item!r}: must be a number of USD per hour "
                                     "(0 or more, finite), e.g. price_hour = 0.75")
        return value

    def provider_options(self, name: str) -> dict[str, Any]:
        """Options for `get_provider(name, **options)`: the section minus what only the launcher reads."""
        return {k: v for k, v in self.providers.get(name, {}).items() if k not in LAUNCHER_ONLY_KEYS}

    def price_override(self, name: str) -> float | None:
        value = self.providers.get(name, {}).get("price_hour")
        return float(value) if value is not None else None


def _check_names(names: Any) -> None:
    try:
        check_provider_names(names, "provider")
    except UserError as exc:
        raise ValueError(str(exc)) from None


# Key names that hold a secret, whatever their case (`API_KEY`, `Token`, `aws_secret_access_key`); `*_env`
# keys name an environment variable and are fine.
_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "passwd", "credential", "private_key")


def _looks_secret(key: str) -> bool:
    k = str(key).lower().replace("-", "_")
    return not k.endswith("_env") and any(w in k for w in _SECRET_WORDS)


def _is_price(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# Provider-section keys the launcher reads itself (not adapter options).
LAUNCHER_ONLY_KEYS = ("price_hour", "remote_root", "gpu", "gpus")  # gpus: per machine (local/ssh)


def check_provider_names(names: Any, what: str) -> None:
    """Every name must be a provider ftplan knows (exact, lower case): a typo (`runpd`, `AWS`, `azure`) is
    bad input everywhere (launch, plan, gc, the project file), never an empty result."""
    import difflib

    from ftplan.providers.base import ADAPTERS

    for name in names or ():
        if name in ADAPTERS:
            continue
        close = difflib.get_close_matches(str(name).lower(), list(ADAPTERS), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{what}: unknown provider '{name}'; {hint}choose one of: {', '.join(ADAPTERS)}")


def render_template(model: str = "tiny-llama", method: str = "qlora", dataset: str = "data/train.jsonl",
                    budget: float = 20) -> str:
    return TEMPLATE.format(model=_toml_text(model), method=_toml_text(method), dataset=_toml_text(dataset),
                           budget=_fmt_number(budget))


def write_template(path: Path, *, force: bool = False, **values: Any) -> Path:
    """Write the template, validated first: a value that would make an invalid file is refused and nothing
    is left on disk (the file appears whole, via a rename, or not at all)."""
    import math
    import os
    import tempfile

    if path.exists() and not force:
        raise UserError(f"{path} already exists; edit it, or pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist; create it first or pass "
                        "another --path")
    budget = values.get("budget", 20)
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise UserError("--budget must be a positive, finite number of USD, e.g. --budget 20")
    text = render_template(**values)
    try:
        ProjectConfig.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        detail = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise UserError(f"these values would make an invalid {path.name} ({detail}); nothing written") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _toml_text(value: Any) -> str:
    """`value` for the inside of a TOML basic string ("..."): backslash, quote and control characters escaped."""
    out = []
    for ch in str(value):
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def load_project(path: str | Path | None = None, *, required: bool = False) -> ProjectConfig:
    """Read and validate a project file; `path=None` reads ./ftplan.toml when present, else defaults."""
    if path is None:
        candidate = Path(DEFAULT_FILE)
        if not candidate.exists():
            if required:
                raise UserError(f"no {DEFAULT_FILE} here; run 'ftplan init' or pass --config FILE")
            return ProjectConfig()
        path = candidate
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; run 'ftplan init' to write one") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}; fix the line it names") from None
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {_first_error(exc)}") from None
    cfg.source = str(path)
    return cfg


def with_overrides(cfg: ProjectConfig, **flags: Any) -> ProjectConfig:
    """Apply command-line flags (None = not given). Keys are `job.<field>` or `launch.<field>` names."""
    job = cfg.job.model_dump()
    launch = cfg.launch.model_dump()
    for key, value in flags.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        target = {"job": job, "launch": launch}[section]
        if field not in target:
            raise KeyError(key)
        target[field] = value
    try:
        return ProjectConfig(job=JobSection(**job), launch=LaunchSection(**launch), providers=cfg.providers,
                             source=cfg.source)
    except ValidationError as exc:
        raise UserError(_first_error(exc, flags=True)) from None


def _first_error(exc: ValidationError, *, flags: bool = False) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'; see the template 'ftplan init' writes for the valid keys"
    if flags:
        return f"invalid value for {loc.split('.')[-1].replace('_', '-')}: {msg}"
    return f"invalid value for '{loc}': {msg}"


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
