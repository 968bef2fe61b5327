"""Feeding CIFAR-shaped training batches: the suite's on-device path vs a torchvision DataLoader.

Random uint8 images of CIFAR's size (50,000 x 3x32x32; the values do not change the cost) are fed at
each batch size through
- the suite's path (hpcnoise.data): the whole split is a tensor on the device; a step gathers its batch
  by index from the epoch's permutation and applies the batched crop+flip augmentation and the
  normalisation. Two variants: the split held as uint8 (crop, then normalise the batch), and the split
  normalised once at load time, as the dataset loaders hand it to ``train`` (4x the memory);
- a torch DataLoader over a CIFAR-like dataset (PIL image per sample, as torchvision's CIFAR10 returns)
  with the standard transforms RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, with
  0 and 2 worker processes; batches are moved to the device.
Samples/s counts samples delivered ready for the model (normalised, augmented, on the device); the last
column is the speed-up over the fastest DataLoader at the same batch size. The suite's rows are the
median of several timed rounds; the DataLoader's come from one round after warm-up batches that absorb
worker start-up. On a CPU shared with other jobs, --threads 1 avoids OpenMP threads waiting on each other.

    hpcnoise bench data [--samples 50000] [--batches 128,512] [--workers 0,2]
                        [--steps 20] [--threads T] [--device auto|cpu|cuda]    (hpcnoise.cli.bench.data)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hpcnoise.data import IMAGE_SETS, crop_flip_augment, epoch_batches, normalise
from hpcnoise.seeding import generator

SPEC = IMAGE_SETS["cifar10"]
WARMUP = 3  # untimed batches before timing (DataLoader: includes starting the workers)
SUITE_ROUNDS = 5  # timed rounds of --steps batches for the suite's path; the median is reported


class CifarLike(Dataset):
    """What torchvision's CIFAR10 does per sample: an HWC uint8 array to a PIL image, then the transform."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def standard_transform() -> Callable:
    from torchvision import transforms as T  # type: ignore[import-untyped]

    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(SPEC.mean, SPEC.std),
        ]
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_suite(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device) -> float:
    """Samples/s of the suite's feed: epoch permutation, index gather, crop+flip, normalise, on the device.

    uint8 ``x`` is cropped with black (0) padding, then normalised: torchvision's order, a quarter of the
    memory traffic. Float ``x`` (normalised at load time, as ``train`` holds it) is cropped with the
    normalised black, exactly like ``Data.augment`` in training.
    """
    raw = x.dtype == torch.uint8
    fill = torch.zeros(3, device=device) if raw else -torch.tensor(SPEC.mean) / torch.tensor(SPEC.std)
    augment = crop_flip_augment(fill.to(device))
    batches = epoch_batches(x.shape[0], batch, epoch=0, seed=0)
    step = 0

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal step
        idx = batches[step % len(batches)].to(device)
        xb = augment(x[idx], generator(0, "augment", step, device=device), 0, batch)
        step += 1
        return (normalise(xb, SPEC) if raw else xb), y[idx]

    rounds = []
    for r in range(SUITE_ROUNDS + 1):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps if r else WARMUP):
            one()
        sync(device)
        if r:  # round 0 is warm-up
            rounds.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rounds)


def time_loader(dataset: Dataset, batch: int, workers: int, steps: int, device: torch.device) -> float:
    """Samples/s of a DataLoader with the standard transforms, batches moved to the device."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    it = iter(loader)
    for _ in range(WARMUP):
        next(it)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        xb, yb = next(it)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    sync(device)
    rate = steps * batch / (time.perf_counter() - t)
    del it  # stops the workers
    return rate


def device_of(name: str) -> torch.device:
    """``auto``: the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(samples: int, batch_sizes: list[int], worker_counts: list[int], steps: int, device: torch.device) -> None:
    """Print the table: samples/s of the suite's two paths and of each DataLoader, at each batch size."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, *SPEC.shape), dtype=torch.uint8, generator=g)  # N, C, H, W
    labels = torch.randint(0, SPEC.num_classes, (samples,), generator=g)
    x_u8, y = images.to(device), labels.to(device)
    x_float = normalise(x_u8, SPEC)  # what the loader hands to train: normalised once, float32
    dataset = CifarLike(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(), standard_transform())

    print(
        f"data feed: {samples} x {'x'.join(map(str, SPEC.shape))} uint8 images, device {device}, "
        f"torch {torch.__version__}"
    )
    print(
        f"threads: torch intra-op {torch.get_num_threads()} in the main process (of {os.cpu_count()} cores); "
        f"DataLoader workers are processes with 1 intra-op thread each"
    )
    print(f"{'batch':>5}  {'path':<50} {'samples/s':>10} {'vs best DataLoader':>19}")
    for batch in batch_sizes:
        rates = {
            "suite: gather uint8, crop/flip, normalise": time_suite(x_u8, y, batch, steps, device),
            "suite: gather normalised float, crop/flip (train)": time_suite(x_float, y, batch, steps, device),
        }
        for workers in worker_counts:
            rate = time_loader(dataset, batch, workers, steps, device)
            rates[f"DataLoader, standard transforms, {workers} worker{'s' * (workers != 1)}"] = rate
        best = max(v for k, v in rates.items() if k.startswith("DataLoader"))
        for label, rate in rates.items():
            print(f"{batch:>5}  {label:<50} {rate:>10,.0f} {rate / best:>18.1f}x")
