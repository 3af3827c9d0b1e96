"""Commit schedules: what each step commits, that every schedule finishes the generation, and that
LLaDA's split equals the table ``get_num_transfer_tokens`` computes when a block starts."""

import math

import pytest
import torch

from hybridkernels import ops, reference
from hybridkernels.schedules import (
    FixedKSchedule,
    LLaDASchedule,
    ParallelForcedSchedule,
    StepPlan,
    ThresholdSchedule,
)

MASK, V = 31, 32


def run(schedule, x, *, backend="reference", logits_fn=None, seed=0):
    """Drive ``schedule`` with random logits; return the plans and per-step committed counts.
    The mask token is banned: committing it would leave its position masked."""
    g = torch.Generator().manual_seed(seed)
    plans, commits = [], []
    for plan in schedule.plans(x, MASK):
        Lr = plan.stop - plan.start
        logits = torch.randn(x.shape[0], Lr, V, generator=g) if logits_fn is None else logits_fn(plan)
        res = ops.unmask_step(
            x, logits=logits, mask_id=MASK, backend=backend, banned_token_ids=(MASK,), **plan.kwargs()
        )
        plans.append(plan)
        commits.append(res.committed.sum(dim=1))
    return plans, commits


def prompt_and_masks(B=3, prompt=4, gen=16):
    x = torch.full((B, prompt + gen), MASK)
    x[:, :prompt] = torch.arange(prompt)
    return x


def test_llada_matches_the_block_start_table():
    x = prompt_and_masks(gen=16)
    x[1, 4 + 2] = 7  # sequence 1 starts its first block with one mask fewer
    sched = LLaDASchedule(gen_start=4, gen_len=16, block_len=8, steps=6)  # 3 steps per block
    tables, plans = {}, []
    g = torch.Generator().manual_seed(1)
    for plan in sched.plans(x, MASK):
        if plan.step == 0:  # LLaDA computes its table when a block starts
            start, stop = plan.start, plan.stop
            tables[plan.stage] = reference.get_num_transfer_tokens(x[:, start:stop] == MASK, 3)
        assert torch.equal(plan.num_transfer, tables[plan.stage][:, plan.step])
        logits = torch.randn(3, 8, V, generator=g)
        res = ops.unmask_step(x, logits=logits, mask_id=MASK, banned_token_ids=(MASK,), **plan.kwargs())
        assert torch.equal(res.committed.sum(dim=1), plan.num_transfer)
        plans.append(plan)
    assert [(p.stage, p.step) for p in plans] == [(s, t) for s in range(2) for t in range(3)]
    assert torch.equal(tables[0][1], torch.tensor([3, 2, 2]))  # 7 masks over 3 steps
    assert not (x == MASK).any()


def test_fixed_k_commits_k_per_step_block_by_block():
    x = prompt_and_masks(gen=16)
    sched = FixedKSchedule(gen_start=4, gen_len=16, block_len=8, k=3)
    plans, commits = run(sched, x)
    assert len(plans) == 2 * math.ceil(8 / 3)
    assert [int(c[0]) for c in commits] == [3, 3, 2, 3, 3, 2]
    assert [(p.start, p.stop) for p in plans[:3]] == [(4, 12)] * 3
    assert not (x == MASK).any()


def test_threshold_stops_each_block_when_it_is_full():
    x = prompt_and_masks(B=2, gen=16)
    sched = ThresholdSchedule(gen_start=4, gen_len=16, block_len=8, threshold=0.5)

    def confident(plan):  # every row very sure: one step fills a block
        logits = torch.zeros(2, plan.stop - plan.start, V)
        logits[..., 5] = 20.0
        return logits

    plans, commits = run(sched, x, logits_fn=confident)
    assert [(p.stage, p.step) for p in plans] == [(0, 0), (1, 0)]
    assert all(p.threshold == 0.5 and p.num_transfer is None for p in plans)
    x2 = prompt_and_masks(B=2, gen=16)
    plans, commits = run(ThresholdSchedule(4, 16, 8, threshold=2.0), x2)  # nothing passes: one per step
    assert len(plans) == 16 and all(int(c.min()) == 1 for c in commits)
    assert not (x2 == MASK).any()


def test_parallel_forced_spreads_over_the_whole_generation():
    x = prompt_and_masks(B=2, gen=16)
    sched = ParallelForcedSchedule(gen_start=4, gen_len=16, k=4)

    def late_is_confident(plan):  # the last positions are the most confident
        logits = torch.zeros(2, plan.stop - plan.start, V)
        logits[..., 3] = torch.linspace(0, 8, plan.stop - plan.start)
        return logits

    plans, commits = run(sched, x, logits_fn=late_is_confident)
    assert len(plans) == 4 and all((p.start, p.stop) == (4, 20) for p in plans)
    assert all(int(c.min()) == 4 for c in commits)
    assert not (x == MASK).any()
    x2 = prompt_and_masks(B=2, gen=16)
    res = ops.unmask_step(
        x2, logits=late_is_confident(plans[0]), mask_id=MASK, **sched.plan(x2, MASK, 0, 0).kwargs()
    )
    assert res.committed[:, 12:].all() and not res.committed[:, :12].any()  # not left to right


def test_parallel_forced_with_a_step_budget_finishes():
    x = prompt_and_masks(B=2, gen=16)
    sched = ParallelForcedSchedule(gen_start=4, gen_len=16, k=2, steps=5)  # 2 * 5 < 16: the split decides
    plans, commits = run(sched, x)
    assert len(plans) == 5
    assert [int(c[0]) for c in commits] == [4, 3, 3, 3, 3] and all(int(c.min()) >= 2 for c in commits)
    assert not (x == MASK).any()
    x = prompt_and_masks(B=1, gen=16)
    assert [int(c[0]) for c in run(ParallelForcedSchedule(4, 16, k=5, steps=4), x)[1]] == [5, 5, 5, 1]
    with pytest.raises(ValueError, match="steps .5. is more than ceil.gen_len / k. = 4"):
        ParallelForcedSchedule(4, 16, k=5, steps=5)


def test_schedule_with_triton_backend(device):
    x = prompt_and_masks(B=2, gen=8).to(device)
    sched = LLaDASchedule(gen_start=4, gen_len=8, block_len=4, steps=4)
    g = torch.Generator().manual_seed(2)
    for plan in sched.plans(x, MASK):
        logits = torch.randn(2, plan.stop - plan.start, V, generator=g).to(device)
        kw = dict(logits=logits, mask_id=MASK, banned_token_ids=(MASK,), **plan.kwargs())
        ref = reference.unmask_step(x.clone(), **kw)
        out = ops.unmask_step(x, backend="triton", **kw)
        assert torch.equal(out.x, ref.x)
    assert not (x == MASK).any()


def test_step_plan_kwargs():
    nt = torch.tensor([1])
    assert StepPlan(0, 0, 3, 5, num_transfer=nt).kwargs() == {"start": 3, "num_transfer": nt}
    assert StepPlan(0, 0, 3, 5, threshold=0.9).kwargs() == {"start": 3, "threshold": 0.9}


def test_bad_arguments():
    with pytest.raises(ValueError, match="gen_len .16. must be a multiple of block_len .6."):
        LLaDASchedule(0, 16, 6, steps=8)
    with pytest.raises(ValueError, match="steps .3. must be a multiple of the number of blocks .2."):
        LLaDASchedule(0, 16, 8, steps=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        FixedKSchedule(0, 16, 8, k=0)
    with pytest.raises(ValueError, match="threshold must be a number"):
        ThresholdSchedule(0, 16, 8, threshold=float("nan"))
    with pytest.raises(ValueError, match="gen_start must be an int >= 0"):
        ParallelForcedSchedule(-1, 16, k=2)
    with pytest.raises(ValueError, match="L >= gen_start \\+ gen_len = 20"):
        next(ParallelForcedSchedule(4, 16, k=2).plans(torch.zeros(1, 10, dtype=torch.long), MASK))
    with pytest.raises(ValueError, match="step must be in"):
        LLaDASchedule(0, 16, 8, steps=4).plan(torch.zeros(1, 16, dtype=torch.long), MASK, 0, 2)
