"""What a training run shows and records (rank 0 only): a rich progress bar with the step, loss,
tokens per second, learning rate and time left; OUT/log.jsonl, one JSON object per optimizer step
(step, loss, lr, tokens, grad_norm, tokens_per_second, elapsed; evaluation steps add eval_loss and
eval_perplexity); and the loss-curve PNG at the end (train/plot.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOG_NAME = "log.jsonl"
console = Console(stderr=True)


def say(message: str) -> None:
    """A line on standard error (the caller decides which process speaks)."""
    console.print(message, highlight=False, soft_wrap=True)


def read_log(out: Path) -> list[dict[str, Any]]:
    path = out / LOG_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Report:
    """Open with the step the run starts from: a resumed run first drops the log lines of steps
    after its checkpoint, so the log reads as if the run had never stopped."""

    def __init__(self, out: Path, total_steps: int, first_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._log = None
        self._progress: Progress | None = None
        if not enabled:
            return
        path = out / LOG_NAME
        kept = [line for line in read_log(out) if line["step"] <= first_step]
        path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        self._log = path.open("a", encoding="utf-8")
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(), console=console,
            )  # fmt: skip
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step, status="")
            self._progress.start()

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
        status = (
            f"loss {record['loss']:.4f}  {record['tokens_per_second']:,.0f} tok/s  lr {record['lr']:.2e}"
        )
        if "eval_loss" in record:
            status += f"  eval {record['eval_loss']:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=status)
        if "eval_loss" in record or record["step"] == self.total_steps:
            self.print(f"step {record['step']}/{self.total_steps}  {status}" + (
                f"  perplexity {record['eval_perplexity']:.2f}" if "eval_perplexity" in record else ""
            ))  # fmt: skip

    def print(self, message: str) -> None:
        if self.enabled:
            say(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Report:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()
