"""Tests of the report stage (dodlib.report) on a fake artifacts tree: tables, figures, grids,
findings, DVC outputs and error handling. No model runs; everything is built from small arrays."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dodlib.report as report_mod
from dodlib import pipeline as P
from dodlib.config import parse_params
from dodlib.io import save_json, save_npy
from dodlib.report import build_report
from dodlib.report.collect import collect, load_samples
from dodlib.report.figures import UnknownFigureError, writer_for
from dodlib.report.grids import compose_grid, grid_origin
from dodlib.report.findings import findings, group_findings
from dodlib.report.tables import main_table, seed_summary

RAW = {
    "sample": {"num_samples": 8, "batch_size": 4, "shard_size": 5},  # two shards: the grid spans both
    "report": {"grid_samples": 6, "grid_columns": 4},  # 2 rows per stage block, the second one partial
    "experiments": {
        "dod": {"description": "DoD, three stages", "stages": {"count": 3}},
        "sit": {"description": "plain SiT baseline", "lem": {"enabled": False}, "stages": {"count": 1}},
        "dod_seed1": {"description": "DoD, seed 1", "label": "dod", "train": {"seed": 1}},
        "dod_cfg2": {"description": "DoD at CFG 2", "group": "cfg_sweep", "label": "cfg 2", "weights_from": "dod",
                     "stages": {"count": 2}, "sample": {"cfg": {"scale": 2.0}}},
        "dod_rfd": {"description": "stage 2 from real priors", "group": "cfg_sweep", "label": "real priors",
                    "weights_from": "dod", "stages": {"count": 2}, "sample": {"prior_source": "real"}},
    },
}
# Fréchet values per experiment and stage: stage 2 beats stage 1, stage 3 ≈ stage 2.
FD = {"dod": [20.0, 15.0, 14.5], "dod_seed1": [22.0, 16.0, 15.0], "sit": [17.0],
      "dod_cfg2": [12.0, 10.0], "dod_rfd": [20.0, 8.0]}
EXTRA_FIGURES = ["figures/cfg_sweep.png", "figures/training_efficiency.png"]
N, RES = 8, 16


def fake_images(exp: str, stage: int) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((exp, stage))) % 2**32)
    return rng.integers(0, 256, size=(N, RES, RES, 3), dtype=np.uint8)


def make_tree(root: Path, params) -> dict:
    """Write every input of the report under root/artifacts, as the other stages would."""
    images = {}
    for name, exp in params.experiments.items():
        labels = np.arange(N) % 10
        for k in range(1, exp.stages.count + 1):
            metrics = {
                "experiment": name, "stage": k, "detector": "features_mnist", "metric_name": "FD_mnist",
                "num_samples": N, "FD_mnist": FD[name][k - 1], "IS": 8.0 + k, "IS_std": 0.1,
                "precision": 0.7, "recall": 0.6, "class_accuracy": 0.9, "nfe": 50,
                "cfg_scale": exp.stage_sampling(k).cfg.scale,
                "msd_to_prior": 0.05 if k >= 2 else None, "msd_within_class": 0.3 if k >= 2 else None,
                "train_images": 256000, "params": 1_400_000, "lem_params": 90_000 if exp.lem.enabled else 0,
                "sampling_gflops_per_image": 4.2 * k,
                # one job ran on 2 threads: the README must name it among the departures
                "provenance": {job: {"cpu_isa": "avx2", "torch": "9.9.9", "cpu_model": "Test CPU",
                                     "threads": "2" if (name, k, job) == ("sit", 1, "sample") else "1"}
                               for job in ("train", "sample", "evaluate")},
            }
            if name == "sit":  # a detector that cannot produce IS / precision: keys absent
                for key in ("IS", "IS_std", "precision"):
                    del metrics[key]
            save_json(root / P.metrics_path(name, k), metrics)
            d = root / P.stage_dir(name, k)
            imgs = fake_images(name, k)
            images[name, k] = imgs
            for j, lo in enumerate(range(0, N, 5)):
                save_npy(d / f"images-{j:05d}.npy", imgs[lo:lo + 5])
                save_npy(d / f"labels-{j:05d}.npy", labels[lo:lo + 5])
            save_json(d / "meta.json", {"experiment": name, "stage": k, "num_samples": N, "num_shards": 2, "nfe": 50})
        if not exp.weights_from:
            steps = np.arange(1, 21)
            log = pd.DataFrame({"images": steps * 1280, "step": steps * 10, "loss": 1.5 / np.sqrt(steps) + 0.1 * len(name),
                                "lr": 1e-3, "images_per_sec": 70.0})
            (root / P.train_dir(name)).mkdir(parents=True, exist_ok=True)
            log.to_csv(root / P.train_dir(name) / "train_log.csv", index=False)
    for name, v in (("dod", 30.0), ("sit", 25.0), ("dod_seed1", 31.0)):
        save_json(root / P.ARTIFACTS / "exp" / name / "snapshots.json",
                  [{"train_images": 64000, "FD_mnist": v}, {"train_images": 128000, "FD_mnist": v - 5}])
    save_json(root / P.probe_path("dod"), {"top1": 0.81, "bottleneck_dim": 1})
    return images


@pytest.fixture(scope="module")
def params():
    return parse_params(json.loads(json.dumps(RAW)))


@pytest.fixture(scope="module")
def built(params, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    images = make_tree(root, params)
    results = root / "results"
    stale = results / "tables" / "removed_group.csv"  # left by an earlier run: must disappear
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    names = P.report_figures(params) + EXTRA_FIGURES
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_mod, "report_figures", lambda p: names)
        readme = build_report(params, results, root, manifest=root / "artifacts" / "report" / "manifest.json",
                              provenance=root / "artifacts" / "report" / "provenance.json")
    return {"root": root, "results": results, "images": images, "readme": readme, "figures": names}


def test_manifest_hashes_every_file_written_and_nothing_stale(built):
    import hashlib
    import json

    results = built["results"]
    manifest = json.loads((built["root"] / "artifacts" / "report" / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()}
    assert set(manifest) == on_disk and "README.md" in manifest and "tables/removed_group.csv" not in manifest
    for rel, digest in manifest.items():
        assert hashlib.sha256((results / rel).read_bytes()).hexdigest() == digest, rel


def test_every_figure_is_a_png_and_a_pdf(built, params):
    results = built["results"]
    assert set(P.report_figures(params)) <= set(built["figures"])
    for name in built["figures"]:
        png = results / name
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) >= 150 and max(im.size) <= 6000, (name, im.size)
        pdf = png.with_suffix(".pdf")
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000, pdf
    written = {p.relative_to(results).as_posix() for p in (results / "figures").iterdir()}
    expected = set(built["figures"]) | {n.replace(".png", ".pdf") for n in built["figures"]}
    assert written == expected  # exactly the declared figures, nothing else


def test_main_table_rows_and_numbers(built):
    tables = built["results"] / "tables"
    for ext in ("md", "csv", "tex"):
        assert (tables / f"main.{ext}").stat().st_size > 0
    df = pd.read_csv(tables / "main.csv")
    assert list(zip(df["experiment"], df["stage"])) == [
        ("dod", 1), ("dod", 2), ("dod", 3), ("sit", 1), ("dod_seed1", 1), ("dod_seed1", 2), ("dod_seed1", 3)]
    for _, row in df.iterrows():
        assert row["FD_mnist"] == FD[row["experiment"]][row["stage"] - 1]
    assert "FID" not in df.columns  # FD_* is never relabelled
    sit = df[df["experiment"] == "sit"].iloc[0]
    assert math.isnan(sit["IS"]) and math.isnan(sit["msd_to_prior"])
    assert df.loc[(df["experiment"] == "dod") & (df["stage"] == 2), "msd_within_class"].item() == 0.3
    md = (tables / "main.md").read_text()
    assert "FD_mnist ↓" in md and "–" in md and "| sit | sit | 1 | 17.00 |" in md
    tex = (tables / "main.tex").read_text()
    assert r"\begin{tabular}" in tex and r"FD\_mnist" in tex and "--" in tex


def test_seeds_table_mean_and_std(built):
    df = pd.read_csv(built["results"] / "tables" / "main_seeds.csv")
    dod1 = df[(df["label"] == "dod") & (df["stage"] == 1)].iloc[0]
    assert dod1["n_seeds"] == 2
    assert dod1["FD_mnist_mean"] == pytest.approx(21.0)
    assert dod1["FD_mnist_std"] == pytest.approx(np.std([20.0, 22.0], ddof=1))
    sit = df[df["label"] == "sit"].iloc[0]
    assert sit["n_seeds"] == 1 and sit["FD_mnist_mean"] == 17.0 and math.isnan(sit["FD_mnist_std"])
    assert "21.00 ± 1.41" in (built["results"] / "tables" / "main_seeds.md").read_text()


def test_seed_summary_directly():
    rows = pd.DataFrame({"experiment": ["a", "b", "c"], "label": ["x", "x", "x"], "stage": [1, 1, 1],
                         "m": [1.0, 2.0, 6.0], "nfe": [50, 50, 50]})
    out = seed_summary(rows, ["m"], ["nfe"]).iloc[0]
    assert out["n_seeds"] == 3 and out["m_mean"] == pytest.approx(3.0)
    assert out["m_std"] == pytest.approx(np.std([1, 2, 6], ddof=1)) and out["nfe"] == 50


def test_group_tables(built):
    tables = built["results"] / "tables"
    for ext in ("md", "csv", "tex"):
        assert (tables / f"cfg_sweep.{ext}").exists()
    df = pd.read_csv(tables / "cfg_sweep.csv")
    assert list(zip(df["experiment"], df["stage"])) == [("dod_cfg2", 1), ("dod_cfg2", 2), ("dod_rfd", 1), ("dod_rfd", 2)]
    assert {"sample.cfg.scale", "sample.prior_source", "description"} <= set(df.columns)
    assert df.loc[df["experiment"] == "dod_cfg2", "cfg_scale"].tolist() == [2.0, 2.0]
    assert not (tables / "removed_group.csv").exists()
    probe = pd.read_csv(tables / "linear_probe.csv")
    assert probe["top1"].tolist() == [0.81]


def test_metrics_json_and_plot_data(built, params):
    # DVC's metrics: the headline metric per experiment and stage, nothing else (no settings, no
    # counts: those are params or in the tables).
    metrics = json.loads((built["results"] / "metrics.json").read_text())
    assert metrics["dod"] == {"stage1": {"FD_mnist": 20.0}, "stage2": {"FD_mnist": 15.0}, "stage3": {"FD_mnist": 14.5}}
    assert set(metrics) == set(params.experiments) and metrics["sit"] == {"stage1": {"FD_mnist": 17.0}}
    # dvc plots: one file per main experiment, so each is its own line
    main = ["dod", "sit", "dod_seed1"]
    files = sorted((built["results"] / "plots" / "metric_per_stage").glob("*.csv"))
    assert [f.stem for f in files] == sorted(main)
    dod = pd.read_csv(built["results"] / P.metric_plot_file("dod"))
    assert list(dod.columns) == ["stage", "metric", "metric_name"]
    assert dod["stage"].tolist() == [1, 2, 3] and dod["metric"].tolist() == FD["dod"]
    assert set(dod["metric_name"]) == {"FD_mnist"}


def test_readme_index(built, params):
    text = built["readme"].read_text()
    assert "## Findings" in text and "findings:begin" in text and "findings:end" in text
    # No date, commit or machine in results/ (they would change its bytes run to run): those go to
    # the run record outside it, while the README names what decided the bytes and who departs.
    assert "UTC" not in text and "from commit" not in text and "Test CPU" not in text
    assert "| torch | `9.9.9` |" in text and "| threads | `1` |" in text
    assert "`threads` = `2` in: sit/stage1 sample" in text
    record = json.loads((built["root"] / "artifacts" / "report" / "provenance.json").read_text())
    assert record["generated_utc"] and record["commit"] and record["jobs"]["sit/stage1"]["sample"]["cpu_model"] == "Test CPU"
    for table in ("main", "main_seeds", "cfg_sweep", "linear_probe"):
        assert f"tables/{table}.csv" in text
    for name in built["figures"]:
        assert f"({name})" in text and name.replace(".png", ".pdf") in text
    for name, exp in params.experiments.items():
        assert f"### {name}" in text and exp.description in text
    assert "scale: 2.0" in text and "prior_source: real" in text  # overrides behind each row
    findings_text = text.split("findings:begin")[1].split("findings:end")[0]
    assert "dod: stage 2 improves on stage 1 (lower FD_mnist)**: holds" in findings_text
    assert "21.00 ± 1.41 (n=2 seeds)" in findings_text


def test_grid_shows_same_indices_across_stages(built, params):
    root = built["root"]
    exp = params.experiment("dod")
    n = exp.report.grid_samples
    stages = [load_samples(root, "dod", k, n)[0] for k in (1, 2, 3)]
    for k, imgs in enumerate(stages, 1):
        assert np.array_equal(imgs, built["images"]["dod", k][:n])  # read across the two shards
    grid, layout = compose_grid(stages, exp.report.grid_columns)
    scale = layout.cell_h // RES
    assert scale >= 2  # 16x16 digits are upscaled
    with Image.open(built["results"] / "figures" / "samples_dod.png") as im:
        png = np.asarray(im.convert("RGB"))
    top, left = grid_origin(layout)
    assert np.array_equal(png[top:top + layout.height, left:left + layout.width], grid)  # drawn 1:1
    # Sample 5 (second row, second column) in every stage block is input sample 5 of that stage.
    for b, k in enumerate((1, 2, 3)):
        y0, x0, y1, x1 = layout.cell_box(b, 5)
        cell = png[top + y0:top + y1, left + x0:left + x1]
        expected = built["images"]["dod", k][5].repeat(scale, 0).repeat(scale, 1)
        assert np.array_equal(cell, expected)


def test_findings_holds_and_does_not_hold():
    def rows(s1: float, s2: float) -> pd.DataFrame:
        return pd.DataFrame({
            "experiment": ["dod", "dod", "sit"], "label": ["dod", "dod", "sit"], "stage": [1, 2, 1],
            "metric": [s1, s2, 16.0], "metric_name": "FD_mnist", "lem_enabled": [True, True, False],
            "stages_count": [2, 2, 1], "train_images": 1000,
        })

    def stage2_claim(items):
        (f,) = [f for f in items if "stage 2 improves on stage 1" in f.claim]
        return f

    better = stage2_claim(findings(rows(20.0, 15.0)))
    assert better.holds is True and "holds" in better.text() and "does not hold" not in better.text()
    assert "20.00" in better.text() and "15.00" in better.text()
    worse = stage2_claim(findings(rows(15.0, 20.0)))
    assert worse.holds is False and "does not hold at this scale" in worse.text()
    base = [f for f in findings(rows(20.0, 15.0)) if "beats sit" in f.claim][0]
    assert base.holds is True and "stage 2" in base.evidence  # best DoD stage vs SiT stage 1
    unequal = rows(20.0, 15.0).assign(train_images=[1000, 1000, 2000])
    base = [f for f in findings(unequal) if "beats sit" in f.claim][0]
    assert base.holds is None and "Not comparable" in base.evidence


def test_equal_compute_finding_compares_final_stages():
    def rows(two_stages: float, one_stage: float) -> pd.DataFrame:
        return pd.DataFrame({
            "experiment": ["d2", "d2", "s2x"], "label": ["DoD 2xN", "DoD 2xN", "SiT 2N"], "stage": [1, 2, 1],
            "group": "equal_compute", "metric": [30.0, two_stages, one_stage], "metric_name": "FD_mnist",
            "lem_enabled": [True, True, False], "stages_count": [2, 2, 1], "train_images": [100, 100, 200],
            "sampling_gflops_per_image": [1.0, 2.0, 1.0], "prior_source": "generated", "cfg_scale": 1.0,
        })

    (win,) = group_findings(rows(8.0, 9.0))
    assert win.claim == "Equal compute: DoD 2xN beats SiT 2N" and win.holds is True
    assert "8.00" in win.evidence and "9.00" in win.evidence and "200 training images" in win.evidence
    (loss,) = group_findings(rows(8.0, 4.0))  # stage 1 (30.0) must not be the one compared
    assert loss.holds is False and "30.00" not in loss.evidence


def test_cfg_finding_judges_real_priors_at_the_largest_scale():
    def rows(real_curve: list[float]) -> pd.DataFrame:
        scales = [1.0, 2.0, 5.0]
        gen = [9.0, 8.0, 11.0]
        return pd.DataFrame({
            "experiment": [f"c{i}" for i in range(6)], "label": [f"x{i}" for i in range(6)], "stage": 2,
            "group": "cfg_sweep", "metric": gen + real_curve, "metric_name": "FD_mnist",
            "lem_enabled": True, "stages_count": 2, "cfg_scale": scales * 2,
            "prior_source": ["generated"] * 3 + ["real"] * 3,
        })

    (peaked,) = group_findings(rows([7.0, 6.0, 9.0]))
    assert peaked.holds is False and "real priors: s=1: 7.00, s=2: 6.00, s=5: 9.00 (best at s=2)" in peaked.evidence
    (rising,) = group_findings(rows([7.0, 6.0, 5.0]))
    assert rising.holds is True  # judged on real priors even though generated priors peak at s=2


def test_bottleneck_finding_follows_the_copy_ratio():
    def rows(msd_to_prior: list[float]) -> pd.DataFrame:
        return pd.DataFrame({
            "experiment": ["a", "b", "c"], "label": ["d_b=1", "d_b=4", "d_b=16"], "stage": 2,
            "group": "bottleneck", "metric": [8.0, 9.0, 10.0], "metric_name": "FD_mnist", "lem_enabled": True,
            "stages_count": 2, "bottleneck_dim": [1, 4, 16], "msd_to_prior": msd_to_prior, "msd_within_class": 0.3,
        })

    (wider_copies,) = group_findings(rows([0.2, 0.05, 0.001]))
    assert wider_copies.holds is True and "copies (ratio < 0.01) at d_b=16" in wider_copies.evidence
    (not_monotone,) = group_findings(rows([0.05, 0.2, 0.1]))
    assert not_monotone.holds is False and "copies" not in not_monotone.evidence


def test_finetune_finding_compares_the_final_stages():
    def rows(tuned_final: float) -> pd.DataFrame:
        return pd.DataFrame({
            "experiment": ["ft"] * 3 + ["sh"] * 3, "label": ["tuned"] * 3 + ["shared"] * 3, "stage": [1, 2, 3] * 2,
            "group": "finetune", "metric": [9.0, 8.0, tuned_final, 9.0, 8.5, 8.6], "metric_name": "FD_mnist",
            "lem_enabled": True, "stages_count": 3, "finetuned_stages": [2] * 3 + [0] * 3,
            "train_images": [100, 120, 140, 100, 100, 100],
        })

    (better,) = group_findings(rows(7.0))
    assert better.holds is True and better.claim == "tuned beats the shared at stage 3"
    assert "7.00" in better.evidence and "8.60" in better.evidence and "140 training images" in better.evidence
    (worse,) = group_findings(rows(9.5))
    assert worse.holds is False


def test_missing_metrics_file_is_named(built, params, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(built["root"] / "artifacts", root / "artifacts")
    (root / P.metrics_path("dod", 2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"artifacts/exp/dod/metrics/stage2\.json"):
        build_report(params, tmp_path / "results", root)
    assert not (tmp_path / "results").exists()  # nothing written before the inputs are complete


def test_unknown_figure_raises(params, built, tmp_path, monkeypatch):
    with pytest.raises(UnknownFigureError, match="no figure writer.*nope"):
        writer_for("figures/nope.png")
    monkeypatch.setattr(report_mod, "report_figures", lambda p: ["figures/metric_per_stage.png", "figures/nope.png"])
    with pytest.raises(UnknownFigureError):
        build_report(params, tmp_path / "results", built["root"])
    assert not (tmp_path / "results").exists()


def test_main_table_order_follows_report_main_table(built):
    raw = json.loads(json.dumps(RAW))
    raw["report"]["main_table"] = ["sit", "dod"]
    data = collect(parse_params(raw), built["root"])
    df = main_table(data).data
    assert list(dict.fromkeys(df["experiment"])) == ["sit", "dod"]


def test_git_describe_ignores_the_reports_own_output(tmp_path):
    import subprocess

    from dodlib.report.index import git_describe

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "README.md").write_text("old\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    (tmp_path / "results" / "README.md").write_text("new\n")
    assert "uncommitted" not in git_describe(tmp_path)
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert "uncommitted" in git_describe(tmp_path)
