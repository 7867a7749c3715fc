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


def _request(model_arg: str, opts: dict):
    from ftplan.planner.estimate.estimator import EstimateRequest
    from ftplan.planner.estimate.models import resolve_model

    model = resolve_model(model_arg)
    dataset_tokens = opts["dataset_tokens"]
    how = None
    if opts["dataset"] is not None:
        if dataset_tokens is not None:
            raise UserError("pass either --dataset or --dataset-tokens, not both")
        from ftplan.planner.estimate.dataset_tokens import count_dataset_tokens

        tok_file = Path(model.hf_id) / "tokenizer.json" if Path(model.hf_id).is_dir() else None
        dataset_tokens, records, how = count_dataset_tokens(opts["dataset"], model.vocab_size, tok_file,
                                                            max_seq_len=opts["seq_len"])
        how = f"{records} records, {dataset_tokens} tokens ({how})"
    req = EstimateRequest(
        model=model, method=opts["method"], seq_len=opts["seq_len"], batch_size=opts["batch_size"],
        grad_accum=opts["grad_accum"], lora_r=opts["lora_r"], lora_targets=opts["lora_targets"],
        optimizer=opts["optimizer"], precision=opts["precision"], offload=opts["offload"],
        grad_checkpointing=opts["grad_checkpointing"], attention=opts["attention"], zero=opts["zero"],
        dataset_tokens=dataset_tokens, epochs=opts["epochs"], framework=opts["framework"])
    return req, how


def _fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def _print_detail(req, est, suggestions, how) -> None:
    mem = est.memory
    m = req.model
    click.echo(f"{m.name}  {req.method}  {est.gpu_count}x {est.gpu.name} ({est.gpu.memory_gib:g} GB, "
               f"{est.gpu.usable_gib:.1f} GiB usable)")
    click.echo(f"params: {mem.params_total / 1e9:.2f} B total, {mem.params_trainable / 1e6:.2f} M trainable "
               f"({100 * mem.params_trainable / mem.params_total:.3f}%)")
    click.echo(f"seq {req.seq_len} x batch {req.batch_size} (grad accum {req.grad_accum}), {req.precision}, "
               f"{req.resolved_optimizer}, attention {req.attention}, checkpointing "
               f"{'on' if req.grad_checkpointing else 'off'}"
               + (f", ZeRO-{req.resolved_zero(est.gpu_count)}" if est.gpu_count > 1 else ""))
    click.echo("peak memory per GPU (GiB):")
    for key, label in _LABELS.items():
        click.echo(f"  {label:<20} {getattr(mem, key):8.2f}")
    verdict = "fits" if est.fits else "DOES NOT FIT"
    click.echo(f"  {'total':<20} {mem.total:8.2f}   {verdict} ({est.headroom_gib:+.1f} GiB headroom)")
    click.echo(f"throughput: {est.tokens_per_s:,.0f} tokens/s")
    if est.training_tokens is not None:
        src = f" [{how}]" if how else ""
        click.echo(f"time: {_fmt_hours(est.hours)} for {est.training_tokens:,} tokens ({req.epochs:g} epochs){src}")
    for note in est.notes:
        click.echo(f"note: {note}")
    if not est.fits:
        if suggestions:
            click.echo("would fit: " + "; ".join(s.text for s in suggestions))
        else:
            click.echo("would fit: nothing up to 8 GPUs; try --method qlora, a shorter --seq-len or --offload")


def _print_table(req, rows) -> None:
    click.echo(f"{req.model.name}  {req.method}  seq {req.seq_len} x batch {req.batch_size}  {req.precision}")
    click.echo(f"{'GPU':<20} {'GiB':>5} {'need':>7} {'fits':>5} {'headroom':>9} {'tokens/s':>10} {'time':>9}")
    for est in rows:
        name = f"{est.gpu_count}x {est.gpu.name}" if est.gpu_count > 1 else est.gpu.name
        click.echo(f"{name:<20} {est.gpu.memory_gib:>5g} {est.memory.total:>7.1f} {'yes' if est.fits else 'no':>5} "
                   f"{est.headroom_gib:>+9.1f} {est.tokens_per_s:>10,.0f} {_fmt_hours(est.hours):>9}")


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
@click.option("--model", "model_arg", required=True, help="Catalog name, HF id, or a local config.json / folder.")
@click.option("--method", type=click.Choice(METHODS), required=True)
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
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="Default: paged_adamw8bit for qlora, adamw otherwise.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="bf16-mixed", show_default=True)
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True)
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=True, show_default=True)
@click.option("--attention", type=click.Choice(ATTENTIONS), default="sdpa", show_default=True)
@click.option("--framework", type=click.Choice(FRAMEWORKS), default="hf", show_default=True,
              help="Training code: hf (Trainer/PEFT/accelerate, what 'ftplan launch' runs) or litgpt.")
@click.option("--zero", type=click.IntRange(0, 3), default=None, help="DeepSpeed ZeRO stage / FSDP (3).")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help="JSONL (Alpaca or chat messages) to count tokens from.")
@click.option("--dataset-tokens", type=int, default=None, callback=_positive, help="Tokens per epoch.")
@click.option("--epochs", type=float, default=1.0, show_default=True, callback=_positive)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def estimate(model_arg, method, gpu_name, gpu_count, as_json, **opts):
    """Peak GPU memory by component and training time of a fine-tuning job."""
    from ftplan.planner.estimate.estimator import estimate as run_estimate
    from ftplan.planner.estimate.estimator import smallest_fit
    from ftplan.planner.estimate.gpus import resolve_gpu, table_gpus

    opts["method"] = method
    req, how = _request(model_arg, opts)
    if gpu_name is not None:
        gpu = resolve_gpu(gpu_name)
        est = _corrected(run_estimate(req, gpu, gpu_count), req)
        suggestions = [] if est.fits else smallest_fit(req, gpu, gpu_count)
        if as_json:
            out = {"model": req.model.name, "method": req.method, "params_total": est.memory.params_total,
                   "params_trainable": est.memory.params_trainable, **est.as_dict(),
                   "would_fit": [{"kind": s.kind, "text": s.text} for s in suggestions]}
            if how:
                out["dataset"] = how
            click.echo(json.dumps(out))
        else:
            _print_detail(req, est, suggestions, how)
        return
    rows = [run_estimate(req, g, gpu_count) for g in table_gpus()]
    if as_json:
        first = rows[0].memory
        out = {"model": req.model.name, "method": req.method, "params_total": first.params_total,
               "params_trainable": first.params_trainable, "gpu_count": gpu_count,
               "memory_gib": first.as_dict(), "training_tokens": rows[0].training_tokens,
               "gpus": [{"gpu": e.gpu.name, "fits": e.fits, "headroom_gib": round(e.headroom_gib, 2),
                         "memory_gib": e.memory.as_dict(), "throughput_tokens_per_s": round(e.tokens_per_s, 1),
                         "hours": None if e.hours is None else round(e.hours, 3)} for e in rows]}
        click.echo(json.dumps(out))
    else:
        _print_table(req, rows)
