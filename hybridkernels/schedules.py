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
``DreamSchedule``          whole generation   Dream's ``int(n * (1 - s / t))`` over
                                              ``linspace(1, eps, steps + 1)``, ``n`` the
                                              batch's mean mask count (or, ``origin``, each
                                              mask with probability ``1 - s / t``)
``DreamBlockSchedule``     block by block     Fast-dLLM's Dream blocks: the block's first
                                              position, then the threshold rule or Dream's
                                              count over the block's timesteps
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
    transfer_probability: Dream's ``origin`` rule instead: float32 0-dim tensor, each masked
        position of the window is committed when its uniform draw is below it.
    """

    stage: int
    step: int
    start: int
    stop: int
    num_transfer: torch.Tensor | None = None
    threshold: float | None = None
    transfer_probability: torch.Tensor | None = None

    def kwargs(self) -> dict:
        """``start`` and the rule, as ``unmask_step`` keywords."""
        if self.transfer_probability is not None:
            raise ValueError(
                "StepPlan.kwargs: Dream's origin plan commits each masked position with probability "
                "transfer_probability; it is not an unmask_step rule (propose with num_transfer=0, then draw)"
            )
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


def dream_timesteps(steps: int, eps: float, device) -> torch.Tensor:
    """Dream's float32 ``linspace(1, eps, steps + 1)`` on ``device`` (as Dream computes it)."""
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_num_transfer(masked: torch.Tensor, ts: torch.Tensor, i: int, last: bool) -> torch.Tensor:
    """Dream's count of step ``i``, int64 ``[B]``, on the device: ``n = masked.sum() / B`` (the
    *batch's* mean mask count, float32), ``int(n * (1 - ts[i + 1] / ts[i]))``, ``int(n)`` at the
    last step; capped at each row's own masks (Dream would write ``mask_id`` over committed
    tokens of a row with fewer; rows only differ when the model proposed the mask token)."""
    n = masked.sum() / masked.shape[0]
    k = n if last else n * (1 - ts[i + 1] / ts[i])
    return torch.minimum(k.long(), masked.sum(dim=1))


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    return float(eps)


class DreamSchedule(Schedule):
    """Dream's ``diffusion_generate`` (no blocks): one window, the whole generation, ``steps``
    steps from time 1 to ``eps``. Step ``i`` commits :func:`dream_num_transfer` tokens per row (the
    confidence rules), or with ``origin=True`` every masked position with probability
    ``1 - s / t`` (1 at the last step; the plan's ``transfer_probability``).

    ``first`` (a stale position before the window) is ignored: the window is the whole generation.
    """

    def __init__(self, gen_start: int, gen_len: int, steps: int, eps: float = 1e-3, *, origin: bool = False):
        super().__init__(gen_start, gen_len, gen_len)
        self.steps = check_positive_int("", "steps", steps)
        self.eps = _check_eps(eps)
        self.origin = bool(origin)

    def num_steps(self, stage: int) -> int:
        return self.steps

    def plan(self, x, mask_id, stage, step):
        start, stop, masked = self._masked(x, mask_id, stage)
        if not 0 <= step < self.steps:
            raise ValueError(f"step must be in [0, {self.steps}), got {step}")
        ts = dream_timesteps(self.steps, self.eps, x.device)
        last = step == self.steps - 1
        if self.origin:
            p = torch.ones((), device=x.device) if last else 1 - ts[step + 1] / ts[step]
            return StepPlan(stage, step, start, stop, transfer_probability=p)
        return StepPlan(stage, step, start, stop, num_transfer=dream_num_transfer(masked, ts, step, last))

    def stage_plans(self, x, mask_id, stage, *, first=None, skip_idle=False):
        """Each step from ``x`` as it is; ``skip_idle`` leaves out steps committing nothing (one host
        read of the count per step)."""
        for step in range(self.steps):
            plan = self.plan(x, mask_id, stage, step)
            if skip_idle and plan.num_transfer is not None and not bool(plan.num_transfer.any()):
                continue
            yield plan


class DreamBlockSchedule(Schedule):
    """Fast-dLLM's Dream block sampler (``generation_utils_block.py``). Each block ``[s, e)``:

    * step 0 commits position ``s`` (the plan's window ``[s, s + 1)``, one token);
    * then, on the window ``[s + 1, e)``, until the block holds no mask (a host check per step):
      with ``threshold``, every masked position whose confidence is ``>= threshold`` and the most
      confident one (Fast-dLLM's ``confidence_threshold``); else steps ``i = 1 .. S - 1`` of
      ``linspace(1, eps, S + 1)``, ``S = steps / num_blocks``, each committing
      :func:`dream_num_transfer` of the block's masks (all of them at ``i = S - 1``).

    With ``S == 1`` and no threshold only position ``s`` of each block is committed (as Fast-dLLM).
    ``first`` is ignored (the blocks never leave a stale mask unless the model proposes it).
    """

    def __init__(
        self,
        gen_start: int,
        gen_len: int,
        block_len: int,
        steps: int,
        eps: float = 1e-3,
        threshold: float | None = None,
    ):
        super().__init__(gen_start, gen_len, block_len)
        self.steps = check_positive_int("", "steps", steps)
        if steps % self.num_stages:
            raise ValueError(
                f"steps ({steps}) must be a multiple of the number of blocks ({self.num_stages})"
            )
        self.eps = _check_eps(eps)
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold)
        ):
            raise ValueError(f"threshold must be a number or None, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_stages

    def num_steps(self, stage: int) -> int:
        return self.block_len if self.threshold is not None else self.steps_per_block

    def plan(self, x, mask_id, stage, step):
        start, stop, masked = self._masked(x, mask_id, stage)
        if step == 0:
            return StepPlan(stage, 0, start, start + 1, num_transfer=masked[:, 0].long())
        if self.threshold is not None:
            return StepPlan(stage, step, start + 1, stop, threshold=self.threshold)
        S = self.steps_per_block
        if not 0 < step < S:
            raise ValueError(f"step must be in [0, {S}), got {step}")
        ts = dream_timesteps(S, self.eps, x.device)
        # Fast-dLLM counts the block's masks (position s included), the window is [s + 1, e).
        k = torch.minimum(dream_num_transfer(masked, ts, step, step == S - 1), masked[:, 1:].sum(dim=1))
        return StepPlan(stage, step, start + 1, stop, num_transfer=k)

    def stage_plans(self, x, mask_id, stage, *, first=None, skip_idle=False):
        start, stop = self.window(stage)
        yield self.plan(x, mask_id, stage, 0)
        for step in range(1, self.num_steps(stage)):
            if not bool((x[:, start:stop] == mask_id).any()):
                return
            plan = self.plan(x, mask_id, stage, step)
            if skip_idle and plan.num_transfer is not None and not bool(plan.num_transfer.any()):
                continue
            yield plan
