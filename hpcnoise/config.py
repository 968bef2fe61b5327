"""The one frozen config, its type-checked overrides, and presets as Python functions.

A run is fully described by a ``Config``. The CLI builds one from a preset function and
``--key=value`` overrides (type-checked; unknown keys are errors); ``check_values`` checks the values
that need nothing else (every numeric field against its one range in ``RANGES``), and
``hpcnoise.workload.validate`` checks the rest against the registries, the device and the world size,
before anything is written. The config is written to config.json and
copied into every result row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from hpcnoise.errors import ConfigError

# Closed choices: each a Literal type, checked in one place (``check_choices``) against its own values.
NoisePlacement = Literal["gradient", "parameter"]
NoiseCalibration = Literal["paper", "temperature"]
LrScaling = Literal["linear", "sqrt", "none"]
ConvModeName = Literal["exact", "spatial"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "float64", "bf16"]
Allreduce = Literal["buckets", "fused"]

# How a learning-rate rule scales a rate when the batch grows by ``ratio`` (M_L / M_S): the one table of
# the rules, used by the presets (lr_LB from lr_SB), BatchChange (back to M_S) and the temperature (k).
LR_RULES: dict[str, Callable[[float], float]] = {
    "linear": lambda ratio: ratio,  # Goyal et al. 2017
    "sqrt": math.sqrt,  # Hoffer et al. 2017
    "none": lambda ratio: 1.0,  # the small-batch rate unchanged
}


def scaled_rate(rule: str, ratio: float) -> float:
    """The factor ``rule`` (an ``LrScaling``) multiplies a learning rate by when the batch grows by ``ratio``."""
    return LR_RULES[rule](ratio)


@dataclass(frozen=True)
class Config:
    # --- what is trained -------------------------------------------------------------------------
    dataset: str = "mnist1d"
    model: str = "mlp"
    train_samples: int = 60_000  # MNIST-1D and synthetic data: samples generated for training
    test_samples: int = 10_000  # MNIST-1D and synthetic data: samples generated for testing
    synthetic_data: bool = False  # random inputs of the dataset's shape (smoke runs, throughput benchmarks)
    data_seed: int = 42  # MNIST-1D generation seed (the dataset itself, not the run)
    val_samples: int = 0  # held-out validation samples (docs/tuning.md); 0 = no split, train on all
    data_root: str = ""  # prepared datasets (`hpcnoise data prepare`); "" = $HPCNOISE_DATA or ~/.cache/hpcnoise
    # --- how it is trained -----------------------------------------------------------------------
    regime: str = "diagf"  # see hpcnoise.regimes.REGIMES
    batch_size: int = 4096  # M_L: global large batch, samples per step over all workers
    small_batch: int = 128  # M_S: the small batch whose noise the regimes imitate; `sb` trains with it
    ghost_bn: bool = False  # batch-norm statistics over ghost batches of ghost_size samples
    ghost_size: int = 128  # samples per ghost batch (Hoffer et al. 2017)
    sync_bn: bool = True  # without ghost_bn: batch norm over the GLOBAL batch (statistics summed over
    # workers, so W ranks train as one); false: over each worker's share (depends on W)
    bn_momentum: float = 0.1  # running-statistics momentum, applied once per step (see GhostBatchNorm)
    epochs: int = 60
    lr: float = 0.1  # peak learning rate actually used (presets derive it from a scaling rule)
    warmup_epochs: float = 0.0  # linear warmup to lr over this many epochs (Goyal et al. 2017)
    lr_decay_epochs: tuple[int, ...] = ()  # multiply the lr by lr_decay_factor at each of these epochs
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    noise_epochs: int = 50  # noise on for epochs [0, noise_epochs), then off (the paper's cut-off)
    noise_fraction: float = 0.0  # > 0: noise on for the first round(noise_fraction * total steps) global
    # steps instead (overrides noise_epochs); 0 = the noise_epochs rule
    noise_placement: NoisePlacement = "gradient"  # "gradient": added to g before momentum and weight decay;
    # "parameter": theta -= lr * noise after the optimiser step (see hpcnoise.regimes)
    multiplicative_sigma: float = 0.5  # `multiplicative`: g * (1 + sigma xi); the paper gives no value
    noise_multiplier: float = 1.0  # lambda: multiplies every regime's noise standard deviation (1 = Algorithm 1)
    noise_calibration: NoiseCalibration = "paper"  # paper: lambda = noise_multiplier; temperature: lambda matches SB's
    # temperature under lr_scaling (hpcnoise.temperature)
    batchchange_epochs: int = 50  # `batchchange`: epochs at M_S before switching to M_L
    fisher_every: int = 1  # recompute diag F every k steps, reusing the last one in between
    kfac_every: int = 10  # `kfac`: refresh the K-FAC factors (and their square roots) every k steps
    conv_mode: ConvModeName = "exact"  # per-sample squared conv gradients: exact | spatial (Appendix C)
    lr_scaling: LrScaling = "linear"  # the rule the preset used to derive lr: linear | sqrt | none (recorded)
    decay_bn_and_bias: bool = True  # apply weight_decay to batch-norm and bias parameters too
    seed: int = 0  # init, data order, noise: each its own stream (hpcnoise.seeding)
    stop_blown_up: bool = False  # stop after the epoch the blow-up rule fires (hpcnoise.blowup)
    # --- where and how it runs -------------------------------------------------------------------
    out_dir: str = "runs"
    checkpoint_every: int = 1  # epochs between checkpoints (0: only on SIGTERM/SIGUSR1)
    diagnostics_every: int = 0  # epochs between Fisher norms / gradient variances (diagnostics.jsonl); 0 = off
    precise_bn_batches: int = 0  # re-estimate BN running statistics over K global training batches before
    # each evaluation (pycls's precise BN; hpcnoise.precise_bn); 0 = off, the running averages as trained
    sharpness: bool = False  # measure the final model's max Hessian eigenvalue (sharpness.json)
    sharpness_samples: int = 4096  # training samples the Hessian is taken over
    run_name: str = ""  # default: <preset or regime>-<model>-<dataset>-s<seed>-<time>
    device: Device = "auto"  # auto | cpu | cuda
    dtype: DType = "float32"  # float32 | float64 (numerical studies: no float32 cancellation) | bf16: float32
    # weights, forward and backward under bf16 autocast; curvature, statistics, noise and update float32
    channels_last: bool = False  # 2-D convolutional networks: activations in channels-last memory format
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    allreduce: Allreduce = "buckets"  # buckets: gradients summed bucket by bucket during backward (overlap);
    # fused: everything in one collective after backward (hpcnoise.buckets, hpcnoise.step)
    bucket_mb: float = 25.0  # largest gradient bucket for allreduce=buckets, in MiB
    min_buckets: int = 16  # and buckets of at most 1/min_buckets of the gradients (1: bucket_mb alone)
    horovod_timeline: bool = False  # write Horovod's timeline to RUN_DIR/horovod_timeline.json (under Horovod)
    progress: bool = True  # progress bar on rank 0 when attached to a terminal
    preset: str = ""  # the preset this config came from (informational)

    @property
    def noise_scale(self) -> float:
        """s = sqrt((M_L - M_S) / (M_L M_S)): g_SB - g_LB ~ N(0, s^2 F). 0.0870 for 4096/128."""
        return math.sqrt((self.batch_size - self.small_batch) / (self.batch_size * self.small_batch))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _parse_value(key: str, raw: str) -> Any:
    """Convert the text of ``--key=raw`` to the field's type, or raise a ConfigError naming both."""
    hint = _HINTS[key]
    try:
        if hint is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(raw)
        if hint is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if hint is str or typing.get_origin(hint) is Literal:
            return raw  # a Literal's value is checked with the other values (check_choices)
        if typing.get_origin(hint) is tuple:
            (item, _) = typing.get_args(hint)
            return tuple(item(v) for v in raw.split(",") if v.strip())
    except ValueError:
        pass
    else:
        raise TypeError(f"field {key!r} has an unsupported type {hint!r}")
    name = getattr(hint, "__name__", str(hint))
    if typing.get_origin(hint) is tuple:
        name = "comma-separated list of " + typing.get_args(hint)[0].__name__
    raise ConfigError(f"field {key!r} expects {name}, got {raw!r}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` (or ``--key=value``) strings to a config; unknown keys are errors."""
    changes: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        key, sep, raw = text.partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --key=value")
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(_FIELDS)}")
        changes[key] = _parse_value(key, raw)
    return replace(cfg, **changes)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from its JSON form through the type-checked overrides (unknown keys are errors)."""

    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return apply_overrides(Config(), [f"{k}={text(v)}" for k, v in values.items()])


# The range of every numeric field, checked in this one place: (field, lower, upper, lower_open, upper_open),
# None = unbounded on that side. lr_decay_epochs (a tuple of ints) is checked item by item below.
_RANGES: tuple[tuple[str, float | None, float | None, bool, bool], ...] = (
    ("train_samples", 1, None, False, False),
    ("test_samples", 1, None, False, False),
    ("data_seed", 0, None, False, False),  # numpy seeds are non-negative
    ("val_samples", 0, None, False, False),  # its upper bound depends on the dataset (workload.validate)
    ("batch_size", 1, None, False, False),
    ("small_batch", 1, None, False, False),
    ("ghost_size", 1, None, False, False),
    ("bn_momentum", 0, 1, True, False),  # 1: the running statistics are the last step's
    ("epochs", 1, None, False, False),
    ("lr", 0, None, True, False),
    ("warmup_epochs", 0, None, False, False),
    ("lr_decay_factor", 0, 1, True, False),  # a decay: 1 keeps the rate, 0 would stop training
    ("momentum", 0, 1, False, True),  # 1 and above never forget a gradient: the iteration diverges
    ("weight_decay", 0, None, False, False),
    ("noise_epochs", 0, None, False, False),
    ("noise_fraction", 0, 1, False, False),
    ("multiplicative_sigma", 0, None, False, False),
    ("noise_multiplier", 0, None, False, False),  # lambda = 0: no noise (the LB baseline's step)
    ("batchchange_epochs", 0, None, False, False),
    ("fisher_every", 1, None, False, False),
    ("kfac_every", 1, None, False, False),
    ("seed", 0, None, False, False),  # numpy's SeedSequence takes non-negative entropy
    ("checkpoint_every", 0, None, False, False),
    ("diagnostics_every", 0, None, False, False),
    ("precise_bn_batches", 0, None, False, False),
    ("sharpness_samples", 1, None, False, False),
    ("threads", 0, None, False, False),
    ("bucket_mb", 0, None, True, False),
    ("min_buckets", 1, None, False, False),
)
RANGES = {r[0]: r[1:] for r in _RANGES}


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(key: str) -> str:
    """What ``key`` may be, in words: "a positive integer", "positive", ">= 0" or "in [0, 1)"."""
    low, high, low_open, high_open = RANGES[key]
    integer = _HINTS[key] is int
    if high is None:
        if low == 1 and integer and not low_open:
            return "a positive integer"
        if low == 0 and low_open:
            return "positive"
        return f"{'>' if low_open else '>='} {_number(low)}" if low is not None else "any number"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"in {left}{_number(low) if low is not None else '-inf'}, {_number(high)}{right}"


def _in_range(key: str, value: float) -> bool:
    low, high, low_open, high_open = RANGES[key]
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or value < high or (not high_open and value == high)


CHOICES = {key: typing.get_args(hint) for key, hint in _HINTS.items() if typing.get_origin(hint) is Literal}


def check_choices(cfg: Config) -> None:
    """Every closed-choice field holds one of its Literal type's values; one ConfigError otherwise."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise ConfigError(f"{key} must be one of {', '.join(valid)}, got {getattr(cfg, key)!r}")


@functools.cache
def check_values(cfg: Config) -> None:
    """Check the values that need no registry or world size; raise one ConfigError on the first problem.

    A config is frozen, so its answer never changes: the check runs once per config and process, however
    many layers (command, workload, train) ask (a ConfigError is not cached, and ends the command)."""
    for key in RANGES:
        value = getattr(cfg, key)
        if not _in_range(key, value):
            raise ConfigError(f"{key} must be {range_text(key)}, got {value}")
    if any(epoch < 0 for epoch in cfg.lr_decay_epochs):
        listed = ",".join(map(str, cfg.lr_decay_epochs))
        raise ConfigError(f"lr_decay_epochs must be epochs >= 0 (comma-separated), got {listed}")
    if cfg.small_batch > cfg.batch_size:
        raise ConfigError(f"small_batch ({cfg.small_batch}) must not exceed batch_size ({cfg.batch_size})")
    check_choices(cfg)
    if cfg.run_name in (".", "..") or "/" in cfg.run_name:
        raise ConfigError(f"run_name must be a plain directory name (no '/'), got {cfg.run_name!r}")
