"""The findings of results/README.md: each claim of the paper stated as a measured fact.

The findings are computed, never written by hand: each function takes the metric rows (one per
experiment and stage) and states a claim as "holds" / "does not hold at this scale", citing the
values and the seed spread, so a rerun with other numbers rewrites the conclusions too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

STAGE3_TOLERANCE = 0.05  # "stage 3 ≈ stage 2": within 5 % of stage 2 (or the seed std, if larger)
COPY_RATIO = 0.01  # stage k "copies" its prior when its MSD to it is < 1 % of the within-class MSD


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


# ---- ablation groups -------------------------------------------------------------------------------
# Groups are named in params (experiments.<name>.group); these two answer claims of the paper.

EQUAL_COMPUTE_GROUP = "equal_compute"
CFG_SWEEP_GROUP = "cfg_sweep"
BOTTLENECK_GROUP = "bottleneck"
FINETUNE_GROUP = "finetune"


def group_findings(metrics: pd.DataFrame) -> list[Finding]:
    """Claims answered by ablation groups present in `metrics` (all rows, with a `group` column)."""
    checks = {EQUAL_COMPUTE_GROUP: _equal_compute_finding, CFG_SWEEP_GROUP: _cfg_finding,
              BOTTLENECK_GROUP: _bottleneck_finding, FINETUNE_GROUP: _finetune_finding}
    return [check(metrics[metrics["group"] == group]) for group, check in checks.items()
            if (metrics["group"] == group).any()]


def _final_stage(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["stage"] == rows["stages_count"]]


def _equal_compute_finding(rows: pd.DataFrame) -> Finding:
    """The reviewers' ask: one stage trained on 2N images vs the same budget spent as 2 stages × N."""
    final = _final_stage(rows)
    multi = final[final["lem_enabled"].astype(bool) & (final["stages_count"] >= 2)]
    single = final[final["stages_count"] == 1]
    if multi.empty or single.empty:
        return Finding("Equal compute: multi-stage vs single-stage", None,
                       f"Group `{EQUAL_COMPUTE_GROUP}` needs a multi-stage experiment with the LEM and a single-stage one.")
    m_label, s_label = multi["label"].iloc[0], single["label"].iloc[0]
    m, s = (_stat(final, lab, int(final.loc[final["label"] == lab, "stage"].iloc[0])) for lab in (m_label, s_label))
    metric = final["metric_name"].iloc[0]

    def facts(label: str, stat: _Stat) -> str:
        g = final[final["label"] == label]
        cost = g["sampling_gflops_per_image"].mean()
        cost = "" if math.isnan(cost) else f", {cost:.3g} GFLOPs/image to sample"
        return f"{label}: {stat} ({_images(sorted(set(g['train_images'].dropna().astype(int))))} training images{cost})"

    return Finding(f"Equal compute: {m_label} beats {s_label}", m.mean < s.mean,
                   f"{metric}: {facts(m_label, m)}; {facts(s_label, s)}.{_within_spread(m, s)}")


def _cfg_finding(rows: pd.DataFrame) -> Finding:
    """Paper Fig. 3 left: the stage-2 metric with real priors (rFID) is best at a large CFG scale."""
    final = _final_stage(rows[rows["stage"] >= 2]).dropna(subset=["metric", "cfg_scale"])
    claim = "A large CFG scale is needed to use the priors (stage 2 best at the largest scale tried)"
    if final.empty:
        return Finding(claim, None, f"Group `{CFG_SWEEP_GROUP}` has no stage ≥ 2 with a CFG scale.")
    metric = final["metric_name"].iloc[0]
    curves, best = [], {}
    for source, g in final.groupby("prior_source", sort=False):
        by_scale = g.groupby("cfg_scale")["metric"].mean().sort_index()
        best[source] = float(by_scale.idxmin())
        points = ", ".join(f"s={s:g}: {v:.2f}" for s, v in by_scale.items())
        curves.append(f"{source} priors: {points} (best at s={best[source]:g})")
    largest = float(final["cfg_scale"].max())
    # The paper's evidence is rFID (priors from real latents); fall back to generated priors.
    judged = best.get("real", next(iter(best.values())))
    return Finding(claim, judged == largest and largest > 1,
                   f"{metric} of stage 2 vs CFG scale; " + "; ".join(curves) + ".")


def _bottleneck_finding(rows: pd.DataFrame) -> Finding:
    """docs/method.md section 8: the bottleneck decides whether stage 2 copies its prior."""
    claim = "A wider LEM bottleneck makes stage 2 copy its prior more (DESIGN.md section 8)"
    stage2 = rows[rows["stage"] == 2].dropna(subset=["bottleneck_dim", "msd_to_prior", "msd_within_class"])
    if stage2["bottleneck_dim"].nunique() < 2:
        return Finding(claim, None, f"Group `{BOTTLENECK_GROUP}` needs stage 2 at two bottleneck sizes or more.")
    ratio = (stage2["msd_to_prior"] / stage2["msd_within_class"]).groupby(stage2["bottleneck_dim"]).mean().sort_index()
    metric = stage2.groupby("bottleneck_dim")["metric"].mean()
    name = rows["metric_name"].iloc[0]
    points = ", ".join(f"d_b={int(d)}: ratio {r:.3g}, {name} {metric[d]:.2f}" for d, r in ratio.items())
    copying = [f"d_b={int(d)}" for d, r in ratio.items() if r < COPY_RATIO]
    return Finding(claim, bool(ratio.is_monotonic_decreasing),
                   f"Stage 2's MSD to its prior over the within-class MSD: {points}"
                   + (f"; copies (ratio < {COPY_RATIO:g}) at {', '.join(copying)}." if copying else "."))


def _finetune_finding(rows: pd.DataFrame) -> Finding:
    """docs/method.md section 3's option: stages k >= 2 fine-tuned on paired priors vs one shared network."""
    final = _final_stage(rows)
    tuned, shared = final[final["finetuned_stages"] > 0], final[final["finetuned_stages"] == 0]
    if tuned.empty or shared.empty:
        return Finding("Fine-tuned stages beat the shared network", None,
                       f"Group `{FINETUNE_GROUP}` needs an experiment with fine-tuned stages and one without.")
    t_label, s_label = tuned["label"].iloc[0], shared["label"].iloc[0]
    stage = int(tuned["stage"].iloc[0])
    t, s = _stat(final, t_label, stage), _stat(final, s_label, int(shared["stage"].iloc[0]))
    images = {lab: _images(sorted(set(final.loc[final["label"] == lab, "train_images"].dropna().astype(int))))
              for lab in (t_label, s_label)}
    return Finding(f"{t_label} beats the {s_label} at stage {stage}", t.mean < s.mean,
                   f"{final['metric_name'].iloc[0]} at stage {stage}: {t_label}: {t} ({images[t_label]} training "
                   f"images in all); {s_label}: {s} ({images[s_label]}).{_within_spread(s, t)}")
