"""Presets (Python functions returning a Config) and tables (the cells a sweep runs).

Derived values (learning rates from the scaling rule, warmup, decay epochs) are computed here, each
with its rule in a comment. Every preset has a ``smoke`` variant that runs in seconds on a CPU, on the
same network with synthetic data of the dataset's shape, so the plumbing of every cell can be tested
without downloads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from hpcnoise.config import Config, LrScaling, NoiseCalibration, config_from_dict, scaled_rate
from hpcnoise.errors import ConfigError

PresetFn = Callable[[bool], Config]  # smoke -> config
PRESETS: dict[str, PresetFn] = {}
TableFn = Callable[[bool], list[Config]]  # smoke -> cells
TABLES: dict[str, TableFn] = {}
DEFAULT_PRESET = "mnist1d-diagf-gbn"
SEEDS = (0, 1, 2)  # the paper reports 3 seeds per cell


def get_preset(name: str, smoke: bool = False) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name](smoke), preset=name + ("-smoke" if smoke else ""))


def get_table(name: str, smoke: bool = False) -> list[Config]:
    if name not in TABLES:
        raise ConfigError(f"unknown table {name!r}; valid: {', '.join(sorted(TABLES))}")
    return TABLES[name](smoke)


def _register(name: str, fn: PresetFn) -> str:
    PRESETS[name] = fn
    return name


def _cells(names: list[str], smoke: bool) -> list[Config]:
    return [replace(get_preset(n, smoke), seed=seed) for n in names for seed in SEEDS]


def _protocol(
    regime: str,
    ghost_bn: bool,
    large: int,
    small: int,
    epochs: int,
    sb_lr: float,
    factor: float,
    smoke: bool,
    warmup: float = 5.0,
) -> dict[str, Any]:
    """The Config fields of the SB/LB protocol that every preset sets alike.

    SB trains at ``sb_lr``, LB regimes at ``sb_lr * factor`` (the scaling rule) reached by a linear warmup
    over ``warmup`` epochs (none for SB, nor in smoke runs); ghost batches of M_S; a 10x decay at 1/2 and
    3/4 of training.
    """
    return dict(
        regime=regime,
        batch_size=large,
        small_batch=small,
        ghost_bn=ghost_bn,
        ghost_size=small,
        epochs=epochs,
        lr=sb_lr if regime == "sb" else sb_lr * factor,
        warmup_epochs=0.0 if regime == "sb" or smoke else warmup,
        lr_decay_epochs=(epochs // 2, epochs * 3 // 4),
    )


# --- MNIST-1D: the embedded default ------------------------------------------------------------------
MNIST1D_EPOCHS = 32


def mnist1d(
    regime: str,
    ghost_bn: bool,
    smoke: bool,
    scaling: LrScaling = "linear",
    multiplier: float = 1.0,
    calibration: NoiseCalibration = "paper",
    epochs: int = MNIST1D_EPOCHS,
) -> Config:
    """MNIST-1D (generated offline): the paper's SB/LB protocol at a CPU-friendly scale.

    SB trains with M_S = 128 at lr 0.05. LB regimes use M_L = 4096 and one of two learning-rate rules:
    ``linear`` (Goyal et al. 2017): lr_LB = lr_SB * M_L / M_S = 1.6, reached by a linear warmup over 5
    epochs; ``sqrt`` (Hoffer et al. 2017): lr_LB = lr_SB * sqrt(M_L / M_S) = 0.283, no warmup (the rate
    is small enough). Every regime trains for the same number of epochs (the paper's rule), with the
    paper's 10x decays at 1/2 and 3/4 of training. The noise is on for the first HALF of training, until
    the first decay, not the paper's first quarter (50 of 200 CIFAR epochs): at 32 epochs a quarter is 8,
    which would end the noise only 3 epochs after the 5-epoch warmup, before the noise had any time at
    the full rate. ``multiplier`` and ``calibration`` set the noise multiplier lambda
    (hpcnoise.temperature). ``smoke`` shrinks data and epochs to seconds.
    """
    epochs = 4 if smoke else epochs
    sb_lr = 0.05  # per 128 samples
    large, small = (512, 64) if smoke else (4096, 128)
    factor = scaled_rate(scaling, large / small)
    return Config(
        **_protocol(regime, ghost_bn, large, small, epochs, sb_lr, factor, smoke, 5.0 if scaling == "linear" else 0.0),
        dataset="mnist1d",
        model="mlp",
        train_samples=4096 if smoke else 60_000,
        test_samples=1024 if smoke else 10_000,
        noise_epochs=max(epochs // 2, 1),
        lr_scaling="none" if regime == "sb" else scaling,
        noise_multiplier=multiplier,
        noise_calibration=calibration,
    )


def _mnist1d_name(regime: str, gbn: bool, scaling: str = "linear", variant: str = "") -> str:
    rule = "" if scaling == "linear" else f"{scaling}-"
    return f"mnist1d-{rule}{regime}" + ("-gbn" if gbn else "") + (f"-{variant}" if variant else "")


MNIST1D = [
    _register(_mnist1d_name(regime, gbn), partial(mnist1d, regime, gbn))
    for regime, gbn in (("sb", False), ("lb", False), ("lb", True), ("diagf", False), ("diagf", True), ("trace", True))
]
# The calibration grid: LB+GBN and diagF+GBN under both learning-rate rules, diagF at noise multipliers
# lambda = 1/8 .. 1 and at the temperature-matched lambda (0 under linear scaling, 0.39 under sqrt).
GRID_MULTIPLIERS = (0.125, 0.25, 0.5, 1.0)
GRID_EPOCHS = 24  # 39 runs: `hpcnoise study --grid` measured 58 min 59 s on 2 CPU cores (budget: about 90)
MNIST1D_GRID: list[str] = []
for _scaling in ("linear", "sqrt"):
    MNIST1D_GRID.append(_register(_mnist1d_name("lb", True, _scaling), partial(mnist1d, "lb", True, scaling=_scaling)))
    for _lam in GRID_MULTIPLIERS:
        _variant = "" if _lam == 1.0 else f"x{_lam:g}"
        _fn = partial(mnist1d, "diagf", True, scaling=_scaling, multiplier=_lam)
        MNIST1D_GRID.append(_register(_mnist1d_name("diagf", True, _scaling, _variant), _fn))
    _fn = partial(mnist1d, "diagf", True, scaling=_scaling, calibration="temperature")
    MNIST1D_GRID.append(_register(_mnist1d_name("diagf", True, _scaling, "temp"), _fn))


def _mnist1d_table(smoke: bool) -> list[Config]:
    """The embedded-default study: SB; LB+GBN and the paper's diagF+GBN (lambda = 1) under linear
    scaling; LB+GBN and the temperature-calibrated diagF+GBN (lambda = 0.39) under sqrt scaling; 3
    seeds each. Each diagF cell has its LB baseline under the same rule, so both closures are measured."""
    names = ["mnist1d-sb", "mnist1d-lb-gbn", "mnist1d-diagf-gbn", "mnist1d-sqrt-lb-gbn", "mnist1d-sqrt-diagf-gbn-temp"]
    return _cells(names, smoke)


def _mnist1d_grid(smoke: bool) -> list[Config]:
    """SB and the calibration grid (MNIST1D_GRID) at GRID_EPOCHS, 3 seeds each."""
    cells = _cells(["mnist1d-sb", *MNIST1D_GRID], smoke)
    return cells if smoke else [with_epochs(c, GRID_EPOCHS) for c in cells]


def with_epochs(cfg: Config, epochs: int) -> Config:
    """A MNIST-1D preset's ``cfg`` trained for ``epochs`` with the presets' proportions: the same
    fraction of warmup (5/32 under linear scaling), noise for the first half, decays at 1/2 and 3/4."""
    warmup = cfg.warmup_epochs * epochs / cfg.epochs  # the same fraction of training (idempotent)
    decays = (epochs // 2, epochs * 3 // 4)
    return replace(cfg, epochs=epochs, warmup_epochs=warmup, noise_epochs=epochs // 2, lr_decay_epochs=decays)


TABLES["mnist1d"] = _mnist1d_table
TABLES["mnist1d-grid"] = _mnist1d_grid


# --- the tuned study (docs/tuning.md; hpcnoise.tuning) -------------------------------------------------
# Its base configs: two MNIST-1D workloads, each for SB, LB+GBN and diagF+GBN under the linear rule (the
# search spaces, hpcnoise.search_spaces, scale the rate from 1/16 to 4 times it, which holds the sqrt rule's).
TUNE_WORKLOADS = ("mlp", "cnn1d")  # the MLP, and the conv net with batch norm
TUNE_REGIMES = {"sb": False, "lb": True, "diagf": True}  # regime -> ghost batch norm
TUNE_EPOCHS = 24  # 98 runs (118 run-lengths with the long budget): 84 min measured on 2 cores (docs/results.md)
TUNE_TRAIN_SAMPLES = 60_000  # the presets' size: LB takes 14 steps an epoch, 336 in all (672 at k = 2)
TUNE_VAL_SAMPLES = 10_000  # generated from their own seed; the training set is unchanged
TUNE_PRECISE_BN = 8  # global batches of precise BN before each evaluation, as the quick study (hpcnoise.study)


def tuning_preset(model: str, regime: str, smoke: bool) -> Config:
    """The tuned study's base config for ``model`` under ``regime``: the MNIST-1D protocol (``mnist1d``,
    linear rule) at TUNE_EPOCHS with its proportions, a validation split of TUNE_VAL_SAMPLES, precise BN
    as the quick study has it, no sharpness or diagnostics, and the blow-up stop of a trial. The noise is
    on for the first half of training (noise_fraction 0.5) until the search space sets it. ``smoke``:
    the smoke MNIST-1D sizes (4 epochs, 4096 samples) with a 1024-sample validation split."""
    base = mnist1d(regime, TUNE_REGIMES[regime], smoke)
    base = base if smoke else with_epochs(base, TUNE_EPOCHS)
    return replace(
        base,
        model=model,
        train_samples=base.train_samples if smoke else TUNE_TRAIN_SAMPLES,
        val_samples=1024 if smoke else TUNE_VAL_SAMPLES,
        noise_fraction=0.5,
        stop_blown_up=True,
        precise_bn_batches=TUNE_PRECISE_BN,
        sharpness=False,
        diagnostics_every=0,
        threads=1,
        progress=False,
    )


def tuning_preset_name(model: str, regime: str) -> str:
    return f"tune-{model}-{regime}" + ("-gbn" if TUNE_REGIMES[regime] else "")


TUNING_PRESETS = {
    (model, regime): _register(tuning_preset_name(model, regime), partial(tuning_preset, model, regime))
    for model in TUNE_WORKLOADS
    for regime in TUNE_REGIMES
}


# --- the tuned settings: the tuned study's selection, committed (docs/results.md) ------------------------------
# hpcnoise/tuned_settings.json is OUT/tuned_settings.json of a finished `hpcnoise study --tune`
# (hpcnoise.tuning.settings_record): the selected trial of each (workload, regime) and where it came from
# (command, date of the selection, commit, selection rule). The presets tuned-MODEL-REGIME[-gbn] are those
# settings; the quick default `hpcnoise study` reruns them (hpcnoise.cli.study).
TUNED_SETTINGS = Path(__file__).with_name("tuned_settings.json")


def tuned_settings(path: Path | None = None) -> dict[str, Any]:
    """The tuned settings at ``path`` (default: the committed ones), a ``settings_record``; ConfigError
    when missing or unreadable."""
    path = path or TUNED_SETTINGS
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the tuned settings {path}: {e}") from e
    return record


def tuned_preset(model: str, regime: str, smoke: bool) -> Config:
    """The tuning preset with the tuned study's selected learning rate, warmup (as the same fraction of
    training) and noise settings; full length, no blow-up stop."""
    trial = next(t for t in tuned_settings()["manifest"]["trials"] if (t["workload"], t["regime"]) == (model, regime))
    chosen = config_from_dict(trial["config"])
    base = tuning_preset(model, regime, smoke)
    return replace(
        base,
        lr=chosen.lr,
        warmup_epochs=chosen.warmup_epochs * base.epochs / chosen.epochs,
        noise_multiplier=chosen.noise_multiplier,
        noise_fraction=chosen.noise_fraction,
        stop_blown_up=False,
    )


def tuned_preset_name(model: str, regime: str) -> str:
    return "tuned" + tuning_preset_name(model, regime).removeprefix("tune")


def _tuned_keys() -> list[tuple[str, str]]:
    """(workload, regime) of every committed tuned setting; none when the file is missing or unreadable
    (the quick study then says why in one line)."""
    try:
        return [(t["workload"], t["regime"]) for t in tuned_settings()["manifest"]["trials"]]
    except (ConfigError, KeyError, TypeError):
        return []


TUNED_PRESETS = {key: _register(tuned_preset_name(*key), partial(tuned_preset, *key)) for key in _tuned_keys()}


# --- the paper's Tables 1-3 --------------------------------------------------------------------------
# Per (dataset, network): small-batch learning rate at M_S = 128, weight decay, epochs. The paper gives
# M_L = 4096, M_S = 128, ghost batches of 128, linear scaling with warmup (Goyal et al.: 5 epochs),
# noise until epoch 50, and BatchChange = 50 SB + 150 LB epochs (so CIFAR runs 200 epochs). Where it is
# silent we use the networks' published recipes: lr 0.1 with momentum 0.9 and a 10x decay at 50% and
# 75% of training (He et al. 2016 for ResNets; the same schedule for VGG and AlexNet), weight decay
# 1e-4 for ResNets and 5e-4 otherwise; MNIST/Fashion-MNIST 100 epochs at lr 0.05.
RECIPES: dict[tuple[str, str], dict[str, float]] = {
    ("mnist", "mnist_mlp"): dict(lr=0.05, weight_decay=5e-4, epochs=100),
    ("mnist", "lenet5"): dict(lr=0.05, weight_decay=5e-4, epochs=100),
    ("fashion_mnist", "lenet5"): dict(lr=0.05, weight_decay=5e-4, epochs=100),
    ("cifar10", "alexnet"): dict(lr=0.05, weight_decay=5e-4, epochs=200),
    ("cifar100", "alexnet"): dict(lr=0.05, weight_decay=5e-4, epochs=200),
    ("cifar10", "vgg16_bn"): dict(lr=0.1, weight_decay=5e-4, epochs=200),
    ("cifar100", "vgg16_bn"): dict(lr=0.1, weight_decay=5e-4, epochs=200),
    ("cifar10", "resnet44"): dict(lr=0.1, weight_decay=1e-4, epochs=200),
    ("cifar100", "resnet44x2"): dict(lr=0.1, weight_decay=1e-4, epochs=200),
}
TABLE_ROWS = {
    "table1": list(RECIPES),
    "table2": [("cifar10", "vgg16_bn"), ("cifar100", "vgg16_bn"), ("cifar10", "resnet44"), ("cifar100", "resnet44x2")],
    "table3": [("cifar10", "vgg16_bn"), ("cifar100", "vgg16_bn"), ("cifar10", "resnet44"), ("cifar100", "resnet44x2")],
}
# Table columns: (regime, ghost batch norm). All LB regimes use GBN, the paper's baseline.
TABLE_COLUMNS = {
    "table1": [("sb", False), ("lb", True), ("trace", True), ("diagf", True)],
    "table2": [("sb", False), ("batchchange", False), ("multiplicative", True), ("kfac", True), ("diagf", True)],
    "table3": [("sb", False), ("lb", True), ("diagf", True)],
}


def paper_cell(dataset: str, model: str, regime: str, ghost_bn: bool, scaling: LrScaling, smoke: bool) -> Config:
    """One cell of the paper's tables, with the hyperparameters documented above.

    Learning rate: SB uses the recipe's rate; LB regimes scale it by M_L/M_S (``linear``, Tables 1-2,
    with a 5-epoch warmup) or sqrt(M_L/M_S) (``sqrt``, Table 3 and Hoffer et al.; no warmup needed at
    that smaller rate, we keep the same warmup for comparability). BatchChange gets the LB rate and
    trains its first 50 epochs at M_S with that rate scaled back by the same rule.
    """
    r = RECIPES[(dataset, model)]
    large, small, epochs = (32, 8, 2) if smoke else (4096, 128, int(r["epochs"]))
    factor = scaled_rate(scaling, large / small)
    return Config(
        **_protocol(regime, ghost_bn, large, small, epochs, r["lr"], factor, smoke),
        dataset=dataset,
        model=model,
        lr_scaling="none" if regime == "sb" else scaling,
        weight_decay=r["weight_decay"],
        noise_epochs=1 if smoke else 50,
        batchchange_epochs=1 if smoke else 50,
        # smoke: synthetic data of the dataset's shape, so every cell runs without downloads
        synthetic_data=smoke,
        train_samples=64 if smoke else 60_000,
        test_samples=32 if smoke else 10_000,
        threads=1 if smoke else 0,
        # the paper's diagonal Fisher for convolutions (Appendix C.2) sums squares over positions
        conv_mode="spatial",
        checkpoint_every=0 if smoke else 1,  # smoke: no 60 MB checkpoints of VGG16 per epoch
    )


def _table(name: str) -> TableFn:
    scaling: LrScaling = "sqrt" if name == "table3" else "linear"
    names = []
    for dataset, model in TABLE_ROWS[name]:
        for regime, gbn in TABLE_COLUMNS[name]:
            preset_name = f"{name}-{dataset}-{model}-{regime}" + ("-gbn" if gbn else "")
            names.append(
                _register(
                    preset_name,
                    partial(paper_cell, dataset, model, regime, gbn, scaling),
                )
            )
    return lambda smoke: _cells(names, smoke)


for _name in TABLE_ROWS:
    TABLES[_name] = _table(_name)
