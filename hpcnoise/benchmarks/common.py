"""What the benchmarks share: the dataset each model is built for and the benchmark run's configuration."""

from __future__ import annotations

from hpcnoise.config import Config

# The dataset whose shape each model is built for.
MODEL_DATA = {"mlp": "mnist1d", "cnn1d": "mnist1d", "mnist_mlp": "mnist", "lenet5": "mnist"}


def bench_config(model: str, regime: str, batch: int, steps: int, threads: int) -> Config:
    small = max(batch // 4, 1)
    trained_batch = small if regime == "sb" else batch
    return Config(
        dataset=MODEL_DATA.get(model, "cifar10"),
        model=model,
        regime=regime,
        batch_size=batch,
        small_batch=small,
        batchchange_epochs=1,  # batchchange: the reported second epoch is at the large batch
        ghost_bn=True,
        ghost_size=small,
        epochs=2,
        noise_epochs=2,
        lr=0.01,
        synthetic_data=True,
        train_samples=trained_batch * steps if regime != "batchchange" else batch * steps,
        test_samples=batch,
        checkpoint_every=0,
        threads=threads,
        progress=False,
        conv_mode="spatial" if MODEL_DATA.get(model, "cifar10") != "mnist1d" else "exact",
    )
