"""Datasets: whole splits as tensors on the training device, and the world-size invariant batch order.

Each dataset is a function registered in ``DATASETS`` under its CLI name. It returns a ``Data``: the
train, test and validation splits as tensors (the whole split lives on the device; batches are index
gathers, so there is no DataLoader and no per-sample Python), the input shape and the number of classes,
and an optional batched ``augment`` function.

The validation split (``val_samples`` > 0; docs/tuning.md) is a function of the data seed alone, so the
same for every world size, run seed and resume, and disjoint from train and test: MNIST-1D generates
``val_samples`` extra samples from their own seed (the training set unchanged); the image sets and
synthetic data hold out ``val_samples`` training images chosen by a permutation of the
(data_seed, "validation") stream (``hold_out``).

The batch order is a function of (seed, epoch) alone: every rank draws the same permutation of the
training set, cuts it into global batches of M_L samples, and takes its own contiguous 1/W share of
each. The global batch is therefore the same whatever the world size W.

Image datasets (MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100) are read from files that
``hpcnoise data prepare NAME --root DIR`` (hpcnoise.download) writes once, on a machine with internet or
with the raw upstream files at hand: one file per split, ``DIR/NAME-train.pt`` and ``DIR/NAME-test.pt``,
each a ``torch.save``d dict

    format       "hpcnoise-images-v1"
    name, split  e.g. "cifar10", "train"
    shape        [N, C, H, W]
    num_classes  int
    source       the torchvision class the raw files were read with
    sha256       hex digest of the images' bytes followed by the labels' bytes
    images       uint8 tensor (N, C, H, W), pixel values 0..255 as published
    labels       int64 tensor (N,)

A training job reads each split in one ``torch.load``, verifies it, moves the uint8 tensor to the device
and normalises it there. A missing or damaged file raises ``DataFileError`` (a ConfigError: the CLI
prints one line and exits 2) naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hpcnoise.errors import DataFileError as DataFileError  # re-exported; its home is hpcnoise.errors
from hpcnoise.files import save_torch_atomic
from hpcnoise.seeding import generator, stream_seed


class DataConfig(Protocol):
    """What a loader reads of a run's ``hpcnoise.config.Config``, which this module does not import."""

    @property
    def train_samples(self) -> int: ...
    @property
    def test_samples(self) -> int: ...
    @property
    def data_seed(self) -> int: ...
    @property
    def data_root(self) -> str: ...
    @property
    def synthetic_data(self) -> bool: ...
    @property
    def val_samples(self) -> int: ...


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    # Batched train-time augmentation (tensor ops on the device); None for no augmentation.
    # augment(x_local, generator, offset, global_batch): the generator is the (seed, step) stream,
    # identical on all ranks; the function draws the random choices for the whole global batch and
    # applies rows [offset, offset + len(x_local)) to this rank's share, so augmentation, too, does
    # not depend on the world size.
    augment: Callable[[torch.Tensor, torch.Generator, int, int], torch.Tensor] | None = None
    # The held-out validation split (``val_samples``); empty (0 samples of the training shape) without one.
    x_val: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    y_val: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        if self.x_val.numel() == 0:  # no split: empty tensors of the training set's shape, dtype and device
            self.x_val = self.x_train.new_empty((0, *self.x_train.shape[1:]))
            self.y_val = self.y_train.new_empty((0,))

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[..., Data]  # load(cfg, device) -> Data
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, description: str) -> Callable[[Callable[..., Data]], Callable[..., Data]]:
    def wrap(fn: Callable[..., Data]) -> Callable[..., Data]:
        DATASETS[name] = DatasetSpec(fn, description)
        return fn

    return wrap


def cache_dir(data_root: str = "") -> Path:
    """Where generated or prepared data lives: ``data_root``, else $HPCNOISE_DATA, else ~/.cache/hpcnoise."""
    if data_root:
        return Path(data_root)
    return Path(os.environ.get("HPCNOISE_DATA", Path.home() / ".cache" / "hpcnoise"))


@register("mnist1d", "MNIST-1D (Greydanus 2020), generated offline: 40-sample 1-D signals, 10 classes")
def mnist1d(cfg: DataConfig, device: torch.device) -> Data:
    """MNIST-1D generated by the ``mnist1d`` package from its templates, then cached.

    Sizes come from the config (default 60,000 train + 10,000 test, so that a global batch of 4096 is
    a small fraction of an epoch, as 4096 is of CIFAR's 50,000). Generation is deterministic in
    ``data_seed`` and takes a while (a per-sample loop inside mnist1d), so the result is cached in
    ``cache_dir()`` and shared by all ranks and runs.
    """
    n_train, n_test, seed = cfg.train_samples, cfg.test_samples, cfg.data_seed
    path = cache_dir(cfg.data_root) / f"mnist1d-v2-{n_train}-{n_test}-seed{seed}.pt"
    if path.exists():
        blob = torch.load(path)
    else:
        x, y = _generate_mnist1d(n_train + n_test, seed)
        blob = {
            "x": x[:n_train].clone(),
            "y": y[:n_train].clone(),
            "x_test": x[n_train : n_train + n_test].clone(),
            "y_test": y[n_train : n_train + n_test].clone(),
        }
        save_torch_atomic(blob, path)
    data = Data(
        x_train=blob["x"].to(device),
        y_train=blob["y"].to(device),
        x_test=blob["x_test"].to(device),
        y_test=blob["y_test"].to(device),
        num_classes=10,
    )
    if cfg.val_samples:
        x_val, y_val = mnist1d_validation(cfg.val_samples, seed, cfg.data_root)
        data.x_val, data.y_val = x_val.to(device), y_val.to(device)
    return data


def _generate_mnist1d(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of one MNIST-1D set generated with numpy seed ``seed`` (inputs, labels)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = -(-n // 10) * 10  # mnist1d makes num_samples // 10 per class
    args.train_split = 1.0  # split here, to get exactly the samples asked for
    args.seed = seed
    state = np.random.get_state()  # mnist1d seeds numpy's global generator; leave it as it was
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return torch.tensor(d["x"], dtype=torch.float32)[:n], torch.tensor(d["y"], dtype=torch.int64)[:n]


def mnist1d_validation(n: int, data_seed: int, data_root: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-1D's validation split: ``n`` extra samples generated apart from train and test, with a seed of
    the (data_seed, "validation") stream; cached like the training set, on the CPU. The generator centres
    and scales each set by its own mean and std: with thousands of samples they match the training set's."""
    seed = stream_seed(data_seed, "validation") % 2**32  # numpy's legacy seeding takes 32 bits
    path = cache_dir(data_root) / f"mnist1d-v2-val-{n}-seed{data_seed}.pt"
    if path.exists():
        blob = torch.load(path)
    else:
        x, y = _generate_mnist1d(n, seed)
        blob = {"x": x.clone(), "y": y.clone()}
        save_torch_atomic(blob, path)
    return blob["x"], blob["y"]


# --- prepared image datasets -------------------------------------------------------------------------
FORMAT = "hpcnoise-images-v1"  # the ``format`` field of a prepared split file


@dataclass(frozen=True)
class ImageSet:
    """What a prepared image dataset holds and how its loader normalises and augments it."""

    shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int
    # Published per-channel mean and std of pixel / 255 over the training split; x -> (x / 255 - mean) / std.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # train-time random 32x32 crop of the image padded by 4 black pixels, horizontal flip
    train_size: int  # images in the published training split (what val_samples is held out of)
    raw: str  # what `prepare` needs in --root when there is no internet
    description: str


def _mnist_family(folder: str, mean: float, std: float, title: str, content: str) -> ImageSet:
    """28x28 grey images of 10 classes, not augmented; raw IDX files in torchvision's ``FOLDER/raw``."""
    description = f"{title}: 28x28 grey {content}, 60k train / 10k test; prepared"
    return ImageSet((1, 28, 28), 10, (mean,), (std,), False, 60_000, f"{folder}/raw/*-ubyte.gz", description)


def _cifar(num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], folder: str, sizes: str) -> ImageSet:
    """32x32 colour images, trained with crop+flip; raw: the upstream archive or its extracted ``folder``."""
    raw = f"cifar-{num_classes}-python.tar.gz or {folder}/"
    description = f"CIFAR-{num_classes} (Krizhevsky 2009): 32x32 colour, {sizes}, crop+flip; prepared"
    return ImageSet((3, 32, 32), num_classes, mean, std, True, 50_000, raw, description)


IMAGE_SETS: dict[str, ImageSet] = {
    # The values used by the PyTorch MNIST example.
    "mnist": _mnist_family("MNIST", 0.1307, 0.3081, "MNIST (LeCun et al. 1998)", "digits"),
    # Training-split statistics of Fashion-MNIST (Xiao et al. 2017).
    "fashion_mnist": _mnist_family("FashionMNIST", 0.2860, 0.3530, "Fashion-MNIST (Xiao et al. 2017)", "clothes"),
    # CIFAR: per-channel population std of the training pixels, not the widespread (0.2023, 0.1994, 0.2010),
    # which is not the std of the pixels.
    "cifar10": _cifar(
        10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py", "50k train / 10k test"
    ),
    "cifar100": _cifar(
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python", "100 classes, 50k / 10k"
    ),
}


def split_path(root: Path, name: str, split: str) -> Path:
    """The prepared file of one split: ``root/NAME-SPLIT.pt``."""
    return Path(root) / f"{name}-{split}.pt"


def prepare_command(name: str, root: Path) -> str:
    """The shell command that (re)builds the prepared files of ``name`` in ``root``."""
    return f"hpcnoise data prepare {name} --root {shlex.quote(str(root))}"


def payload_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the images' bytes followed by the labels' bytes (CPU tensors, native byte order)."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(t.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def make_split(name: str, split: str, images: torch.Tensor, labels: torch.Tensor, source: str) -> dict[str, Any]:
    """The dict that ``prepare`` saves for one split: header fields plus the uint8 images and int64 labels."""
    return {
        "format": FORMAT,
        "name": name,
        "split": split,
        "shape": list(images.shape),
        "num_classes": IMAGE_SETS[name].num_classes,
        "source": source,
        "sha256": payload_sha256(images, labels),
        "images": images,
        "labels": labels,
    }


# What torch.load raises on truncated, overwritten or foreign files (zip reader, weights-only unpickler).
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError)


def read_split(name: str, split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one prepared split (one file read) and verify it; returns (uint8 images, int64 labels) on the CPU.

    Raises DataFileError naming the file and the command that rebuilds it when the file is missing,
    unreadable, of another dataset or format, or its payload does not match its sha256.
    """
    spec = IMAGE_SETS[name]
    path = split_path(root, name, split)
    fix = prepare_command(name, Path(root))
    if not path.is_file():
        raise DataFileError(f"prepared data file {path} is missing; create it with: {fix}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:  # a damaged file: whichever way torch.load fails, the fix is to rebuild it
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = f"prepared data file {path} is unreadable ({reason}); rebuild it with: {fix}"
        raise DataFileError(msg) from e

    def bad(what: str) -> DataFileError:
        return DataFileError(f"prepared data file {path} is corrupt ({what}); rebuild it with: {fix}")

    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise bad(f"not an {FORMAT} file")
    if (blob.get("name"), blob.get("split")) != (name, split):
        raise bad(f"holds {blob.get('name')!r} split {blob.get('split')!r}")
    images, labels = blob.get("images"), blob.get("labels")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise bad("images or labels missing")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != spec.shape:
        expected = ", ".join(map(str, spec.shape))
        raise bad(f"images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, {expected})")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (images.shape[0],):
        raise bad(f"labels are {labels.dtype} {tuple(labels.shape)}, expected int64 ({images.shape[0]},)")
    if list(images.shape) != blob.get("shape"):
        raise bad(f"header shape {blob.get('shape')} but images {list(images.shape)}")
    if payload_sha256(images, labels) != blob.get("sha256"):
        raise bad("sha256 of the payload does not match the header")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise bad(f"labels outside 0..{spec.num_classes - 1}")
    return images, labels


def normalise(images: torch.Tensor, spec: ImageSet) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel, on the images' device."""
    mean = torch.tensor(spec.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


def crop_flip_choices(gen: torch.Generator, n: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (dy, dx, flip) for n samples on the generator's device: offsets in 0..2*pad (pixels), flip bool.

    The crop of sample i is rows dy..dy+H-1, columns dx..dx+W-1 of the image padded by ``pad`` on each side.
    """
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=gen.device)
    flip = torch.randint(0, 2, (n,), generator=gen, device=gen.device).bool()
    return offsets[:, 0], offsets[:, 1], flip


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, fill: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Batched crop of x (N, C, H, W) padded by ``pad``, then horizontal flip: one gather, no Python loop.

    Output pixel (i, j) of sample n is padded pixel (i + dy, j' + dx), j' = W - 1 - j if flip else j, i.e.
    torchvision's RandomCrop(padding=pad) followed by RandomHorizontalFlip. Padded pixels take the
    per-channel value ``fill`` (C,).
    """
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    rows = torch.arange(h, device=dev).view(1, h) + (dy - pad).view(n, 1)  # source row in x, (n, h)
    cols = torch.arange(w, device=dev).view(1, w)
    cols = torch.where(flip.view(n, 1), w - 1 - cols, cols) + (dx - pad).view(n, 1)  # source column, (n, w)
    inside = ((rows >= 0) & (rows < h)).view(n, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, w)
    src = rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)  # flat index, (n, h, w)
    out = x.reshape(n, c, h * w).gather(2, src.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return torch.where(inside.view(n, 1, h, w), out, fill.to(dev, x.dtype).view(1, c, 1, 1))


def crop_flip_augment(
    fill: torch.Tensor, pad: int = 4
) -> Callable[[torch.Tensor, torch.Generator, int, int], torch.Tensor]:
    """A ``Data.augment``: draws crops and flips for the whole global batch and applies this rank's rows."""

    def augment(x_local: torch.Tensor, gen: torch.Generator, offset: int, global_batch: int) -> torch.Tensor:
        if offset < 0 or offset + x_local.shape[0] > global_batch:
            end = offset + x_local.shape[0]
            raise ValueError(f"rows [{offset}, {end}) lie outside a global batch of {global_batch} samples")
        dy, dx, flip = crop_flip_choices(gen, global_batch, pad)
        rows = slice(offset, offset + x_local.shape[0])
        return crop_flip(x_local, dy[rows], dx[rows], flip[rows], fill, pad)

    return augment


def synthetic_split(spec: ImageSet, n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels of a dataset's shape (``synthetic_data``: smoke runs and
    throughput benchmarks without downloads); they then go through the real normalise/augment path."""
    gen = generator(seed, "synthetic-" + split)
    images = torch.randint(0, 256, (n, *spec.shape), generator=gen, dtype=torch.uint8)
    return images, torch.randint(0, spec.num_classes, (n,), generator=gen)


def hold_out(n: int, val_samples: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices of a training set of ``n`` samples, ``val_samples`` of them held out.

    The held-out ones are the first ``val_samples`` of a permutation of the (data_seed, "validation")
    stream: a function of the data alone (not of the run's seed, the world size or a resume). Both
    index sets are in ascending order, so the kept samples keep their published order.
    """
    perm = torch.randperm(n, generator=generator(data_seed, "validation"))
    return perm[val_samples:].sort().values, perm[:val_samples].sort().values


def load_images(name: str, cfg: DataConfig, device: torch.device) -> Data:
    """Load a prepared image dataset: the splits normalised on the device, with crop+flip where standard.

    Padding is black in pixel space, as torchvision's RandomCrop(padding=4) pads before Normalize; after
    normalisation that is -mean/std per channel. ``val_samples`` training images are held out (``hold_out``).
    """
    spec = IMAGE_SETS[name]
    if cfg.synthetic_data:
        x_train, y_train = synthetic_split(spec, cfg.train_samples, cfg.data_seed, "train")
        x_test, y_test = synthetic_split(spec, cfg.test_samples, cfg.data_seed, "test")
    else:
        root = cache_dir(cfg.data_root)
        x_train, y_train = read_split(name, "train", root)
        x_test, y_test = read_split(name, "test", root)
    x_val, y_val = x_train[:0], y_train[:0]
    if cfg.val_samples:
        kept, held = hold_out(x_train.shape[0], cfg.val_samples, cfg.data_seed)
        x_train, y_train, x_val, y_val = x_train[kept], y_train[kept], x_train[held], y_train[held]
    black = -torch.tensor(spec.mean) / torch.tensor(spec.std)  # normalised value of pixel 0, per channel
    return Data(
        x_train=normalise(x_train.to(device), spec),
        y_train=y_train.to(device),
        x_test=normalise(x_test.to(device), spec),
        y_test=y_test.to(device),
        num_classes=spec.num_classes,
        augment=crop_flip_augment(black.to(device)) if spec.augment else None,
        x_val=normalise(x_val.to(device), spec),
        y_val=y_val.to(device),
    )


def _image_loader(name: str) -> Callable[..., Data]:
    def load(cfg: DataConfig, device: torch.device) -> Data:
        return load_images(name, cfg, device)

    return load


for _name, _spec in IMAGE_SETS.items():
    register(_name, _spec.description)(_image_loader(_name))
del _name, _spec


def epoch_batches(n_samples: int, global_batch: int, epoch: int, seed: int) -> torch.Tensor:
    """Indices of this epoch's global batches, shape (steps, global_batch); the last partial batch is dropped.

    Identical on every rank and for every world size: a permutation drawn from the (seed, epoch) stream.
    """
    perm = torch.randperm(n_samples, generator=generator(seed, "data", epoch))
    steps = n_samples // global_batch
    return perm[: steps * global_batch].view(steps, global_batch)


def local_share(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous 1/world share of a global batch of indices."""
    m = batch.numel() // world
    return batch[rank * m : (rank + 1) * m]
