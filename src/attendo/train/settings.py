"""What a training run is asked to do (TrainSettings), checked up front, and its learning-rate
schedule: a linear warm-up, then a cosine decay to min_lr at the last step."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from attendo.errors import InvalidSettingError

Precision = Literal["auto", "bfloat16", "float32"]
Strategy = Literal["ddp", "fsdp"]

# Settings that change the arithmetic of a step: resuming checks they are what the checkpoint
# was trained with. The number of steps may change (it reshapes the cosine decay from there).
RESUME_MUST_MATCH = (
    "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "clip", "seed", "precision",
)  # fmt: skip


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, summed over every process
    micro_batch_size: int | None = None  # per process and forward pass; None: the whole share
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int | None = None  # None: 5% of the steps (at least 1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # gradient norm clipping; 0 turns it off
    eval_every: int = 100
    eval_batches: int = 20  # held-out micro-batches per evaluation (per process)
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    precision: Precision = "auto"
    compile: bool = False
    strategy: Strategy = "ddp"

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f"--lr must be above 0, got {self.lr}")
        elif not 0 <= self.final_lr <= self.lr:
            problems.append(f"--min-lr must be between 0 and --lr, got {self.min_lr}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            problems.append(f"--micro-batch-size must be at least 1, got {self.micro_batch_size}")
        if self.warmup < 0:
            problems.append(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.clip < 0:
            problems.append("--weight-decay and --clip must be 0 or more")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append("Adam's betas must be in [0, 1)")
        if self.precision not in ("auto", "bfloat16", "float32"):
            problems.append(f"--precision must be auto, bfloat16 or float32, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if problems:
            raise InvalidSettingError("; ".join(problems))

    @property
    def final_lr(self) -> float:
        """The learning rate the cosine decay ends at."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup(self) -> int:
        """Steps of linear warm-up."""
        return max(1, round(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """The learning rate of optimizer step `step` (0-based): rises linearly over the warm-up
    steps, then follows half a cosine from lr down to min_lr at the last step."""
    lr, floor, warmup = settings.lr, settings.final_lr, settings.warmup
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, settings.steps - warmup))
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
