"""The workload of a run: its checked config, its data and its freshly initialised model.

What is trained (dataset, model) is resolved here, apart from how it is trained (regimes, the step):
the registries are checked where the workload is built, so that config stays a leaf of plain values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpcnoise.comm import Comm
from hpcnoise.config import Config, check_values
from hpcnoise.data import DATASETS, Data
from hpcnoise.errors import ConfigError
from hpcnoise.models import MODELS, build_model
from hpcnoise.regimes import REGIMES
from hpcnoise.rundir import RunDir, load_config
from hpcnoise.seeding import stream_seed


def validate(cfg: Config, world_size: int) -> None:
    """Check a config against the registries and the world size; raise one ConfigError on the first problem."""
    for key, registry in (("dataset", DATASETS), ("model", MODELS), ("regime", REGIMES)):
        value = getattr(cfg, key)
        if value not in registry:
            raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(sorted(registry))}")
    check_values(cfg)
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


def check_batches(cfg: Config, data: Data) -> None:
    """Every batch size the regime trains with must fit in the training set."""
    for batch_key in REGIMES[cfg.regime].batch_keys:
        if getattr(cfg, batch_key) > data.x_train.shape[0]:
            raise ConfigError(
                f"{batch_key}={getattr(cfg, batch_key)} exceeds the {data.x_train.shape[0]} training samples "
                f"of {cfg.dataset}"
            )


def data_and_model(cfg: Config, comm: Comm) -> tuple[Data, nn.Module]:
    """The run's data (in its dtype, on its device) and its freshly initialised model.

    Rank 0 loads first, so that a dataset generated or cached on first use is built only once.
    """
    data = DATASETS[cfg.dataset].load(cfg, comm.device) if comm.is_main else None
    comm.broadcast_object("data ready")
    data = data or DATASETS[cfg.dataset].load(cfg, comm.device)
    dtype = getattr(torch, cfg.dtype)
    data.x_train, data.x_test = data.x_train.to(dtype), data.x_test.to(dtype)
    model = build_model(
        cfg.model,
        data.in_shape,
        data.num_classes,
        ghost_size=cfg.ghost_size if cfg.ghost_bn else 0,
        bn_momentum=cfg.bn_momentum,
        seed=stream_seed(cfg.seed, "init"),
    ).to(comm.device, dtype)
    return data, model


def load_run(run_dir: Path, comm: Comm) -> tuple[Config, Data, nn.Module]:
    """Config, data (in the run's dtype) and final model of a finished run, rebuilt as train() builds them."""
    cfg = load_config(run_dir)
    data, model = data_and_model(cfg, comm)
    model.load_state_dict(torch.load(RunDir(run_dir).model_path, map_location=comm.device))
    return cfg, data, model
