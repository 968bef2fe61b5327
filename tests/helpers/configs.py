"""Small configs for tests and their --key=value form."""

from __future__ import annotations

from hpcnoise.config import Config


def small_config(**changes: object) -> Config:
    """A seconds-long MNIST-1D config: 2048 train / 512 test samples, global batch 256."""
    base: dict[str, object] = dict(
        train_samples=2048,
        test_samples=512,
        batch_size=256,
        small_batch=64,
        epochs=2,
        lr=0.2,
        progress=False,
        threads=1,
    )
    base.update(changes)
    return Config(**base)  # type: ignore[arg-type]


def overrides(cfg: Config) -> list[str]:
    """--key=value arguments that rebuild ``cfg`` from the defaults."""
    out = []
    for key, value in cfg.to_dict().items():
        if value != getattr(Config(), key):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            out.append(f"--{key}={text}")
    return out
