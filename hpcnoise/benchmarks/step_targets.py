"""Reading ``hpcnoise bench step``'s table: the suite's targets per device type, the lines that judge
them (each with its diag-F variant's floor, hpcnoise.benchmarks.floor), and the header's note where
ranks busy-wait for each other on too few cores."""

from __future__ import annotations

import os
from typing import Any

from hpcnoise.comm import Comm

# (model or None for every model, dtype or None for every dtype, variant, its baseline, bound) per
# device type. The first of each list is a throughput ratio (the variant's samples/s over the baseline's,
# at least the bound); the others step-time ratios (the variant's step over the baseline's, at most it).
TARGETS = {
    "cpu": [
        (None, None, "lb", "horovod", 1.0),
        ("mlp", "float32", "diagf exact", "lb", 1.5),
        ("cnn1d", "float32", "diagf exact", "lb", 1.7),
        ("lenet5", "float32", "diagf spatial", "lb", 1.3),
        ("resnet44", "float32", "diagf spatial", "lb", 1.3),
        ("resnet44", "float32", "diagf exact", "lb", 2.5),
    ],
    "cuda": [
        (None, None, "lb", "horovod", 0.95),
        ("resnet44", "bf16", "diagf spatial", "lb", 1.3),
        (None, None, "diagf exact", "lb", 2.0),
    ],
}


YIELD = "OMPI_MCA_mpi_yield_when_idle"  # Open MPI: a process waiting in MPI gives its core away


def busy_wait_note(comm: Comm, threads: int) -> str:
    """A line for the table's header when this node's ranks busy-wait for each other on too few cores:
    each rank computes on ``threads`` threads and runs Horovod's background thread, and while a collective
    waits for the other ranks, Open MPI polls on a core a rank needs. Then a step that runs its collectives
    during backward (buckets, curvature sums) is slowed by more than its own work; ``YIELD=1`` (as the
    README's CPU figures were measured) makes the waiting thread yield. Empty where it does not apply."""
    if comm.size < 2 or comm.device.type != "cpu" or os.environ.get(YIELD):
        return ""
    local = comm.hvd.local_size() if comm.hvd is not None else comm.size
    cores = os.cpu_count() or 1
    if local * (threads + 1) <= cores:
        return ""
    return (
        f"note: {local} ranks, each with {threads} compute thread(s) and Horovod's, on {cores} cores: a rank "
        f"waiting in MPI polls a core the others compute on; export {YIELD}=1 for steadier ratios"
    )


def _verdict(met: bool, iqr: str, bound: float) -> str:
    """met / NOT met by the median; the bound inside the interquartile range says the rounds disagree."""
    low, high = (float(v) for v in iqr.split("-"))
    return ("met" if met else "NOT met") + (" (within the rounds' spread)" if low <= bound <= high else "")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["model"] == b["model"] and a["dtype"] == b["dtype"])


def targets(rows: list[dict[str, Any]], device: str = "cpu") -> list[str]:
    """One line per target of ``device``'s type that the measured rows allow: the median paired ratio
    with its interquartile range, and met / NOT met; then diag-F against BackPACK where both ran."""
    lines = []
    for model, dtype, variant, base, bound in TARGETS[device]:
        for row in rows:
            if row["variant"] != variant or model not in (None, row["model"]) or dtype not in (None, row["dtype"]):
                continue
            where = f"[{row['model']} {row['dtype']}]"
            if base == "horovod":
                value, iqr = row["vs horovod"], row["vs horovod IQR"]
                verdict = _verdict(value >= bound, iqr, bound)
                lines.append(f"{where} {variant} throughput >= {bound}x {base}: {value:.2f}x (IQR {iqr})  {verdict}")
            else:
                value, iqr = row["vs own base"], row["own base IQR"]
                verdict = _verdict(value <= bound, iqr, bound)
                floor = next((f for f in rows if f["variant"] == f"{variant} floor" and _same(f, row)), None)
                if floor is not None:  # what the step cannot go below (hpcnoise.benchmarks.floor)
                    verdict += f"; its floor {floor['vs own base']:.2f}x (IQR {floor['own base IQR']})"
                lines.append(f"{where} {variant} step <= {bound}x {base}: {value:.2f}x (IQR {iqr})  {verdict}")
    by = {(r["model"], r["dtype"], r["variant"]): r for r in rows}
    for (model, dtype, variant), bp in by.items():
        if variant != "backpack":
            continue
        for mode in ("diagf exact", "diagf spatial"):
            if (ours := by.get((model, dtype, mode))) is not None:
                a, b = ours["vs own base"], bp["vs own base"]
                verdict = "met" if a <= b else "NOT met"
                lines.append(
                    f"[{model} {dtype}] {mode} over lb <= BackPACK over its plain step: {a:.2f}x vs {b:.2f}x  {verdict}"
                )
    return lines
