"""The report's PNG figures (matplotlib, no pyplot state). Each function returns the file it wrote, or None
when the runs hold nothing to draw."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from .runs import Run, rows_text

DPI = 130


def _series(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped into lines: one per method (and per model when several models are present)."""
    models = {r.model for r in runs}
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.method if len(models) == 1 else f"{r.method} ({r.model})", []).append(r)
    return out


def _colors(labels) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(sorted(labels))}


def pruning_map(runs: list[Run], path: Path) -> Path | None:
    runs = [r for r in runs if r.kept]
    if not runs:
        return None
    n_layers = max(len(r.kept) for r in runs)
    fig = Figure(figsize=(max(6.0, 0.28 * n_layers + 2.5), 0.95 * len(runs) + 1.1), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    im = None
    for ax, r in zip(axes, runs):
        grid = np.full((2, n_layers), np.nan)
        for i, k in enumerate(r.kept):
            grid[0, i], grid[1, i] = k["attn"], k["mlp"]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_yticks([0, 1], ["attn", "mlp"])
        step = 1 if n_layers <= 24 else 2
        ax.set_xticks(range(0, n_layers, step))
        ax.tick_params(labelsize=7)
        ratio = f", ratio {r.ratio:.3f}" if r.ratio is not None else ""
        ax.set_title(f"{r.name}: {r.method}{ratio}", fontsize=8, loc="left")
        for i in range(n_layers):  # removed blocks get a cross, narrowed ones their fraction
            for j in range(2):
                v = grid[j, i]
                if v == 0:
                    ax.text(i, j, "×", ha="center", va="center", color="white", fontsize=7)
                elif 0 < v < 1:
                    ax.text(i, j, f"{v:.2f}".lstrip("0"), ha="center", va="center", fontsize=5.5,
                            color="white" if v < 0.6 else "black")
    axes[-1].set_xlabel("layer")
    bar = fig.colorbar(im, ax=list(axes), shrink=0.9)
    bar.set_label("kept fraction\n(heads / channels)", fontsize=7)  # two short lines fit one run's height
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("Pruning map: kept fraction per layer and block (× = block removed)", fontsize=9)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.05)  # the bar's label inside the image
    return path


def _dense_line(ax, runs: list[Run], metric) -> float | None:
    values = sorted({v for r in runs if (v := metric(r, dense=True)) is not None})
    for v in values[:1]:  # the dense model is the same for runs of one model; show it once
        ax.axhline(v, color="grey", linestyle="--", linewidth=1, label=f"dense ({v:.3g})")
    return values[0] if values else None


def _metric_plot(runs: list[Run], path: Path, x_of, x_label: str, panels: list[tuple[str, object, bool]], title: str):
    """One panel per (label, metric, log-scale); x from ``x_of(run)``; a line per method."""
    panels = [p for p in panels if any(x_of(r) is not None and p[1](r, dense=False) is not None for r in runs)]
    if not panels:
        return None
    series = _series(runs)
    colors = _colors(series)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (label, metric, log) in zip(axes, panels):
        values = []
        for name, rs in series.items():
            pts = sorted((x_of(r), metric(r, dense=False)) for r in rs
                         if x_of(r) is not None and metric(r, dense=False) is not None)
            if pts:
                xs, ys = zip(*pts)
                values += ys
                ax.plot(xs, ys, marker="o", color=colors[name], label=name)
        values += [v for v in [_dense_line(ax, runs, metric)] if v is not None]
        lo, hi = min(values), max(values)
        if log and lo > 0 and hi / lo > 4:  # log only where values span a wide range; plain numbers on the axis
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI)
    return path


def _ppl_metric(name):
    return lambda r, dense: (r.ppl_dense if dense else r.ppl).get(name)


def _task_metric(name):
    return lambda r, dense: None if dense else r.tasks.get(name)


def _mean_acc(r, dense):
    return None if dense else r.mean_accuracy


def ppl_panels(runs):
    return [(f"perplexity ({s}, {rows_text(runs, s)})", _ppl_metric(s), True) for s in sorted({s for r in runs for s in r.ppl})]


def acc_panels(runs):
    tasks = sorted({t for r in runs for t in r.tasks})
    return ([("mean accuracy", _mean_acc, False)] if len(tasks) > 1 else []) + [(f"accuracy ({t})", _task_metric(t), False) for t in tasks]


def vs_ratio(runs: list[Run], out: Path) -> dict[str, Path | None]:
    ratio = lambda r: r.ratio  # noqa: E731
    return {
        "ppl_vs_ratio": _metric_plot(runs, out / "ppl_vs_ratio.png", ratio, "parameter ratio removed", ppl_panels(runs),
                                     "Perplexity against pruning ratio"),
        "accuracy_vs_ratio": _metric_plot(runs, out / "accuracy_vs_ratio.png", ratio, "parameter ratio removed",
                                          acc_panels(runs), "Zero-shot accuracy against pruning ratio"),
    }


def vs_speedup(runs: list[Run], out: Path) -> dict[str, Path | None]:
    figs = {}
    for kind in sorted({k for r in runs for k in r.speedup}):
        sp = lambda r, kind=kind: r.speedup.get(kind)  # noqa: E731
        figs[f"vs_speedup_{kind}"] = _metric_plot(
            runs, out / f"vs_speedup_{kind}.png", sp, f"measured {kind} speedup (dense time / pruned time)",
            ppl_panels(runs) + acc_panels(runs)[:1], f"Quality against measured {kind} speedup")
    return figs
