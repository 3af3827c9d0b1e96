"""Tensor-parallel step measurements: seconds per step, seconds and bytes inside collectives, and
tokens/s, for a planner (dual cache, one token per step) and an executor (greedy decode) on random
shards of the given shapes. Run on every rank (``hybridkernels bench --tp N`` under torchrun,
``benches/bench_tp.py``); every rank measures its own figures."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..models.config import TransformerConfig
from .comm import step_communication
from .group import TPGroup
from .model import TensorParallelTransformer


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one measurement runs: ``batch`` rows, ``prompt`` tokens, the planner's ``gen`` tokens
    in blocks of ``block`` (dual cache), the executor's ``new`` tokens."""

    batch: int = 1
    prompt: int = 8
    gen: int = 8
    block: int = 4
    new: int = 8


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_run(tp: TPGroup, run, steps: int, rows: int, device: torch.device) -> dict:
    run()  # warm-up (and CUDA graph capture)
    tp.stats.reset()
    tp.timed = True
    run()
    tp.timed = False
    stats = dataclasses.replace(tp.stats)
    tp.stats.reset()
    _synchronize(device)
    started = time.perf_counter()
    run()  # collectives not synchronised: the step time as deployed
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "step_ms": 1e3 * seconds / steps,
        "comm_ms": 1e3 * stats.seconds / steps,
        "comm_bytes": stats.bytes / steps,
        "collectives": (stats.all_reduce_calls + stats.all_gather_calls) / steps,
        "tokens_per_s": rows * steps / seconds,
    }


def measure_steps(
    tp: TPGroup,
    *,
    planner: TransformerConfig | None,
    executor: TransformerConfig | None,
    dtype: torch.dtype,
    device: torch.device,
    shape: StepShape = StepShape(),
) -> dict:
    """``{"planner": {...}, "executor": {...}}`` (the configs given): ``step_ms`` (wall time per
    step, the executor's prefill amortised into it), ``comm_ms`` (time inside the collectives,
    synchronised, from a second run), ``comm_bytes`` and ``collectives`` per step (eagerly issued:
    with CUDA graphs the decode steps replay theirs uncounted), ``tokens_per_s``, and
    ``computed_bytes`` (:func:`step_communication` for the same step)."""
    from ..models import ARExecutor, DiffusionPlanner

    out = {}
    B = shape.batch
    if planner is not None:
        model = TensorParallelTransformer.random(planner, tp_group=tp, dtype=dtype, device=device)
        ids = torch.randint(0, planner.vocab_size - 1, (B, shape.prompt), device=device)
        mask_id = planner.mask_token_id if planner.mask_token_id is not None else planner.vocab_size - 1
        ids = ids.masked_fill(ids == mask_id, 0)
        runner = DiffusionPlanner(model, mask_id=mask_id)
        kw = dict(gen_length=shape.gen, block_length=shape.block, steps=shape.gen, cache="dual")
        row = _measure_run(tp, lambda: runner.generate(ids, **kw), shape.gen, B, device)
        row["computed_bytes"] = step_communication(
            planner, tp.world_size, batch=B, tokens=shape.block, lm_head_rows=shape.block,
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        )["payload_bytes"]  # fmt: skip
        out["planner"] = row
        del runner, model
    if executor is not None:
        model = TensorParallelTransformer.random(executor, tp_group=tp, dtype=dtype, device=device)
        ids = torch.randint(0, executor.vocab_size, (B, shape.prompt), device=device)
        decoder = ARExecutor(model)
        row = _measure_run(
            tp, lambda: decoder.generate(ids, max_new_tokens=shape.new), shape.new - 1, B, device
        )
        row["computed_bytes"] = step_communication(
            executor, tp.world_size, batch=B, tokens=1, lm_head_rows=1, lm_head="greedy",
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        )["payload_bytes"]  # fmt: skip
        out["executor"] = row
    return out


def format_rows(world_size: int, rows: dict) -> str:
    """A markdown table of :func:`measure_steps`'s result."""
    lines = [
        "| TP | side | ms / step | collectives ms / step | collectives / step | KiB / step (computed) "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in rows.items():
        lines.append(
            f"| {world_size} | {side} | {r['step_ms']:.2f} | {r['comm_ms']:.2f} | {r['collectives']:.1f} | "
            f"{r['comm_bytes'] / 1024:.1f} ({r['computed_bytes'] / 1024:.1f}) | {r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)
