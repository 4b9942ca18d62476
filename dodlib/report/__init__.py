"""The report stage: tables, figures and an index into results/, regenerated from artifacts/.

`build_report(params, results_dir, artifacts_root)` reads every input first (a missing one fails
before anything is written), then writes:

- tables/<name>.{md,csv,tex}: main, main_seeds, one per other experiment group (+ <group>_seeds
  when a group holds seeds), linear_probe when probe.json files exist;
- exactly the figures of `pipeline.report_figures(params)`, each as PNG and PDF;
- metrics.json (the headline metric per experiment and stage: `dvc metrics show`, `dvc exp show`)
  and plots/metric_per_stage/<experiment>.csv (`dvc plots`);
- README.md: the index, with the generated findings, every experiment's overrides and the
  provenance that decided the bytes (no date, commit or machine: the same inputs give the same
  bytes, so a fresh clone that reruns the pipeline leaves `git status` clean);
- when asked, the run's record (date, commit, machines) and last a manifest (sha256 of every file
  written), both outside results/: the manifest is Snakemake's marker of a finished report, which
  a fresh clone with committed results/ does not have.

Files left in tables/, figures/ or plots/ by earlier runs (e.g. of a removed experiment) are
deleted, so results/ always describes exactly the current params.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config import Params
from ..io import save_json
from ..pipeline import report_figures
from .collect import ReportData, collect
from .figures import write_figures, write_plot_data, writer_for
from .findings import findings, group_findings
from .index import git_describe, readme, write_readme
from .provenance import readme_section, stage_records, write_run_record
from .tables import metric_phrase, build_tables, write_metrics_json

log = logging.getLogger(__name__)

OWNED_DIRS = ("tables", "figures", "plots")

__all__ = ["build_report", "collect", "ReportData"]


def build_report(params: Params, results_dir: str | Path, artifacts_root: str | Path = Path("."),
                 manifest: str | Path | None = None, provenance: str | Path | None = None) -> Path:
    """Write the whole report into `results_dir`; returns the path of its README.md."""
    results_dir, root = Path(results_dir), Path(artifacts_root)
    figure_names = report_figures(params)
    for name in figure_names:
        writer_for(name)  # an undrawable figure fails before any output is touched
    data = collect(params, root)

    written: list[Path] = []
    tables = build_tables(data)
    for table in tables:
        written += table.write(results_dir / "tables")
    figures = write_figures(data, results_dir, figure_names)
    for name, _ in figures:
        written += [results_dir / name, (results_dir / name).with_suffix(".pdf")]
    written.append(write_metrics_json(data, results_dir / "metrics.json"))
    plot_files = write_plot_data(data, results_dir)
    written += plot_files
    _remove_stale(results_dir, written)

    records = stage_records(params, root)
    text = readme(
        params, tables, figures, findings(data.rows(data.main_experiments)) + group_findings(data.metrics), metric_phrase(data),
        readme_section(records, str(provenance or "artifacts/report/<set>/provenance.json")),
        extra_files=["metrics.json"] + [p.relative_to(results_dir).as_posix() for p in plot_files],
    )
    path = write_readme(results_dir / "README.md", text)
    if provenance is not None:
        write_run_record(Path(provenance), params, records, git_describe(root))
    if manifest is not None:
        write_manifest(Path(manifest), results_dir, written + [path])
    log.info("report: %d tables, %d figures in %s", len(tables), len(figures), results_dir)
    return path


def write_manifest(path: Path, results_dir: Path, written: list[Path]) -> None:
    files = {str(p.relative_to(results_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in written}
    save_json(path, {"results_dir": str(results_dir), "files": dict(sorted(files.items()))})


def _remove_stale(results_dir: Path, written: list[Path]) -> None:
    keep = {p.resolve() for p in written}
    for sub in OWNED_DIRS:
        directory = results_dir / sub
        if not directory.is_dir():
            continue
        for path in directory.rglob("*"):
            if path.is_file() and path.resolve() not in keep:
                log.info("report: removing stale %s", path)
                path.unlink()
