"""The sections of the report (``analysis.report``), in order (``SECTIONS``).

A section is a function of the loaded runs that returns its Markdown lines and adds the files it has (tables
as CSV, figures as PNG) to the mapping it is given; ``analysis.report.build`` joins them into report.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from analysis import closure, figures, gap, paper_tables, tables
from analysis.diverged import DIVERGED_FIELDS
from analysis.formatting import markdown
from analysis.load import Loaded

# What ``hpcnoise bench train --out`` writes into a run directory of W > 1 workers (kept in step with
# hpcnoise.benchmarks.throughput, which analysis does not import: it would load torch).
PREDICTION_FILE = "scaling.json"
PREDICTION_FORMAT = "hpcnoise-scaling-prediction-v1"

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
    "(start-up), then over runs. Scaling efficiency (measured): per-worker throughput relative to 1 worker "
    "of the same dataset, model, regime, device and global batch (strong scaling); empty where no 1-worker "
    "run exists (`hpcnoise bench train --out DIR`, once alone and once under `horovodrun -np 2 -H "
    "localhost:2`, measures both). Predicted efficiency (model): NOT a measurement, but what the "
    "ring-allreduce alpha-beta model of `hpcnoise bench scaling` predicts for the run, "
    "T_compute(B) / (W T_step(W; local batch B/W)), from compute times measured on one worker of the same "
    "machine and the network parameters listed below; it leaves out contention between workers, "
    "Horovod's per-collective costs and stragglers. At 1 worker the model's efficiency is 1 by definition and "
    "left blank."
)
_SHARPNESS_NOTE = (
    "Maximum Hessian eigenvalue of the final model (from sharpness.json), mean ± 95% t interval "
    "over seeds; temperature: the fitted softmax temperature, mean."
)

# A section of the report: its Markdown lines; it adds the files it has (tables, figures) to the mapping.
Section = Callable[[Loaded, dict[str, bytes]], list[str]]


def csv_bytes(df: pd.DataFrame) -> bytes:
    """A table as the CSV the report writes (no index)."""
    text: str = df.to_csv(index=False)
    return text.encode()


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
    """The answer, in words computed from the runs: does any setting close the gap (none is selected as best:
    the settings were evaluated on test, so this is a sensitivity study)."""
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
    files["tables/closure.csv"] = csv_bytes(table)
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
    return ["## Generalisation gap", "", gap.gap_summary(loaded.runs, loaded.diverged), "", _ACCURACY_NOTE, ""]


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
    for table in paper_tables.TABLES.values():
        long = paper_tables.paper_table(loaded.runs, table, loaded.diverged)
        files[f"tables/{table.name}.csv"] = csv_bytes(long)
        measured, reference = paper_tables.split_measured(long)
        md += [f"## {table.title}", ""]
        n_ref = reference[["dataset", "network"]].drop_duplicates().shape[0]
        elsewhere = f"[{_REFERENCE_TITLE}]({_REFERENCE_LINK})"
        if measured.empty:
            md += [f"No run fills a row of this table; the paper's {n_ref} rows are under {elsewhere}.", ""]
            continue
        md += [paper_tables.paper_table_markdown(measured, table), ""]
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
    for table in paper_tables.TABLES.values():
        _, reference = paper_tables.split_measured(paper_tables.paper_table(loaded.runs, table, loaded.diverged))
        md += [f"### {table.title}", ""]
        if reference.empty:
            md += ["Every row of this table has a run (see above).", ""]
            continue
        md += [paper_tables.paper_table_markdown(reference, table), ""]
        notes = _table_notes(reference)
        md += [f"- {n}" for n in notes] + ([""] if notes else [])
    return md


def _results_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    results = tables.results_table(loaded.runs, loaded.diverged)
    files["tables/results.csv"] = csv_bytes(results)
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


def _prediction(path: Path, world_size: int) -> tuple[float, str]:
    """(predicted efficiency, network in words) of a run's scaling.json; ValueError saying why it is unusable."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not readable JSON ({type(e).__name__})") from e
    if not isinstance(blob, dict) or blob.get("format") != PREDICTION_FORMAT:
        raise ValueError(f"not a {PREDICTION_FORMAT} file")
    eff, network, world = blob.get("efficiency"), blob.get("network_text"), blob.get("world_size")
    if isinstance(eff, bool) or not isinstance(eff, (int, float)) or not math.isfinite(eff) or eff <= 0:
        raise ValueError(f"efficiency is {eff!r}, not a positive number")
    if not isinstance(network, str) or not network:
        raise ValueError("no network_text")
    if world != world_size:
        raise ValueError(f"predicts for {world!r} workers but the run had {world_size}")
    return float(eff), network


def predictions(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The scaling model's prediction of every finished run that has RUN_DIR/scaling.json (columns
    ``tables.PREDICTION_COLUMNS``), and one note per such file that is unusable (the run stays measured)."""
    rows, problems = [], []
    for _, r in runs.iterrows() if "path" in runs else []:
        path = Path(str(r["path"])) / PREDICTION_FILE
        if not path.exists():
            continue
        try:
            eff, network = _prediction(path, int(r["world_size"]))
        except ValueError as e:
            problems.append(f"`{r['run_id']}`: {PREDICTION_FILE} ignored: {e}")
            continue
        rows.append({"run_id": r["run_id"], "predicted_efficiency": eff, "network": network})
    return pd.DataFrame(rows, columns=list(tables.PREDICTION_COLUMNS)), problems


def _throughput_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    md = ["## Throughput", "", _THROUGHPUT_NOTE, ""]
    predicted, problems = predictions(loaded.runs)
    throughput = tables.throughput_table(loaded.runs, loaded.epochs, loaded.diverged, predicted)
    if throughput.empty:
        return md + ["No throughput data (no samples_per_s in metrics.jsonl).", ""]
    files["tables/throughput.csv"] = csv_bytes(throughput)
    md += [tables.throughput_markdown(throughput), ""]
    modelled = throughput[throughput["n_predicted"] > 0]
    if len(modelled):
        md += ["Network parameters of the predictions (model inputs, not measurements):", ""]
        for network, cells in modelled.groupby("network", sort=True):
            which = ", ".join(
                f"{r['model']} {r['label']} batch {int(r['batch'])} W={int(r['world_size'])}"
                for _, r in cells.iterrows()
            )
            md.append(f"- {network}: {which}.")
        md.append("")
    else:
        md += ["No run has a prediction (RUN_DIR/scaling.json, written by `hpcnoise bench train --out`).", ""]
    return md + [f"- {p}" for p in problems] + ([""] if problems else [])


def _sharpness_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    md = ["## Sharpness", ""]
    sharp = tables.sharpness_table(loaded.runs, loaded.diverged)
    if sharp.empty:
        return md + ["No run has sharpness.json (`hpcnoise sharpness`), so there is no sharpness table.", ""]
    files["tables/sharpness.csv"] = csv_bytes(sharp)
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
    *DIVERGED_FIELDS,
    "path",
]


def _diverged_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The diverged runs: which, where their loss became non-finite, and the last good epoch."""
    div = loaded.diverged.sort_values("run_id") if not loaded.diverged.empty else loaded.diverged
    files["tables/diverged.csv"] = csv_bytes(div[[c for c in _DIVERGED_CSV_COLUMNS if c in div]])
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
    return md + [markdown(pd.DataFrame(rows)), ""]


def _skipped_section(loaded: Loaded, files: dict[str, bytes]) -> list[str]:
    """The runs (and optional files of kept runs) that were skipped, and why."""
    skipped_df = pd.DataFrame([vars(s) for s in loaded.skipped], columns=["run", "what", "reason"])
    files["tables/skipped.csv"] = csv_bytes(skipped_df)
    if not loaded.skipped:
        return ["## Skipped", "", "Nothing was skipped."]
    return ["## Skipped", ""] + [
        f"- `{s.run}`" + (f" ({s.what} ignored, run kept)" if s.what != "run" else "") + f": {s.reason}"
        for s in loaded.skipped
    ]


SECTIONS: tuple[Section, ...] = (
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

# What the tuned report (analysis.report.build_tuned) adds after its own sections, over the reruns.
TUNED_TAIL: tuple[Section, ...] = (_diverged_section, _skipped_section)
