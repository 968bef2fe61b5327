"""Checkpoints written before the statistics registry encoded its own values still resume.

Earlier versions wrote K-FAC factors as ``{"__kfactors__": [A, G, weight, bias]}`` wherever they
occurred: in the statistics cache, and inside the regime state's square roots (A^1/2, G^1/2, factors).
Now the ``kfac`` statistic encodes the cache in that same form (``Statistic.to_plain``), and the regime
state holds (A^1/2, G^1/2, weight, bias); a state of the older shape is recomputed from the cached
factors, which gives the same roots and so the same noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hpcnoise.checkpoint import encode
from hpcnoise.comm import Comm
from hpcnoise.curvature import KFactors
from hpcnoise.lifecycle import load_checkpoint
from hpcnoise.regimes import REGIMES, NoiseInput, _psd_sqrt
from hpcnoise.seeding import generator
from hpcnoise.statistics import STATISTICS
from tests.helpers.configs import small_config


def _factors() -> tuple[list[torch.Tensor], list[KFactors]]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    return grads, [KFactors(a @ a.T, g @ g.T, 0, 1)]


def test_older_kfac_checkpoint_resumes_with_the_same_noise(tmp_path: Path) -> None:
    cfg = small_config(regime="kfac", out_dir=str(tmp_path))
    grads, factors = _factors()
    diag = [g.square() for g in grads]
    tagged = [{"__kfactors__": [f.A, f.G, f.weight, f.bias]} for f in factors]
    older_roots = [(_psd_sqrt(f.A), _psd_sqrt(f.G), tag) for f, tag in zip(factors, tagged)]
    position = {
        "epoch": 1,
        "batch": 0,
        "step": 7,
        "sums": [0.0, 0.0],
        "epoch_time_s": 0.0,
        "history": [],
        "statistics": {"kfac": tagged, "diag_fisher": diag},
        "regime_state": {"kfac_sqrt": older_roots},
        "elapsed_s": 0.0,
    }
    (tmp_path / "checkpoint.pt").write_bytes(encode(cfg.to_dict(), {}, {}, position))
    comm = Comm(rank=0, size=1, local_rank=0, launcher="none", device=torch.device("cpu"))
    payload, path = load_checkpoint(tmp_path, cfg, comm)
    assert path.name == "checkpoint.pt"
    restored = payload["position"]
    assert [type(f) for f in restored.statistics["kfac"]] == [KFactors]
    assert torch.equal(restored.statistics["kfac"][0].A, factors[0].A)

    def noise(state: dict) -> list[torch.Tensor]:
        x = NoiseInput(cfg, grads, restored.statistics, generator(cfg.seed, "noise", 7), state, frozenset())
        return REGIMES["kfac"].noise(x)  # type: ignore[misc]

    resumed_state = restored.regime_state
    resumed = noise(resumed_state)
    fresh = noise({})
    assert all(torch.equal(a, b) for a, b in zip(resumed, fresh, strict=True))
    assert [len(r) for r in resumed_state["kfac_sqrt"]] == [4]  # recomputed in the current shape


def test_statistics_round_trip_through_their_plain_form() -> None:
    _, factors = _factors()
    plain = STATISTICS["kfac"].to_plain(factors)
    assert [list(item) for item in plain] == [["__kfactors__"]]  # the tagged form older checkpoints hold
    a, g, weight, bias = plain[0]["__kfactors__"]
    assert a is factors[0].A and g is factors[0].G and (weight, bias) == (0, 1)
    back = STATISTICS["kfac"].from_plain(plain)
    assert back == factors  # KFactors compare their fields: the same tensor objects and indices
    diag = [torch.ones(2)]
    assert STATISTICS["diag_fisher"].from_plain(STATISTICS["diag_fisher"].to_plain(diag)) is diag
