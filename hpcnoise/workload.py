"""The workload of a run: its checked config, its data and its freshly initialised model.

What is trained (dataset, model) is resolved here, apart from how it is trained (regimes, the step):
the registries are checked where the workload is built, so that config stays a leaf of plain values.
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hpcnoise import precision
from hpcnoise.comm import Comm
from hpcnoise.config import Config, check_values
from hpcnoise.data import DATASETS, IMAGE_SETS, Data
from hpcnoise.errors import ConfigError
from hpcnoise.models import MODELS, GhostBatchNorm, build_model
from hpcnoise.regimes import REGIMES
from hpcnoise.rundir import RunDir, load_config
from hpcnoise.seeding import stream_seed

MNIST1D_SHAPE = (40,)  # what the mnist1d package generates: 40-sample signals (hpcnoise.data.mnist1d)
MNIST1D_CLASSES = 10


def dataset_shape(dataset: str) -> tuple[tuple[int, ...], int]:
    """(input shape of one sample, number of classes) of a registered dataset, without loading it."""
    if dataset in IMAGE_SETS:
        return IMAGE_SETS[dataset].shape, IMAGE_SETS[dataset].num_classes
    return MNIST1D_SHAPE, MNIST1D_CLASSES


class _ShapesOnly(TorchFunctionMode):
    """Skips in-place random fills (weight initialisation): on meta tensors they hold no values anyway,
    and their meta kernels are Python decompositions that cost seconds to load on first use."""

    FILLS = frozenset({"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "log_normal_", "cauchy_"})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.FILLS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


def _meta_model(model: str, dataset: str) -> nn.Module:
    """``model`` built for ``dataset``'s inputs on the meta device: shapes only, no memory and no
    initialisation cost. Raises the builder's ValueError or TypeError when it does not fit."""
    in_shape, classes = dataset_shape(dataset)
    with torch.random.fork_rng(devices=[]), torch.device("meta"), _ShapesOnly():  # leaves torch's RNG as it was
        return MODELS[model].build(in_shape, classes, lambda c: GhostBatchNorm(c))


def model_problem(model: str, dataset: str) -> str | None:
    """Why ``model`` cannot be built for ``dataset``'s inputs (the builder's own words), or None if it can."""
    try:
        _meta_model(model, dataset)
    except (ValueError, TypeError) as e:
        return str(e) or type(e).__name__
    return None


def is_conv2d(model: str, dataset: str) -> bool:
    """Whether ``model`` (which fits ``dataset``) has 2-D convolutions: what ``channels_last`` applies to."""
    return any(isinstance(m, nn.Conv2d) for m in _meta_model(model, dataset).modules())


@functools.cache
def check_workload(cfg: Config) -> None:
    """Check what a config trains and where, independent of the world size; one ConfigError on the first problem.

    Registries, the values (``check_values``), whether the model fits the dataset (built on the meta
    device), whether the device exists here and whether ``data_root`` can be a directory. Once per config
    and process: the command checks before any launcher or Horovod starts, and ``train`` asks again for
    callers that did not (tests, sweeps), at no cost.
    """
    for key, registry in (("dataset", DATASETS), ("model", MODELS), ("regime", REGIMES)):
        value = getattr(cfg, key)
        if value not in registry:
            raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(sorted(registry))}")
    check_values(cfg)
    if cfg.noise_calibration == "temperature":
        if REGIMES[cfg.regime].noise_free:
            raise ConfigError(f"noise_calibration=temperature needs a noise regime; regime {cfg.regime!r} has no noise")
        if cfg.lr_scaling not in ("linear", "sqrt"):
            raise ConfigError(
                "noise_calibration=temperature derives lambda from the learning-rate rule: lr_scaling must be "
                f"linear or sqrt, got {cfg.lr_scaling!r}"
            )
    problem = model_problem(cfg.model, cfg.dataset)
    if problem is not None:
        fits = [m for m in sorted(MODELS) if model_problem(m, cfg.dataset) is None]
        shape = dataset_shape(cfg.dataset)[0]
        raise ConfigError(
            f"model {cfg.model!r} does not fit dataset {cfg.dataset!r} (inputs {shape}: {problem}); "
            f"models for {cfg.dataset}: {', '.join(fits)}"
        )
    _check_val_samples(cfg)
    if cfg.channels_last and not is_conv2d(cfg.model, cfg.dataset):
        conv2d = [m for m in sorted(MODELS) if model_problem(m, cfg.dataset) is None and is_conv2d(m, cfg.dataset)]
        raise ConfigError(
            f"channels_last applies to 2-D convolutional networks; {cfg.model!r} on {cfg.dataset!r} has none "
            f"(valid here: {', '.join(conv2d) or 'none: use an image dataset'})"
        )
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' is not available on this machine (no CUDA GPU); valid here: auto, cpu")
    if cfg.data_root and Path(cfg.data_root).exists() and not Path(cfg.data_root).is_dir():
        raise ConfigError(f"data_root {cfg.data_root!r} is not a directory; give the directory of the prepared data")
    precision.check_device(cfg.dtype, cfg.device)


def _check_val_samples(cfg: Config) -> None:
    """``val_samples`` must leave training samples: below the training set's size for the image sets and
    synthetic data (held out of it); MNIST-1D generates its validation samples apart, so any count fits."""
    if cfg.dataset not in IMAGE_SETS:
        return
    n = cfg.train_samples if cfg.synthetic_data else IMAGE_SETS[cfg.dataset].train_size
    if cfg.val_samples >= n:
        where = "synthetic training samples (train_samples)" if cfg.synthetic_data else "training images"
        raise ConfigError(
            f"val_samples={cfg.val_samples} leaves no training data: {cfg.dataset} has {n} {where}; use 0 to {n - 1}"
        )


def validate(cfg: Config, world_size: int) -> None:
    """Check a config against the registries and the world size; raise one ConfigError on the first problem."""
    check_workload(cfg)
    for batch_key in REGIMES[cfg.regime].batch_keys:
        batch = getattr(cfg, batch_key)
        if batch % world_size:
            raise ConfigError(
                f"{batch_key}={batch} is not divisible by the world size {world_size}; use a multiple of {world_size}"
            )
        local = batch // world_size
        if cfg.ghost_bn and (cfg.ghost_size <= 0 or local % cfg.ghost_size):
            raise ConfigError(
                f"ghost_size={cfg.ghost_size} must be positive and divide the local batch of {local} samples "
                f"({batch_key}={batch} over {world_size} workers)"
            )
    if cfg.sharpness and cfg.sharpness_samples < world_size:
        raise ConfigError(
            f"sharpness_samples={cfg.sharpness_samples} cannot be shared by {world_size} workers; "
            f"use at least {world_size}"
        )


def check_batches(cfg: Config, data: Data) -> None:
    """Every batch size the regime trains with must fit in the training set."""
    for batch_key in REGIMES[cfg.regime].batch_keys:
        if getattr(cfg, batch_key) > data.x_train.shape[0]:
            raise ConfigError(
                f"{batch_key}={getattr(cfg, batch_key)} exceeds the {data.x_train.shape[0]} training samples "
                f"of {cfg.dataset}"
            )


def epoch_steps(cfg: Config, n_train: int) -> list[int]:
    """Global steps of each planned epoch over ``n_train`` training samples (the regime's batch of the
    epoch; the last partial batch dropped, as ``hpcnoise.data.epoch_batches`` does)."""
    regime = REGIMES[cfg.regime]
    return [n_train // regime.batch(cfg, epoch) for epoch in range(cfg.epochs)]


def noise_end(cfg: Config, n_train: int) -> int:
    """The noise is on for the global steps [0, noise_end) (a noise regime's; 0-based step numbers).

    ``noise_fraction`` > 0: round(noise_fraction * the run's planned steps), summed exactly over epochs
    of different batch sizes (BatchChange); otherwise the steps of epochs [0, noise_epochs) (the paper's
    cut-off). A function of the config and the training set's size: the same for every world size and resume.
    """
    steps = epoch_steps(cfg, n_train)
    if cfg.noise_fraction > 0:
        return round(cfg.noise_fraction * sum(steps))
    return sum(steps[: cfg.noise_epochs])


def data_and_model(cfg: Config, comm: Comm) -> tuple[Data, nn.Module]:
    """The run's data (in its dtype, on its device) and its freshly initialised model.

    Rank 0 loads first, so that a dataset generated or cached on first use is built only once.
    """
    data = DATASETS[cfg.dataset].load(cfg, comm.device) if comm.is_main else None
    comm.broadcast_object("data ready")
    data = data or DATASETS[cfg.dataset].load(cfg, comm.device)
    dtype = precision.weight_dtype(cfg.dtype)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for split in ("x_train", "x_test", "x_val"):  # channels_last: the image sets' (N, C, H, W) tensors
        setattr(data, split, getattr(data, split).to(dtype, memory_format=layout))
    model = build_model(
        cfg.model,
        data.in_shape,
        data.num_classes,
        ghost_size=cfg.ghost_size if cfg.ghost_bn else 0,
        bn_momentum=cfg.bn_momentum,
        seed=stream_seed(cfg.seed, "init"),
    ).to(comm.device, dtype)
    model = model.to(memory_format=layout)  # 4-D weights only (the 2-D convolutions')
    return data, model


# What torch.load raises on truncated, overwritten or foreign files (zip reader, weights-only unpickler).
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError)


def read_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """RUN_DIR/model.pt (the final state_dict that train() writes), on the CPU; ConfigError if it is not one."""
    path = RunDir(run_dir).model_path
    if not zipfile.is_zipfile(path):  # what torch.save writes; torch's own error for anything else is a page
        raise ConfigError(f"{str(path)!r} is not a model file written by torch.save; train the run again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"{str(path)!r} is not a readable model file ({reason}); train the run again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{str(path)!r} does not hold a model state_dict (name -> tensor); train the run again")
    return state


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], cfg: Config, run_dir: Path) -> None:
    """Load a run's final parameters and buffers into the freshly built ``model``; ConfigError if they do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{str(RunDir(run_dir).model_path)!r} does not fit the run's {cfg.model} on {cfg.dataset} ({first})"
        ) from e


def load_run(run_dir: Path, comm: Comm) -> tuple[Config, Data, nn.Module]:
    """Config, data (in the run's dtype) and final model of a finished run, rebuilt as train() builds them.

    Bad run directories (missing, unfinished, unreadable config.json or model.pt) raise ConfigError.
    """
    cfg = load_config(run_dir)
    state = read_model_state(run_dir)
    data, model = data_and_model(cfg, comm)
    load_model_state(model, state, cfg, run_dir)
    return cfg, data, model
