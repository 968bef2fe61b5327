"""Image datasets: prepare from raw upstream files, load, verify, augment; world-size invariant batch order.

Fixtures are tiny files in the exact upstream formats (MNIST/Fashion-MNIST IDX ``.gz`` in torchvision's
``<Class>/raw`` layout, CIFAR-10/100 python pickles). torchvision verifies raw files by the MD5s in its
class attributes; the tests set those attributes to the fixtures' MD5s and point every download URL at a
nonexistent local path, so nothing is ever fetched. The real ``prepare`` and loader code runs on them.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from torchvision.transforms.v2 import functional as TF

from hpcnoise import cli
from hpcnoise.cli import data as data_cli
from hpcnoise.comm import init
from hpcnoise.config import Config
from hpcnoise.data import (
    DATASETS,
    IMAGE_SETS,
    crop_flip,
    crop_flip_augment,
    crop_flip_choices,
    epoch_batches,
    local_share,
    make_split,
    normalise,
    split_path,
)
from hpcnoise.errors import ConfigError, DataFileError
from hpcnoise.files import save_torch_atomic as save_atomic
from hpcnoise.seeding import generator
from hpcnoise.train import train

NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
N_TRAIN, N_TEST = 20, 10  # fixture sizes; CIFAR-10's 20 train images are 5 batches of 4
NO_NETWORK = "file:///nonexistent-hpcnoise-test-mirror/"  # any download attempt fails at once, offline


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fixture_arrays(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (n, C, H, W) covering 0..255, and labels including 0 and num_classes - 1."""
    spec = IMAGE_SETS[name]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *spec.shape), dtype=np.uint8)
    images.reshape(n, -1)[0, :2] = (0, 255)
    labels = rng.integers(0, spec.num_classes, size=n)
    labels[:2] = (0, spec.num_classes - 1)
    return images, labels


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """An IDX file (big-endian header: magic 0x0000 08 ndim, then each dimension) of uint8 data, gzipped."""
    header = struct.pack(">I", (0x08 << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_raw(name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write upstream-format raw files of ``name`` into ``root`` and make torchvision accept them offline.

    Returns {split: (images (N, C, H, W), labels)} as written.
    """
    data = {"train": fixture_arrays(name, N_TRAIN, 1), "test": fixture_arrays(name, N_TEST, 2)}
    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        raw = root / cls.__name__ / "raw"
        raw.mkdir(parents=True)
        resources = []
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images, labels = data[split]
            for kind, array in (("images-idx3", images[:, 0]), ("labels-idx1", labels)):
                path = raw / f"{prefix}-{kind}-ubyte.gz"
                write_idx_gz(path, array)
                resources.append((path.name, md5(path)))
        monkeypatch.setattr(cls, "resources", resources)
        monkeypatch.setattr(cls, "mirrors", [NO_NETWORK])
        return data
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    flat = {s: (x.reshape(len(x), -1), [int(v) for v in y]) for s, (x, y) in data.items()}  # rows of R|G|B
    if name == "cifar10":
        train_list = []
        for b in range(5):
            rows = slice(4 * b, 4 * b + 4)
            entry = {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": flat["train"][1][rows],
                "data": flat["train"][0][rows],
                "filenames": [f"img_{i}.png" for i in range(4 * b, 4 * b + 4)],
            }
            write_pickle(folder / f"data_batch_{b + 1}", entry)
            train_list.append([f"data_batch_{b + 1}", md5(folder / f"data_batch_{b + 1}")])
        test = {
            "batch_label": "testing batch 1 of 1",
            "labels": flat["test"][1],
            "data": flat["test"][0],
            "filenames": [f"t_{i}.png" for i in range(N_TEST)],
        }
        write_pickle(folder / "test_batch", test)
        test_list = [["test_batch", md5(folder / "test_batch")]]
        meta_name, meta = (
            "batches.meta",
            {"num_cases_per_batch": 4, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072},
        )
    else:
        for split in ("train", "test"):
            x, y = flat[split]
            entry = {
                "filenames": [f"{split}_{i}.png" for i in range(len(y))],
                "batch_label": f"{split} batch",
                "fine_labels": y,
                "coarse_labels": [v // 5 for v in y],
                "data": x,
            }
            write_pickle(folder / split, entry)
        train_list, test_list = [["train", md5(folder / "train")]], [["test", md5(folder / "test")]]
        meta_name, meta = (
            "meta",
            {
                "fine_label_names": [f"f{i}" for i in range(100)],
                "coarse_label_names": [f"k{i}" for i in range(20)],
            },
        )
    write_pickle(folder / meta_name, meta)
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / meta_name)})
    monkeypatch.setattr(cls, "url", NO_NETWORK + cls.filename)
    return data


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Point every torchvision download at a nonexistent local path: tests never touch the network."""
    for cls in (tvd.MNIST, tvd.FashionMNIST):
        monkeypatch.setattr(cls, "mirrors", [NO_NETWORK])
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "url", NO_NETWORK + cls.filename)
    return monkeypatch


def prepared_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.pt")) + sorted(p.name for p in root.glob(".*.pt.*"))


# --- prepare --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_prepare_writes_one_verified_file_per_split(
    tmp_path: Path, offline: pytest.MonkeyPatch, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_raw(name, tmp_path, offline)
    assert data_cli.main([name, "--root", str(tmp_path)]) == 0
    assert prepared_files(tmp_path) == [f"{name}-test.pt", f"{name}-train.pt"]  # no temporary files left
    c, h, w = IMAGE_SETS[name].shape
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        blob = torch.load(tmp_path / f"{name}-{split}.pt", weights_only=True)
        assert (blob["format"], blob["name"], blob["split"]) == ("hpcnoise-images-v1", name, split)
        assert blob["shape"] == [n, c, h, w] and blob["num_classes"] == IMAGE_SETS[name].num_classes
        images, labels = blob["images"], blob["labels"]
        assert images.dtype == torch.uint8 and tuple(images.shape) == (n, c, h, w)
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (n,)
        assert np.array_equal(images.numpy(), raw[split][0])  # pixel values round-trip, channel order kept
        assert labels.tolist() == raw[split][1].tolist()
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        assert blob["sha256"] == digest
    assert capsys.readouterr().out.count(f"hpcnoise: wrote {tmp_path}") == 2
    # With the raw files in place a second run needs no network at all.
    assert data_cli.main([name, "--root", str(tmp_path), "--no-download"]) == 0


@pytest.mark.parametrize(
    "argv_tail,expected",
    [
        (["svhn"], "unknown dataset 'svhn'; valid: mnist, fashion_mnist, cifar10, cifar100"),
        ([], "the following arguments are required: name"),
        (["cifar10", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_prepare_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], expected: str
) -> None:
    root = tmp_path / "root"
    assert data_cli.main([*argv_tail, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hpcnoise: error: ") and expected in err
    assert not root.exists()


def test_prepare_refuses_unwritable_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    assert data_cli.main(["mnist", "--root", str(tmp_path / "a-file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write to --root {tmp_path / 'a-file' / 'sub'}" in err


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("download", [True, False])
def test_prepare_without_raw_files_writes_nothing(
    tmp_path: Path, offline: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, download: bool
) -> None:
    argv = [name, "--root", str(tmp_path)] + ([] if download else ["--no-download"])
    assert data_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"cannot read the raw {name} files in {tmp_path}" in err
    assert IMAGE_SETS[name].raw in err and f"hpcnoise data prepare {name} --root {tmp_path}" in err
    assert ("--no-download" in err) == (not download)
    assert prepared_files(tmp_path) == []


def test_prepare_rejects_a_damaged_raw_file(
    tmp_path: Path, offline: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_raw("cifar10", tmp_path, offline)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-7])  # its MD5 no longer matches; the download cannot replace it
    assert data_cli.main(["cifar10", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert prepared_files(tmp_path) == []


# --- loading ---------------------------------------------------------------------------------------------
@pytest.fixture
def prepared(tmp_path: Path, offline: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[Path, dict]:
    name = request.param
    raw = make_raw(name, tmp_path, offline)
    assert data_cli.main([name, "--root", str(tmp_path)]) == 0
    return tmp_path, raw


@pytest.mark.parametrize("prepared", NAMES, indirect=True)
def test_loader_normalises_each_channel(prepared: tuple[Path, dict], request: pytest.FixtureRequest) -> None:
    root, raw = prepared
    name = request.node.callspec.params["prepared"]
    spec = IMAGE_SETS[name]
    data = DATASETS[name].load(Config(dataset=name, data_root=str(root)), torch.device("cpu"))
    assert data.num_classes == {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}[name]
    assert data.in_shape == spec.shape and (data.augment is not None) == name.startswith("cifar")
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, -1, 1, 1)
    for x, y, (images, labels) in (
        (data.x_train, data.y_train, raw["train"]),
        (data.x_test, data.y_test, raw["test"]),
    ):
        assert x.dtype == torch.float32 and tuple(x.shape) == (len(images), *spec.shape)
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
        expected = (torch.from_numpy(images).double() / 255 - mean) / std
        torch.testing.assert_close(x.double(), expected, rtol=0, atol=2e-6)
        # Per-channel statistics of the loaded split: those of the raw pixels, shifted and scaled.
        raw_mean = torch.from_numpy(images).double().mean((0, 2, 3)) / 255
        torch.testing.assert_close(
            x.double().mean((0, 2, 3)), (raw_mean - mean.flatten()) / std.flatten(), atol=1e-6, rtol=0
        )
    # Pixel 0 and 255 of the first channel (the fixture holds both in its first image).
    lo, hi = -spec.mean[0] / spec.std[0], (1 - spec.mean[0]) / spec.std[0]
    assert abs(data.x_train[0].flatten()[0].item() - lo) < 1e-6 and abs(data.x_train[0].flatten()[1].item() - hi) < 1e-6
    assert {"mnist": -0.424213, "fashion_mnist": -0.810198, "cifar10": -1.989474, "cifar100": -1.897119}[name] == (
        pytest.approx(lo, abs=1e-6)
    )


@pytest.mark.parametrize("name", NAMES)
def test_published_statistics_map_to_zero_mean_unit_std(tmp_path: Path, name: str) -> None:
    """Pixels with the published mean and std (x 255) per channel load as mean 0, std 1 in every channel."""
    spec = IMAGE_SETS[name]
    n, (c, h, w) = 64, spec.shape
    # Per channel a two-valued pixel distribution with mean m and std s: lo, hi with a fraction p at hi.
    # m +- s with p = 1/2 where m >= s (CIFAR); else 0 and (m^2 + s^2) / m with p = m^2 / (m^2 + s^2) (MNIST).
    images = torch.empty(n, c, h, w, dtype=torch.uint8)
    position = (torch.arange(n * h * w, dtype=torch.float64) * 0.6180339887498949).remainder(1).view(n, h, w)
    for ch, (m, s) in enumerate(zip(spec.mean, spec.std)):
        lo, hi, p = (m - s, m + s, 0.5) if m >= s else (0.0, (m * m + s * s) / m, m * m / (m * m + s * s))
        images[:, ch] = torch.where(position < p, round(255 * hi), round(255 * lo)).to(torch.uint8)
    labels = torch.arange(n) % spec.num_classes
    for split in ("train", "test"):
        save_atomic(make_split(name, split, images, labels, source="test"), split_path(tmp_path, name, split))
    x = DATASETS[name].load(Config(dataset=name, data_root=str(tmp_path)), torch.device("cpu")).x_train
    assert x.mean((0, 2, 3)).abs().max().item() < 0.01
    assert (x.std((0, 2, 3), correction=0) - 1).abs().max().item() < 0.01


def test_missing_file_names_the_file_and_the_command(tmp_path: Path) -> None:
    cfg = Config(dataset="cifar10", data_root=str(tmp_path))
    with pytest.raises(DataFileError) as e:
        DATASETS["cifar10"].load(cfg, torch.device("cpu"))
    assert isinstance(e.value, ConfigError)
    assert str(e.value) == (
        f"prepared data file {tmp_path / 'cifar10-train.pt'} is missing; "
        f"create it with: hpcnoise data prepare cifar10 --root {tmp_path}"
    )


@pytest.mark.parametrize("prepared", ["cifar10"], indirect=True)
@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate", "is unreadable"),
        ("garbage", "is unreadable"),
        ("payload", "sha256 of the payload does not match the header"),
        ("other-split", "holds 'cifar10' split 'train'"),
        ("shape", "images are torch.uint8 (10, 3, 28, 28), expected uint8 (N, 3, 32, 32)"),
        ("missing-test", "is missing"),
    ],
)
def test_damaged_file_is_refused(prepared: tuple[Path, dict], damage: str, reason: str) -> None:
    root, _ = prepared
    path = root / "cifar10-test.pt"
    blob = torch.load(path, weights_only=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 100)
    elif damage == "payload":
        blob["images"][3, 1, 2, 3] ^= 1  # one bit of one pixel; header kept
        torch.save(blob, path)
    elif damage == "other-split":
        path.write_bytes((root / "cifar10-train.pt").read_bytes())
    elif damage == "shape":
        blob["images"] = blob["images"][:, :, :28, :28].contiguous()
        torch.save(blob, path)
    else:
        path.unlink()
    with pytest.raises(DataFileError) as e:
        DATASETS["cifar10"].load(Config(dataset="cifar10", data_root=str(root)), torch.device("cpu"))
    msg = str(e.value)
    assert msg.startswith(f"prepared data file {path} ") and reason in msg and "\n" not in msg
    assert msg.endswith(f"hpcnoise data prepare cifar10 --root {root}")


def test_cli_train_without_prepared_data_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    argv = [
        "train",
        "mnist1d-sb",
        "--smoke",
        "--dataset=cifar10",
        f"--data_root={tmp_path / 'none'}",
        f"--out_dir={runs}",
        "--progress=false",
        "--threads=1",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"hpcnoise: error: prepared data file {tmp_path / 'none' / 'cifar10-train.pt'} is missing; "
        f"create it with: hpcnoise data prepare cifar10 --root {tmp_path / 'none'}\n"
    )
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("prepared", ["cifar10"], indirect=True)
def test_training_on_prepared_cifar_with_augmentation(prepared: tuple[Path, dict]) -> None:
    root, _ = prepared
    cfg = Config(
        dataset="cifar10",
        data_root=str(root),
        model="mlp",
        regime="lb",
        batch_size=8,
        small_batch=4,
        epochs=2,
        lr=0.01,
        progress=False,
        threads=1,
        out_dir=str(root / "runs"),
        run_name="r",
    )
    summary = train(cfg, init("cpu"))
    assert summary["steps"] == 2 * (N_TRAIN // 8) and summary["dataset"] == "cifar10"
    assert 0.0 <= summary["final_test_error"] <= 1.0 and np.isfinite(summary["final_train_loss"])


# --- augmentation ------------------------------------------------------------------------------------------
BLACK = -torch.tensor(IMAGE_SETS["cifar10"].mean) / torch.tensor(IMAGE_SETS["cifar10"].std)


def batch(n: int, seed: int = 0) -> torch.Tensor:
    """Continuous random images (n, 3, 32, 32): every crop of one is distinguishable from every other."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def padded(x: torch.Tensor, fill: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Brute force: a (N, C, H + 2 pad, W + 2 pad) canvas of ``fill`` with x pasted in the middle."""
    n, c, h, w = x.shape
    out = fill.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    out[:, :, pad : pad + h, pad : pad + w] = x
    return out


def test_flip_is_an_exact_mirror_and_centre_crop_the_identity() -> None:
    x = batch(6)
    centre = torch.full((6,), 4)
    assert torch.equal(crop_flip(x, centre, centre, torch.ones(6, dtype=torch.bool), BLACK), x.flip(-1))
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(6, dtype=torch.bool), BLACK), x)


@pytest.mark.parametrize("flip", [False, True])
def test_every_crop_is_a_shift_of_the_padded_image(flip: bool) -> None:
    x = batch(81, seed=1)
    dy, dx = torch.arange(81) // 9, torch.arange(81) % 9  # all 9 x 9 offsets, one per sample
    out = crop_flip(x, dy, dx, torch.full((81,), flip), BLACK)
    big = padded(x, BLACK)
    for i in range(81):
        crop = big[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip else crop), (i, int(dy[i]), int(dx[i]))
    top = BLACK.view(3, 1, 1).expand(3, 4, 32)
    assert torch.equal(out[0, :, :4, :], top)  # dy = dx = 0: 4 rows of padding


def test_augmentation_equals_torchvision_crop_then_flip_then_normalise() -> None:
    """Same offsets: crop+flip of normalised data == torchvision pad(0), crop, hflip of uint8, normalised."""
    spec = IMAGE_SETS["cifar10"]
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    dy, dx, flip = crop_flip_choices(torch.Generator().manual_seed(4), 12)
    ours = crop_flip(normalise(images, spec), dy, dx, flip, BLACK)
    for i in range(12):
        ref = TF.crop(TF.pad(images[i], [4], fill=0), int(dy[i]), int(dx[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        ref = TF.normalize(ref.float() / 255, list(spec.mean), list(spec.std))
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-6)


def test_augment_is_reproducible_and_each_output_a_crop_of_its_input() -> None:
    augment = crop_flip_augment(BLACK)
    x = batch(16, seed=5)
    out = augment(x, generator(0, "augment", 7), 0, 16)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, augment(x, generator(0, "augment", 7), 0, 16))  # same generator, same result
    assert not torch.equal(out, augment(x, generator(0, "augment", 8), 0, 16))  # next step, other crops
    big = padded(x, BLACK)
    dy, dx, flip = crop_flip_choices(generator(0, "augment", 7), 16)
    for i in range(16):
        matches = [
            (a, b, f)
            for a in range(9)
            for b in range(9)
            for f in (False, True)
            if torch.equal(
                out[i], big[i, :, a : a + 32, b : b + 32].flip(-1) if f else big[i, :, a : a + 32, b : b + 32]
            )
        ]
        assert matches == [(int(dy[i]), int(dx[i]), bool(flip[i]))]


def test_crop_and_flip_choices_are_uniform() -> None:
    n = 90_000
    dy, dx, flip = crop_flip_choices(torch.Generator().manual_seed(0), n)
    assert abs(flip.double().mean().item() - 0.5) < 0.01  # std of the mean: 0.0017
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=9).double() / n
        assert counts.numel() == 9 and (counts - 1 / 9).abs().max().item() < 0.006  # std: 0.001


@pytest.mark.parametrize("world", [2, 4])
def test_augmentation_does_not_depend_on_the_world_size(world: int) -> None:
    augment = crop_flip_augment(BLACK)
    m_global = 16
    x = batch(m_global, seed=6)
    whole = augment(x, generator(3, "augment", 11), 0, m_global)
    m = m_global // world
    shares = [augment(x[r * m : (r + 1) * m], generator(3, "augment", 11), r * m, m_global) for r in range(world)]
    assert torch.equal(torch.cat(shares), whole)
    with pytest.raises(ValueError, match="outside a global batch of 16"):
        augment(x[:m], generator(3, "augment", 11), m_global - m + 1, m_global)


# --- batch order -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prepared", ["mnist"], indirect=True)
def test_global_batch_is_the_same_for_every_world_size(prepared: tuple[Path, dict]) -> None:
    root, _ = prepared
    data = DATASETS["mnist"].load(Config(dataset="mnist", data_root=str(root)), torch.device("cpu"))
    batches = epoch_batches(N_TRAIN, 8, epoch=1, seed=5)
    assert tuple(batches.shape) == (2, 8)  # 20 // 8 steps; the last partial batch dropped
    assert batches.unique().numel() == 16 and 0 <= int(batches.min()) and int(batches.max()) < N_TRAIN
    assert torch.equal(batches, epoch_batches(N_TRAIN, 8, epoch=1, seed=5))
    assert not torch.equal(batches, epoch_batches(N_TRAIN, 8, epoch=2, seed=5))
    for b in batches:
        for world in (1, 2, 4):
            shares = [local_share(b, r, world) for r in range(world)]
            assert all(s.numel() == 8 // world for s in shares)
            assert torch.equal(torch.cat(shares), b)
            x = torch.cat([data.x_train[s] for s in shares])
            assert torch.equal(x, data.x_train[b]) and torch.equal(
                torch.cat([data.y_train[s] for s in shares]), data.y_train[b]
            )
