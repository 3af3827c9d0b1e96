"""Commit schedules of the diffusion planner: which window each denoising step ranks, and how many
of its masked positions it commits. Each one drives :func:`hybridkernels.ops.unmask_step`::

    schedule = LLaDASchedule(gen_start=prompt_len, gen_len=256, block_len=32, steps=256)
    for plan in schedule.plans(x, mask_id):
        scores = model(x)[:, plan.start : plan.stop]          # or the hidden states of those rows
        unmask_step(x, logits=scores, mask_id=mask_id, banned_token_ids=(mask_id,), **plan.kwargs())

The step counts assume every commit unmasks its position: pass ``banned_token_ids=(mask_id, ...)``
so that the mask token itself is never a candidate (LLaDA leaves this to the model).

The planner drives one schedule per generation: for each stage (window) it asks
:meth:`Schedule.stage_plans` for the steps, one at a time, each computed from the live tokens ``x``
when it is requested. A new decoding rule is a new subclass that implements ``num_steps`` and
``plan`` (a step's commit count from ``x`` on the device: no host sync, so fixed-length schedules
can run in CUDA graphs) and, where the rule needs per-window state or host checks, ``stage_plans``
(LLaDA's block-start table, the threshold rule's stop check).

=========================  =================  ==============================================
schedule                   window             per step
=========================  =================  ==============================================
``LLaDASchedule``          block by block     LLaDA's ``get_num_transfer_tokens`` split of the
                                              block's masks over its steps
``FixedKSchedule``         block by block     ``k`` tokens (fewer when fewer masks are left)
``ThresholdSchedule``      block by block     confidence >= threshold, at least one (Fast-dLLM)
``ParallelForcedSchedule`` whole generation   at least ``k`` tokens, ranked over the whole
                                              generation (NAP's parallel-forced decoding)
=========================  =================  ==============================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .common import get_num_transfer_tokens
from .validation import check_int_at_least, check_positive_int


@dataclass(frozen=True)
class StepPlan:
    """The arguments of one ``unmask_step`` call.

    stage: index of the window (block) being denoised; step: the step within it.
    start, stop: the window ``x[:, start:stop]``; the scores passed must cover exactly these rows.
    num_transfer: int64 ``[B]`` tokens to commit per sequence, or None when ``threshold`` is set.
    """

    stage: int
    step: int
    start: int
    stop: int
    num_transfer: torch.Tensor | None = None
    threshold: float | None = None

    def kwargs(self) -> dict:
        """``start`` and the rule, as ``unmask_step`` keywords."""
        if self.threshold is not None:
            return {"start": self.start, "threshold": self.threshold}
        return {"start": self.start, "num_transfer": self.num_transfer}


class Schedule:
    """Base class: the generation ``x[:, gen_start : gen_start + gen_len]`` split into windows of
    ``block_len`` denoised in order (one window when ``block_len == gen_len``)."""

    def __init__(self, gen_start: int, gen_len: int, block_len: int):
        check_int_at_least("", "gen_start", gen_start, 0)
        self.gen_start = gen_start
        self.gen_len = check_positive_int("", "gen_len", gen_len)
        self.block_len = check_positive_int("", "block_len", block_len)
        if gen_len % block_len:
            raise ValueError(f"gen_len ({gen_len}) must be a multiple of block_len ({block_len})")

    @property
    def num_stages(self) -> int:
        return self.gen_len // self.block_len

    def window(self, stage: int) -> tuple[int, int]:
        """``(start, stop)`` of stage ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage must be in [0, {self.num_stages}), got {stage}")
        start = self.gen_start + stage * self.block_len
        return start, start + self.block_len

    def num_steps(self, stage: int) -> int:
        """Steps of stage ``stage`` (an upper bound for :class:`ThresholdSchedule`)."""
        raise NotImplementedError

    def plan(self, x: torch.Tensor, mask_id: int, stage: int, step: int) -> StepPlan:
        """The ``unmask_step`` arguments of step ``step`` of stage ``stage`` given the tokens ``x [B, L]``."""
        raise NotImplementedError

    def stage_plans(
        self, x: torch.Tensor, mask_id: int, stage: int, *, first: int | None = None, skip_idle: bool = False
    ) -> Iterator[StepPlan]:
        """The steps of stage ``stage``, each computed when requested from ``x`` as it is then.

        first: the first row the steps rank (default: the window's start). The planner passes the
            first generated position still masked, so that a position an earlier window left
            masked (the model proposed ``mask_id``) stays committable, as in LLaDA; the commit
            counts are still the window's.
        skip_idle: leave out steps that commit nothing (a forward pass saved; the planner keeps
            them when they would consume random draws).
        """
        start, stop = self.window(stage)
        first = start if first is None else first
        for step in range(self.num_steps(stage)):
            plan = self.plan(x, mask_id, stage, step)
            yield dataclasses.replace(plan, start=first) if first != plan.start else plan

    def plans(self, x: torch.Tensor, mask_id: int) -> Iterator[StepPlan]:
        """Every step in order. Each plan is computed when requested, from ``x`` as it is then."""
        if x.dim() != 2 or x.shape[1] < self.gen_start + self.gen_len:
            raise ValueError(
                f"x must be [B, L] with L >= gen_start + gen_len = {self.gen_start + self.gen_len}, "
                f"got {tuple(x.shape)}"
            )
        for stage in range(self.num_stages):
            yield from self.stage_plans(x, mask_id, stage)

    def _masked(self, x: torch.Tensor, mask_id: int, stage: int) -> tuple[int, int, torch.Tensor]:
        start, stop = self.window(stage)
        return start, stop, x[:, start:stop] == mask_id


class LLaDASchedule(Schedule):
    """LLaDA's semi-autoregressive schedule: ``steps`` in total, ``steps / num_blocks`` per block;
    the masks a block holds when it starts are split evenly over its steps, earlier steps taking
    the remainder (``get_num_transfer_tokens``).

    Step ``s`` of ``S`` commits ``get_num_transfer_tokens(masks left, S - s)[:, 0]``: splitting what
    is left over the steps left gives, step for step, the same counts as LLaDA's table computed when
    the block starts, without keeping that table.
    """

    def __init__(self, gen_start: int, gen_len: int, block_len: int, steps: int):
        super().__init__(gen_start, gen_len, block_len)
        self.steps = check_positive_int("", "steps", steps)
        if steps % self.num_stages:
            raise ValueError(
                f"steps ({steps}) must be a multiple of the number of blocks ({self.num_stages})"
            )

    def num_steps(self, stage: int) -> int:
        return self.steps // self.num_stages

    def plan(self, x, mask_id, stage, step):
        start, stop, masked = self._masked(x, mask_id, stage)
        steps_left = self.num_steps(stage) - step
        if steps_left < 1:
            raise ValueError(f"step must be in [0, {self.num_steps(stage)}), got {step}")
        num_transfer = get_num_transfer_tokens(masked, steps_left)[:, 0]
        return StepPlan(stage, step, start, stop, num_transfer=num_transfer)

    def stage_plans(self, x, mask_id, stage, *, first=None, skip_idle=False):
        """LLaDA's table, computed once when the block starts (it differs from :meth:`plan`'s
        split of what is left only when a step commits ``mask_id`` itself)."""
        start, stop, masked = self._masked(x, mask_id, stage)
        table = get_num_transfer_tokens(masked, self.num_steps(stage))
        active = table.any(dim=0).tolist() if skip_idle else [True] * table.shape[1]
        first = start if first is None else first
        for step, on in enumerate(active):
            if on:
                yield StepPlan(stage, step, first, stop, num_transfer=table[:, step])


class FixedKSchedule(Schedule):
    """``k`` tokens per step block by block (the last step of a block takes what is left):
    ``ceil(block_len / k)`` steps per block."""

    def __init__(self, gen_start: int, gen_len: int, block_len: int, k: int):
        super().__init__(gen_start, gen_len, block_len)
        self.k = check_positive_int("", "k", k)

    def num_steps(self, stage: int) -> int:
        return math.ceil(self.block_len / self.k)

    def plan(self, x, mask_id, stage, step):
        start, stop, masked = self._masked(x, mask_id, stage)
        return StepPlan(stage, step, start, stop, num_transfer=masked.sum(dim=1).clamp(max=self.k))


class ThresholdSchedule(Schedule):
    """Fast-dLLM's parallel decoding, block by block: every masked position whose confidence is
    ``>= threshold`` and at least the most confident one, until the block has no mask left
    (at most ``block_len`` steps; :meth:`plans` checks the block on the host before each step)."""

    def __init__(self, gen_start: int, gen_len: int, block_len: int, threshold: float):
        super().__init__(gen_start, gen_len, block_len)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        self.threshold = float(threshold)

    def num_steps(self, stage: int) -> int:
        return self.block_len

    def plan(self, x, mask_id, stage, step):
        start, stop = self.window(stage)
        return StepPlan(stage, step, start, stop, threshold=self.threshold)

    def stage_plans(self, x, mask_id, stage, *, first=None, skip_idle=False):
        """Until the rows ``[first, stop)`` hold no mask: one host check before each step, at most
        one step per row."""
        start, stop = self.window(stage)
        first = start if first is None else first
        for step in range(stop - first):
            if not bool((x[:, first:stop] == mask_id).any()):
                return
            yield StepPlan(stage, step, first, stop, threshold=self.threshold)


class ParallelForcedSchedule(Schedule):
    """NAP's parallel-forced decoding: one window, the whole generation, and at least ``k`` tokens
    per step ranked over all of it (not block by block), so the model cannot fall back to
    left-to-right decoding.

    ``steps <= ceil(gen_len / k)`` (default: that, exactly ``k`` per step) is the step budget: step ``s``
    commits ``max(k, get_num_transfer_tokens(masks left, steps - s))`` per sequence (all that is left
    when that is fewer), so the generation is complete after ``steps`` steps even when
    ``k * steps < gen_len``.
    """

    def __init__(self, gen_start: int, gen_len: int, k: int, steps: int | None = None):
        super().__init__(gen_start, gen_len, gen_len)
        self.k = check_positive_int("", "k", k)
        most = math.ceil(gen_len / k)
        self.steps = most if steps is None else check_positive_int("", "steps", steps)
        if self.steps > most:
            raise ValueError(
                f"steps ({steps}) is more than ceil(gen_len / k) = {most}: at least k tokens per step "
                "would complete the generation before the last step"
            )

    def num_steps(self, stage: int) -> int:
        return self.steps

    def plan(self, x, mask_id, stage, step):
        start, stop, masked = self._masked(x, mask_id, stage)
        steps_left = self.steps - step
        if steps_left < 1:
            raise ValueError(f"step must be in [0, {self.steps}), got {step}")
        left = masked.sum(dim=1)
        split = get_num_transfer_tokens(masked, steps_left)[:, 0]
        num_transfer = torch.minimum(torch.clamp(split, min=self.k), left)
        return StepPlan(stage, step, start, stop, num_transfer=num_transfer)
