"""The model catalog (`catalogs/models.json`) and resolving `--model`: a catalog name or alias, a local
config.json or folder, or a Hugging Face id whose config.json is fetched once and cached.

`from_hf_config` turns a transformers config.json into a `ModelSpec` (`ftplan.planner.estimate.architecture`).
The shipped catalog is validated once per file content and version and read back from the user cache
afterwards (`ftplan.planner.estimate.gpus.read_validated`), so a warm `ftplan estimate` never imports
pydantic. httpx/platformdirs are imported inside the resolver.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.architecture import _FIELD_NAMES, _TRAITS, SUPPORTED_MODEL_TYPES, ModelSpec

# config.json keys that say nothing about the architecture (dropped by from_hf_config).
_IGNORED_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "quantization_config", "model_type", "n_ctx", "use_cache", "_attn_implementation_autoset",
}


def from_hf_config(config: dict, name: str | None = None, hf_id: str | None = None) -> ModelSpec:
    """ModelSpec from a transformers config.json dict (families of SUPPORTED_MODEL_TYPES).

    Raises ValueError naming the problem (missing field, unsupported model_type); callers that
    read a file wrap it in a UserError naming the file.
    """
    if not isinstance(config, dict):
        raise ValueError("config.json must be a JSON object")
    mt = config.get("model_type")
    if mt not in _TRAITS:
        raise ValueError(
            f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    names = _FIELD_NAMES.get(mt, _FIELD_NAMES["default"])
    spec: dict[str, Any] = {"model_type": mt}
    required = ("vocab_size", "hidden_size", "num_layers", "num_heads")
    for ours in ("vocab_size", *names):
        theirs = "vocab_size" if ours == "vocab_size" else names[ours]
        value = config.get(theirs)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"field '{theirs}' must be an integer, got {value!r}")
            spec[ours] = value
        elif ours in required:
            raise ValueError(f"missing field '{theirs}'")
    h = spec["hidden_size"]
    if "intermediate_size" not in spec:
        if mt in ("gpt2", "gptj"):
            spec["intermediate_size"] = 4 * h  # n_inner: null means 4 * n_embd
        else:
            raise ValueError(f"missing field '{names['intermediate_size']}'")
    if mt in ("gpt2", "gptj") and "max_position_embeddings" not in spec:
        spec["max_position_embeddings"] = config.get("n_ctx", 1024)
    spec.setdefault("max_position_embeddings", 2048)
    if config.get("head_dim") is not None and mt not in ("gpt2", "gptj", "bert", "roberta", "distilbert", "phi"):
        spec["head_dim"] = config["head_dim"]
    elif mt == "gemma2":
        spec["head_dim"] = 256
    if mt == "mixtral":
        spec.setdefault("num_experts", 8)
        spec.setdefault("experts_per_token", 2)
    if mt in ("bert", "roberta"):
        spec["type_vocab_size"] = config.get("type_vocab_size", 2)
    if mt == "llama":
        spec["qkv_bias"] = spec["o_bias"] = bool(config.get("attention_bias", False))
        spec["mlp_bias"] = bool(config.get("mlp_bias", False))
    if mt == "gemma2" and config.get("attention_bias"):
        spec["qkv_bias"] = spec["o_bias"] = True
    if mt == "phi" and config.get("qk_layernorm"):
        raise ValueError("phi with qk_layernorm=true is not supported")
    if mt == "gpt2" and config.get("add_cross_attention"):
        raise ValueError("gpt2 with add_cross_attention=true is not supported")
    default_tie = mt in ("gpt2", "gemma2", "bert", "roberta", "distilbert")
    spec["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", default_tie))
    used = {"vocab_size", "tie_word_embeddings", "head_dim", "type_vocab_size", "attention_bias", "mlp_bias",
            *names.values()}
    spec["hf_extra"] = {k: v for k, v in config.items() if k not in used and k not in _IGNORED_KEYS}
    ident = hf_id or config.get("_name_or_path") or name or f"local/{mt}"
    spec["name"] = _slug(name or ident.rsplit("/", 1)[-1])
    spec["hf_id"] = ident
    spec["family"] = mt
    from pydantic import ValidationError

    try:
        return ModelSpec.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(_first_error(exc)) from None


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return s or "model"


def _first_error(exc) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


# ---- the catalog ----------------------------------------------------------------------------
class CatalogError(UserError):
    """The shipped (or a given) models.json is broken."""


def _validated_catalog(text: bytes | str, path: Path) -> list[dict]:
    """Every entry of a models.json validated, as plain dicts (what the cache stores)."""
    return [spec.model_dump() for spec in _parse_catalog(text, path).values()]


def _load_catalog_file(path: Path) -> dict[str, ModelSpec]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    return _parse_catalog(text, path)


def _parse_catalog(text: bytes | str, path: Path) -> dict[str, ModelSpec]:
    from pydantic import ValidationError

    try:
        raw = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    entries = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise CatalogError(f"model catalog {path} must be an object with a 'models' list")
    specs: dict[str, ModelSpec] = {}
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            raise CatalogError(f"model catalog {path}: entry '{label}' is invalid: {_first_error(exc)}") from None
        for key in {spec.name, spec.hf_id.lower(), *(a.lower() for a in spec.aliases)}:
            if key in seen:
                raise CatalogError(f"model catalog {path}: '{key}' of entry '{spec.name}' is already used by "
                                   f"'{seen[key]}'; names, aliases and hf_ids must be unique")
            seen[key] = spec.name
        specs[spec.name] = spec
    return specs


@lru_cache(maxsize=1)
def _default_catalog() -> dict[str, ModelSpec]:
    from ftplan.catalogs import data_path
    from ftplan.planner.estimate.gpus import read_validated

    path = data_path("models.json")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc}; reinstall ftplan or fix the file") from None
    here = Path(__file__).parent  # the validating code: this module, the dataclass and its schema
    code = b"".join((here / f).read_bytes() for f in ("models.py", "architecture.py", "model_schema.py"))
    entries = read_validated("models", text, lambda raw: _validated_catalog(raw, path), code)
    return {e["name"]: ModelSpec(**e) for e in entries}


def load_catalog(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Catalog keyed by canonical name (the shipped file is parsed once per process)."""
    return _default_catalog() if path is None else _load_catalog_file(Path(path))


def _index() -> dict[str, ModelSpec]:
    idx: dict[str, ModelSpec] = {}
    for spec in load_catalog().values():
        for key in (spec.name, spec.hf_id, *spec.aliases):
            idx[key.lower()] = spec
    return idx


# ---- resolution -----------------------------------------------------------------------------
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(arg: str) -> ModelSpec:
    """Catalog name / alias / HF id (any case); local folder or config.json; else an HF id whose
    config.json is fetched from the Hub once and cached."""
    key = arg.strip()
    spec = _index().get(key.lower())
    if spec is not None:
        return spec
    path = Path(key).expanduser()
    if path.is_dir() or path.suffix == ".json" or path.is_file():
        return _from_local(path)
    if _HF_ID.match(key):
        try:
            config = _hub_config(key)
        except _HubUnavailable as why:
            raise UserError(f"'{arg}' is not in the catalog and {why}; pass a catalog name (closest: "
                            f"{', '.join(_closest(key))}) or a local config.json / folder of the model") from None
        if config is not None:
            return _spec_from_source(config, f"config.json of '{key}'", name=key.rsplit("/", 1)[-1], hf_id=key)
    raise UserError(f"unknown model '{arg}'; closest catalog names: {', '.join(_closest(key))} "
                    "(or pass a local config.json)")


def _closest(arg: str, n: int = 3) -> list[str]:
    import difflib

    idx = _index()
    out: list[str] = []
    for cutoff in (0.5, 0.0):
        for k in difflib.get_close_matches(arg.lower(), list(idx), n=10, cutoff=cutoff):
            if idx[k].name not in out:
                out.append(idx[k].name)
        if len(out) >= n:
            break
    return out[:n]


def _from_local(path: Path) -> ModelSpec:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} not found; pass a folder containing config.json or the config.json itself")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}; pass a valid transformers config.json") from None
    folder = file.resolve().parent
    return _spec_from_source(config, str(file), name=folder.name, hf_id=str(folder))


def _spec_from_source(config: Any, source: str, name: str, hf_id: str) -> ModelSpec:
    try:
        return from_hf_config(config, name=name, hf_id=hf_id)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}; pass a config.json of a supported model") from None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("FTPLAN_OFFLINE", "HF_HUB_OFFLINE"))


def hf_config_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("ftplan")) / "hf-configs"


class _HubUnavailable(Exception):
    """The Hub was not asked (offline) or could not be reached: the message says which."""


def _hub_config(hf_id: str) -> Any | None:
    """config.json of an HF repo: from the cache, else fetched. None when the Hub says it does not exist;
    _HubUnavailable when offline or unreachable."""
    cache = hf_config_cache_dir() / (hf_id.replace("/", "--") + ".json")
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cached {cache} is unreadable ({exc}); delete it and retry") from None
    if _offline():
        raise _HubUnavailable("FTPLAN_OFFLINE / HF_HUB_OFFLINE is set, so its config.json was not fetched "
                              "(unset it to download once)")
    import httpx

    from ftplan.providers.errors import scrub

    base = (os.environ.get("FTPLAN_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{base.rstrip('/')}/{hf_id}/resolve/main/config.json"
    try:
        resp = httpx.get(url, headers=headers, timeout=5.0, follow_redirects=True)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _HubUnavailable(f"the Hugging Face Hub ({base}) could not be reached ({type(exc).__name__}); "
                              "retry when online") from None
    if resp.status_code in (401, 403):
        raise UserError(scrub(f"config.json of '{hf_id}' is gated or private (HTTP {resp.status_code}); "
                              "set HF_TOKEN to a token with access, or pass a local config.json"))
    if resp.status_code != 200:
        return None
    try:
        config = resp.json()
    except ValueError:
        raise UserError(f"config.json of '{hf_id}' from {base} is not valid JSON; pass a local config.json") from None
    try:  # the cache is a convenience: an unwritable cache dir must not fail the command
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=1))
        tmp.replace(cache)
    except OSError:
        pass
    return config
