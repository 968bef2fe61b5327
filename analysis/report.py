"""The report: the paper's tables and figures from a root of run directories (``hpcnoise report RUNS_DIR
[--out DIR]``, hpcnoise.cli.report).

Writes, under DIR (default RUNS_DIR/report):
    report.md               the verdict (does any setting close the SB-vs-LB gap?), the gap-closure table,
                            tables as Markdown (the paper's tables: the rows we ran, beside the published
                            numbers; the rows nobody ran in a reference section), figures embedded by relative
                            path, diverged runs (epoch, message), skipped runs with reasons
    figures/*.png           Figs. 3a-d and 4, accuracy against lambda and against tau (those with data)
    tables/*.csv            every table in tidy long form (closure.csv: ``analysis.closure``), plus runs.csv
                            (one row per finished run), diverged.csv (one row per diverged run) and skipped.csv
Means are over finished runs; every table counts each cell's diverged runs beside its mean ("k diverged").
Every file is written to a temporary name and renamed into place, report.md last. Everything is computed
before anything is written, so bad input (RUNS_DIR missing, not a directory, no finished runs, DIR not
writable) gives one line on stderr, exit status 2, and nothing written.

A root holding manifest.json is a tuned study (``hpcnoise study --tune``, docs/tuning.md): its report.md is
the tuned comparison (``analysis.tuned_report``: settings selected on validation, test accuracy of the
reruns only, Holm-corrected declared comparisons, best-of-k), with tables/tuned_*.csv, best_of_k.csv and
figures/best_of_k.png; the trials' test metrics are read nowhere.
"""

from __future__ import annotations

from pathlib import Path

from analysis import figures, tuned_report
from analysis.gap import gap_summary
from analysis.load import Loaded, load
from analysis.sections import SECTIONS, TUNED_TAIL, csv_bytes
from analysis.tuned import TunedStudy, read_study
from hpcnoise.errors import ConfigError
from hpcnoise.files import unwritable, write_bytes_atomic, write_files_atomic
from hpcnoise.tuning import MANIFEST

__all__ = ["REPORT_NAME", "ReportError", "build", "build_tuned", "gap_summary", "make", "write"]

REPORT_NAME = "report.md"
_CSV_NAMES = (
    "closure",
    "table1",
    "table2",
    "table3",
    "results",
    "throughput",
    "sharpness",
    "runs",
    "diverged",
    "skipped",
)


class ReportError(ConfigError):
    """Bad input to the report (one line on stderr, exit 2)."""


def _finish(md: list[str], loaded: Loaded, files: dict[str, bytes]) -> dict[str, bytes]:
    """runs.csv, the Files section and report.md added to ``files``."""
    files["tables/runs.csv"] = csv_bytes(loaded.runs)
    csvs = ", ".join(f"[{Path(p).name}]({p})" for p in files if p.endswith(".csv"))
    md += ["", "## Files", "", f"CSV (tidy long form) of every table: {csvs}.", ""]
    files[REPORT_NAME] = "\n".join(md).encode()
    return files


def build(loaded: Loaded) -> dict[str, bytes]:
    """Every output file (path relative to the report directory -> content), report.md last."""
    files: dict[str, bytes] = {}
    md: list[str] = []
    for section in SECTIONS:
        md += section(loaded, files)
    return _finish(md, loaded, files)


def build_tuned(study: TunedStudy) -> dict[str, bytes]:
    """The tuned study's report (``analysis.tuned_report``), then its reruns' diverged and skipped runs."""
    files: dict[str, bytes] = {}
    md = tuned_report.header(study) + tuned_report.sections(study, files)
    for section in TUNED_TAIL:
        md += section(study.reruns, files)
    return _finish(md, study.reruns, files)


def write(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` under ``out`` (report.md last) and remove our own outputs that this report no longer has."""
    for sub in ("figures", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_files_atomic({out / rel: data for rel, data in files.items() if rel != REPORT_NAME})
    owned = [f"figures/{s.name}" for s in figures.ALL_FIGURES] + [f"figures/{tuned_report.FIGURE}"]
    owned += [f"tables/{n}.csv" for n in (*_CSV_NAMES, *tuned_report.CSV_NAMES)]
    for rel in owned:
        if rel not in files:
            (out / rel).unlink(missing_ok=True)
    write_bytes_atomic(out / REPORT_NAME, files[REPORT_NAME])


def check_out(out: Path) -> None:
    problem = unwritable(out)
    if problem is not None:
        raise ReportError(f"cannot write the report to {out}: {problem[1]}")


def check_root(root: Path) -> None:
    if not root.exists():
        raise ReportError(f"runs directory {root} does not exist")
    if not root.is_dir():
        raise ReportError(f"runs directory {root} is not a directory")


def load_checked(root: Path) -> Loaded:
    loaded = load(root)
    if loaded.runs.empty:
        if loaded.found == 0:
            raise ReportError(f"no run directories (directories with config.json) under {root}")
        why = []
        if not loaded.diverged.empty:
            names = ", ".join(loaded.diverged["run_id"].astype(str).head(3))
            more = ", ..." if len(loaded.diverged) > 3 else ""
            why.append(f"{len(loaded.diverged)} diverged: {names}{more}")
        runs_skipped = [s for s in loaded.skipped if s.what == "run"]
        if runs_skipped:
            reasons = "; ".join(f"{s.run}: {s.reason}" for s in runs_skipped[:3])
            more = f"; and {len(runs_skipped) - 3} more" if len(runs_skipped) > 3 else ""
            why.append(f"{len(runs_skipped)} run directories skipped: {reasons}{more}")
        raise ReportError(f"no finished runs under {root} ({'; '.join(why)})")
    return loaded


def load_tuned(root: Path) -> TunedStudy:
    """The tuned study at ``root`` (it holds manifest.json), with at least one finished rerun."""
    try:
        study = read_study(root)
    except ConfigError as e:
        raise ReportError(str(e)) from e
    if study.runs.empty:
        raise ReportError(
            f"no finished reruns of the selected settings under {root / 'reruns'} ({len(study.planned)} planned, "
            f"{len(study.gone)} diverged): the tuned report shows test accuracy of reruns only"
        )
    return study


def make(root: Path, out: Path) -> Loaded:
    """The report of the runs under ``root``, written to ``out``; ReportError (or OSError) before anything is
    written when the input is bad. A root holding manifest.json is a tuned study (``hpcnoise study --tune``):
    its report is the tuned comparison's (``build_tuned``), and the Loaded returned is its reruns'."""
    check_root(root)
    check_out(out)
    if (root / MANIFEST).exists():
        study = load_tuned(root)
        write(out, build_tuned(study))
        return study.reruns
    loaded = load_checked(root)
    write(out, build(loaded))
    return loaded
