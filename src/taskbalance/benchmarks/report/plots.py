"""The report's PNG plots: validation curves, task weights against the improvable gaps, Δm% and its price.

matplotlib (the ``bench`` extra) is imported here, so importing this module without it raises ImportError, which
:func:`taskbalance.benchmarks.report.markdown.write_report` turns into a note with the install hint. Figures are built
with ``matplotlib.figure.Figure`` and its Agg canvas, never pyplot: no global figure state, no GUI backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..datasets.cache import atomic_open
from .folder import MethodRuns, RunFolder, WeightsTrace
from .markdown import STL, Row

#: at most this many metric panels in curves.png (CelebA has 40 attributes)
MAX_CURVE_PANELS = 16
#: beyond this many methods the ± std bands of curves.png would hide each other: STL keeps its band, methods none
MAX_BANDS = 6
#: the moving average spans about this fraction of the sampled steps
SMOOTH_FRACTION = 1 / 25
DPI = 110


_MARKERS = ("o", "s", "^", "D")


def _colors(n: int) -> list[Any]:
    """tab10 (the pastel halves of tab20 are unreadable on white); past ten, plots change the marker or line style."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png", dpi=DPI)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _mean_std(series: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of per-epoch series of different lengths (an unfinished seed is shorter)."""
    length = max(len(s) for s in series)
    data = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        data[i, : len(s)] = s
    counts = np.sum(~np.isnan(data), axis=0)
    mean = np.nanmean(data, axis=0)
    std = np.where(counts > 1, np.nanstd(np.where(np.isnan(data), mean, data), axis=0, ddof=0), 0.0)
    std = std * np.sqrt(counts / np.maximum(counts - 1, 1))  # sample std over the seeds that reached each epoch
    return mean, std


def _val_series(runs: MethodRuns, metric: str) -> list[list[float]]:
    return [
        [float(r["val"][metric]) for r in history if metric in r.get("val", {})]
        for history in runs.history.values()
        if any(metric in r.get("val", {}) for r in history)
    ]


def plot_curves(run: RunFolder, path: Path) -> str | None:
    """Validation metric per epoch, one panel per metric, mean over seeds with a ± std band; STL dashed."""
    metrics = run.metrics[:MAX_CURVE_PANELS]
    if not any(runs.history for runs in run.methods):
        return None
    rows, cols = _grid(len(metrics), 2 if len(metrics) <= 4 else 4)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _colors(len(run.methods))
    bands = len(run.methods) <= MAX_BANDS
    for ax, metric in zip(axes, metrics, strict=False):
        stl = run.stl.get(metric.task)
        curves = [(runs.name, color, runs) for runs, color in zip(run.methods, colors, strict=True)]
        if stl is not None:
            curves.insert(0, (f"{STL} ({metric.task})" if len(run.tasks) > 1 else STL, "black", stl))
        for label, color, runs in curves:
            series = _val_series(runs, metric.name)
            if not series:
                continue
            mean, std = _mean_std(series)
            x = np.arange(1, mean.size + 1)
            i = run.methods.index(runs) if runs is not stl else 0
            style = "--" if runs is stl else ("-", "-.", ":")[i // 10 % 3]
            marker = _MARKERS[i // 10 % len(_MARKERS)]
            ax.plot(x, mean, style, color=color, lw=1.6, marker=marker, ms=3, label=label if runs is not stl else STL)
            if bands or runs is stl:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.set_title(f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)", fontsize=10)
        ax.set_xlabel("epochs trained")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9, frameon=False)
    _save(fig, path)
    shown = "" if len(metrics) == len(run.metrics) else f" (the first {len(metrics)} of {len(run.metrics)} metrics)"
    spread = (
        "band ± 1 std"
        if bands
        else f"band ± 1 std for STL only (with {len(run.methods)} methods they would hide each other)"
    )
    return (
        f"Validation metrics per epoch{shown}: mean over seeds, {spread}; STL (single-task baseline) dashed. "
        "The table's test values are taken at each seed's best validation epoch."
    )


def _fractional_epochs(trace: WeightsTrace) -> np.ndarray:
    """Each sampled step's position in epochs trained: epoch index + (step − the epoch's first sampled step) / steps
    per epoch."""
    steps = np.asarray(trace.steps, dtype=float)
    epochs = np.asarray(trace.epochs)
    firsts = {int(e): steps[epochs == e].min() for e in np.unique(epochs)}
    ordered = [firsts[e] for e in sorted(firsts)]
    per_epoch = float(np.median(np.diff(ordered))) if len(ordered) > 1 else steps.max() - steps.min() + 1
    first = np.asarray([firsts[int(e)] for e in epochs])
    # epochs count from the trace's first (the runner numbers them from 1, other writers from 0)
    return np.asarray(epochs - epochs.min() + (steps - first) / max(per_epoch, 1.0), dtype=float)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 (shrinking at the ends, so the curve spans the whole run)."""
    if window <= 1:
        return values
    kernel = np.ones(window)
    counts = np.convolve(np.ones(values.shape[0]), kernel, mode="same")
    return np.stack([np.convolve(values[:, k], kernel, mode="same") / counts for k in range(values.shape[1])], 1)


def _mean_weights(runs: MethodRuns) -> tuple[np.ndarray, np.ndarray]:
    """(fractional epochs, weights) averaged over seeds at the steps every seed sampled (or the longest seed)."""
    traces = list(runs.weights.values())
    longest = max(traces, key=lambda t: len(t.steps))
    x = _fractional_epochs(longest)
    index = {step: i for i, step in enumerate(longest.steps)}
    total = np.zeros((len(longest.steps), len(longest.weights[0])))
    count = np.zeros((len(longest.steps), 1))
    for trace in traces:
        rows = [index[s] for s in trace.steps if s in index]
        kept = [i for i, s in enumerate(trace.steps) if s in index]
        total[rows] += np.asarray(trace.weights)[kept]
        count[rows] += 1
    return x, total / np.maximum(count, 1)


def _varies(runs: MethodRuns) -> bool:
    return any(np.ptp(np.asarray(t.weights), axis=0).max() > 1e-6 for t in runs.weights.values())


def _gap_proxy(runs: MethodRuns, tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """L_k(e) / L̄_k per epoch from metrics.jsonl, L̄ = the second epoch's mean training loss; mean over seeds."""
    series = []
    for history in runs.history.values():
        losses = [[float(r["train"][f"loss/{t}"]) for t in tasks] for r in history if "train" in r]
        if len(losses) >= 2:
            arr = np.asarray(losses)
            series.append(arr[1:] / arr[1])
    if not series:
        return None
    length = max(s.shape[0] for s in series)
    stacked = np.full((len(series), length, len(tasks)), np.nan)
    for i, s in enumerate(series):
        stacked[i, : s.shape[0]] = s
    return np.arange(1, length + 1) + 0.5, np.nanmean(stacked, axis=0)


def _is_igb(spec: str) -> bool:
    return spec.split("+")[0] in {"igbv1", "igbv2"}


def plot_weights(run: RunFolder, path: Path) -> str | None:
    """Effective task weights over training, one panel per method whose weights change; IGB panels also show the
    improvable-gap proxy L_k/L̄_k on a right axis."""
    shown = [runs for runs in run.methods if runs.weights and _varies(runs)]
    if not shown:
        return None
    rows, cols = _grid(len(shown), 3)
    fig = Figure(figsize=(5.0 * cols, 3.3 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = _colors(len(run.tasks))
    windows = []
    handles: dict[str, Any] = {}
    for ax, runs in zip(axes, shown, strict=False):
        x, weights = _mean_weights(runs)
        window = max(1, round(len(x) * SMOOTH_FRACTION))
        windows.append(window)
        smooth = _smooth(weights, window)
        for k, task in enumerate(run.tasks):
            (line,) = ax.plot(x, smooth[:, k], color=colors[k], lw=1.5)
            handles.setdefault(f"weight: {task}", line)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(runs.name + (f"  ({len(runs.weights)} seeds)" if len(runs.weights) > 1 else ""), fontsize=10)
        ax.set_xlabel("epochs trained")
        ax.set_ylabel("effective weight")
        ax.set_xlim(0, math.ceil(float(x.max())))
        ax.grid(alpha=0.3)
        proxy = _gap_proxy(runs, run.tasks) if _is_igb(runs.name) else None
        if proxy is not None:
            twin = ax.twinx()
            for k, task in enumerate(run.tasks):
                (line,) = twin.plot(proxy[0], proxy[1][:, k], "--", color=colors[k], marker="s", ms=4, lw=1.2)
                handles.setdefault(f"gap L_k/L̄_k (right-hand axis): {task}", line)
            twin.set_ylabel("L_k / L̄_k (L̄ = 2nd-epoch mean)", fontsize=9)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    _save(fig, path)
    span = sorted(set(windows))
    return (
        "Effective task weights (loss weight × gradient weight) of the methods whose weights change, mean over seeds, "
        + (
            f"smoothed with a centred moving average over {'/'.join(map(str, span))} sampled steps (≈ "
            f"{SMOOTH_FRACTION:.0%} of training)"
            if max(span) > 1
            else "not smoothed (too few sampled steps)"
        )
        + "; dotted line = equal weights. In IGB panels the dashed squares are the "
        "improvable-gap proxy L_k/L̄_k (each epoch's mean training loss over the second epoch's, right axis): IGBv1 "
        "sets w = K·softmax(L/L̄), so the task with the larger remaining gap gets the larger weight."
    )


def _with_delta(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.label != STL and r.delta_m is not None]


def plot_delta_m(rows: Sequence[Row], path: Path) -> str | None:
    """Δm% per method, best at the top, error bars ± 1 std over seeds, each seed as a dot; STL at 0."""
    data = sorted(_with_delta(rows), key=lambda r: -r.delta_m.mean if r.delta_m else 0.0)
    if not data:
        return None
    fig = Figure(figsize=(6.4, 0.45 * len(data) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(data))
    means = [r.delta_m.mean for r in data if r.delta_m]
    stds = [r.delta_m.std or 0.0 for r in data if r.delta_m]
    colors = ["tab:green" if m < 0 else "tab:red" for m in means]
    ax.barh(y, means, xerr=stds, color=colors, alpha=0.6, height=0.6, error_kw={"capsize": 3, "ecolor": "0.3"})
    for i, r in enumerate(data):
        seeds = r.delta_m_per_seed
        ax.plot(seeds, [i - 0.15] * len(seeds), "o", mfc="white", mec="black", ms=4, mew=0.8)
    ax.axvline(0.0, color="black", lw=1)
    ax.text(0.0, len(data) - 0.4, " STL", va="bottom", ha="left", fontsize=9)
    ax.set_yticks(y, [r.label + ("†" if r.n_finished < r.n_expected else "") for r in data])
    ax.set_ylim(-0.6, len(data) - 0.1)
    ax.set_xlabel("Δm% vs single-task (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return (
        "Δm% per method (best at the top), bars ± 1 std over seeds, circles = single seeds; 0 = the STL baselines "
        "(green bars beat them)."
    )


#: label positions tried around a point, in points: right, left, above, below, then the diagonals; each at growing
#: distances until one overlaps no other label, no point and stays inside the axes
_DIRECTIONS = ((1, 0, "left"), (-1, 0, "right"), (0, 1, "center"), (0, -1, "center"))
_DIAGONALS = ((1, 1, "left"), (1, -1, "left"), (-1, 1, "right"), (-1, -1, "right"))


def _text_box(annotation: Any, renderer: Any) -> Any:
    """The display box of an annotation's text alone (its own extent includes the connector line)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _place_labels(
    fig: Figure, ax: Any, xs: np.ndarray, ys: np.ndarray, errs: np.ndarray, labels: Sequence[str]
) -> None:
    """Annotate each point with its label where it collides with no label, point or error bar already drawn
    (greedy, in display space)."""
    from matplotlib.transforms import Bbox

    canvas: Any = FigureCanvasAgg(fig)  # its draw and get_renderer are untyped in the stubs
    canvas.draw()  # run the layout once, then freeze it so the measured positions stay true
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.column_stack([xs, ys]))
    low = ax.transData.transform(np.column_stack([xs, ys - errs]))[:, 1]
    high = ax.transData.transform(np.column_stack([xs, ys + errs]))[:, 1]
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in points]
    taken += [Bbox.from_extents(px - 4, lo, px + 4, hi) for (px, _), lo, hi in zip(points, low, high, strict=True)]

    def annotate(i: int, dx: int, dy: int, ha: str, distance: int) -> Any:
        return ax.annotate(
            labels[i],
            xy=(xs[i], ys[i]),
            xytext=(dx * distance, dy * distance),
            textcoords="offset points",
            ha=ha,
            va="center",
            fontsize=9,
            color="0.15",
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkB": 4} if distance > 7 else None,
        )

    for i in range(len(labels)):
        # the first candidate that collides with nothing; failing that, the one with the fewest collisions
        chosen: tuple[int, int, str, int] = (1, 0, "left", 7)
        fewest = math.inf
        for distance in (7, 16, 28, 42, 60, 80):
            for dx, dy, ha in (*_DIRECTIONS, *_DIAGONALS):
                text = annotate(i, dx, dy, ha, distance)
                box = _text_box(text, renderer)
                text.remove()
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                collisions = sum(box.overlaps(other) for other in taken) + (0 if inside else 100)
                if collisions < fewest:
                    chosen, fewest = (dx, dy, ha, distance), collisions
                if fewest == 0:
                    break
            if fewest == 0:
                break
        text = annotate(i, *chosen)
        taken.append(_text_box(text, renderer))


def plot_cost(rows: Sequence[Row], path: Path) -> str | None:
    """Δm% against training seconds per epoch, one labelled point per method (± std over seeds)."""
    data = [r for r in _with_delta(rows) if r.time_per_epoch_s is not None]
    if not data:
        return None
    fig = Figure(figsize=(7.0, 4.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    colors = _colors(len(data))
    x = np.asarray([r.time_per_epoch_s for r in data], dtype=float)
    y = np.asarray([r.delta_m.mean for r in data if r.delta_m])
    errors = np.asarray([(r.delta_m.std or 0.0) for r in data if r.delta_m])
    for i, (xi, yi, err, color) in enumerate(zip(x, y, errors, colors, strict=True)):
        ax.errorbar(xi, yi, yerr=err, fmt=_MARKERS[i // 10 % len(_MARKERS)], color=color, capsize=3)
    ax.axhline(0.0, color="black", lw=1)
    log_x = x.max() / max(x.min(), 1e-12) > 8
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.2)
    ax.set_xlabel("training time per epoch (s)" + (", log scale" if log_x else ""))
    ax.set_ylabel("Δm% (lower is better)")
    ax.grid(alpha=0.3)
    ax.set_xlim(ax.get_xlim())  # freeze the limits the labels are placed against
    ax.set_ylim(ax.get_ylim())
    names = [r.label + ("†" if r.n_finished < r.n_expected else "") for r in data]
    _place_labels(fig, ax, x, y, errors, names)
    _save(fig, path)
    return "The price of each method: Δm% (± std over seeds) against training seconds per epoch; 0 = STL."


def draw_all(run: RunFolder, rows: Sequence[Row], out: Path) -> list[tuple[str, str]]:
    """Draw every plot the data supports into ``out``; (file name, caption) of each one drawn."""
    drawn = []
    for name, caption in (
        ("curves.png", plot_curves(run, out / "curves.png")),
        ("weights.png", plot_weights(run, out / "weights.png")),
        ("delta_m.png", plot_delta_m(rows, out / "delta_m.png")),
        ("cost.png", plot_cost(rows, out / "cost.png")),
    ):
        if caption is not None:
            drawn.append((name, caption))
    return drawn
