"""`ftplan estimate`: peak memory per GPU by component, fits or not, tokens/s and hours.

Imports only click and the planner's pure modules; the data files are validated with pydantic once per
content and read from the user cache afterwards (`ftplan.planner.estimate.gpus.read_validated`), and nothing here imports
rich, so a warm-cache run never pays for pydantic or rich (`benchmarks/cli_speed`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ftplan.planner.errors import UserError
from ftplan.planner.estimate.request import (
    ATTENTIONS,
    FRAMEWORKS,
    LOSSES,
    METHODS,
    OFFLOADS,
    OPTIMIZERS,
    PRECISIONS,
)

_LABELS = {"weights": "base weights", "trainable": "trainable params", "gradients": "gradients",
           "optimizer": "optimizer states", "activations": "activations", "logits": "logits + loss",
           "allocator_overhead": "allocator overhead", "cuda_context": "CUDA context"}


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        flag = max(param.opts, key=len)  # the flag the user typed, e.g. --gpus for gpu_count
        raise UserError(f"{flag} must be a positive number, got {value}")
    return value


# Options a --from-config file can set, with the defaults the CLI (and ftplan.estimate) use when neither
# the flag nor the file says otherwise. Keys missing from `opts` (older callers) take these defaults.
_DEFAULTS = {"seq_len": 2048, "batch_size": 1, "grad_accum": 1, "lora_r": 16, "lora_targets": "all-linear",
             "lora_dropout": 0.05, "optimizer": None, "precision": "bf16-mixed", "offload": "none",
             "grad_checkpointing": True, "attention": "sdpa", "framework": "hf", "zero": None, "epochs": 1.0,
             "num_virtual_tokens": 20, "train_layers": 2, "loss": "standard", "activation_offload": False,
             "packing": True, "peak_seq_len": None, "fused_optimizer": False, "compile": False,
             "modules_to_save": "", "dora": False, "transformers_version": None}


def _explicit(name: str) -> bool:
    """Whether the user typed this flag (a config file must not override it)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or name not in ctx.params:
        return False
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


def _merge_config(model_arg, opts: dict) -> tuple[str | None, dict]:
    """Options from --from-config FILE under the flags the user typed; one stderr line per key not used as
    written (ignored, contradictory, or overridden by a flag)."""
    from ftplan.planner.estimate.from_config import read_config

    path = opts["from_config"]
    reading = read_config(path)
    lines = reading.summary()
    merged = dict(opts)
    for key, value in reading.options.items():
        if key == "model_arg":
            if model_arg is None:
                model_arg = value
            elif str(value) != model_arg:
                lines.append(f"model: {value} overridden by --model {model_arg}")
            continue
        flag = "--" + key.replace("_", "-")
        if _explicit(key) and opts.get(key) != value:
            lines.append(f"{key}: {value} overridden by {flag} {opts.get(key)}")
            continue
        merged[key] = value
    for line in lines:
        click.echo(f"{Path(path).name} ({reading.fmt}): {line}", err=True)
    return model_arg, merged


def _transformers_major(text: str | None) -> int:
    if text is None:
        from ftplan.planner.estimate.request import launch_transformers_major

        return launch_transformers_major()
    head = str(text).strip().split(".", 1)[0]
    if not head.isdigit():
        raise UserError(f"--transformers-version must look like 4.46 or 5, got '{text}'")
    return int(head)


def _request(model_arg: str | None, opts: dict):
    """The EstimateRequest for these flags (and --from-config FILE): `estimate`, `plan` and ftplan.estimate."""
    from ftplan.planner.estimate.models import resolve_model
    from ftplan.planner.estimate.request import EstimateRequest

    opts = {**_DEFAULTS, **opts}
    if opts.get("from_config"):
        model_arg, opts = _merge_config(model_arg, opts)
    if not model_arg:
        raise UserError("no model: pass --model NAME (a catalog name, HF id or config.json), or a --from-config "
                        "file that names one")
    if not opts.get("method"):
        raise UserError(f"no method: pass --method ({'|'.join(METHODS)})")
    model = resolve_model(model_arg)
    if opts["seq_len"] > model.max_position_embeddings and not _explicit("seq_len") and not opts.get("from_config"):
        opts["seq_len"] = model.max_position_embeddings  # the default 2048 adapts to a shorter context
    if opts["seq_len"] > model.max_position_embeddings:
        raise UserError(f"--seq-len {opts['seq_len']} exceeds {model.name}'s context of "
                        f"{model.max_position_embeddings} tokens; pass --seq-len {model.max_position_embeddings} "
                        "or less")
    dataset_tokens = opts.get("dataset_tokens")
    peak = opts["peak_seq_len"]
    how = None
    if opts.get("dataset") is not None:
        if dataset_tokens is not None:
            raise UserError("pass either --dataset or --dataset-tokens, not both")
        from ftplan.planner.estimate.dataset_tokens import dataset_lengths

        tok_file = Path(model.hf_id) / "tokenizer.json" if Path(model.hf_id).is_dir() else None
        dataset_tokens, records, how, longest = dataset_lengths(opts["dataset"], model.vocab_size, tok_file,
                                                                max_seq_len=opts["seq_len"])
        how = f"{records} records, {dataset_tokens} tokens ({how})"
        if not opts["packing"] and peak is None:
            peak = longest  # padded batches peak at the longest sample
    mts = tuple(x.strip() for x in str(opts["modules_to_save"] or "").split(",") if x.strip())
    req = EstimateRequest(
        model=model, method=opts["method"], seq_len=opts["seq_len"], batch_size=opts["batch_size"],
        grad_accum=opts["grad_accum"], lora_r=opts["lora_r"], lora_targets=opts["lora_targets"],
        lora_dropout=opts["lora_dropout"], optimizer=opts["optimizer"], precision=opts["precision"],
        offload=opts["offload"], grad_checkpointing=opts["grad_checkpointing"], attention=opts["attention"],
        zero=opts["zero"], dataset_tokens=dataset_tokens, epochs=opts["epochs"], framework=opts["framework"],
        num_virtual_tokens=opts["num_virtual_tokens"], freeze_trainable_layers=opts["train_layers"],
        loss=opts["loss"], activation_offload=opts["activation_offload"], packing=opts["packing"],
        peak_seq_len=peak, fused_optimizer=opts["fused_optimizer"], compile=opts["compile"],
        modules_to_save=mts, dora=opts["dora"],
        transformers_major=_transformers_major(opts["transformers_version"]) if model.num_experts > 1 else 5)
    return req, how


def _fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _settings(req) -> dict:
    """The request's knobs as --json reports them (what a --from-config file turned into)."""
    return {"seq_len": req.seq_len, "peak_seq_len": req.step_seq_len, "batch_size": req.batch_size,
            "grad_accum": req.grad_accum, "precision": req.precision, "optimizer": req.resolved_optimizer,
            "fused_optimizer": req.fused_optimizer, "lora_r": req.lora_r, "lora_targets": req.lora_targets,
            "lora_dropout": req.lora_dropout, "dora": req.dora, "modules_to_save": list(req.modules_to_save),
            "grad_checkpointing": req.grad_checkpointing, "activation_offload": req.activation_offload,
            "attention": req.attention, "loss": req.loss, "packing": req.packing, "compile": req.compile,
            "zero": req.zero, "offload": req.offload, "epochs": req.epochs, "framework": req.framework,
            "num_virtual_tokens": req.num_virtual_tokens, "train_layers": req.freeze_trainable_layers,
            "transformers_major": req.transformers_major}


def _signed(x: float) -> str:
    """+1.2 / -1.2, never -0.0."""
    x = round(x, 1)
    return f"{x + 0.0:+.1f}"


def _knobs(req) -> str:
    """The non-default techniques in effect, for the header line."""
    on = [name for name, flag in (("dora", req.dora), ("compile", req.compile), ("fused optimizer", req.fused_optimizer),
                                  ("activation offload", req.activation_offload)) if flag]
    if not req.packing:
        on.append(f"padded to {req.step_seq_len}")
    if req.modules_to_save:
        on.append("trains " + "+".join(req.modules_to_save))
    return (", " + ", ".join(on)) if on else ""


def loss_note(loss: str) -> str:
    """The one line `estimate` and `plan` print about the cross-entropy they assumed."""
    if loss == "standard":
        return "loss: standard (full fp32 logits, the HF Trainer's); ftplan launch's job runs --loss fused"
    what = {"fused": "no full-vocabulary logits", "chunked": "torchtune's chunks: every chunk's logits kept"}[loss]
    return f"loss: {loss} ({what}; --loss fused is what ftplan launch's job runs)"


def _print_detail(req, est, suggestions, how) -> None:
    mem = est.memory
    m = req.model
    precision = est.precision or req.precision
    click.echo(f"{m.name}  {req.method}  {est.gpu_count}x {est.gpu.name} ({est.gpu.memory_gib:g} GB, "
               f"{est.gpu.usable_gib:.1f} GiB usable)")
    click.echo(f"params: {mem.params_total / 1e9:.2f} B total, {mem.params_trainable / 1e6:.2f} M trainable "
               f"({100 * mem.params_trainable / mem.params_total:.3f}%)")
    click.echo(f"seq {req.seq_len} x batch {req.batch_size} (grad accum {req.grad_accum}), {precision}, "
               f"{req.resolved_optimizer}, attention {req.attention}, checkpointing "
               f"{'on' if req.grad_checkpointing else 'off'}"
               + (f", ZeRO-{req.resolved_zero(est.gpu_count)}" if est.gpu_count > 1 else "") + _knobs(req))
    click.echo("peak memory per GPU (GiB):")
    for key, label in _LABELS.items():
        click.echo(f"  {label:<20} {getattr(mem, key):8.2f}")
        if key == "logits":
            click.echo(f"  {'= allocated':<20} {mem.allocated:8.2f}   torch.cuda.max_memory_allocated()")
        elif key == "allocator_overhead":
            click.echo(f"  {'= reserved':<20} {mem.reserved:8.2f}   torch.cuda.max_memory_reserved()")
    verdict = "fits" if est.fits else "DOES NOT FIT"
    click.echo(f"  {'= device total':<20} {mem.total:8.2f}   nvidia-smi; {verdict} "
               f"({_signed(est.headroom_gib)} GiB headroom of {est.gpu.usable_gib:.1f})")
    click.echo(f"throughput: {est.tokens_per_s:,.0f} tokens/s")
    click.echo(loss_note(req.loss))
    if est.training_tokens is not None:
        src = f" [{how}]" if how else ""
        click.echo(f"time: {_fmt_hours(est.hours)} for {est.training_tokens:,} tokens ({req.epochs:g} epochs){src}")
    for note in est.notes:
        click.echo(f"note: {note}")
    if not est.fits:
        if suggestions:
            click.echo("would fit: " + "; ".join(s.text for s in suggestions))
        else:
            lighter = "" if req.method == "qlora" else "--method qlora, "
            click.echo(f"would fit: nothing up to 8 GPUs; try {lighter}a shorter --seq-len, --loss chunked "
                       "or --offload")


def _print_table(req, rows) -> None:
    click.echo(f"{req.model.name}  {req.method}  seq {req.seq_len} x batch {req.batch_size}  {req.precision}"
               f"{_knobs(req)}")
    click.echo("memory is the device total per GPU (what nvidia-smi shows); GiB = usable GiB of the card")
    click.echo(f"{'GPU':<20} {'GiB':>6} {'need':>7} {'fits':>5} {'headroom':>9} {'tokens/s':>10} {'time':>9}")
    marked = False
    for est in rows:
        name = f"{est.gpu_count}x {est.gpu.name}" if est.gpu_count > 1 else est.gpu.name
        fits = "yes" if est.fits else "no"
        if est.precision and est.precision != req.precision:
            fits += "*"
            marked = True
        click.echo(f"{name:<20} {est.gpu.usable_gib:>6.1f} {est.memory.total:>7.1f} {fits:>5} "
                   f"{_signed(est.headroom_gib):>9} {est.tokens_per_s:>10,.0f} {_fmt_hours(est.hours):>9}")
    if marked:
        click.echo("* no bf16 on this GPU: estimated as fp16-mixed (as plan and launch do)")
    click.echo(loss_note(req.loss))


def _corrected(est, req):
    """Scale the estimate by what finished runs of the same GPU, model and method measured (ftplan.planner.runs.corrections).

    Only when the run store exists: a first-time user's estimate never opens SQLite."""
    from ftplan.planner.runs.store import Store, default_store_path

    path = default_store_path()
    if not path.is_file():
        return est
    from ftplan.planner.runs.corrections import apply_corrections

    try:
        est, _ = apply_corrections(est, est.gpu.name, req.model.name, req.method, Store(path))
    except Exception as exc:  # noqa: BLE001 - a broken store must not break an estimate
        est.notes.append(f"measured-run corrections skipped: {' '.join(str(exc).split())[:120]}")
    return est


@click.command("estimate")
@click.option("--model", "model_arg", default=None,
              help="Catalog name, HF id, or a local config.json / folder (or from --from-config).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Required unless --from-config sets it.")
@click.option("--from-config", type=click.Path(dir_okay=False), default=None,
              help="An axolotl / LLaMA-Factory / torchtune YAML or a TrainingArguments JSON; flags you type win.")
@click.option("--gpu", "gpu_name", default=None, help="GPU type (e.g. A100-80GB, L4, rtx-4090). Default: all.")
@click.option("--gpus", "gpu_count", type=int, default=1, show_default=True, callback=_positive,
              help="GPUs per node (DDP/ZeRO/FSDP).")
@click.option("--seq-len", type=int, default=2048, show_default=True, callback=_positive)
@click.option("--batch-size", type=int, default=1, show_default=True, callback=_positive,
              help="Micro-batch per GPU.")
@click.option("--grad-accum", type=int, default=1, show_default=True, callback=_positive)
@click.option("--lora-r", type=int, default=16, show_default=True, callback=_positive)
@click.option("--lora-targets", default="all-linear", show_default=True,
              help="all-linear or module names, e.g. q_proj,v_proj.")
@click.option("--lora-dropout", type=float, default=0.05, show_default=True,
              help="> 0 keeps a dropped-out copy of each adapted module's input for the backward pass.")
@click.option("--dora/--no-dora", default=False, show_default=True, help="Weight-decomposed LoRA (peft use_dora).")
@click.option("--modules-to-save", default="", help="Trained in full beside the adapters: embed_tokens,lm_head.")
@click.option("--num-virtual-tokens", type=int, default=20, show_default=True, callback=_positive,
              help="Prompt/prefix tuning length.")
@click.option("--train-layers", type=int, default=2, show_default=True, callback=_positive,
              help="Top blocks trained by --method freeze.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="Default: paged_adamw8bit for qlora, adamw otherwise.")
@click.option("--fused-optimizer/--no-fused-optimizer", default=False, show_default=True,
              help="AdamW(fused=True): one pass per step, no foreach temporaries.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16-mixed", show_default=True,
              help="GPUs without bf16 (T4, V100, ...) are estimated as fp16-mixed.")
@click.option("--loss", type=click.Choice(LOSSES), default="standard", show_default=True,
              help="Cross-entropy: standard (fp32 logits), chunked (torchtune), fused (Liger/unsloth).")
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True)
@click.option("--activation-offload/--no-activation-offload", default=False, show_default=True,
              help="Saved activations in CPU RAM (torchtune, axolotl).")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True)
@click.option("--attention", type=click.Choice(ATTENTIONS), default="sdpa", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the model.")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Samples packed to --seq-len; --no-packing pads to the batch's longest sample.")
@click.option("--peak-seq-len", type=int, default=None, callback=_positive,
              help="Longest sample when not packing (default: the --dataset's longest, else --seq-len).")
@click.option("--framework", type=click.Choice(FRAMEWORKS), default="hf", show_default=True,
              help="Training code: hf (Trainer/PEFT/accelerate, what 'ftplan launch' runs) or litgpt.")
@click.option("--transformers-version", default=None,
              help="MoE experts: 4.x quantizes per-expert Linears, 5.x keeps fused experts 16-bit. "
                   "Default: the version 'ftplan launch' installs.")
@click.option("--zero", type=click.IntRange(0, 3), default=None, help="DeepSpeed ZeRO stage / FSDP (3).")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help="JSONL (Alpaca or chat messages) to count tokens from.")
@click.option("--dataset-tokens", type=int, default=None, callback=_positive, help="Tokens per epoch.")
@click.option("--epochs", type=float, default=1.0, show_default=True, callback=_positive)
@click.option("--nodes", type=int, default=1, show_default=True, callback=_positive,
              help="Machines of --gpus GPUs each; ZeRO-3/FSDP shards over all of them.")
@click.option("--node-gbps", type=float, default=None, callback=_positive,
              help="Network between the nodes, Gb/s (default: 10 Gb/s Ethernet, as between your own machines).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def estimate(model_arg, method, gpu_name, gpu_count, as_json, **opts):
    """Peak GPU memory by component and training time of a fine-tuning job."""
    from ftplan.planner.estimate.estimator import estimate as run_estimate
    from ftplan.planner.estimate.estimator import smallest_fit
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus

    opts["method"] = method
    nodes, node_gbps = opts.pop("nodes", 1), opts.pop("node_gbps", None)
    req, how = _request(model_arg, opts)
    if nodes > 1 or node_gbps is not None:  # several machines: ftplan.planner.commands.estimate_multinode
        from ftplan.planner.commands.estimate_multinode import run_multinode

        run_multinode(req, how, gpu_name, gpu_count, nodes, node_gbps, as_json, _settings(req))
        return
    if gpu_name is not None:
        gpu = resolve_gpu(gpu_name)
        est = _corrected(run_estimate(req, gpu, gpu_count), req)
        suggestions = [] if est.fits else smallest_fit(req, gpu, gpu_count)
        if as_json:  # the JSON is ftplan.estimate()'s result, so the CLI and the API cannot drift apart
            from ftplan.results import EstimateResult, FitHint

            click.echo(json.dumps(EstimateResult(
                model=req.model.name, method=req.method, gpu_count=gpu_count, rows=[est], single_gpu=True,
                would_fit=[FitHint(s.kind, s.text) for s in suggestions], dataset=how,
                settings=_settings(req)).to_dict()))
        else:
            _print_detail(req, est, suggestions, how)
        return
    rows = [run_estimate(req, g, gpu_count) for g in table_gpus()]
    if as_json:
        from ftplan.results import EstimateResult

        click.echo(json.dumps(EstimateResult(model=req.model.name, method=req.method, gpu_count=gpu_count, rows=rows,
                                             dataset=how, settings=_settings(req)).to_dict()))
    else:
        _print_table(req, rows)
