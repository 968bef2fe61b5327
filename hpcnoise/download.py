"""Download an upstream image dataset (or read its raw files already present) and pack it into one compact
file per split; ``hpcnoise data prepare NAME --root DIR`` runs it (hpcnoise.cli.data).

Run once per dataset on a machine with internet (a login node): torchvision downloads the raw upstream
files into DIR and checks their MD5s. Where the raw files are already in DIR (copied there: MNIST IDX
``.gz`` files in ``DIR/MNIST/raw``, the CIFAR ``.tar.gz`` or its extracted folder), no network is used.
It then writes ``DIR/NAME-train.pt`` and ``DIR/NAME-test.pt`` (format in hpcnoise.data), each atomically,
after both splits have been read, so a failure leaves no prepared file half-written. Training jobs read
only these files (``--data_root=DIR``).

Bad input (unknown NAME, unwritable DIR, raw files neither present nor downloadable) raises
``PrepareError``, whose message is the one line the command prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcnoise.errors import ConfigError
from hpcnoise.files import unwritable

if TYPE_CHECKING:
    import torch

# torch, numpy and hpcnoise.data load only once the arguments are known good, so bad input answers at once.

# The torchvision.datasets class that reads each dataset's raw upstream files.
SOURCES: dict[str, str] = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


class PrepareError(ConfigError):
    """Bad input to ``prepare``: the message is the one line the user sees."""


def _check_writable(root: Path) -> None:
    """Prove that ``root`` is, or can be created as, a writable directory (creates nothing)."""
    problem = unwritable(root)
    if problem is not None:
        raise PrepareError(f"cannot write to --root {root}: {problem[1]}")


def _download_dirs(name: str, root: Path) -> list[Path]:
    """The directories a download of ``name`` may create, deepest first: the MNIST family's ``CLASS/raw``,
    ``root`` and those of its parents that do not exist yet."""
    own = root / SOURCES[name]
    dirs = [own / "raw", own, root] if name in ("mnist", "fashion_mnist") else [root]
    for parent in root.absolute().parents:
        if parent.exists():
            break
        dirs.append(parent)
    return dirs


def _remove_new_empty_dirs(dirs: list[Path], existed: list[bool]) -> None:
    """Remove those of ``dirs`` that did not exist before and are empty: what a failed download leaves."""
    for path, was_there in zip(dirs, existed):
        if not was_there:
            try:
                path.rmdir()
            except OSError:  # not empty (part of a download), or already gone
                pass


def one_line(e: BaseException, limit: int = 300) -> str:
    """The exception as one line of at most ``limit`` characters (torchvision's errors span lines)."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_raw(name: str, root: Path, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both splits of ``name`` via torchvision as {split: (uint8 images (N, C, H, W), int64 labels (N,))}."""
    import numpy as np
    import torch
    import torchvision.datasets  # type: ignore[import-untyped]

    from hpcnoise.data import IMAGE_SETS, prepare_command

    cls = getattr(torchvision.datasets, SOURCES[name])
    spec = IMAGE_SETS[name]
    out = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=split == "train", download=download)
        except Exception as e:  # download, MD5, archive and unpickling errors alike: one line for the user
            how = "is not allowed (--no-download)" if not download else "failed"
            raise PrepareError(
                f"cannot read the raw {name} files in {root} ({one_line(e)}); the download {how}. "
                f"Copy {spec.raw} into {root}, "
                f"or run `{prepare_command(name, root)}` on a machine with internet"
            ) from e
        if isinstance(ds.data, np.ndarray):  # CIFAR: (N, H, W, C) uint8
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        else:  # MNIST family: (N, H, W) uint8 tensor
            images = ds.data.unsqueeze(1)
        images = images.contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != spec.shape or len(labels) != len(images):
            raise PrepareError(
                f"raw {name} {split} split in {root} has images {images.dtype} {tuple(images.shape)} and "
                f"{len(labels)} labels; expected uint8 (N, {', '.join(map(str, spec.shape))}) and N labels"
            )
        out[split] = (images, labels)
    return out


def download_and_pack(name: str, root: Path, download: bool = True) -> list[Path]:
    """Read both raw splits of ``name`` in ``root`` (downloading if allowed); write both prepared files."""
    if name not in SOURCES:
        raise PrepareError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")
    _check_writable(root)
    from hpcnoise.data import make_split, split_path  # lazy: torch
    from hpcnoise.files import save_torch_atomic

    dirs = _download_dirs(name, root)
    existed = [d.exists() for d in dirs]
    try:
        splits = read_raw(name, root, download)
    except PrepareError:
        _remove_new_empty_dirs(dirs, existed)  # a failed download leaves no empty directories behind
        raise
    written = []
    for split, (images, labels) in splits.items():
        path = split_path(root, name, split)
        blob = make_split(name, split, images, labels, source=f"torchvision.datasets.{SOURCES[name]}")
        save_torch_atomic(blob, path)
        written.append(path)
        n, c, h, w = images.shape
        print(f"hpcnoise: wrote {path}: {n} images {c}x{h}x{w} uint8, sha256 {blob['sha256'][:16]}...")
    return written
