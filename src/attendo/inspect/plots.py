"""PNG pictures of the inspection views, with matplotlib (Agg: no display needed).

- `stages_figure`: the sampler's stages side by side, the same tokens on every row, so a token can
  be followed from the raw distribution to the final one; each panel shows the stage's input in
  grey behind its output, the tokens it removed, its cut-off, and the chosen token.
- `attention_figure`: heatmaps of query × key attention weights with the tokens on both axes: one
  head, the average of the heads, or every head of a layer; encoder-decoders get their encoder,
  decoder and cross-attention side by side.
- `geometry_figure`: words or texts placed by PCA in 2-D or 3-D, beside the angles between them.

Token labels make the invisible visible: a leading space is "␣", a newline "↵", a tab "⇥", and a
character the font cannot draw its code point.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from attendo.inspect.attention import KIND_AXES  # noqa: E402

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from attendo.inspect.attention import LayerAttention
    from attendo.inspect.geometry import Geometry
    from attendo.inspect.stages import StagesReport

DPI = 100
AFTER, BEFORE, CHOSEN, REMOVED, CUT, MASKED = "#3b75af", "#d5d5d5", "#e8830c", "#c0392b", "#555555", "#e6e6e6"
WEIGHTS = "viridis"
KIND_TITLES = {"self": "self-attention", "encoder": "encoder self-attention", "decoder": "decoder self-attention",
               "cross": "cross-attention (decoder → encoder)"}  # fmt: skip
MAX_LABEL = 18


@lru_cache(maxsize=1)
def _drawable() -> frozenset[int]:
    path = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    return frozenset(FT2Font(path).get_charmap())


def token_label(token: str) -> str:
    """A token as a tick label: spaces, newlines and tabs made visible, undrawable characters as
    their code points, long tokens shortened."""
    visible = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
    stripped = token.lstrip(" ")
    text = "␣" * (len(token) - len(stripped)) + stripped
    drawable = _drawable()
    text = "".join(visible.get(c) or (c if ord(c) in drawable else f"U+{ord(c):04X}") for c in text)
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def save(figure: Figure, path: str | Path) -> None:
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


# --- sampling stages --------------------------------------------------------------------------


def stage_rows(report: StagesReport, top: int) -> list[int]:
    """The tokens every panel shows, most probable in the end first: those any stage lists, by
    final then raw probability, at most `top` (the chosen token always among them)."""
    listed = {t.id for stage in report.stages for t in stage.tokens}
    order = sorted(listed, key=lambda i: (-report.probability("final", i), -report.probability("raw", i)))[:top]
    if report.chosen is not None and report.chosen.id not in order:
        order[-1] = report.chosen.id
    return order


def setting_text(name: str, report: StagesReport) -> str:
    s = report.settings
    penalties = [f"{name} {value:g}" for name, value, off in (("repetition", s.repetition_penalty, 1),
                 ("presence", s.presence_penalty, 0), ("frequency", s.frequency_penalty, 0)) if value != off]  # fmt: skip
    values = {
        "penalties": ", ".join(penalties) or "off",
        "temperature": f"T = {s.temperature:g}",
        "top_k": f"k = {s.top_k}" if s.top_k else "k off",
        "top_p": f"p = {s.top_p:g}" if s.top_p < 1 else "p off",
        "min_p": f"min p = {s.min_p:g}" if s.min_p else "min p off",
        "final": "argmax (greedy)" if s.greedy else "drawn from",
    }
    return values.get(name, "")


def _short_percent(p: float) -> str:
    return f"{p:.0%}" if p >= 0.095 else f"{p:.1%}" if p >= 0.001 else "<0.1%"


def stages_figure(report: StagesReport, labels: dict[int, str], title: str, top: int = 20) -> Figure:
    rows = stage_rows(report, top)
    names = report.names
    figure, axes = plt.subplots(
        1, len(names), figsize=(2.3 * len(names) + 1.5, 0.32 * len(rows) + 2.6), sharey=True, layout="constrained"
    )
    y = list(range(len(rows)))
    for i, (ax, stage) in enumerate(zip(axes, report.stages)):
        after = [report.probability(stage.name, t) for t in rows]
        before = [report.probability(names[i - 1], t) for t in rows] if i else after
        colours = [CHOSEN if report.chosen is not None and t == report.chosen.id else AFTER for t in rows]
        ax.barh(y, before, color=BEFORE, height=0.8)
        ax.barh(y, after, color=colours, height=0.5)
        for row, p in enumerate(after):
            if p > 0:
                ax.text(p, row, f" {_short_percent(p)}", va="center", fontsize=6.5, color="#333333")
        removed = [row for row, (b, a) in enumerate(zip(before, after)) if b > 0 and a == 0]
        if removed:  # (an empty unclipped line has no extent and upsets the layout)
            ax.plot([0] * len(removed), removed, "x", color=REMOVED, markersize=7, mew=2, clip_on=False)
        if stage.threshold is not None:
            ax.axvline(stage.threshold, color=CUT, linestyle="--", linewidth=1)
        peak = max(max(after), max(before), 1e-9)
        ax.set_xlim(0, peak * 1.3)  # room for the numbers
        ax.set_xticks([t for t in MaxNLocator(4).tick_values(0, peak) if t <= peak * 1.0001])  # no tick past the data
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{stage.name}\n{setting_text(stage.name, report)}", fontsize=9)
        ax.set_xlabel(f"kept {stage.kept:,}\nmass {stage.mass:.3f}  H {stage.entropy:.2f} bits", fontsize=8)
        ax.grid(axis="x", color="#eeeeee")
        ax.set_axisbelow(True)
    axes[0].set_yticks(y, [token_label(labels[t]) for t in rows], fontsize=9)
    axes[0].invert_yaxis()
    legend = [
        Patch(color=AFTER, label="probability after the stage"),
        Patch(color=BEFORE, label="before the stage (its input)"),
        Patch(color=CHOSEN, label="the chosen token"),
        Line2D([], [], marker="x", color=REMOVED, linestyle="", mew=2, label="removed by the stage"),
        Line2D([], [], color=CUT, linestyle="--", label="cut-off (lowest kept input probability)"),
    ]
    figure.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    return figure


# --- attention --------------------------------------------------------------------------------


def _heatmap(ax: Axes, weights: torch.Tensor, queries: list[str], keys: list[str], ticks: bool, size: float,
             causal: bool) -> object:
    shown = weights.numpy().copy()
    if causal:  # a token cannot attend to later ones: grey, not a weight of 0
        shown[np.triu(np.ones(shown.shape, dtype=bool), k=1)] = np.nan
    cmap = matplotlib.colormaps[WEIGHTS].with_extremes(bad=MASKED)
    image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if ticks:
        ax.set_xticks(range(len(keys)), [token_label(k) for k in keys], rotation=90, fontsize=size)
        ax.set_yticks(range(len(queries)), [token_label(q) for q in queries], fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def _label_size(count: int) -> float:
    return max(4.0, min(10.0, 260 / max(count, 1)))


def attention_figure(view: LayerAttention, labels: list[str], target_labels: list[str] | None, title: str,
                     head: int | None = None, all_heads: bool = False) -> Figure:
    """One heatmap per kind (the given head, or the average of the heads), or with all_heads a
    row of every head per kind."""
    axes_of = {"tokens": labels, "target_tokens": target_labels or []}
    kinds = list(view.kinds)
    causal = {kind: kind == "decoder" or (kind == "self" and view.family == "decoder") for kind in kinds}
    longest = max(len(labels), len(target_labels or []))
    if all_heads:
        columns = min(view.heads, 6)
        per_kind = math.ceil(view.heads / columns)
        cell = 2.4 if longest > 24 else 3.0
        figure, grid = plt.subplots(
            per_kind * len(kinds), columns, figsize=(cell * columns + 1.2, cell * per_kind * len(kinds) + 1.2),
            layout="constrained", squeeze=False,
        )  # fmt: skip
        image = None
        for k, kind in enumerate(kinds):
            queries, keys = (axes_of[a] for a in KIND_AXES[kind])
            for h in range(per_kind * columns):
                ax = grid[k * per_kind + h // columns, h % columns]
                if h >= view.heads:
                    ax.axis("off")
                    continue
                image = _heatmap(ax, view.kinds[kind][h], queries, keys, longest <= 16, _label_size(longest) * 0.7, causal[kind])
                ax.set_title(f"{KIND_TITLES[kind]}, head {h}" if len(kinds) > 1 else f"head {h}", fontsize=8)
    else:
        side = min(max(4.5, 0.24 * longest + 2.5), 16)
        figure, grid = plt.subplots(1, len(kinds), figsize=(side * len(kinds) + 1.0, side), layout="constrained", squeeze=False)
        for ax, kind in zip(grid[0], kinds):
            queries, keys = (axes_of[a] for a in KIND_AXES[kind])
            weights = view.kinds[kind][head] if head is not None else view.kinds[kind].mean(dim=0)
            image = _heatmap(ax, weights, queries, keys, True, _label_size(longest), causal[kind])
            ax.set_title(KIND_TITLES[kind], fontsize=10)
            ax.set_xlabel("key: the token attended to", fontsize=9)
            ax.set_ylabel("query: the token attending", fontsize=9)
    colorbar = figure.colorbar(image, ax=grid, shrink=0.6)
    colorbar.set_label("attention weight (each row sums to 1)")
    if any(causal.values()):
        masked = Patch(color=MASKED, label="masked: a token does not see the tokens after it")
        figure.legend(handles=[masked], loc="outside lower center", fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=11)
    return figure


# --- embeddings -------------------------------------------------------------------------------


def _unstack_labels(figure: Figure, labels: list[Annotation]) -> None:
    """Raise each point label above the labels before it that it would cover (at most 40 steps),
    so points that (nearly) coincide in the picture keep readable names. Only the texts count:
    an annotation's own extent includes its leader line, which grows as the text rises."""
    renderer = figure.canvas.get_renderer()
    placed: list = []
    for label in labels:
        box = Text.get_window_extent(label, renderer)
        for _ in range(40):
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y + 0.8 * label.get_fontsize())
            box = Text.get_window_extent(label, renderer)
        placed.append(box)


def geometry_figure(found: Geometry, texts: list[str], title: str, three_d: bool = False) -> Figure:
    """The points (PCA) on the left, the angle between every pair of vectors on the right."""
    labels = [t if len(t) <= 28 else t[:27] + "…" for t in texts]
    n = len(texts)
    table = n <= 16
    figure = plt.figure(figsize=(13 if table else 8, 6.5), layout="constrained")
    shares = found.explained_variance
    if three_d:
        ax = figure.add_subplot(1, 2 if table else 1, 1, projection="3d")
        x, y, z = found.points.T.tolist()
        ax.scatter(x, y, z, color=AFTER, s=40, depthshade=False)
        for label, px, py, pz in zip(labels, x, y, z):
            ax.text(px, py, pz, f" {label}", fontsize=9)
        ax.set_zlabel(f"PC3 ({shares[2]:.0%})")
        ax.view_init(elev=20, azim=-60)
    else:
        ax = figure.add_subplot(1, 2 if table else 1, 1)
        x, y = found.points.T.tolist()
        ax.scatter(x, y, color=AFTER, s=40, zorder=3)
        leader = {"arrowstyle": "-", "color": "#aaaaaa", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}
        names = [ax.annotate(label, (px, py), textcoords="offset points", xytext=(5, 4), fontsize=9, arrowprops=leader)
                 for label, px, py in zip(labels, x, y)]  # fmt: skip
        ax.axhline(0, color="#dddddd", zorder=1)
        ax.axvline(0, color="#dddddd", zorder=1)
        ax.margins(0.15)
    ax.set_xlabel(f"PC1 ({shares[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC2 ({shares[1]:.0%})")
    ax.set_title(f"PCA of the {found.source}", fontsize=10)
    if table:
        right = figure.add_subplot(1, 2, 2)
        angles = found.angle_degrees.numpy()
        image = right.imshow(angles, cmap="magma_r", vmin=0, vmax=max(90.0, float(angles.max())))
        right.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        right.set_yticks(range(n), labels, fontsize=8)
        for i in range(n):
            for j in range(n):
                dark = angles[i, j] > 45
                right.text(j, i, f"{angles[i, j]:.0f}°", ha="center", va="center", fontsize=7 if n > 8 else 9,
                           color="white" if dark else "black")  # fmt: skip
        right.set_title("the angle between each pair (its cosine is their similarity)", fontsize=10)
        figure.colorbar(image, ax=right, shrink=0.7).set_label("angle (degrees)")
    figure.suptitle(title, fontsize=11)
    if not three_d:
        figure.canvas.draw()  # lay the figure out, so the labels know where they are
        _unstack_labels(figure, names)
    return figure
