"""Entry point on the GPU machine: `python train.py --config job.json`.

Needs only torch, transformers, peft, bitsandbytes and accelerate (a peft dependency). The sibling
modules are imported from this file's folder, because the job is shipped as a flat folder.
One custom loop, so the heartbeat, stop file, atomic checkpoints and label masking are explicit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device_check  # noqa: E402
import job_checkpoints  # noqa: E402
import job_config  # noqa: E402
import job_data  # noqa: E402
import job_distributed  # noqa: E402
import job_loss  # noqa: E402
import job_optim  # noqa: E402
import job_progress  # noqa: E402
from job_config import JobConfigError  # noqa: E402

log = logging.getLogger("job")
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class StopRequest:
    """Set by SIGTERM/SIGINT (spot notice, launcher) or by the stop file appearing."""

    def __init__(self, stop_file: str):
        self.stop_file = stop_file
        self.signalled: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signalled is not None or os.path.exists(self.stop_file)

    def reason(self) -> str:
        return self.signalled or f"stop file {os.path.basename(self.stop_file)}"

    def consume(self) -> None:
        """Remove the stop file once acted on, so `resume` does not stop again at once."""
        try:
            os.remove(self.stop_file)
        except FileNotFoundError:
            pass


def scrub(text: str, cfg: dict | None) -> str:
    """Hide the hub token (by value and by shape) from anything written to logs or summary.json."""
    if cfg is not None:
        token = os.environ.get(cfg["hf_token_env"])
        if token:
            text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


def setup_logging(out_dir: str | None, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if out_dir and is_main:
        os.makedirs(out_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(out_dir, "train.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


def evaluate(acc, model, examples, batch_size: int, pad_id: int, loss_mode: str = "standard") -> float | None:
    """Token-weighted mean loss over the held-out examples (each rank takes a share)."""
    import torch

    if not examples:
        return None
    mine = examples[acc.process_index :: acc.num_processes]
    # Every rank runs the same number of forwards (DDP broadcasts buffers in each): a rank short of rows
    # repeats a row with weight 0 instead of skipping ahead to the reduce and hanging the others.
    n_batches = math.ceil(math.ceil(len(examples) / acc.num_processes) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    model.eval()
    if acc.device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs in eval mode and asserts shapes that small
        # models fail ("N must be divisible by block_n"); its layers stay in train mode (no dropout in them).
        for m in model.modules():
            if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit":
                m.train()
    with torch.no_grad():
        for b in range(n_batches):
            rows = mine[b * batch_size : (b + 1) * batch_size]
            weight = 1 if rows else 0
            batch = {k: v.to(acc.device) for k, v in job_data.collate(rows or examples[:1], pad_id).items()}
            n = (batch["labels"][:, 1:] != job_data.IGNORE).sum() * weight
            loss = job_loss.compute(model, batch, loss_mode)
            if n > 0:
                total[0] += loss.double() * n
                total[1] += n
    model.train()
    total = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
    return round(float(total[0] / total[1]), 5) if total[1] > 0 else None


def setup_failed(cfg: dict, exc: Exception, t_start: float) -> int:
    """A failure before training could start (wrong device, CUDA init, Accelerator): summary + exit 1."""
    error = scrub(f"{type(exc).__name__}: {exc}", cfg)
    print(f"error: {error}", file=sys.stderr)
    if device_check.is_rank_zero():
        job_progress.write_json_atomic(os.path.join(cfg["_paths"]["output_dir"], "summary.json"), {
            "status": "failed", "error": error, "phase": "setup", "steps": 0, "device": None,
            **getattr(exc, "device_facts", {}), "durations_s": {"total": round(time.time() - t_start, 3)},
            "config": job_config.public_view(cfg)})
    return EXIT_FAILED


def bootstrap_timings(first_step_at: float | None) -> dict | None:
    """What bootstrap.sh measured (FTPLAN_BOOTSTRAP_TIMINGS), plus first_step_s: its start to the first
    finished step. The planner's setup and download overheads are learnt from these (summary.json "bootstrap")."""
    path = os.environ.get("FTPLAN_BOOTSTRAP_TIMINGS")
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            boot = json.load(fh)
    except (OSError, ValueError):
        return None
    started = boot.pop("started_at", None)
    if first_step_at is not None and isinstance(started, (int, float)):
        boot["first_step_s"] = round(first_step_at - started, 3)
    return boot


def run(cfg: dict) -> int:
    """One worker (the only one on a single GPU/CPU). Returns the process exit code."""
    t_start = time.time()
    job_distributed.pin_global_rank(cfg)  # several nodes: global rank 0 on node 0, before any rank is read
    import job_model
    import torch
    import transformers
    from accelerate import Accelerator

    paths = cfg["_paths"]
    out_dir = paths["output_dir"]
    os.makedirs(out_dir, exist_ok=True)
    # Device check (a GPU torch cannot use stops here, in seconds), precision and the Accelerator: inside a
    # guard that writes summary.json, as every later failure does.
    try:
        env = device_check.setup(cfg, torch, Accelerator,
                                 lambda name, cpu: job_distributed.accelerator_kwargs(cfg, name, out_dir, cpu))
    except Exception as exc:  # noqa: BLE001 - the summary must say why, whatever broke
        return setup_failed(cfg, exc, t_start)
    acc, device_type, dtype_name, load_dtype = env["acc"], env["device_type"], env["dtype_name"], env["load_dtype"]
    setup_logging(out_dir, acc.is_main_process)
    if not acc.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the progress log, not one per rank
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed-API notices, not the user's concern
    progress = job_progress.Progress(out_dir, cfg["heartbeat_every_s"], device_type, acc.is_main_process,
                                     started=t_start)
    stop = StopRequest(paths["stop_file"])
    stop.install()
    durations = {"load": 0.0, "train": 0.0, "save": 0.0, "total": 0.0}
    loop = {"step": 0, "epoch": 0, "group_in_epoch": 0, "tokens_seen": 0, "losses": [], "eval_loss": None}
    summary = {"status": "failed", "error": None, "steps": 0, "total_steps": None, "train_tokens": 0,
               "tokens_per_s": None, "losses": [], "eval_loss": None, "durations_s": durations,
               "device": device_type, **env["facts"],
               "num_processes": acc.num_processes, "precision": dtype_name, "method": cfg["method"],
               "resumed_from_step": None, "config": job_config.public_view(cfg)}
    session_tokens = 0
    t_train = None
    first_step_at = None
    clock = None
    try:
        progress.start()
        progress.update(write=True, status="loading")
        log.info("run %s: %s on %s x%d (%s)", cfg["run_id"], cfg["method"], device_type, acc.num_processes,
                 dtype_name)
        transformers.set_seed(cfg["seed"])

        vocab = cfg["model"]["config"].get("vocab_size") if cfg["model"]["random_init"] else None
        tok_dir = os.path.join(out_dir, "tokenizer")
        with acc.main_process_first():
            if cfg["model"]["random_init"] and paths["tokenizer"] is None and os.path.isdir(tok_dir):
                tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)  # same one as before a resume
            else:
                tokenizer = job_model.load_tokenizer(cfg, vocab)
            data = job_data.load_dataset(paths["dataset"], cfg["data_format"], tokenizer, cfg["seq_len"],
                                         cfg["packing"], cfg["eval_fraction"], cfg["max_eval_samples"],
                                         cfg["seed"])
            if acc.is_main_process:
                tokenizer.save_pretrained(tok_dir)
        train_set, eval_set = data["train"], data["eval"]
        log.info("data: %s format, %d records, %d train rows, %d eval rows, %d dropped (no response in seq_len)",
                 data["format"], data["records"], len(train_set), len(eval_set), data["dropped"])
        summary["data"] = {k: data[k] for k in ("format", "records", "dropped")}
        summary["data"].update(train_rows=len(train_set), eval_rows=len(eval_set))

        model, info = job_model.load_model(cfg, len(tokenizer), acc.device, load_dtype,
                                           acc.is_main_process, acc.wait_for_everyone)
        summary["model"] = info
        log.info("model: %s, %d trainable of %d params, %d Linear4bit", info["source"],
                 info["trainable_params"], info["total_params"], info["linear4bit_modules"])
        if acc.is_main_process:
            job_model.drop_random_base_if_large(cfg, info["total_params"])

        groups_per_epoch = math.ceil(
            len(job_data.epoch_batches(len(train_set), cfg["batch_size"], 0, cfg["seed"], acc.process_index,
                                       acc.num_processes)) / cfg["grad_accum"])
        if groups_per_epoch == 0:
            raise JobConfigError(f"too few training rows ({len(train_set)}) for {acc.num_processes} processes")
        total_steps = cfg["max_steps"] or groups_per_epoch * cfg["epochs"]
        summary["total_steps"] = total_steps
        loss_mode = summary["loss"] = job_loss.prepare(cfg["loss"], device_type, model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, summary["optimizer"] = job_optim.make(cfg["optimizer"], cfg["method"], params,
                                                         cfg["learning_rate"], device_type)
        log.info("loss: %s, optimizer: %s", loss_mode, summary["optimizer"])
        scheduler = transformers.get_linear_schedule_with_warmup(
            optimizer, math.ceil(cfg["warmup_ratio"] * total_steps), total_steps)
        model, optimizer = acc.prepare(model, optimizer)
        job_model.drop_fp32_output_copy(acc.unwrap_model(model))
        sharded = cfg["distributed"] in ("fsdp", "zero2", "zero3")

        resume_from = job_checkpoints.newest(out_dir) if cfg["resume"] else None
        if resume_from:
            loop = job_checkpoints.load(acc, model, optimizer, scheduler, resume_from, sharded)
            summary["resumed_from_step"] = loop["step"]
            log.info("resumed from %s", resume_from)
        progress.update(write=True, status="training", step=loop["step"], total_steps=total_steps,
                        tokens_seen=loop["tokens_seen"], epoch=round(loop["step"] / groups_per_epoch, 4))
        durations["load"] = round(time.time() - t_start, 3)

        job_progress.reset_peaks(device_type)
        clock = job_progress.StepClock()
        t_train = time.time()
        model.train()
        # Stop requests are acted on after a step, once all ranks agree (all-reduced flag): a check here
        # could differ between ranks and leave one waiting in a collective forever.
        stopped = False
        last_saved = loop["step"] if resume_from else None
        while loop["step"] < total_steps and not stopped:
            batches = job_data.epoch_batches(len(train_set), cfg["batch_size"], loop["epoch"], cfg["seed"],
                                             acc.process_index, acc.num_processes)
            groups = [batches[i : i + cfg["grad_accum"]] for i in range(0, len(batches), cfg["grad_accum"])]
            while loop["group_in_epoch"] < len(groups) and loop["step"] < total_steps:
                group = groups[loop["group_in_epoch"]]
                clock.start_step()
                stats = torch.zeros(4, dtype=torch.float64, device=acc.device)  # tokens, loss sum, n, stop
                for j, idx in enumerate(group):
                    batch = {k: v.to(acc.device)
                             for k, v in job_data.collate([train_set[i] for i in idx], tokenizer.pad_token_id).items()}
                    last = j == len(group) - 1
                    # DDP: all-reduce gradients only on the group's last micro-batch.
                    ctx = acc.no_sync(model) if not last and acc.num_processes > 1 and not sharded \
                        else contextlib.nullcontext()
                    with ctx:
                        loss = job_loss.compute(model, batch, loss_mode)
                        acc.backward(loss / len(group))
                    stats[0] += batch["attention_mask"].sum()
                    stats[1] += loss.detach().double()
                    stats[2] += 1
                acc.clip_grad_norm_(model.parameters() if sharded else params, 1.0)
                optimizer.step()
                if getattr(optimizer, "step_was_skipped", False):
                    # fp16: the GradScaler found inf/NaN gradients and skipped the update; not a step.
                    optimizer.zero_grad(set_to_none=True)
                    loop["group_in_epoch"] += 1
                    loop["skipped_steps"] = loop.get("skipped_steps", 0) + 1
                    continue
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if cfg["throttle_s_per_step"]:
                    time.sleep(cfg["throttle_s_per_step"])
                stats[3] = 1.0 if stop.requested() else 0.0
                if acc.num_processes > 1:
                    stats = acc.reduce(stats, reduction="sum")
                loop["step"] += 1
                loop["group_in_epoch"] += 1
                loop["tokens_seen"] += int(stats[0])
                session_tokens += int(stats[0])
                clock.end_step(int(stats[0]))  # int() synced the device: the step's time is real
                first_step_at = first_step_at or time.time()
                if device_type == "cuda":
                    job_progress.sample_device_memory()
                step_loss = round(float(stats[1] / stats[2]), 5)
                loop["losses"].append([loop["step"], step_loss])
                elapsed = time.time() - t_train
                tps = clock.tokens_per_s()
                epoch_pos = round(loop["step"] / groups_per_epoch, 4)
                progress.update(step=loop["step"], loss=step_loss, tokens_per_s=tps,
                                tokens_seen=loop["tokens_seen"], epoch=epoch_pos)
                progress.log_metrics({"step": loop["step"], "epoch": epoch_pos, "loss": step_loss,
                                      "lr": scheduler.get_last_lr()[0], "tokens_seen": loop["tokens_seen"],
                                      "tokens_per_s": tps, "elapsed_s": round(elapsed, 3)})
                stopped = stats[3] > 0
                if loop["step"] % cfg["checkpoint_every_steps"] == 0 or stopped:
                    t_other = time.perf_counter()
                    if eval_set and not stopped:
                        loop["eval_loss"] = evaluate(acc, model, eval_set, cfg["batch_size"],
                                                     tokenizer.pad_token_id, loss_mode)
                        progress.log_metrics({"step": loop["step"], "eval_loss": loop["eval_loss"]})
                        clock.add("eval", time.perf_counter() - t_other)
                        t_other = time.perf_counter()
                    progress.update(write=True, status="saving", eval_loss=loop["eval_loss"])
                    job_checkpoints.save(acc, model, optimizer, scheduler, loop, out_dir,
                                         cfg["keep_checkpoints"], sharded)
                    clock.add("checkpoint", time.perf_counter() - t_other)
                    last_saved = loop["step"]
                    progress.update(write=True, status="training")
                if stopped:
                    break
            if not stopped and loop["group_in_epoch"] >= len(groups):
                loop["epoch"] += 1
                loop["group_in_epoch"] = 0
        durations["train"] = round(time.time() - t_train, 3)
        if device_type == "cuda":
            summary["paged_optimizer_gib"] = round(job_progress.paged_optimizer_bytes(optimizer) / 1024**3, 4)

        t_save = time.time()
        if stopped:
            if last_saved != loop["step"] and loop["step"] > 0:
                job_checkpoints.save(acc, model, optimizer, scheduler, loop, out_dir, cfg["keep_checkpoints"],
                                     sharded)
            log.info("stopped at step %d (%s); resume continues from here", loop["step"], stop.reason())
            if acc.is_main_process:
                stop.consume()
            summary["status"] = "stopped"
            summary["stop_reason"] = stop.reason()
        else:
            if eval_set:
                loop["eval_loss"] = evaluate(acc, model, eval_set, cfg["batch_size"], tokenizer.pad_token_id, loss_mode)
                progress.log_metrics({"step": loop["step"], "eval_loss": loop["eval_loss"]})
            progress.update(write=True, status="saving", eval_loss=loop["eval_loss"])
            # Sharded engines hold the weights in pieces: gather them (a collective) before saving.
            state_dict = acc.get_state_dict(model) if sharded else None
            if acc.is_main_process:
                summary["outputs"] = job_model.save_outputs(cfg, acc.unwrap_model(model), tokenizer, state_dict)
            acc.wait_for_everyone()
            if cfg["merge_adapter"] and acc.is_main_process:
                del model, optimizer
                summary["outputs"]["merged"] = job_model.merge_adapter(cfg, tokenizer)
            summary["status"] = "succeeded"
        durations["save"] = round(time.time() - t_save, 3)
        code = 0
    except JobConfigError as exc:
        summary["error"] = scrub(str(exc), cfg)
        log.error("error: %s", summary["error"])
        code = EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the summary must say why, whatever broke
        summary["error"] = scrub(f"{type(exc).__name__}: {exc}", cfg)
        log.error("failed: %s\n%s", summary["error"], scrub(traceback.format_exc(), cfg))
        code = EXIT_FAILED
    if t_train is not None and not durations["train"]:
        durations["train"] = round(time.time() - t_train, 3)
    durations["total"] = round(time.time() - t_start, 3)
    train_s = durations["train"]
    summary.update(steps=loop["step"], train_tokens=loop["tokens_seen"], losses=loop["losses"],
                   eval_loss=loop["eval_loss"], skipped_steps=loop.get("skipped_steps", 0),
                   tokens_per_s=round(session_tokens / train_s, 2) if train_s and session_tokens else None)
    if clock is not None:
        # tokens/s of the training steps alone; the wall-clock rate (eval, saves, warm-up included) kept beside it
        summary["tokens_per_s_wall"] = summary["tokens_per_s"]
        summary["tokens_per_s"] = clock.tokens_per_s()
        durations.update(clock.durations())
    summary.update({k: v for k, v in job_progress.peak_memory(device_type).items()})
    summary["mem_compare"] = job_progress.MEMORY_COMPARISON
    boot = bootstrap_timings(first_step_at)
    if boot:
        summary["bootstrap"] = boot
    final_status = {"succeeded": "done", "stopped": "stopped", "failed": "failed"}[summary["status"]]
    progress.update(status=final_status, step=loop["step"], eval_loss=loop["eval_loss"])
    progress.close()
    progress.write_heartbeat()
    progress.write_summary(json.loads(scrub(json.dumps(summary), cfg)))
    log.info("%s: %d/%s steps, %s tokens/s", summary["status"], loop["step"], summary["total_steps"],
             summary["tokens_per_s"])
    return code


def launcher(cfg: dict, config_path: str) -> int:
    """Parent of a multi-GPU run: start torchrun, turn SIGTERM into the stop file, check the summary."""
    out_dir = cfg["_paths"]["output_dir"]
    summary_path = os.path.join(out_dir, "summary.json")
    os.makedirs(out_dir, exist_ok=True)
    started = time.time()

    def to_stop_file(_signum, _frame):
        with open(cfg["_paths"]["stop_file"], "w", encoding="utf-8") as fh:
            fh.write("signal\n")

    signal.signal(signal.SIGTERM, to_stop_file)
    signal.signal(signal.SIGINT, to_stop_file)
    rc = job_distributed.run_launcher(cfg, config_path, os.path.abspath(__file__))
    if cfg["node_rank"] > 0:  # global rank 0 writes the summary and artifacts on node 0, not here
        return rc
    summary = None
    if os.path.exists(summary_path) and os.path.getmtime(summary_path) >= started:
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
    if summary is None:
        summary = {"status": "failed", "error": f"distributed workers exited with code {rc} before a summary",
                   "config": job_config.public_view(cfg)}
        job_progress.write_json_atomic(summary_path, summary)
    if summary["status"] in ("succeeded", "stopped"):
        return 0
    return rc or EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ftplan fine-tuning job")
    parser.add_argument("--config", required=True, help="path to the job's JSON config")
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = job_config.load(args.config)
        # Check every record before torch is even imported: a bad line fails in a second, not minutes.
        job_data.normalize(job_data.read_records(cfg["_paths"]["dataset"]), cfg["data_format"])
    except JobConfigError as exc:
        message = scrub(str(exc), cfg)
        print(f"error: {message}", file=sys.stderr)
        if cfg is not None:
            os.makedirs(cfg["_paths"]["output_dir"], exist_ok=True)
            job_progress.write_json_atomic(os.path.join(cfg["_paths"]["output_dir"], "summary.json"), {
                "status": "failed", "error": message, "steps": 0, "config": job_config.public_view(cfg)})
        return EXIT_BAD_INPUT
    if job_distributed.needs_launcher(cfg):
        return launcher(cfg, os.path.abspath(args.config))
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
