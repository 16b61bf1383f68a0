"""The training loop: batches in, a better network out.

One optimizer step:
  1. the step's global batch (train/data.py GlobalOrder), this process's share of it in
     micro-batches;
  2. each micro-batch forward (bfloat16 autocast where the CPU has bfloat16 dot products) and
     its summed cross-entropy backward, scaled so the gradients add up to the mean loss per
     target token of the whole global batch, however the batch was split over micro-batches and
     processes (DDP averages gradients over processes; the scale undoes that average);
  3. gradient clipping to a maximum norm, the learning rate of this step (warm-up then cosine),
     an AdamW step;
  4. a log line; every N steps the held-out loss, every M steps a checkpoint and the model.

Weight decay applies to the weight matrices of linear layers only: not to biases, norms, or
embedding tables (token and position embeddings, and so a head tied to the token embeddings),
which is GPT-2's and LLaMA's practice and what transformers' Trainer does for norms and biases.

Ctrl-C (or SIGTERM) is caught: the step in progress finishes, a checkpoint and the model are
written, then the command exits. A second Ctrl-C stops at once; the last finished checkpoint
stays whole.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attendo.errors import CheckpointError, InvalidSettingError
from attendo.train import checkpoint
from attendo.train.data import IGNORE, Dataset, GlobalOrder, shard
from attendo.train.distributed import Processes, all_sum, barrier, wrap
from attendo.train.report import Report, say
from attendo.train.settings import RESUME_MUST_MATCH, TrainSettings, learning_rate


@dataclass
class Job:
    """What to train and where (built by train/pretrain.py and train/finetune.py)."""

    network: nn.Module  # the engine's own network (attendo.models), float32, on the device
    train: Dataset
    held_out: Dataset | None
    out: Path
    save_model: Callable[[dict[str, torch.Tensor]], None]  # rank 0: write the model into out
    record: dict[str, Any]  # what a resumed run must share with the checkpoint (data, model)


@dataclass(frozen=True)
class Outcome:
    steps: int  # optimizer steps done in all, earlier runs of a resumed one included
    loss: float | None  # the last step's training loss
    eval_loss: float | None
    interrupted: bool


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 when asked, or for "auto" where the hardware multiplies it natively (CPUs with
    AVX512-BF16 or AMX, GPUs that support it); None (float32 throughout) otherwise."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    return torch.bfloat16 if native else None


def parameter_groups(network: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: decayed (weight matrices) and not (biases, norms, embeddings)."""
    embeddings = {id(m.weight) for m in network.modules() if isinstance(m, nn.Embedding)}
    decayed, plain = [], []
    for _, parameter in network.named_parameters():
        if parameter.requires_grad:
            (decayed if parameter.dim() >= 2 and id(parameter) not in embeddings else plain).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def token_loss_sum(module: nn.Module, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """The summed cross-entropy of the batch's labelled positions (labels -100 take no loss)."""
    device = batch["tokens"].device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if "source" in batch:  # encoder-decoder: read the source, write the target
            logits = module(batch["source"], batch["tokens"], batch["source_mask"])
        else:
            logits = module(batch["tokens"])
    labels = batch["labels"]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the model read: inputs that are not padding (and the encoder's source)."""
    count = int(batch["real"].sum())
    return count + (int(batch["source_mask"].sum()) if "source_mask" in batch else 0)


class Trainer:
    def __init__(self, job: Job, settings: TrainSettings, processes: Processes) -> None:
        self.job, self.settings, self.processes = job, settings, processes
        world = processes.world_size
        if settings.batch_size % world:
            raise InvalidSettingError(f"--batch-size {settings.batch_size} must be a multiple of the {world} processes")
        share = settings.batch_size // world
        self.micro_batch = min(share, settings.micro_batch_size or share)
        if share % self.micro_batch:
            raise InvalidSettingError(
                f"each process's share of the batch ({share}) must be a multiple of --micro-batch-size {self.micro_batch}"
            )
        self.network = job.network
        self.module = wrap(job.network, processes, settings.strategy)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        # fused: one kernel updates every parameter (a third of the for-loop update's time here)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.network, settings.weight_decay), lr=settings.lr,
            betas=(settings.beta1, settings.beta2), eps=1e-8, fused=True,
        )  # fmt: skip
        self.order = GlobalOrder(len(job.train), settings.batch_size, settings.seed)
        self.autocast = autocast_dtype(settings.precision, processes.device)
        self.loss_sum = self._loss_function()
        self.stop_requested = False
        self.tokens, self.earlier_seconds = 0, 0.0  # tokens trained; seconds of earlier runs (resumed)

    def _loss_function(self) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        # The closure holds the module, not the trainer: no trainer -> loss -> trainer cycle, so
        # a finished trainer and the DDP wrapper it holds (which holds the process group) are
        # freed when the run returns, not at some later garbage collection.
        module, autocast = self.module, self.autocast

        def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return token_loss_sum(module, batch, autocast)

        return torch.compile(loss) if self.settings.compile else loss

    # --- the run -------------------------------------------------------------------------------

    def run(self, resume: bool) -> Outcome:
        settings, out = self.settings, self.job.out
        first_step = self._restore(resume)
        self._started = time.perf_counter()
        last: dict[str, Any] = {}
        eval_loss = None
        with Report(out, settings.steps, first_step, self.processes.is_main) as report, self._signals():
            if first_step >= settings.steps:
                report.print(f"{out} already holds {first_step} steps (--steps {settings.steps}): nothing to do")
            self.module.train()
            for step in range(first_step, settings.steps):
                last = self._step(step)
                done = step + 1
                if self.job.held_out is not None and (done % settings.eval_every == 0 or done == settings.steps):
                    eval_loss = self.evaluate()
                    last |= {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}
                report.step(last)
                stop = all_sum([float(self.stop_requested)], self.processes)[0] > 0
                if done % settings.save_every == 0 or done == settings.steps or stop:
                    where = self.save(done)
                    if stop:
                        report.print(f"interrupted after step {done}: saved {where}; continue with --resume")
                        return Outcome(done, last.get("loss"), eval_loss, True)
        return Outcome(max(first_step, settings.steps), last.get("loss"), eval_loss, False)

    def _restore(self, resume: bool) -> int:
        """The step to start from: 0, or a checkpoint's (whose state it loads)."""
        out, processes = self.job.out, self.processes
        if processes.is_main:
            out.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_unfinished(out)
        barrier(processes)
        folder = checkpoint.latest_checkpoint(out)
        if folder is None:
            torch.manual_seed(self.settings.seed * 1_000_003 + processes.rank)
            return 0
        checkpoint.check_fresh(out, resume)
        saved = checkpoint.read_state(folder)
        self._check_same_run(saved, folder)
        state = checkpoint.load_checkpoint(folder, self.network, self.optimizer, processes, self.settings.seed)
        self.tokens, self.earlier_seconds = state["tokens"], state["elapsed"]
        if processes.is_main:
            note = "" if state["world_size"] == processes.world_size else f" (saved by {state['world_size']} processes)"
            say(f"resuming from {folder}{note}")
        return state["step"]

    def _check_same_run(self, saved: dict[str, Any], folder: Path) -> None:
        for name in RESUME_MUST_MATCH:
            was, now = saved["settings"].get(name), getattr(self.settings, name)
            if was != now:
                raise CheckpointError(f"{folder}: trained with {name} = {was}, now {now}; resume with the same settings")
        now = json.loads(json.dumps(self.job.record))  # as state.json holds it (tuples become lists)
        for key, was in saved["job"].items():
            if now.get(key) != was:
                raise CheckpointError(f"{folder}: this run's {key} differs from the checkpoint's; resume with the same data and model")

    # --- one step ------------------------------------------------------------------------------

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.processes.device) for k, v in batch.items()}

    @contextmanager
    def _gradient_sync(self, last: bool) -> Iterator[None]:
        """Exchange gradients between processes only after the last micro-batch of a step."""
        if not self.processes.distributed or last:
            yield
        elif hasattr(self.module, "no_sync"):  # DDP
            with self.module.no_sync():
                yield
        else:  # FSDP
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

    def _step(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()  # this step's own time: tokens per second
        p, settings = self.processes, self.settings
        micro_batches = [self.job.train.batch(rows) for rows in shard(self.order.step(step), p.rank, p.world_size, self.micro_batch)]
        local = [sum(_targets(b) for b in micro_batches), sum(_tokens(b) for b in micro_batches)]
        targets, tokens = all_sum(local, p)
        lr = learning_rate(step, settings)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Each micro-batch's summed loss over all target tokens of the global batch; times the
        # number of processes, since DDP and FSDP average the gradients they exchange.
        scale = p.world_size / max(targets, 1.0)
        loss_sum = 0.0
        for index, batch in enumerate(micro_batches):
            with self._gradient_sync(index == len(micro_batches) - 1):
                part = self.loss_sum(self._on_device({k: v for k, v in batch.items() if k != "real"}))
                (part * scale).backward()
            loss_sum += float(part.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, settings.clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = all_sum([loss_sum], p)[0]
        seconds = time.perf_counter() - started
        self.tokens += int(tokens)
        return {
            "step": step + 1,
            "loss": total_loss / max(targets, 1.0),
            "lr": lr,
            "tokens": self.tokens,
            "grad_norm": float(norm),
            "tokens_per_second": tokens / seconds,
            "epoch": self.order.epoch_of(step + 1),
            "elapsed": self.earlier_seconds + time.perf_counter() - self._started,  # wall time, logging included
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per target token on (at most eval_batches micro-batches per process of) the
        held-out rows, summed over processes. Every process runs the same number of forward
        passes (FSDP gathers weights in each): one with no rows left computes a row and drops it."""
        data, p = self.job.held_out, self.processes
        per_round = self.micro_batch * p.world_size
        rows = min(len(data), self.settings.eval_batches * per_round)
        self.network.eval()
        total = count = 0.0
        for first in range(0, rows, per_round):
            start = first + p.rank * self.micro_batch
            mine = [i for i in range(start, start + self.micro_batch) if i < rows]
            batch = data.batch(mine or [0])
            part = token_loss_sum(self.network, self._on_device({k: v for k, v in batch.items() if k != "real"}), self.autocast)
            if mine:
                total, count = total + float(part), count + _targets(batch)
        self.network.train()
        total, count = all_sum([total, count], p)
        return total / max(count, 1.0)

    # --- saving --------------------------------------------------------------------------------

    def save(self, step: int) -> Path | None:
        """A checkpoint of `step` and the model itself in the output folder."""
        weights = checkpoint.full_weights(self.network)
        state = {
            "tokens": self.tokens,
            "elapsed": self.earlier_seconds + time.perf_counter() - self._started,
            "settings": self.settings.to_dict(),
            "job": self.job.record,
        }
        folder = checkpoint.save_checkpoint(
            self.job.out, step, self.network, weights, self.optimizer, state, self.processes, self.settings.keep_checkpoints
        )
        if self.processes.is_main:
            self.job.save_model(weights)
        barrier(self.processes)
        return folder

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM ask the loop to stop after the current step (a second Ctrl-C stops
        at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(number: int, frame: object) -> None:
            if self.stop_requested and number == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
