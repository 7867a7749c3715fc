"""What the user asks to estimate: one fine-tuning job's model, method and knobs (`EstimateRequest`).

Its own module so the calculators (memory, throughput) and the estimator all import it and none imports
another through it. Every knob a training config can set lives here; `from_config` and the CLI build it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftplan.planner.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ftplan.planner.estimate.architecture import ModelSpec

METHODS = ("full", "freeze", "lora", "qlora", "prompt", "prefix")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd", "adafactor")
PRECISIONS = ("bf16-mixed", "bf16-true", "fp16-mixed", "fp32")
OFFLOADS = ("none", "optimizer", "all")
ATTENTIONS = ("sdpa", "flash", "eager")
# Training code whose conventions change what is stored (see ftplan.planner.estimate.memory's docstring): "hf" is
# the transformers Trainer / PEFT / accelerate / DeepSpeed stack ftplan's own job uses; "litgpt" is LitGPT.
FRAMEWORKS = ("hf", "litgpt")
# Cross-entropy: "standard" materialises the fp32 logits and log-softmax (HF Trainer); "chunked" computes
# head + loss a slice of tokens at a time (torchtune, LitGPT, ftplan's job); "fused" never materialises the
# logits (Liger / unsloth fused linear cross-entropy).
LOSSES = ("standard", "chunked", "fused")


def launch_transformers_major() -> int:
    """The transformers major version `ftplan launch` installs (the job's pinned requirements)."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("ftplan.remote_job")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "requirements.txt").read_text()
        except OSError:
            continue
        m = re.search(r"^transformers\s*[=~<>]=?\s*(\d+)", text, re.M)
        if m:
            return int(m.group(1))
    return 5


@dataclass
class EstimateRequest:
    model: ModelSpec
    method: str
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str | None = None  # None: paged_adamw8bit for qlora, adamw otherwise
    precision: str = "bf16-mixed"
    offload: str = "none"
    grad_checkpointing: bool = True
    attention: str = "sdpa"
    zero: int | None = None  # None: 0 (DDP) on one GPU, 3 (FSDP full shard) on several for full/freeze
    freeze_trainable_layers: int = 2
    num_virtual_tokens: int = 20
    double_quant: bool = True
    dataset_tokens: int | None = None
    epochs: float = 1.0
    framework: str = "hf"
    loss: str = "standard"
    # transformers' own models upcast the logits to fp32 before the loss; remote-code models that do not
    # (Qwen v1's modeling_qwen.py) keep the whole cross-entropy in the compute dtype.
    loss_upcast: bool = True
    activation_offload: bool = False  # checkpointed block inputs kept in CPU RAM (torchtune, axolotl)
    packing: bool = True  # sequences packed to seq_len; False: padded to the batch's longest sample
    peak_seq_len: int | None = None  # the longest micro-batch's length when unpacked (default seq_len)
    fused_optimizer: bool = False  # AdamW(fused=True): no foreach temporaries over all parameters
    compile: bool = False  # torch.compile: fused elementwise kernels keep fewer intermediates
    modules_to_save: tuple[str, ...] = ()  # "embed_tokens", "lm_head": trained in full beside the adapters
    dora: bool = False  # weight-decomposed LoRA: magnitude vector + the adapted weight's norm per step
    transformers_major: int = 5  # MoE experts: 4 = per-expert nn.Linear (quantized), 5 = fused 3-D (not)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first bad field and how to fix it."""
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("offload", OFFLOADS),
                              ("attention", ATTENTIONS), ("framework", FRAMEWORKS), ("loss", LOSSES)):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "num_virtual_tokens",
                     "freeze_trainable_layers"):
            if getattr(self, name) <= 0:
                flag = {"freeze_trainable_layers": "train-layers"}.get(name, name.replace("_", "-"))
                raise UserError(f"--{flag} must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.peak_seq_len is not None and self.peak_seq_len <= 0:
            raise UserError(f"--peak-seq-len must be a positive number, got {self.peak_seq_len}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.dataset_tokens is not None and self.dataset_tokens <= 0:
            raise UserError(f"--dataset-tokens must be positive, got {self.dataset_tokens}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.offload == "all" and self.zero not in (None, 3):
            raise UserError("--offload all needs ZeRO-3 (parameters are sharded to CPU); pass --zero 3")
        if self.transformers_major not in (4, 5):
            raise UserError(f"--transformers-version must be 4.x or 5.x, got {self.transformers_major}")
        bad = [m for m in self.modules_to_save if m not in ("embed_tokens", "lm_head")]
        if bad:
            raise UserError(f"--modules-to-save: unknown module {', '.join(bad)}; choose embed_tokens, lm_head")
        if self.dora and self.method not in ("lora", "qlora"):
            raise UserError("--dora applies to --method lora or qlora")
        if self.method in ("lora", "qlora"):
            self.model.lora_params(self.lora_r, self.lora_targets)  # validates target names

    @property
    def resolved_optimizer(self) -> str:
        if self.optimizer:
            return self.optimizer
        return "paged_adamw8bit" if self.method == "qlora" else "adamw"

    @property
    def step_seq_len(self) -> int:
        """Tokens per sequence in the micro-batch that peaks: seq_len when packed, else the longest sample."""
        if self.packing or self.peak_seq_len is None:
            return self.seq_len
        return min(self.peak_seq_len, self.seq_len)

    def resolved_zero(self, gpu_count: int) -> int:
        if self.zero is not None:
            return self.zero
        if gpu_count > 1 and self.method in ("full", "freeze"):
            return 3
        if self.offload != "none":
            return 3 if self.offload == "all" else 2
        return 0
