"""Figures of the report, each saved as PNG and PDF.

`pipeline.report_figures(params)` decides which figures exist; this module maps each file name to a
writer through a registry (exact stems like "metric_per_stage", or prefixes like "samples_"), so a
new figure is one decorated function, and a name nobody can draw fails loudly instead of leaving a
declared output missing. Writers draw on `matplotlib.figure.Figure` objects (Agg canvas), never
through pyplot's global state.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless compute nodes; set before seaborn imports pyplot

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter, FuncFormatter, NullLocator  # noqa: E402

from .. import pipeline as P  # noqa: E402
from ..io import atomic_path  # noqa: E402
from .collect import ReportData  # noqa: E402
from .grids import samples_figure  # noqa: E402

log = logging.getLogger(__name__)

FIGSIZE = (6.4, 4.2)
DPI = 150
Writer = Callable[[ReportData, str], "tuple[Figure, str]"]  # (data, stem) -> (figure, caption)

_EXACT: dict[str, Writer] = {}
_PREFIX: dict[str, Writer] = {}


class UnknownFigureError(ValueError):
    """pipeline.report_figures names a figure that no writer here can draw."""


def register(stem: str, *, prefix: bool = False) -> Callable[[Writer], Writer]:
    """Register a writer for figures/<stem>.png (or every figures/<stem>*.png with prefix=True)."""
    def deco(fn: Writer) -> Writer:
        (_PREFIX if prefix else _EXACT)[stem] = fn
        return fn
    return deco


def writer_for(name: str) -> Writer:
    path = PurePosixPath(name)
    if path.parent != PurePosixPath("figures") or path.suffix != ".png":
        raise UnknownFigureError(f"{name}: report figures must be named figures/<name>.png")
    if path.stem in _EXACT:
        return _EXACT[path.stem]
    for prefix, fn in _PREFIX.items():
        if path.stem.startswith(prefix) and len(path.stem) > len(prefix):
            return fn
    known = sorted(_EXACT) + sorted(f"{p}<name>" for p in _PREFIX)
    raise UnknownFigureError(
        f"{name}: no figure writer registered for {path.stem!r} (known: {', '.join(known)}); "
        "add one with @register in dodlib/report/figures.py"
    )


def save_figure(fig: Figure, png: Path) -> list[Path]:
    """Write `png` and the PDF beside it, atomically. PDFs carry no creation date: same bytes per run."""
    paths = [png, png.with_suffix(".pdf")]
    for path, fmt, meta in ((paths[0], "png", {"Software": None}), (paths[1], "pdf", {"CreationDate": None})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi="figure", metadata=meta)
    return paths


def write_figures(data: ReportData, results_dir: Path, names: list[str]) -> list[tuple[str, str]]:
    """Draw every named figure; returns (name, caption) pairs in order. Unknown names fail first."""
    writers = [(name, writer_for(name)) for name in names]
    out = []
    for name, fn in writers:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
            fig, caption = fn(data, PurePosixPath(name).stem)
        save_figure(fig, results_dir / name)
        out.append((name, caption))
    return out


# ---- helpers ---------------------------------------------------------------------------------------


def _metric_axis(data: ReportData, metric_name: str) -> str:
    """Axis label naming the metric and its detector (FD_* is never called FID)."""
    rows = data.metrics[data.metrics["metric_name"] == metric_name]
    detectors = sorted({d for d in rows["detector"].astype(str) if d})
    return f"{metric_name} ↓  [{', '.join(detectors) or 'unknown'}]"


def _images_axis(ax) -> None:
    """Training-image counts as 64k / 1.3M rather than 64000 / 1300000."""
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("training images seen")


def _plain(value: float, _pos=None) -> str:
    """Log-axis tick labels as 0.5 / 2 / 10, not 5×10⁻¹."""
    return f"{value:g}"


def _minor_log_labels(ax) -> FuncFormatter:
    """Minor log ticks: every one labelled on an axis under a decade long, else only 2× and 5×."""
    def label(value: float, _pos=None) -> str:
        low, high = ax.get_ylim()
        leading = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
        return f"{value:g}" if value > 0 and (high / low < 10 or leading in (2, 5)) else ""
    return FuncFormatter(label)


def _palette(labels: list[str]) -> dict[str, tuple]:
    colors = sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))
    return dict(zip(labels, colors))


def _no_data(title: str, why: str) -> Figure:
    """Placeholder for a declared figure whose inputs do not exist (yet): says so on the figure."""
    log.warning("%s: %s", title, why)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data: {why}", ha="center", va="center", wrap=True, transform=ax.transAxes)
    return fig


def _subplots(n: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(FIGSIZE[0] * n, FIGSIZE[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


# ---- figures ---------------------------------------------------------------------------------------


def _line_panels(data: ReportData, rows: pd.DataFrame, *, x: str, y: str, versus: str, **line_style) -> tuple[Figure, list]:
    """One panel per Fréchet metric in `rows` (normally one): `y` against `x`, one line per
    `series`, mean ± std over the experiments sharing a series (seeds)."""
    names = list(dict.fromkeys(rows["metric_name"]))
    fig, axes = _subplots(len(names))
    for ax, name in zip(axes, names):
        d = rows[rows["metric_name"] == name].sort_values(x)
        sns.lineplot(data=d, x=x, y=y, hue="series", errorbar="sd", err_style="bars", ax=ax, **line_style)
        ax.set_ylabel(_metric_axis(data, name))
        ax.set_title(f"{name} vs {versus} (lower is better)")
        ax.legend(title=None, fontsize="small")
    return fig, axes


def metric_per_stage_data(data: ReportData) -> pd.DataFrame:
    """Tidy data of Fig. 3 (right), main experiments: one row per experiment, stage and metric."""
    rows = data.rows(data.main_experiments)
    return pd.DataFrame({
        "experiment": rows["experiment"], "label": rows["label"], "stage": rows["stage"].astype(int),
        "metric_name": rows["metric_name"], "detector": rows["detector"], "value": rows["metric"].astype(float),
        "train_images": rows["train_images"],
    })


@register("metric_per_stage")
def metric_per_stage(data: ReportData, stem: str) -> tuple[Figure, str]:
    df = metric_per_stage_data(data).dropna(subset=["value"])
    if df.empty:
        return _no_data("metric per stage", "no main experiment has a metric value"), "Metric per stage: no data."
    labels = list(dict.fromkeys(df["label"]))
    palette = _palette(labels)
    names = list(dict.fromkeys(df["metric_name"]))
    fig, axes = _subplots(len(names))
    for ax, name in zip(axes, names):
        d = df[df["metric_name"] == name]
        # Mean line with a ±1 std bar over seeds; the individual seeds as small dots on top.
        sns.lineplot(data=d, x="stage", y="value", hue="label", palette=palette, hue_order=labels,
                     errorbar="sd", err_style="bars", err_kws={"capsize": 4}, marker="o", ax=ax)
        sns.scatterplot(data=d, x="stage", y="value", hue="label", palette=palette, hue_order=labels,
                        s=14, alpha=0.5, legend=False, ax=ax)
        # One-stage settings (the SiT baseline) as a dashed level, comparable with every stage.
        for label, g in d.groupby("label", sort=False):
            if g["stage"].max() == 1 and d["stage"].max() > 1:
                ax.axhline(g["value"].mean(), ls="--", lw=1, color=palette[label])
        stages = sorted(d["stage"].unique())
        ax.set_xticks(stages, [f"S{k}" for k in stages])
        ax.set_xlabel("stage")
        ax.set_ylabel(_metric_axis(data, name))
        ax.set_title(f"{name} per stage (mean ± std over seeds; lower is better)")
        ax.legend(title="setting", fontsize="small")
    caption = (f"Fig. 3 (right): {', '.join(names)} per stage for the main experiments; a line per setting "
               "(label), mean with ±1 std bars over seeds and each seed as a dot; one-stage baselines are dashed. "
               "Lower is better.")
    return fig, caption


@register("training_loss")
def training_loss(data: ReportData, stem: str) -> tuple[Figure, str]:
    df = data.train_logs.dropna(subset=["loss"])
    if df.empty:
        return _no_data("training loss", "no training logs"), "Training loss: no data."
    group_of = {name: exp.group for name, exp in data.params.experiments.items()}
    df = df.assign(group=df["experiment"].map(group_of))
    groups = list(dict.fromkeys(["main"] * ("main" in set(df["group"])) + list(df["group"])))
    # Small multiples: one panel per group with its few runs in distinct colours, and the main
    # comparison's runs in grey behind every other panel as the common reference.
    fig, axes = _grid(len(groups))
    reference = df[df["group"] == "main"]
    for ax, group in zip(axes, groups):
        if group != "main":
            for _, g in reference.groupby("experiment", sort=False):
                ax.plot(*_smoothed(g), color="0.6", lw=1.0, ls="--", zorder=1)
        runs = df[df["group"] == group]
        palette = _palette(list(dict.fromkeys(runs["experiment"])))
        for name, g in runs.groupby("experiment", sort=False):
            g = g.sort_values("images")
            ax.plot(g["images"], g["loss"], color=palette[name], alpha=0.2, lw=0.8, zorder=2)
            ax.plot(*_smoothed(g), color=palette[name], lw=1.8, label=name, zorder=3)
        if group != "main" and len(reference):
            ax.plot([], [], color="0.6", lw=1.0, ls="--", label="main (reference)")
        _images_axis(ax)
        ax.set_title(f"group {group}")
        ax.legend(fontsize="x-small", loc="upper right", framealpha=0.9)
    for ax in axes[::_grid_columns(len(groups))]:
        ax.set_ylabel("training loss (velocity MSE)")
    caption = ("Training loss against training images, one panel per experiment group, for every experiment that "
               "trains its own weights (faint: logged values; solid: centred running mean; dashed grey: the main "
               "comparison's runs, repeated in each panel as the reference).")
    return fig, caption


def _smoothed(g: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(images, loss) with a centred running mean over about an eighth of the run's log rows."""
    g = g.sort_values("images")
    window = max(3, len(g) // 8)
    return g["images"], g["loss"].rolling(window, center=True, min_periods=1).mean()


def _grid_columns(n: int) -> int:
    return min(3, n)


def _grid(n: int) -> tuple[Figure, list]:
    """n panels in rows of up to three, sharing the loss axis; unused cells are hidden."""
    cols = _grid_columns(n)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False, sharey=True).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


@register("samples_", prefix=True)
def samples(data: ReportData, stem: str) -> tuple[Figure, str]:
    return samples_figure(data, stem[len("samples_"):])


def _real_prefix(metric_name: str) -> str:
    return f"r{metric_name}"  # rFID / rFD_mnist: stage >= 2 conditioned on real latents' priors


@register("cfg_sweep")
def cfg_sweep(data: ReportData, stem: str) -> tuple[Figure, str]:
    rows = data.metrics[data.metrics["group"] == "cfg_sweep"].dropna(subset=["metric"])
    if rows.empty:
        return _no_data("CFG sweep", "no experiment in group cfg_sweep"), "CFG sweep: no data."
    series = []
    for _, r in rows.iterrows():
        if r["prior_source"] == "real":
            if r["stage"] < 2:
                continue  # stage 1 takes no prior: identical to the generated-prior sweep
            series.append(f"{_real_prefix(r['metric_name'])}, stage {r['stage']} (real priors)")
        else:
            series.append(f"stage {r['stage']}")
    rows = rows[(rows["prior_source"] != "real") | (rows["stage"] >= 2)].assign(series=series)
    fig, axes = _line_panels(data, rows, x="cfg_scale", y="metric", versus="guidance scale",
                             style="series", markers=True, dashes=False)
    for ax in axes:
        ax.set_xlabel("CFG scale (of that stage)")
    caption = ("Fig. 3 (left): metric against the CFG scale for the experiments of group `cfg_sweep`, one line per "
               "stage; lines marked 'real priors' condition stage 2 on real latents (rFID-style).")
    return fig, caption


@register("training_efficiency")
def training_efficiency(data: ReportData, stem: str) -> tuple[Figure, str]:
    snaps = data.snapshots
    main = set(data.main_experiments)
    if len(snaps) and main & set(snaps["experiment"]):
        snaps = snaps[snaps["experiment"].isin(main)]  # DoD vs SiT: the main comparison's runs
    snaps = snaps[snaps["metric_name"].isin(data.metric_names)] if len(snaps) else snaps
    if snaps.empty:
        return _no_data("training efficiency", "no snapshots.json with a metric"), "Training efficiency: no data."
    snaps = snaps.copy()
    # A snapshot evaluated at a known stage gets the final measurement of that stage appended.
    extra = []
    for (name, stage), g in snaps.dropna(subset=["stage"]).groupby(["experiment", "stage"]):
        final = data.metrics[(data.metrics["experiment"] == name) & (data.metrics["stage"] == stage)]
        if len(final) and final["train_images"].iloc[0] not in set(g["train_images"]):
            f = final.iloc[0]
            extra.append({"experiment": name, "label": f["label"], "group": f["group"],
                          "train_images": int(f["train_images"]), "stage": stage,
                          "metric_name": f["metric_name"], "value": f["metric"]})
    snaps = pd.concat([snaps, pd.DataFrame(extra)], ignore_index=True) if extra else snaps
    snaps["series"] = [lab if np.isnan(s) else f"{lab}, stage {int(s)}" for lab, s in zip(snaps["label"], snaps["stage"])]
    fig, axes = _line_panels(data, snaps, x="train_images", y="value", versus="training images", marker="o")
    for ax in axes:
        # Early snapshots are an order of magnitude worse: on a linear axis they flatten the rest.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(_minor_log_labels(ax))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(snaps["train_images"].unique()))  # the snapshots themselves, e.g. 32k 64k 96k
        ax.xaxis.set_minor_locator(NullLocator())
        _images_axis(ax)
    caption = ("Training efficiency: metric of EMA snapshots against training images for the main experiments "
               "(DoD and the SiT baseline), mean ± std over seeds.")
    return fig, caption


def write_plot_data(data: ReportData, results_dir: Path) -> list[Path]:
    """The numbers behind Fig. 3 (right) for `dvc plots`: one CSV per main experiment (stage,
    metric, metric_name), at the paths dvc.yaml's plot definition names."""
    df = metric_per_stage_data(data)
    written = []
    for name in data.main_experiments:
        path = results_dir / P.metric_plot_file(name)
        rows = df.loc[df["experiment"] == name, ["stage", "value", "metric_name"]].rename(columns={"value": "metric"})
        with atomic_path(path) as tmp:
            rows.to_csv(tmp, index=False)
        written.append(path)
    return written
