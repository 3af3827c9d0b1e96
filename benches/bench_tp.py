"""Tensor parallel: communication per step (bytes and seconds) beside compute, and tokens/s by TP size.

* ``test_tp_step``: ``N`` ranks (CPU: 2 gloo processes on a tiny fp32 model; GPU: NCCL on every
  TP size in {2, 4, 8} the machine has GPUs for, LLaDA-8B / Llama-8B shapes in bf16, random
  shards) run the planner (dual cache, one token per step) and the executor (greedy decode); each
  rank measures its seconds per step, the seconds inside collectives (synchronised) and the bytes
  it handed to them. The timed benchmark in this process is TP=1 (the sharded classes on a world
  of one) against the plain model: the wrappers' overhead, which must be ~1x.
* ``test_communication_volume``: the computed per-step volume of LLaDA-8B and Llama-8B at TP
  2 / 4 / 8 (:func:`hybridkernels.distributed.step_communication`), printed (``-s``).

    pytest benches/bench_tp.py --benchmark-json=out.json -s
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, ON_GPU, compare

from hybridkernels.distributed import TensorParallelTransformer, TPGroup, step_communication
from hybridkernels.distributed.bench import StepShape, format_rows, measure_steps
from hybridkernels.distributed.comm import llada_8b, llama_8b
from hybridkernels.distributed.local import run_on_ranks
from hybridkernels.models import DiffusionPlanner, Transformer, TransformerConfig

TINY_PLANNER = TransformerConfig(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, causal=False, family="llada", mask_token_id=127,
)  # fmt: skip
TINY_EXECUTOR = TINY_PLANNER.replace(causal=True, family="llama", mask_token_id=None, head_dim=64)
if ON_GPU:
    PLANNER, EXECUTOR, DTYPE = llada_8b(), llama_8b(), torch.bfloat16
    PROMPT, GEN, BLOCK, NEW = 512, 64, 32, 64
    SIZES = [n for n in (2, 4, 8) if n <= torch.cuda.device_count()]
else:
    PLANNER, EXECUTOR, DTYPE = TINY_PLANNER, TINY_EXECUTOR, torch.float32
    PROMPT, GEN, BLOCK, NEW = 8, 8, 4, 8
    SIZES = [2]
TIMEOUT_S = 600 if ON_GPU else 120


def _measure(rank, world, batch):
    device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
    shape = StepShape(batch=batch, prompt=PROMPT, gen=GEN, block=BLOCK, new=NEW)
    return measure_steps(
        TPGroup(), planner=PLANNER, executor=EXECUTOR, dtype=DTYPE, device=device, shape=shape
    )


def _spawn(world: int, batch: int) -> list[dict]:
    try:
        return run_on_ranks(
            _measure, world, (batch,), backend="nccl" if ON_GPU else "gloo", timeout_s=TIMEOUT_S
        )
    except RuntimeError as exc:
        pytest.fail(f"tensor parallel benchmark: {exc}")


@pytest.mark.parametrize("batch", [1])
def test_tp_step(benchmark, batch):
    plain = Transformer(PLANNER, dtype=DTYPE, device=DEVICE).eval()
    single = TensorParallelTransformer.from_full_model(plain, tp_group=TPGroup.single())
    ids = torch.randint(0, PLANNER.vocab_size - 1, (batch, PROMPT), device=DEVICE)
    kw = dict(gen_length=GEN, block_length=BLOCK, steps=GEN, cache="dual")
    ours, base = DiffusionPlanner(single, mask_id=PLANNER.mask_token_id), DiffusionPlanner(plain)
    expected = base.generate(ids, **kw).tokens
    assert torch.equal(ours.generate(ids, **kw).tokens, expected)  # TP=1 is the plain model
    by_size = {f"tp{n}": _spawn(n, batch) for n in SIZES}
    for n, ranks in by_size.items():
        for r, rows in enumerate(ranks):
            print(f"\n{n}, rank {r}:\n{format_rows(int(n[2:]), rows)}")
    compare(
        benchmark,
        lambda: ours.generate(ids, **kw),
        lambda: base.generate(ids, **kw),
        rounds=3,
        warmup=1,
        ranks={n: ranks[0] for n, ranks in by_size.items()},
    )


def test_communication_volume():
    rows = {}
    greedy, sampled = dict(lm_head="greedy"), dict(lm_head="sampled")
    for name, config, kw in (
        ("LLaDA-8B dual-cache step, block 32, B=1", llada_8b(), dict(batch=1, tokens=32, lm_head_rows=32)),
        ("LLaDA-8B dual-cache step, block 32, B=16", llada_8b(), dict(batch=16, tokens=32, lm_head_rows=32)),
        ("LLaDA-8B no-cache step, L=768, B=1", llada_8b(), dict(batch=1, tokens=768, lm_head_rows=32)),
        ("Llama-8B decode step, greedy, B=1", llama_8b(), dict(batch=1, tokens=1, lm_head_rows=1, **greedy)),
        ("Llama-8B decode step, greedy, B=16", llama_8b(), dict(batch=16, tokens=1, lm_head_rows=1) | greedy),
        ("Llama-8B decode step, sampled, B=1", llama_8b(), dict(batch=1, tokens=1, lm_head_rows=1) | sampled),
    ):  # fmt: skip
        rows[name] = {n: step_communication(config, n, **kw) for n in (2, 4, 8)}
    for name, by_n in rows.items():
        cells = ", ".join(
            f"TP{n}: {c['payload_bytes'] / 2**20:.3f} MiB ({c['all_reduces']} all-reduces + "
            f"{c['all_gather_bytes']} B gather), ring {c['ring_traffic_bytes'] / 2**20:.3f} MiB"
            for n, c in by_n.items()
        )
        print(f"{name}: {cells}")
    assert rows["LLaDA-8B dual-cache step, block 32, B=1"][8]["all_gather_bytes"] == 32 * 9 * 8
