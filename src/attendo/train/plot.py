"""The loss curve of a training run, drawn from OUT/log.jsonl into a PNG (matplotlib).

Training loss per step (faint) with its moving average, and the held-out loss at each evaluation:
the gap between the two is how much the model memorises rather than generalises."""

from __future__ import annotations

from pathlib import Path

from attendo.errors import DataError
from attendo.train.report import LOG_NAME, read_log

PLOT_NAME = "loss.png"


def moving_average(values: list[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        averaged.append(total / min(i + 1, window))
    return averaged


def plot_loss(out: Path, png: Path | None = None) -> Path:
    """Draw OUT/log.jsonl to `png` (default OUT/loss.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_log(out)
    if not records:
        raise DataError(f"{out / LOG_NAME}: no training log to plot")
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    evaluated = [r for r in records if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    window = max(1, len(losses) // 50)
    if window > 1:  # long runs: every step faint, and the mean of the last `window` steps
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        axes.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2,
                  label=f"train loss, mean of {window} steps")  # fmt: skip
    else:
        axes.plot(steps, losses, color="tab:blue", linewidth=2, label="train loss")
    if evaluated:
        axes.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-", color="tab:orange",
                  label="held-out loss")  # fmt: skip
    axes.set_xlabel(f"optimizer step ({records[-1]['tokens']:,} tokens in all)")
    axes.set_ylabel("cross-entropy loss (nats per token)")
    axes.set_title(f"training of {out.resolve().name}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    target = png or out / PLOT_NAME
    figure.savefig(target)
    plt.close(figure)
    return target
