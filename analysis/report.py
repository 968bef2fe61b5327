"""``hpcnoise report RUNS_DIR [--out DIR]``: the paper's tables and figures from a root of run directories.

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
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from analysis import closure, figures, tables
from analysis.load import Loaded, load
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import unwritable, write_bytes_atomic, write_files_atomic

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


# --- the generalisation gap in words ---------------------------------------------------------------------------
def _errors(runs: pd.DataFrame) -> list[float]:
    """Final test error in percent, one value per seed."""
    return list(100.0 * tables.per_seed(runs, "final_test_error"))


def _pick(runs: pd.DataFrame, regime: str, gbn: bool | None) -> pd.DataFrame:
    """Runs of ``regime``, preferring those with ghost batch norm as ``gbn`` says (any if none match)."""
    sel = runs[runs["regime"] == regime]
    if gbn is not None and (sel["gbn"] == gbn).any():
        return sel[sel["gbn"] == gbn]
    if (sel["gbn"]).any():
        return sel[sel["gbn"]]
    return sel


def _gap_sentence(dataset: str, network: str, cell: pd.DataFrame) -> str | None:
    sb = cell[cell["regime"] == "sb"]
    lb = _pick(cell, "lb", True)  # the paper's baseline is LB with ghost batch norm
    if sb.empty or lb.empty:
        return None
    e_sb, e_lb = _errors(sb), _errors(lb)
    lb_name = lb["label"].iloc[0]
    gap = tables.welch_diff(e_lb, e_sb)
    text = (
        f"{dataset}/{network}: {lb_name} {tables.mean_ci(e_lb).mean:.2f}% vs SB "
        f"{tables.mean_ci(e_sb).mean:.2f}% test error ({len(e_lb)} and {len(e_sb)} seeds): "
    )
    significant = False
    if gap.half is None:
        text += f"gap {gap.mean:.2f} points, but too few seeds for a confidence interval (2 or more per regime needed)"
    elif gap.low > 0:
        significant = True
        text += f"gap {gap.mean:.2f} ± {gap.half:.2f} points"
    elif gap.high < 0:
        text += f"no generalisation gap: LB is {-gap.mean:.2f} ± {gap.half:.2f} points better than SB"
    else:
        text += f"no clear gap: {gap.mean:.2f} ± {gap.half:.2f} points, an interval that includes 0"
    diag = _pick(_paper_noise(cell), "diagf", bool(lb["gbn"].iloc[0]))
    if diag.empty:
        return text + "; no DiagF runs at the paper's noise (lambda = 1) to test its closure."
    e_d = _errors(diag)
    closed = tables.welch_diff(e_lb, e_d)  # LB error - DiagF error: positive = DiagF better
    d_name, d_err = diag["label"].iloc[0], tables.mean_ci(e_d).mean
    pm = f" ± {closed.half:.2f}" if closed.half is not None else ""
    unsure = closed.half is not None and closed.low <= 0 <= closed.high
    text += f"; {d_name} ({d_err:.2f}%, {len(e_d)} seeds) is {abs(closed.mean):.2f}{pm} points "
    if closed.mean <= 0:
        return text + "worse than LB" + (", so it does not close the gap." if significant else ".")
    text += "better than LB"
    if significant:
        text += f", closing {100.0 * closed.mean / gap.mean:.0f}% of the gap"
    return text + (" (an interval that includes 0)." if unsure else ".")


def _paper_noise(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs at the paper's noise: multiplier lambda = 1, not calibrated (other multipliers: the closure)."""
    if runs.empty or "noise_multiplier" not in runs:
        return runs
    calibration = runs["noise_calibration"] if "noise_calibration" in runs else pd.Series("paper", index=runs.index)
    return runs[(runs["noise_multiplier"].fillna(1.0) == 1.0) & (calibration.fillna("paper") == "paper")]


def _linear(runs: pd.DataFrame) -> pd.DataFrame:
    """SB and the linear-scaling runs: Table 1's setting."""
    return runs[(runs["regime"] == "sb") | (runs["lr_scaling"] == "linear")] if not runs.empty else runs


def _diverged_note(diverged: pd.DataFrame, pairs: set[tuple[str, str]]) -> str:
    """The sentence naming the diverged SB, LB and DiagF runs of the (dataset, network) pairs discussed."""
    discussed = pd.Series([(d, m) in pairs for d, m in zip(diverged["dataset"], diverged["model"])], dtype=bool)
    gone = diverged[discussed.to_numpy() & diverged["regime"].isin(["sb", "lb", "diagf"]).to_numpy()]
    if gone.empty:
        return ""
    counts = gone.groupby(["dataset", "model", "label"], sort=True).size()
    parts = [f"{n} {lab} on {d}/{m}" for (d, m, lab), n in counts.items()]
    return f" Not in these means: {len(gone)} diverged run{'s' if len(gone) != 1 else ''} ({', '.join(parts)})."


def gap_summary(runs_df: pd.DataFrame, diverged: pd.DataFrame | None = None) -> str:
    """One paragraph, with numbers, on whether the SB-vs-LB generalisation gap appeared and DiagF closed it.

    Uses linear-scaling runs (Table 1's setting) and DiagF at the paper's noise (lambda = 1); test error in
    percent, mean over seeds; intervals are 95% Welch t intervals of differences of means. Says so plainly
    when there is no gap or too few seeds, and names the diverged runs (``Loaded.diverged``) of the
    (dataset, network) pairs it discusses, which are not in its means.
    """
    if runs_df.empty:
        return "No finished runs, so the generalisation gap cannot be assessed."
    runs = _linear(runs_df)
    sentences, pairs = [], set()
    for (dataset, network), cell in runs.groupby(["dataset", "model"], sort=True):
        sentence = _gap_sentence(dataset, network, cell)
        if sentence is not None:
            sentences.append(sentence)
            pairs.add((dataset, network))
    if not sentences:
        return (
            "No (dataset, network) has both SB and LB runs with linear learning-rate scaling, so the "
            "generalisation gap cannot be assessed."
        )
    note = _diverged_note(_linear(diverged), pairs) if diverged is not None and not diverged.empty else ""
    return (
        "Generalisation gap (final test error, mean over seeds; ± is a 95% Welch t interval of the difference). "
        + " ".join(sentences)
        + note
    )


# --- building and writing -------------------------------------------------------------------------------------
_ACCURACY_NOTE = (
    "Accuracy is 100 (1 - final test error). Each of our cells: mean ± half-width of the 95% Student-t "
    "confidence interval over seeds (t_{0.975, n-1} sd / sqrt(n)), with n = seeds (runs that repeat a "
    "seed are averaged first; the run count is shown when it differs). One seed: no interval. Empty: no "
    'runs. "(paper)": the published number (Tables 1-3 of the paper; * marks a transcription note). '
    '"k diverged": runs of the cell whose loss became non-finite; they are not in the mean (n counts the '
    'seeds of finished runs) and are listed under "Diverged runs"; "none finished": every run diverged.'
)
_THROUGHPUT_NOTE = (
    "Samples per second over all workers and per worker: the mean over a run's epochs after the first "
    "(start-up), then over runs. Scaling efficiency: per-worker throughput relative to 1 worker of the "
    "same dataset, model, regime, device and global batch."
)
_SHARPNESS_NOTE = (
    "Maximum Hessian eigenvalue of the final model (from sharpness.json), mean ± 95% t interval "
    "over seeds; temperature: the fitted softmax temperature, mean."
)

# A section of the report: its Markdown lines; it adds the files it has (tables, figures) to the mapping.
_Section = Callable[[Loaded, dict[str, bytes]], list[str]]


def _csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def _header(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """Title, what was found and used, and the source commits."""
    runs = loaded.runs
    n_skipped = sum(s.what == "run" for s in loaded.skipped)
    n_diverged = len(loaded.diverged)
    diverged = f"{n_diverged} diverged (not in the means; see Diverged runs), " if n_diverged else ""
    gits = sorted({str(g) for g in runs["git"].dropna()}) if "git" in runs else []
    return [
        "# hpcnoise report",
        "",
        (
            f"Runs directory: `{loaded.root}`. {len(runs)} finished run{'s' if len(runs) != 1 else ''} used, "
            f"{diverged}{n_skipped} skipped, of {loaded.found} run directories found; "
            f"{runs['seed'].nunique() if len(runs) else 0} distinct seeds. "
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."
        ),
        "",
        f"Source commits of the runs: {', '.join(f'`{g}`' for g in gits) or 'unknown'}.",
        "",
    ]


def _verdict_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The answer, in words computed from the runs: does any setting close the gap, and which best."""
    table, _ = closure.closure_table(loaded.runs, loaded.diverged)
    return [
        "## Verdict",
        "",
        closure.verdict(table),
        "",
        "Computed from the finished runs (test accuracy, mean over seeds); closures and their 95% delta-method "
        "intervals as in Gap closure below, gaps (SB - LB) with 95% Welch t intervals.",
        "",
    ]


def _closure_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """Every variant's closure of the SB-vs-LB gap, with its interval; the cells left out and why."""
    table, left_out = closure.closure_table(loaded.runs, loaded.diverged)
    files["tables/closure.csv"] = _csv(table)
    md = ["## Gap closure", "", closure.METHOD, ""]
    md += [closure.closure_markdown(table) if not table.empty else "No (dataset, network) has both baselines.", ""]
    if left_out:
        md += ["Left out (no baseline to measure a closure against):", ""]
        md += [f"- {note}." for note in left_out] + [""]
    pooled = [
        f"- {r['dataset']}/{r['network']} {r['label']}: {r['pooled']}." for _, r in table.iterrows() if r["pooled"]
    ]
    return md + pooled + ([""] if pooled else [])


def _gap_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    return ["## Generalisation gap", "", gap_summary(loaded.runs, loaded.diverged), "", _ACCURACY_NOTE, ""]


def _table_notes(long: pd.DataFrame) -> list[str]:
    notes = []
    for _, r in long.iterrows():
        if r["published_note"]:
            notes.append(f"\\* paper, {r['dataset']}/{r['network']} {r['title']}: {r['published_note']}.")
        if r["pooled"]:
            notes.append(f"Ours, {r['dataset']}/{r['network']} {r['title']}: {r['pooled']}.")
    return notes


_REFERENCE_TITLE = "Published numbers not reproduced here"
_REFERENCE_LINK = "#published-numbers-not-reproduced-here"


def _paper_tables(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """Tables 1-3, the rows with a measured cell: ours beside the paper's, with transcription and pooling notes."""
    md: list[str] = []
    for table in tables.TABLES.values():
        long = tables.paper_table(loaded.runs, table, loaded.diverged)
        files[f"tables/{table.name}.csv"] = _csv(long)
        measured, reference = tables.split_measured(long)
        md += [f"## {table.title}", ""]
        n_ref = reference[["dataset", "network"]].drop_duplicates().shape[0]
        elsewhere = f"[{_REFERENCE_TITLE}]({_REFERENCE_LINK})"
        if measured.empty:
            md += [f"No run fills a row of this table; the paper's {n_ref} rows are under {elsewhere}.", ""]
            continue
        md += [tables.paper_table_markdown(measured, table), ""]
        if n_ref:
            md += [f"The paper's {n_ref} other row{'s' if n_ref != 1 else ''} (not run here): {elsewhere}.", ""]
        notes = _table_notes(measured)
        md += [f"- {n}" for n in notes] + ([""] if notes else [])
    return md


def _reference_tables(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The rows of the paper's tables that no run fills: the published numbers alone, for reference."""
    md = [
        f"## {_REFERENCE_TITLE}",
        "",
        "The rows of the paper's Tables 1-3 that none of our runs fills, with the published numbers. The "
        "columns are those of the tables above, so that they line up; ours are blank because nothing was run.",
        "",
    ]
    for table in tables.TABLES.values():
        _, reference = tables.split_measured(tables.paper_table(loaded.runs, table, loaded.diverged))
        md += [f"### {table.title}", ""]
        if reference.empty:
            md += ["Every row of this table has a run (see above).", ""]
            continue
        md += [tables.paper_table_markdown(reference, table), ""]
        notes = _table_notes(reference)
        md += [f"- {n}" for n in notes] + ([""] if notes else [])
    return md


def _results_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    results = tables.results_table(loaded.runs, loaded.diverged)
    files["tables/results.csv"] = _csv(results)
    pooled = [
        f"- {r['dataset']}/{r['network']} {r['regime']}: {r['pooled']}." for _, r in results.iterrows() if r["pooled"]
    ]
    return [
        "## Every regime variant",
        "",
        "All (dataset, network, regime) combinations present (finished or diverged), including those outside "
        "the paper's tables.",
        "",
        tables.results_markdown(results),
        "",
        *pooled,
        "",
    ]


def _throughput_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    md = ["## Throughput", "", _THROUGHPUT_NOTE, ""]
    throughput = tables.throughput_table(loaded.runs, loaded.epochs, loaded.diverged)
    if throughput.empty:
        return md + ["No throughput data (no samples_per_s in metrics.jsonl).", ""]
    files["tables/throughput.csv"] = _csv(throughput)
    return md + [tables.throughput_markdown(throughput), ""]


def _sharpness_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    md = ["## Sharpness", ""]
    sharp = tables.sharpness_table(loaded.runs, loaded.diverged)
    if sharp.empty:
        return md + ["No run has sharpness.json (`hpcnoise sharpness`), so there is no sharpness table.", ""]
    files["tables/sharpness.csv"] = _csv(sharp)
    return md + [_SHARPNESS_NOTE, "", tables.sharpness_markdown(sharp), ""]


def _figures_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """Every figure: embedded by relative path when drawn, else why not."""
    md = ["## Figures", ""]
    drawn, no_data = figures.render(loaded, figures.ALL_FIGURES)
    for spec in figures.ALL_FIGURES:
        md += [f"### {spec.title}", ""]
        if spec.name not in drawn:
            md += [f"Not drawn: {no_data[spec.name]}.", ""]
            continue
        files[f"figures/{spec.name}"] = drawn[spec.name]
        caption = spec.caption + (" Bands and bars: 95% t interval over seeds." if spec.intervals else "")
        md += [f"![{spec.title}](figures/{spec.name})", "", caption, ""]
    return md


_DIVERGED_CSV_COLUMNS = [
    "run_id",
    "dataset",
    "model",
    "label",
    "lr_scaling",
    "seed",
    "world_size",
    "diverged_epoch",
    "diverged_step",
    "diverged_message",
    "last_good_epoch",
    "last_good_test_error",
    "last_good_train_error",
    "path",
]


def _diverged_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The diverged runs: which, where their loss became non-finite, and the last good epoch."""
    div = loaded.diverged.sort_values("run_id") if not loaded.diverged.empty else loaded.diverged
    files["tables/diverged.csv"] = _csv(div[[c for c in _DIVERGED_CSV_COLUMNS if c in div]])
    md = ["## Diverged runs", ""]
    if div.empty:
        return md + ["No run diverged.", ""]
    md += [
        f"{len(div)} run{'s' if len(div) != 1 else ''} stopped because the loss became non-finite "
        "(RUN_DIR/diverged.json). They are not retried and not in any mean; each table counts them in their "
        "cell.",
        "",
    ]

    def last_good(r: pd.Series) -> str:
        if not pd.notna(r["last_good_epoch"]):
            return "none (first epoch)"
        err = r["last_good_test_error"]
        return f"epoch {int(r['last_good_epoch'])}" + (f", {100.0 * err:.2f}% test error" if pd.notna(err) else "")

    rows = [
        {
            "Run": f"`{r['run_id']}`",
            "Dataset": r["dataset"],
            "Network": r["model"],
            "Regime": r["label"],
            "Seed": r["seed"],
            "Epoch": r["diverged_epoch"],
            "Step": "" if r["diverged_step"] is None or pd.isna(r["diverged_step"]) else int(r["diverged_step"]),
            "Message": r["diverged_message"],
            "Last good": last_good(r),
        }
        for _, r in div.iterrows()
    ]
    return md + [tables.markdown(pd.DataFrame(rows)), ""]


def _skipped_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The runs (and optional files of kept runs) that were skipped, and why."""
    skipped_df = pd.DataFrame([vars(s) for s in loaded.skipped], columns=["run", "what", "reason"])
    files["tables/skipped.csv"] = _csv(skipped_df)
    if not loaded.skipped:
        return ["## Skipped", "", "Nothing was skipped."]
    return ["## Skipped", ""] + [
        f"- `{s.run}`" + (f" ({s.what} ignored, run kept)" if s.what != "run" else "") + f": {s.reason}"
        for s in loaded.skipped
    ]


_SECTIONS: tuple[_Section, ...] = (
    _header,
    _verdict_section,
    _closure_section,
    _gap_section,
    _paper_tables,
    _results_section,
    _throughput_section,
    _sharpness_section,
    _figures_section,
    _reference_tables,
    _diverged_section,
    _skipped_section,
)


def build(loaded: Loaded) -> dict[str, bytes]:
    """Every output file (path relative to the report directory -> content), report.md last."""
    files: dict[str, bytes] = {}
    md: list[str] = []
    for section in _SECTIONS:
        md += section(loaded, files)
    files["tables/runs.csv"] = _csv(loaded.runs)
    csvs = ", ".join(f"[{Path(p).name}]({p})" for p in files if p.endswith(".csv"))
    md += ["", "## Files", "", f"CSV (tidy long form) of every table: {csvs}.", ""]
    files[REPORT_NAME] = "\n".join(md).encode()
    return files


def write(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` under ``out`` (report.md last) and remove our own outputs that this report no longer has."""
    for sub in ("figures", "tables"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_files_atomic({out / rel: data for rel, data in files.items() if rel != REPORT_NAME})
    owned = [f"figures/{s.name}" for s in figures.ALL_FIGURES] + [f"tables/{n}.csv" for n in _CSV_NAMES]
    for rel in owned:
        if rel not in files:
            (out / rel).unlink(missing_ok=True)
    write_bytes_atomic(out / REPORT_NAME, files[REPORT_NAME])


def _check_out(out: Path) -> None:
    problem = unwritable(out)
    if problem is not None:
        raise ReportError(f"cannot write the report to {out}: {problem[1]}")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise ReportError(f"runs directory {root} does not exist")
    if not root.is_dir():
        raise ReportError(f"runs directory {root} is not a directory")


def _load_checked(root: Path) -> Loaded:
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


def main(argv: list[str] | None = None) -> int:
    """`hpcnoise report RUNS_DIR [--out DIR]`: write the report; bad input: one line on stderr, exit 2."""
    description = __doc__.splitlines()[0] if __doc__ else None
    parser = Parser(prog="hpcnoise report", description=description, error_type=ReportError)
    parser.add_argument("runs_dir", type=Path, help="root of run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUNS_DIR/report)")
    try:
        args = parser.parse_args(argv)
        out = args.out if args.out is not None else args.runs_dir / "report"
        _check_root(args.runs_dir)
        _check_out(out)
        loaded = _load_checked(args.runs_dir)
        files = build(loaded)
        write(out, files)
    except (ReportError, OSError) as exc:
        print(f"hpcnoise report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    n_skipped = sum(s.what == "run" for s in loaded.skipped)
    n_diverged = f"{len(loaded.diverged)} diverged, " if len(loaded.diverged) else ""
    print(f"hpcnoise report: {len(loaded.runs)} runs ({n_diverged}{n_skipped} skipped) -> {out / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
