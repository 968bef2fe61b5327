"""The scaling model (hpcnoise.benchmarks.scaling): the alpha-beta formulas against hand-computed values,
the overlap pipeline against a hand-worked example, bucket assignment, the times file round trip, and
bad input (exit 2, one line, nothing written). Tiny models only: the whole file takes seconds."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from hpcnoise.benchmarks import scaling
from hpcnoise.benchmarks.network import Network, ring_allreduce_s
from hpcnoise.benchmarks.scaling import (
    Bucket,
    Measurement,
    ParamTime,
    buckets_of,
    pipeline_end,
    predict,
    read_times,
    step_s,
    write_times,
)
from hpcnoise.buckets import assign
from hpcnoise.cli.bench import scaling as scaling_cli
from hpcnoise.comm import Comm
from hpcnoise.models import MODELS


def test_ring_allreduce_by_hand() -> None:
    # 2 (p-1) alpha + 2 (p-1)/p n / beta with p = 4, alpha = 1 us, beta = 1 GB/s, n = 1 MB:
    # 6 us + 1.5 ms
    assert ring_allreduce_s(1e6, 4, 1e-6, 1e9) == pytest.approx(1.506e-3, rel=1e-12)
    assert ring_allreduce_s(1e6, 1, 1e-6, 1e9) == 0.0
    assert ring_allreduce_s(0, 2, 3e-6, 1e9) == pytest.approx(6e-6)


def test_two_level_allreduce_by_hand() -> None:
    net = Network()  # 8 GPUs per node, 2 us / 150 GB/s inside, 5 us / 25 GB/s per node across
    n = 100e6
    # W = 4, one node: 2*3*2us + 2*3/4 * 100 MB / 150 GB/s = 12 us + 1 ms
    assert net.allreduce_s(n, 4) == pytest.approx(12e-6 + 1e-3, rel=1e-12)
    # W = 16, two nodes: intra 2*7*2us + 2*7/8 * 100 MB / 150 GB/s = 28 us + 1.16667 ms;
    # inter 2*1*5us + 2*1/2 * 100 MB / 25 GB/s = 10 us + 4 ms
    assert net.allreduce_s(n, 16) == pytest.approx(28e-6 + 7 / 6 * 1e-3 + 10e-6 + 4e-3, rel=1e-12)
    assert net.nodes(16) == 2 and net.nodes(4) == 1 and net.nodes(1024) == 128
    assert net.allreduce_s(n, 1) == 0.0


def _measurement(ready: list[float], sizes: list[int], backward_end: float = 6.0) -> Measurement:
    params = tuple(ParamTime(f"p{i}", b, r) for i, (b, r) in enumerate(zip(sizes, ready)))
    return Measurement("toy", "lb", 128, 1.0, backward_end - 1.0, 0.5, params, 16)


def test_one_worker_has_no_communication_and_efficiency_one() -> None:
    m = _measurement([5.0, 4.0, 2.0], [10**6, 2 * 10**6, 3 * 10**6])
    (row,) = predict(m, Network(), [1], cap_bytes=2**20, min_buckets=1)
    assert row["comm ms"] == 0.0
    assert row["step ms"] == row["step ms overlap"] == pytest.approx(1e3 * m.compute_s)
    assert row["eff"] == row["eff overlap"] == 1.0


def test_overlap_pipeline_by_hand() -> None:
    # Ready at 1, 2, 6; reductions take 3, 1, 1. Bucket 0 runs 1..4; bucket 1 is ready at 2 but waits
    # for bucket 0: 4..5; bucket 2 runs 6..7. Backward ends at 6.
    buckets = [Bucket((0,), 0, 1.0), Bucket((1,), 0, 2.0), Bucket((), 0, 6.0)]
    assert pipeline_end([1.0, 2.0, 6.0], [3.0, 1.0, 1.0]) == 7.0
    plain, overlapped = step_s(buckets, backward_end_s=6.0, after_s=0.5, comm_s=[3.0, 1.0, 1.0])
    assert plain == 6.0 + 5.0 + 0.5
    assert overlapped == 7.0 + 0.5
    # Everything ready only when backward ends: nothing to overlap, both equal.
    at_end = [Bucket((0,), 0, 6.0), Bucket((1,), 0, 6.0), Bucket((), 0, 6.0)]
    assert step_s(at_end, 6.0, 0.5, [3.0, 1.0, 1.0]) == (11.5, 11.5)
    # Communication shorter than the gaps: fully hidden but for the last bucket.
    assert step_s(buckets, 6.0, 0.0, [0.5, 0.5, 0.25]) == (7.25, 6.25)


def test_overlap_is_never_slower() -> None:
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 6)
        end = rng.uniform(1, 10)
        ready = sorted(rng.uniform(0, end) for _ in range(k - 1)) + [end]
        comm = [rng.uniform(0, 3) for _ in range(k)]
        plain, overlapped = step_s([Bucket((), 0, r) for r in ready], end, 0.1, comm)
        assert overlapped <= plain + 1e-12
        assert overlapped >= end + 0.1 + comm[-1] - 1e-12  # the last bucket waits for backward's end


def test_buckets_respect_cap_and_reverse_order() -> None:
    sizes = [5, 1, 7, 3, 3, 2, 9, 1, 1]
    for cap in (1, 4, 6, 10, 100):
        buckets = assign(sizes, cap)
        flat = [i for b in buckets for i in b]
        assert flat == list(reversed(range(len(sizes))))  # every parameter once, in reverse order
        for b in buckets:
            assert len(b) == 1 or sum(sizes[i] for i in b) <= cap
        for b, nxt in zip(buckets, buckets[1:]):  # a new bucket only when the next one would not fit
            assert sum(sizes[i] for i in b) + sizes[nxt[0]] > cap
    assert assign(sizes, 6) == [[8, 7], [6], [5, 4], [3], [2], [1, 0]]


def test_buckets_are_the_training_steps(measured: dict[str, Measurement]) -> None:
    """The measured sizes are the training step's parameters, so the model's buckets are its buckets."""
    params = list(scaling.build_model("mlp", (40,), 10).parameters())
    assert [p.nbytes for p in measured["lb"].params] == [p.numel() * p.element_size() for p in params]


def test_rest_bucket_and_bytes() -> None:
    m = _measurement([5.0, 4.0, 2.0], [3, 2, 4])
    buckets = buckets_of(m, cap_bytes=5, min_buckets=1)
    assert buckets == [Bucket((2,), 4, 2.0), Bucket((1, 0), 5, 5.0), Bucket((), 16, 6.0)]
    # diagf: each bucket carries its parameters' diagonal-Fisher sums too; the rest loses them
    diagf = replace(m, regime="diagf", rest_bytes=16 + 9)
    assert buckets_of(diagf, cap_bytes=5, min_buckets=1) == [
        Bucket((2,), 8, 2.0),
        Bucket((1, 0), 10, 5.0),
        Bucket((), 16, 6.0),
    ]


@pytest.fixture(scope="module")
def measured() -> dict[str, Measurement]:
    torch.manual_seed(0)
    comm = Comm(rank=0, size=1, local_rank=0, launcher="none", device=torch.device("cpu"))
    return {r: scaling.measure("mlp", r, 16, 1, comm) for r in ("lb", "diagf")}


def test_measurement_is_consistent(measured: dict[str, Measurement]) -> None:
    lb, diagf = measured["lb"], measured["diagf"]
    names = [p.name for p in lb.params]
    assert names == [n for n, _ in scaling.build_model("mlp", (40,), 10).named_parameters()]
    grad_bytes = sum(p.nbytes for p in lb.params)
    assert diagf.rest_bytes - lb.rest_bytes == grad_bytes  # diag-F sums: one float per parameter entry
    for m in (lb, diagf):
        assert m.forward_s > 0 and m.backward_s > 0 and m.after_s >= 0
        assert all(m.forward_s <= p.ready_s <= m.backward_end_s for p in m.params)
        assert m.params[-1].ready_s <= m.params[0].ready_s  # backward reaches the last layer first


def test_times_file_round_trip(measured: dict[str, Measurement], tmp_path: Path) -> None:
    path = tmp_path / "times.json"
    write_times(path, list(measured.values()), {"device": "cpu", "repeats": 1})
    back, facts = read_times(path)
    assert back == list(measured.values())
    assert facts == {"device": "cpu", "repeats": 1}
    for m, b in zip(measured.values(), back):
        assert buckets_of(b, 2**16, 1) == buckets_of(m, 2**16, 1)


def test_command_writes_and_reads_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    times, first, second = tmp_path / "t.json", tmp_path / "a.csv", tmp_path / "b.csv"
    common = ["--models", "mlp", "--workers", "1,8,16,1024", "--bucket-mb", "0.5"]
    assert (
        scaling_cli.main([*common, "--batch", "16", "--repeats", "1", "--write-times", str(times), "--csv", str(first)])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("MODEL PREDICTION, not a measurement")
    assert scaling_cli.main([*common, "--times", str(times), "--csv", str(second)]) == 0
    assert f"read from {times}" in capsys.readouterr().out
    a, b = pd.read_csv(first), pd.read_csv(second)
    predicted = ["model", "regime", "W", "nodes", "buckets", "MB/step", "comm ms", "step ms", "step ms overlap", "eff"]
    pd.testing.assert_frame_equal(a[predicted], b[predicted])
    assert set(a["regime"]) == {"lb", "diagf"} and (a["buckets"] > 2).all()  # 1.2 MB of gradients in 0.5 MiB
    one = a[a["W"] == 1]
    assert (one["eff"] == 1).all() and (one["eff overlap"] == 1).all() and (one["comm ms"] == 0).all()
    assert (a["eff overlap"] >= a["eff"]).all()


BAD = [
    (["--models", "nope"], "--models: unknown model 'nope'"),
    (["--regimes", "lb,x"], "--regimes: unknown regime 'x'"),
    (["--bucket-mb", "0"], "--bucket-mb must be a finite number > 0, got 0"),
    (["--inter-bandwidth", "-1"], "--inter-bandwidth must be a finite number > 0, got -1"),
    (["--intra-bandwidth", "nan"], "--intra-bandwidth must be a finite number > 0, got nan"),
    (["--inter-latency", "-5"], "--inter-latency must be a finite number >= 0, got -5"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be a positive integer, got 0"),
    (["--workers", "8,12"], "--workers: 12 is not a world size of whole nodes"),
    (["--workers", "0"], "--workers: 0 is not a world size of whole nodes"),
    (["--workers", "8,x"], "--workers must be comma-separated positive integers"),
    (["--batch", "2"], "--batch must be an integer >= 4"),
    (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--batch", "x"], "argument --batch: invalid int value: 'x'"),
    (["--times", "missing.json"], "--times 'missing.json' is not readable JSON (No such file or directory)"),
    (["--times", "garbage.json"], "--times 'garbage.json' is not readable JSON"),
    (["--times", "other.json"], "is not a file written by --write-times"),
    (["--times", "broken.json"], "holds a malformed measurement (KeyError"),
    (["--times", "good.json", "--batch", "64"], "--batch measure; --times reads measured times"),
    (["--times", "good.json", "--models", "vgg16_bn"], "has no times for model 'vgg16_bn'; it has toy"),
    (["--csv", "no/out.csv", "--times", "good.json"], "cannot write --csv no/out.csv: '"),
    (["--csv", "."], "cannot write --csv .: '.' is a directory"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    (tmp_path / "broken.json").write_text(
        f'{{"format": "{scaling.TIMES_FORMAT}", "measurements": [{{"model": "mlp"}}]}}'
    )
    write_times(tmp_path / "good.json", [_measurement([2.0], [4])], {"device": "cpu", "repeats": 1})
    (tmp_path / "no").write_text("a file where a directory would be")
    before = sorted(tmp_path.rglob("*"))
    assert scaling_cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcnoise bench scaling: error: "), err
    assert message in lines[0]
    assert out == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_cli_dispatch() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpcnoise.cli", "bench", "scaling", "--models", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hpcnoise bench scaling: error: --models: unknown model 'nope'; valid: all, " + ", ".join(MODELS)
    ]
