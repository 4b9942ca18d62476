"""results/README.md: the index of the report, and the findings stated from the numbers.

The findings are computed, never written by hand: `findings()` takes the main comparison's rows
and states each claim of the paper as a measured fact ("holds" / "does not hold at this scale"),
citing the values and the seed spread, so a rerun with other numbers rewrites the conclusions too.
"""

from __future__ import annotations

import datetime as _dt
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from ..config import Params
from ..io import atomic_path
from .tables import Table

FINDINGS_BEGIN = "<!-- findings:begin (generated from the numbers; rewritten on every run) -->"
FINDINGS_END = "<!-- findings:end -->"
STAGE3_TOLERANCE = 0.05  # "stage 3 ≈ stage 2": within 5 % of stage 2 (or the seed std, if larger)
COPY_RATIO = 0.01  # stage k "copies" its prior when its MSD to it is < 1 % of the within-class MSD


# ---- findings ------------------------------------------------------------------------------------


@dataclass
class Finding:
    claim: str
    holds: bool | None  # None: the claim could not be tested with these runs
    evidence: str

    @property
    def verdict(self) -> str:
        if self.holds is None:
            return "not tested"
        return "holds" if self.holds else "does not hold at this scale"

    def text(self) -> str:
        return f"**{self.claim}**: {self.verdict}. {self.evidence}"


@dataclass
class _Stat:
    mean: float
    std: float  # sample std over seeds; NaN for one seed
    n: int
    by_exp: dict  # experiment -> value (pairs seeds across stages)

    def __str__(self) -> str:
        if self.n > 1 and not math.isnan(self.std):
            return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n} seeds)"
        return f"{self.mean:.2f}"

    @property
    def spread(self) -> float:
        return 0.0 if math.isnan(self.std) else self.std


def _stat(rows: pd.DataFrame, label: str, stage: int, key: str = "metric") -> _Stat | None:
    if key not in rows:
        return None
    g = rows[(rows["label"] == label) & (rows["stage"] == stage)].dropna(subset=[key])
    if g.empty:
        return None
    values = g[key].astype(float)
    return _Stat(float(values.mean()), float(values.std(ddof=1)) if len(g) > 1 else float("nan"), len(g),
                 dict(zip(g["experiment"], values)))


def _paired(a: _Stat, b: _Stat) -> str:
    """With seeds: in how many seeds is b lower than a (same experiment at both stages)."""
    common = [e for e in a.by_exp if e in b.by_exp]
    if len(common) < 2:
        return ""
    wins = sum(b.by_exp[e] < a.by_exp[e] for e in common)
    return f"; lower in {wins}/{len(common)} seeds"


def _within_spread(a: _Stat, b: _Stat) -> str:
    spread = max(a.spread, b.spread)
    if spread > 0 and abs(a.mean - b.mean) <= spread:
        return " The difference is within the seed spread."
    return ""


def findings(rows: pd.DataFrame) -> list[Finding]:
    """Claims of the main comparison, tested on `rows` (one row per experiment and stage, with
    columns experiment, label, stage, metric, metric_name, lem_enabled, stages_count,
    train_images and optionally sampling_gflops_per_image, msd_to_prior, msd_within_class).
    Lower metric is better (Fréchet distances)."""
    if rows.empty:
        return [Finding("Main comparison", None, "No experiment in the main table.")]
    metric = " / ".join(dict.fromkeys(rows["metric_name"].astype(str)))
    labels = list(dict.fromkeys(rows["label"]))
    multi = [lab for lab in labels if _label_flag(rows, lab, "lem_enabled") and rows.loc[rows["label"] == lab, "stage"].max() >= 2]
    base = [lab for lab in labels if not _label_flag(rows, lab, "lem_enabled")]
    out: list[Finding] = []
    for lab in multi:
        s1, s2, s3 = (_stat(rows, lab, k) for k in (1, 2, 3))
        if s1 and s2:
            out.append(Finding(
                f"{lab}: stage 2 improves on stage 1 (lower {metric})", s2.mean < s1.mean,
                f"Stage 1: {s1}; stage 2: {s2}{_paired(s1, s2)}.{_within_spread(s1, s2)}"))
        if s2 and s3:
            tol = max(STAGE3_TOLERANCE * abs(s2.mean), s2.spread, s3.spread)
            diff = s3.mean - s2.mean
            direction = "better" if diff < 0 else "worse"
            out.append(Finding(
                f"{lab}: stage 3 ≈ stage 2", abs(diff) <= tol,
                f"Stage 2: {s2}; stage 3: {s3}; stage 3 is {direction} by {abs(diff):.2f}, tolerance {tol:.2f} "
                f"(the larger of {STAGE3_TOLERANCE:.0%} of stage 2 and the seed std)."))
        out.extend(_copy_finding(rows, lab, k) for k in (2, 3) if _stat(rows, lab, k, "msd_to_prior"))
        for b in base:
            out.append(_baseline_finding(rows, lab, b, metric))
    if not multi:
        out.append(Finding("Multi-stage comparison", None, "No multi-stage experiment with the LEM in the main table."))
    if multi and not base:
        out.append(Finding("Baseline comparison", None, "No single-stage baseline (LEM disabled) in the main table."))
    return out


def _label_flag(rows: pd.DataFrame, label: str, key: str) -> bool:
    return bool(rows.loc[rows["label"] == label, key].astype(bool).all()) if key in rows else True


def _copy_finding(rows: pd.DataFrame, label: str, stage: int) -> Finding:
    to_prior = _stat(rows, label, stage, "msd_to_prior")
    within = _stat(rows, label, stage, "msd_within_class")
    claim = f"{label}: stage {stage} does not copy stage {stage - 1}"
    if within is None or within.mean <= 0:
        return Finding(claim, None, f"MSD to prior {to_prior.mean:.3g}; no within-class MSD to compare with.")
    ratio = to_prior.mean / within.mean
    return Finding(claim, ratio >= COPY_RATIO,
                   f"Mean squared distance to its stage-{stage - 1} prior {to_prior.mean:.3g} vs {within.mean:.3g} "
                   f"between two samples of a class (ratio {ratio:.3g}; copying means < {COPY_RATIO:g}).")


def _baseline_finding(rows: pd.DataFrame, label: str, baseline: str, metric: str) -> Finding:
    stages = sorted(rows.loc[rows["label"] == label, "stage"].unique())
    stats = {k: _stat(rows, label, k) for k in stages}
    stats = {k: s for k, s in stats.items() if s is not None}
    ref = _stat(rows, baseline, 1)
    claim = f"{label} (best stage) beats {baseline} (stage 1) at equal training images"
    if not stats or ref is None:
        return Finding(claim, None, "A metric value is missing.")
    best = min(stats, key=lambda k: stats[k].mean)
    images = {lab: sorted(set(rows.loc[rows["label"] == lab, "train_images"].dropna().astype(int)))
              for lab in (label, baseline)}
    if images[label] != images[baseline]:
        return Finding(claim, None, f"Not comparable: training images differ ({label}: "
                                    f"{_images(images[label])}, {baseline}: {_images(images[baseline])}).")
    cost = ""
    if "sampling_gflops_per_image" in rows:
        g = {lab: rows.loc[(rows["label"] == lab) & (rows["stage"] == k), "sampling_gflops_per_image"].mean()
             for lab, k in ((label, best), (baseline, 1))}
        if not any(math.isnan(v) for v in g.values()):
            cost = f" Sampling cost: {g[label]:.3g} vs {g[baseline]:.3g} GFLOPs/image."
    return Finding(claim, stats[best].mean < ref.mean,
                   f"{label} stage {best}: {stats[best]}; {baseline}: {ref} ({metric}, both after "
                   f"{_images(images[label])} training images).{_within_spread(ref, stats[best])}{cost}")


def _images(values: list[int]) -> str:
    return "/".join(f"{v:,}" for v in values) or "unknown"


# ---- README --------------------------------------------------------------------------------------


def git_describe(cwd: Path) -> str:
    """Short commit of HEAD (+ a note when the tree has uncommitted changes); tolerant of no git."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = run("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or no commit yet)"
    try:
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return f"`{commit}`" + (" (with uncommitted changes)" if dirty else "")


def findings_section(items: list[Finding]) -> str:
    lines = ["## Findings", "", FINDINGS_BEGIN, ""]
    lines += [f"- {f.text()}" for f in items]
    lines += ["", FINDINGS_END, ""]
    return "\n".join(lines)


def _yaml(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()


def readme(params: Params, tables: list[Table], figures: list[tuple[str, str]], items: list[Finding],
           metric_phrase: str, commit: str, extra_files: list[str], now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    parts = [
        "# Results",
        "",
        f"Generated by `dod report` on {now.strftime('%Y-%m-%d %H:%M:%S')} UTC from commit {commit}.",
        f"Metric: {metric_phrase}; Fréchet distances are lower-is-better. Everything here is regenerated "
        "from `artifacts/` by the report stage; edit `params.yaml`, not these files.",
        "",
        findings_section(items),
        "## Tables",
        "",
        "Each table exists as Markdown, CSV (full precision) and LaTeX under `tables/`; \"–\" marks a value "
        "the detector cannot produce.",
        "",
    ]
    for t in tables:
        parts += [f"### {t.name}", "", f"*{t.caption}*", "", t.markdown(),
                  f"Files: [md](tables/{t.name}.md) · [csv](tables/{t.name}.csv) · [tex](tables/{t.name}.tex)", ""]
    parts += ["## Figures", ""]
    for name, caption in figures:
        stem = Path(name).stem
        pdf = str(Path(name).with_suffix(".pdf"))
        parts += [f"### {stem}", "", f"![{stem}]({name})", "", f"*{caption}* ([PDF]({pdf}))", ""]
    parts += ["## Experiments", "",
              "Each experiment is the base configuration below plus its overrides (`params.yaml`, "
              "`experiments.<name>`).", ""]
    experiments_raw = params.raw.get("experiments") or {}
    for name, exp in params.experiments.items():
        overrides = experiments_raw.get(name) or {}
        weights = f"samples the weights of `{exp.weights_from}`" if exp.weights_from else "trains its own weights"
        parts += [
            f"### {name}", "",
            f"- description: {exp.description or '(none)'}",
            f"- group: `{exp.group}`, label: `{exp.label}`, stages: {exp.stages.count}, {weights}",
            "", "```yaml", _yaml({name: overrides}) if overrides else f"{name}: {{}}  # the base configuration",
            "```", "",
        ]
    base = {k: v for k, v in params.raw.items() if k != "experiments"}
    parts += ["<details><summary>Base configuration (params.yaml without <code>experiments</code>)</summary>", "",
              "```yaml", _yaml(base), "```", "", "</details>", ""]
    if extra_files:
        parts += ["## Data files", ""] + [f"- [{f}]({f})" for f in extra_files] + [""]
    return "\n".join(parts)


def write_readme(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


__all__ = ["Finding", "findings", "findings_section", "git_describe", "readme", "write_readme"]
