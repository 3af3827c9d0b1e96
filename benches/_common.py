"""Helpers for the pytest-benchmark suites: device choice and same-run comparisons.

Timing and roofline probes live in :mod:`hybridkernels.benchmarking` (``hybridkernels bench`` uses
them too). Under ``--benchmark-disable`` (CI's smoke run) :func:`compare` calls the fast path once
and times nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from hybridkernels.benchmarking import environment, roofline, synchronize, time_ms
from hybridkernels.models.cuda_graphs import capture, warm_up

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# HYBRIDKERNELS_BENCH_QUICK=1 (benches/gpu_check.sh): each module runs a subset of its GPU cases
# and fewer rounds, so that all of them fit in a few minutes; the default runs every case.
QUICK = os.environ.get("HYBRIDKERNELS_BENCH_QUICK", "") not in ("", "0")


def compare(
    benchmark,
    ours: Callable[[], object],
    baseline: Callable[[], object],
    *,
    device: torch.device = DEVICE,
    flops: float = 0.0,
    nbytes: float = 0.0,
    rounds: int = 10,
    warmup: int = 2,
    **extra,
) -> None:
    """Time ``ours`` with pytest-benchmark and ``baseline`` in the same run; record the speedup.

    Check that both compute the same thing *before* calling this. ``flops``/``nbytes`` are the
    work of one call of ``ours`` (for TFLOP/s and GB/s against the measured ceilings). ``warmup``
    untimed calls precede each of the three timings (end-to-end benchmarks whose calls take
    seconds pass 1).
    """

    def run():
        ours()
        synchronize(device)

    if benchmark.disabled:
        benchmark(run)
        return
    baseline_ms = time_ms(baseline, device, warmup=warmup, reps=rounds)
    ours_ms = time_ms(ours, device, warmup=warmup, reps=rounds)
    benchmark.extra_info.update(
        baseline_ms=baseline_ms,
        ours_ms=ours_ms,
        speedup=baseline_ms / ours_ms,
        **roofline(device, flops=flops, nbytes=nbytes, ms=ours_ms),
        **environment(device),
        **extra,
    )
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup)


def cuda_graphed(
    fn: Callable[[], object], device: torch.device = DEVICE, warmup: int = 2
) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph: returns ``graph.replay`` (``fn`` itself off the GPU).

    Timing a replay measures GPU time without Python launch overhead. Call ``fn`` once first when
    it autotunes or compiles (neither can happen during a capture).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn
    with torch.cuda.device(device):
        for _ in range(warmup):
            warm_up(fn)
        return capture(fn).replay
