"""The tuned study's trials, manifest, selection rule and reruns (docs/tuning.md; the command:
``hpcnoise study --tune``, hpcnoise.cli.study).

Layout of a tuned study's root::

    manifest.json              written once, before any trial runs: the protocol as data (below)
    trials.sweep.jsonl         the trials, in the sweep-file format (hpcnoise.sweepfile)
    trials/RUN_NAME/           one run directory per trial
    selected.json              the selected trial of each (workload, regime), chosen on validation only
    reruns-BUDGET.sweep.jsonl  the selected trials with the rerun seeds, per budget (equal, long)
    reruns/RUN_NAME/           their run directories: the test accuracy the report shows

Trials: for each (workload, regime), N points of a scrambled Halton sequence
(``scipy.stats.qmc.Halton(d, scramble=True, seed=derived_seed(seed, workload, regime))``, d the number of
the space's fields) mapped through the regime's search space (hpcnoise.search_spaces) onto the tuning
preset (hpcnoise.presets.tuning_preset): lr = factor x the preset's rule-derived rate, warmup_epochs =
warmup_fraction x epochs, the other fields as drawn.

Rows (what ``select`` ranks and ``trial_rows`` reads from the run directories), one per trial::

    {"run_name": str, "workload": str, "regime": str, "trial": int,
     "state": "finished" | "diverged" | "missing", "final_val_error": float | None, "blown_up": bool}

"finished" includes a blown-up trial stopped early (its final_val_error is the one at the stop);
"missing" is any other state (not started, stopped, failed). Extra keys in a row are ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcnoise.config import Config, check_values, config_from_dict
from hpcnoise.errors import ConfigError
from hpcnoise.files import write_json_atomic, write_text_atomic
from hpcnoise.presets import TUNE_REGIMES, TUNE_WORKLOADS, tuning_preset, tuning_preset_name
from hpcnoise.runstate import run_state
from hpcnoise.search_spaces import SearchSpace, check_space, get_space, map_point
from hpcnoise.sweepfile import cell_lines, config_digest

FORMAT = "hpcnoise-tuning/1"
MANIFEST = "manifest.json"
TRIALS_FILE = "trials.sweep.jsonl"
SELECTED = "selected.json"
SETTINGS = "tuned_settings.json"  # the selection with its provenance: what the quick study reruns
SETTINGS_FORMAT = "hpcnoise-tuned-settings/1"
LONG_REGIMES = ("lb", "diagf")  # the large-batch regimes the long budget trains k times as long
MIN_RERUN_SEEDS = 5
SELECTION_RULE = {
    "metric": "final_val_error",
    "order": "lowest final validation error first (highest final validation accuracy)",
    "ties": "lower trial index",
    "diverged": "last (as are trials without a summary)",
    "blown_up": "ranked by its validation error at the stop",
    "reads": "validation and training metrics only, never a test metric",
}


def derived_seed(seed: int, workload: str, regime: str) -> int:
    """The Halton scramble's seed of one (workload, regime): 63 bits of sha256(seed/workload/regime)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{workload}/{regime}".encode()).digest()[:8], "big") >> 1


def unit_points(space: SearchSpace, n: int, seed: int) -> list[list[float]]:
    """``n`` points of the unit cube, one coordinate per field of ``space``: scrambled Halton."""
    from scipy.stats import qmc  # scipy loads only for drawing

    return [[float(u) for u in row] for row in qmc.Halton(d=len(space), scramble=True, seed=seed).random(n)]


def resolve(base: Config, values: dict[str, float]) -> dict[str, Any]:
    """The Config fields of one point's ``values``: relative factors times the base's value (lr = factor x
    the rule-derived rate), warmup_fraction as warmup_epochs; the others as drawn."""
    fields: dict[str, Any] = {}
    for field, value in values.items():
        if field == "warmup_fraction":
            fields["warmup_epochs"] = value * base.epochs
        elif isinstance(getattr(base, field), int):
            fields[field] = round(value)
        else:
            fields[field] = value
    return fields


def _trial_configs(workload: str, regime: str, n: int, seed: int, root: Path, smoke: bool) -> list[dict[str, Any]]:
    """The ``n`` trial entries of one (workload, regime): index, run name, point, values and config."""
    space = get_space(regime)
    check_space(regime, space)
    name = tuning_preset_name(workload, regime)
    base = replace(tuning_preset(workload, regime, smoke), preset=name, seed=seed, out_dir=str(root / "trials"))
    entries = []
    for index, point in enumerate(unit_points(space, n, derived_seed(seed, workload, regime))):
        values = map_point(space, point)
        factors = {f: v * getattr(base, f) for f, v in values.items() if space[f].get("relative")}
        cfg = replace(base, **resolve(base, {**values, **factors}))
        check_values(cfg)
        cfg = replace(cfg, run_name=f"{name}-t{index:03d}-{config_digest(cfg)}")
        entry = {"workload": workload, "regime": regime, "trial": index, "run_name": cfg.run_name}
        entries.append({**entry, "point": point, "values": values, "config": cfg.to_dict()})
    return entries


def stretch(cfg: Config, factor: float) -> Config:
    """``cfg`` trained ``factor`` times as many epochs, its schedule in proportion (warmup, decays, the
    noise's epochs); noise_fraction, a fraction of training, is unchanged."""
    if factor == 1:
        return cfg
    return replace(
        cfg,
        epochs=max(round(cfg.epochs * factor), 1),
        warmup_epochs=cfg.warmup_epochs * factor,
        lr_decay_epochs=tuple(round(e * factor) for e in cfg.lr_decay_epochs),
        noise_epochs=round(cfg.noise_epochs * factor),
    )


def check_inputs(
    workloads: list[str],
    regimes: list[str],
    trials: int,
    seed: int,
    budgets: dict[str, float],
    rerun_seeds: list[int],
) -> None:
    """One ConfigError line on the first bad input, before anything is written."""
    for w in workloads:
        if w not in TUNE_WORKLOADS:
            raise ConfigError(f"unknown workload {w!r}; valid: {', '.join(TUNE_WORKLOADS)}")
    for r in regimes:
        if r not in TUNE_REGIMES:
            raise ConfigError(f"unknown regime {r!r}; valid: {', '.join(TUNE_REGIMES)}")
    if not workloads or not regimes:
        raise ConfigError("a tuned study needs at least one workload and one regime")
    if trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {trials}")
    if budgets.get("equal") != 1 or set(budgets) - {"equal", "long"}:
        raise ConfigError(f"budgets must be equal (factor 1) and optionally long, got {budgets}")
    if not math.isfinite(budgets.get("long", 1)) or budgets.get("long", 1) < 1:
        raise ConfigError(f"--long-factor must be a number >= 1 (k times the epochs), got {budgets['long']:g}")
    if len(set(rerun_seeds)) < MIN_RERUN_SEEDS or any(s < 0 for s in rerun_seeds):
        raise ConfigError(f"rerun seeds must be at least {MIN_RERUN_SEEDS} distinct seeds >= 0, got {rerun_seeds}")
    if seed < 0 or seed in rerun_seeds:
        raise ConfigError(f"--seed must be >= 0 and not a rerun seed (reruns use fresh seeds), got {seed}")


def _budgets(entries: list[dict[str, Any]], budgets: dict[str, float]) -> dict[str, Any]:
    """Each budget's factor, regimes and epochs per (workload, regime) as data."""
    out: dict[str, Any] = {}
    for budget, factor in budgets.items():
        regimes = [r for r in dict.fromkeys(e["regime"] for e in entries) if budget == "equal" or r in LONG_REGIMES]
        epochs: dict[str, dict[str, int]] = {}
        for e in entries:
            if e["regime"] in regimes:
                cfg = stretch(config_from_dict(e["config"]), factor)
                epochs.setdefault(e["workload"], {})[e["regime"]] = cfg.epochs
        out[budget] = {"factor": factor, "regimes": regimes, "epochs": epochs}
    return out


def plan(
    root: Path,
    workloads: list[str],
    regimes: list[str],
    trials: int,
    seed: int,
    budgets: dict[str, float],
    rerun_seeds: list[int],
    smoke: bool = False,
) -> tuple[dict[str, Any], str]:
    """The manifest and the trials file's text of a tuned study at ``root``; nothing is written."""
    check_inputs(workloads, regimes, trials, seed, budgets, rerun_seeds)
    root = root.absolute()
    entries = [e for w in workloads for r in regimes for e in _trial_configs(w, r, trials, seed, root, smoke)]
    cells = [config_from_dict(e["config"]) for e in entries]
    text = "".join(line + "\n" for line in cell_lines("tune", cells))
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "smoke": smoke,
        "trials_per_regime": trials,
        "workloads": list(workloads),
        "regimes": list(regimes),
        "presets": {w: {r: tuning_preset_name(w, r) for r in regimes} for w in workloads},
        "spaces": {r: get_space(r) for r in regimes},
        "budgets": _budgets(entries, budgets),
        "long_factor": budgets.get("long", 1.0),
        "selection": SELECTION_RULE,
        "rerun_seeds": list(rerun_seeds),
        "trials_file": TRIALS_FILE,
        "trials_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "trials": entries,
    }
    return manifest, text


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as the current code writes it: every trial's config with the fields added since it was
    written at their defaults, and without the trials file's digest (checked against the file itself)."""
    trials = [{**t, "config": config_from_dict(t["config"]).to_dict()} for t in manifest.get("trials", [])]
    return {**{k: v for k, v in manifest.items() if k != "trials_sha256"}, "trials": trials}


def _differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return keys[0] if keys else "the trials file"


def write_manifest(
    root: Path,
    workloads: list[str],
    regimes: list[str],
    trials: int,
    seed: int,
    budgets: dict[str, float],
    rerun_seeds: list[int],
    smoke: bool = False,
) -> dict[str, Any]:
    """Write ROOT/trials.sweep.jsonl and ROOT/manifest.json once (atomically, the manifest last) and
    return the manifest. The same inputs again find the same files and change nothing; other inputs (or
    a trials file that no longer matches its digest) are one ConfigError line."""
    planned, text = plan(root, workloads, regimes, trials, seed, budgets, rerun_seeds, smoke)
    manifest: dict[str, Any] = json.loads(manifest_text(planned))  # as it reads back (lists, not tuples)
    path, trials_path = root / MANIFEST, root / TRIALS_FILE
    if path.exists():
        old = read_manifest(root)
        same_file = trials_path.exists() and hashlib.sha256(trials_path.read_bytes()).hexdigest() == old.get(
            "trials_sha256"
        )
        if _comparable(old) == _comparable(manifest) and same_file:
            return old
        raise ConfigError(
            f"{path} exists with other settings ({_differs(_comparable(old), _comparable(manifest))} differs); rerun "
            "with the settings it "
            f"records, or start over with another --out (or remove {root})"
        )
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(trials_path, text)
    write_text_atomic(path, manifest_text(planned))
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """ROOT/manifest.json, checked for its format tag; ConfigError when missing or foreign."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the tuned study's manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a tuned study's manifest (format {FORMAT!r})")
    return manifest


def _summary_row(run_dir: Path) -> dict[str, Any]:
    state = run_state(run_dir)
    if state == "diverged":
        return {"state": "diverged", "final_val_error": None, "blown_up": False}
    if state != "finished":
        return {"state": "missing", "final_val_error": None, "blown_up": False}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "state": "finished",
        "final_val_error": summary.get("final_val_error"),
        "blown_up": summary.get("blown_up") is not None,
    }


def trial_rows(root: Path) -> list[dict[str, Any]]:
    """One row per trial of the tuned study at ``root`` (the shape in the module's docstring), read from
    ROOT/trials/RUN_NAME (summary.json, diverged.json)."""
    rows = []
    for t in read_manifest(root)["trials"]:
        row = {k: t[k] for k in ("run_name", "workload", "regime", "trial")}
        rows.append({**row, **_summary_row(root / "trials" / t["run_name"])})
    return rows


def _rank(row: dict[str, Any] | None, trial: int) -> tuple[int, float, int]:
    """The sort key of the declared rule (SELECTION_RULE): finished trials by final validation error,
    then the rest; ties to the lower trial index. Reads only ``state`` and ``final_val_error``."""
    if row is None or row.get("state") != "finished":
        return (1, 0.0, trial)
    error = row.get("final_val_error")
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not math.isfinite(error):
        return (1, 0.0, trial)  # no validation metric (or a non-finite one): as a diverged trial
    return (0, float(error), trial)


def select(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The selected trial (the manifest's trial entry) of each (workload, regime), by the declared rule.

    ``rows`` are the trial rows (``trial_rows``, or any records with workload, regime, trial, state and
    final_val_error); a trial without a row ranks as diverged. No key but those is read: no test metric."""
    by_key = {(r["workload"], r["regime"], r["trial"]): r for r in rows}
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for w in manifest["workloads"]:
        for regime in manifest["regimes"]:
            trials = [t for t in manifest["trials"] if t["workload"] == w and t["regime"] == regime]
            chosen[(w, regime)] = min(trials, key=lambda t: _rank(by_key.get((w, regime, t["trial"])), t["trial"]))
    return chosen


def rerun_cells(
    manifest: dict[str, Any], selected: dict[tuple[str, str], dict[str, Any]], budget: str, root: Path | None = None
) -> list[Config]:
    """The reruns of ``budget``: each selected trial's config with each rerun seed, trained the budget's
    factor times as long (``stretch``; the long budget only for LONG_REGIMES), full length (no blow-up
    stop), under ROOT/reruns (ROOT: the trials' parent directory unless given)."""
    spec = manifest["budgets"].get(budget)
    if spec is None:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(manifest['budgets'])}")
    factor = float(spec["factor"])
    if not math.isfinite(factor) or factor < 1:
        raise ConfigError(f"budget {budget!r}: the factor k must be >= 1, got {factor:g}")
    cells = []
    for (_, regime), trial in selected.items():
        if regime not in spec["regimes"]:
            continue
        cfg = config_from_dict(trial["config"])
        out = (root if root is not None else Path(cfg.out_dir).parent) / "reruns"
        cfg = replace(stretch(cfg, factor), stop_blown_up=False, out_dir=str(out.absolute()), run_name="")
        for seed in manifest["rerun_seeds"]:
            cell = replace(cfg, seed=seed)
            cells.append(replace(cell, run_name=f"{cfg.preset}-{budget}-s{seed}-{config_digest(cell)}"))
    return cells


def selection_record(selected: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """selected.json: per workload and regime, the selected trial's index, run name and values."""
    record: dict[str, Any] = {}
    for (workload, regime), t in selected.items():
        record.setdefault(workload, {})[regime] = {k: t[k] for k in ("trial", "run_name", "values")}
    return record


def select_once(root: Path, manifest: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The selection of the study at ``root``, made once: read from ROOT/selected.json when it is there,
    else made from the trial rows (``select``) and written there (atomically) before any rerun starts."""
    path = root / SELECTED
    if not path.exists():
        selected = select(manifest, trial_rows(root))
        write_json_atomic(path, selection_record(selected))
        return selected
    record = json.loads(path.read_text())
    by_key = {(t["workload"], t["regime"], t["trial"]): t for t in manifest["trials"]}
    return {(w, r): by_key[(w, r, entry["trial"])] for w, regimes in record.items() for r, entry in regimes.items()}


def settings_record(
    root: Path, manifest: dict[str, Any], selected: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """ROOT/tuned_settings.json: the selected trials with where they came from (the command, the date of
    the selection, the commit the trials ran at, the selection rule), and the manifest cut to what a rerun
    needs (its trials: the selected ones). Copied to hpcnoise/tuned_settings.json, it becomes the tuned
    presets and the quick default study (hpcnoise.presets, hpcnoise.cli.study)."""
    import datetime

    errors = {(r["workload"], r["regime"], r["trial"]): r["final_val_error"] for r in trial_rows(root)}
    chosen = []
    for (w, r), t in selected.items():  # each with its validation accuracy at the selection (None: none)
        err = errors.get((w, r, t["trial"]))
        chosen.append({**t, "val_accuracy": None if err is None else 100.0 * (1.0 - err)})
    record_path = root / "trials" / chosen[0]["run_name"] / "config.json"
    commit = json.loads(record_path.read_text()).get("git", "unknown") if record_path.exists() else "unknown"
    made = datetime.datetime.fromtimestamp((root / SELECTED).stat().st_mtime, datetime.timezone.utc)
    k = manifest.get("long_factor", 1.0)
    trimmed = {key: value for key, value in manifest.items() if key not in ("trials", "trials_sha256", "trials_file")}
    return {
        "format": SETTINGS_FORMAT,
        "provenance": {
            "command": f"hpcnoise study --tune --seed {manifest['seed']} --trials {manifest['trials_per_regime']} "
            f"--long-factor {k:g} --workloads {','.join(manifest['workloads'])}"
            + (" --smoke" if manifest.get("smoke") else ""),
            "selected_on": made.strftime("%Y-%m-%d"),
            "commit": commit,
            "selection": manifest["selection"],
            "trials_per_regime": manifest["trials_per_regime"],
        },
        "manifest": {**trimmed, "trials": chosen},
        "selected": selection_record(selected),
    }


def imported_study(
    settings: dict[str, Any], workloads: list[str], seeds: list[int], long_regimes: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and selection record of a study that reruns another study's selection (a
    ``settings_record``): its ``workloads``, the rerun ``seeds``, the long budget for ``long_regimes`` only,
    and ``imported``: where the settings came from. Its trials are the selected ones alone, so ``select``
    finds the imported selection again. ConfigError when the record is not one or lacks a workload."""
    if not isinstance(settings, dict) or settings.get("format") != SETTINGS_FORMAT:
        raise ConfigError(f"not a tuned-settings record (format {SETTINGS_FORMAT!r})")
    source = settings["manifest"]
    missing = [w for w in workloads if w not in source["workloads"]]
    if missing or not seeds:
        raise ConfigError(f"the tuned settings hold workloads {source['workloads']}, not {missing} (or no seeds)")
    budgets = {}
    for budget, spec in source["budgets"].items():
        regimes = [r for r in spec["regimes"] if budget == "equal" or r in long_regimes]
        if regimes:
            epochs = {w: {r: spec["epochs"][w][r] for r in regimes} for w in workloads}
            budgets[budget] = {**spec, "regimes": regimes, "epochs": epochs}
    manifest = {
        **source,
        "workloads": list(workloads),
        "presets": {w: source["presets"][w] for w in workloads},
        "budgets": budgets,
        "rerun_seeds": list(seeds),
        "trials": [t for t in source["trials"] if t["workload"] in workloads],
        "imported": settings["provenance"],
    }
    return manifest, {w: settings["selected"][w] for w in workloads}


def write_imported(root: Path, manifest: dict[str, Any], record: dict[str, Any]) -> None:
    """ROOT/manifest.json and ROOT/selected.json of an imported study, written once; the same again
    changes nothing, other settings are one ConfigError line (as ``write_manifest``)."""
    path = root / MANIFEST
    if path.exists():
        old = read_manifest(root)
        if old != json.loads(manifest_text(manifest)):
            raise ConfigError(
                f"{path} exists with other settings ({_differs(old, manifest)} differs); start over with another "
                f"--out (or remove {root})"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / SELECTED, record)
    write_text_atomic(path, manifest_text(manifest))


def default_rerun_seeds(seed: int) -> list[int]:
    """The reruns' fresh seeds: the MIN_RERUN_SEEDS seeds after the trials' ``seed``."""
    return list(range(seed + 1, seed + 1 + MIN_RERUN_SEEDS))
