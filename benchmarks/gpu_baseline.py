"""The plain transformers + peft baseline that benchmarks/gpu_calibration.py sets beside the job.

    python benchmarks/gpu_baseline.py --spec SPEC.json     (SPEC: base, dataset, method, batch, seq_len,
                                                           steps, warmup_steps, lora, result)

What a user gets from the libraries' documented recipe: `Trainer` on a peft model, bitsandbytes NF4
(double quant, bf16 compute) for QLoRA, `prepare_model_for_kbit_training`, non-reentrant gradient
checkpointing, `optim="paged_adamw_8bit"`, bf16 autocast on GPUs, transformers' standard loss (full
fp32 logits), no Liger, no packing. The rows are the job's own (remote_job/job_data.py on the same
dataset and tokenizer), so both train on identical batches. Writes {tokens_per_s, peak_mem_allocated_gib,
...} to `result`: tokens/s over the steps after the warm-up, by the same rule as the job's metrics; peak
memory by the same meter as the job's summary (torch.cuda.max_memory_allocated, or peak RSS on a CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def run(spec: dict) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
    )

    sys.path.insert(0, str(ROOT / "remote_job"))
    import job_data  # the job's rows, so both sides train on the same tokens

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    transformers.set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(spec["base"] + "/tokenizer")
    data = job_data.load_dataset(spec["dataset"], "alpaca", tokenizer, spec["seq_len"], False, 0.0, 0, 42)
    rows = data["train"][: spec["batch"] * spec["steps"]]

    kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda else "cpu"}}
    if spec["method"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["base"] + "/model", **kwargs)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if spec["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    lora = spec["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["targets"], task_type="CAUSAL_LM", bias="none"))

    times: list[tuple[float, int]] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter(), state.global_step))

    args = TrainingArguments(
        output_dir=spec["work"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=2e-4, warmup_steps=0, lr_scheduler_type="linear",
        optim="paged_adamw_8bit", bf16=bf16, fp16=cuda and not bf16, use_cpu=not cuda,
        gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs, logging_strategy="no",
        save_strategy="no", report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, seed=42, data_seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=lambda batch: job_data.collate(batch, tokenizer.pad_token_id),
                      callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    tokens_per_step = spec["batch"] * spec["seq_len"]
    w = min(spec["warmup_steps"], len(times) - 1)
    window = times[w - 1 :] if w >= 1 else [(t0, 0), *times]
    dt = window[-1][0] - window[0][0]
    tps = tokens_per_step * (window[-1][1] - window[0][1]) / dt if dt > 0 else None
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GIB
        source = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        source = "process_peak_rss"
    rows_full = all(len(r.input_ids) == spec["seq_len"] for r in rows)
    return {"tokens_per_s": tps, "peak_mem_allocated_gib": round(peak, 4), "mem_source": source,
            "steps": len(times), "window_steps": len(window) - 1, "device": "cuda" if cuda else "cpu",
            "rows_full": rows_full, "framework": f"transformers {transformers.__version__} Trainer + peft"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text(encoding="utf-8"))
    result = run(spec)
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
