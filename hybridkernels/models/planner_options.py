"""``PlannerOptions``: how :meth:`DiffusionPlanner.generate` decodes, validated on construction.

The options that pick the decoding rule (``steps``, ``block_length``, ``threshold``, ``schedule``,
``parallel_k``) become one :class:`~hybridkernels.schedules.Schedule` (:meth:`make_schedule`); the
planner's window loop drives whichever schedule it gets.
"""

from __future__ import annotations

import dataclasses
import math

from ..schedules import (
    DreamBlockSchedule,
    DreamSchedule,
    LLaDASchedule,
    ParallelForcedSchedule,
    Schedule,
    ThresholdSchedule,
)
from ..validation import check_bool, check_choice, check_number, check_positive_int

WHERE = "DiffusionPlanner.generate"
CACHES = (None, "prefix", "dual")
SCHEDULES = ("block", "parallel")
REMASKING = ("low_confidence", "random")
FAMILIES = ("llada", "dream")
# Dream's diffusion_generate algorithms; what each ranks by in ops.unmask_step ("origin": none).
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
DREAM_RULES = {"maskgit_plus": "low_confidence", "topk_margin": "topk_margin", "entropy": "entropy"}
DEFAULT_DREAM_ALG = "entropy"
DREAM_ONLY = ("alg", "alg_temp", "top_p", "top_k", "eps")
# LLaDA-only options and their defaults (a Dream planner refuses other values).
LLADA_ONLY = {
    "cfg_scale": 0.0,
    "remasking": "low_confidence",
    "schedule": "block",
    "parallel_k": None,
    "logits_eos_inf": False,
    "confidence_eos_eot_inf": False,
}


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Decoding options of :meth:`DiffusionPlanner.generate` (LLaDA's names where LLaDA has one).

    gen_length: tokens to generate.
    steps: denoising steps in total, split evenly over the windows.
    block_length: window length; ``gen_length % block_length == 0`` and ``steps`` a multiple of the
        number of blocks. None: ``gen_length`` (one window).
    temperature: 0 = greedy; > 0 samples ``softmax(logits / temperature)`` (Gumbel-max).
    cfg_scale: classifier-free guidance, LLaDA's rule (the unconditional pass has the prompt set to
        ``mask_id``).
    remasking: ``"low_confidence"`` or ``"random"`` (rank by a uniform draw).
    threshold: Fast-dLLM's parallel decoding: each step commits every masked position whose
        confidence is ``>= threshold`` and at least the most confident one, until the window is done
        (at most ``block_length`` steps a window; ``steps`` then only has to divide evenly).
    cache: None, ``"prefix"`` or ``"dual"`` (Fast-dLLM's K/V caches; see :mod:`.planner`).
    cache_refresh: with a cache, also refresh every ``cache_refresh`` steps inside a window.
    schedule: ``"block"`` (LLaDA's semi-autoregressive blocks), ``"parallel"`` (NAP's
        parallel-forced decoding: one window, the whole generation, at least ``parallel_k`` tokens
        per step, default ``gen_length // steps``), or a :class:`~hybridkernels.schedules.Schedule`
        to drive as it is (its ``gen_start`` the prompt length, its ``gen_len`` ``gen_length``;
        ``steps``, ``block_length`` and ``threshold`` are then the schedule's business).
    eos_early_stop: after each window, a sequence whose generation so far ends in a run of EOS
        that starts at its first EOS gets EOS in all later positions (LLaDA pads its answers with
        EOS); once every sequence is so, the remaining windows are skipped.
    logits_eos_inf: EOS is never sampled. confidence_eos_eot_inf: EOS / EoT candidates are
        committed last (both as in LLaDA).

    Dream's options (a Dream planner only; Dream's ``diffusion_generate`` names, ``gen_length`` is
    its ``max_new_tokens``):

    alg: ``"origin"`` (each mask committed with probability ``1 - s / t``), ``"maskgit_plus"``
        (max probability), ``"topk_margin"`` (top-1 minus top-2), ``"entropy"`` (negative
        entropy); None: ``"entropy"`` (``"maskgit_plus"`` with a ``threshold``, the only rule
        Fast-dLLM's threshold sampler has). Without ``block_length``/``cache``/``threshold`` the steps
        are Dream's own (:class:`~hybridkernels.schedules.DreamSchedule`), else Fast-dLLM's Dream
        blocks (:class:`~hybridkernels.schedules.DreamBlockSchedule`; ``origin`` has no block rule).
    alg_temp: > 0: the committed positions are drawn from ``softmax(confidence / alg_temp)``.
    top_p, top_k: Dream's filters, applied (after ``/ temperature``) before the token and its
        confidence; they need the window's logits (``[B, window, V]`` float32, not fused).
    eps: the last timestep of ``linspace(1, eps, steps + 1)``.
    Dream's ``temperature`` also scales the confidence (``softmax(logits / T)``), unlike LLaDA's.
    """

    gen_length: int = 128
    steps: int = 128
    block_length: int | None = None
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cache_refresh: int | None = None
    schedule: str | Schedule = "block"
    parallel_k: int | None = None
    eos_early_stop: bool = False
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    alg: str | None = None
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3

    def __post_init__(self):
        for name in ("gen_length", "steps"):
            check_positive_int(WHERE, name, getattr(self, name))
        if self.block_length is not None:
            check_positive_int(WHERE, "block_length", self.block_length)
        if self.gen_length % self.window_length:
            raise ValueError(
                f"{WHERE}: gen_length ({self.gen_length}) must be a multiple of block_length "
                f"({self.block_length})"
            )
        for name in ("temperature", "cfg_scale"):
            check_number(WHERE, name, getattr(self, name), low=0)
        check_choice(WHERE, "remasking", self.remasking, REMASKING)
        check_choice(WHERE, "cache", self.cache, CACHES)
        if not isinstance(self.schedule, Schedule):
            check_choice(WHERE, "schedule", self.schedule, SCHEDULES)
        elif self.schedule.gen_len != self.gen_length:
            raise ValueError(
                f"{WHERE}: the schedule generates {self.schedule.gen_len} tokens, "
                f"gen_length is {self.gen_length}"
            )
        if self.threshold is not None and (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or math.isnan(self.threshold)
        ):
            raise ValueError(f"{WHERE}: threshold must be a number or None, got {self.threshold!r}")
        if self.cache_refresh is not None:
            check_positive_int(WHERE, "cache_refresh", self.cache_refresh)
            if self.cache is None:
                raise ValueError(f"{WHERE}: cache_refresh needs cache='prefix' or 'dual'")
        for name in ("eos_early_stop", "logits_eos_inf", "confidence_eos_eot_inf"):
            check_bool(WHERE, name, getattr(self, name))
        if self.schedule == "parallel":
            if self.window_length != self.gen_length:
                raise ValueError(
                    f"{WHERE}: schedule='parallel' denoises the whole generation at once; leave "
                    f"block_length None or equal to gen_length ({self.gen_length}), got {self.block_length}"
                )
            if self.threshold is not None:
                raise ValueError(f"{WHERE}: give threshold or schedule='parallel', not both")
            if self.steps > self.gen_length:
                raise ValueError(
                    f"{WHERE}: schedule='parallel' needs steps <= gen_length ({self.gen_length}), "
                    f"got {self.steps}"
                )
            if self.parallel_k is not None:
                check_positive_int(WHERE, "parallel_k", self.parallel_k)
        elif self.parallel_k is not None:
            raise ValueError(f"{WHERE}: parallel_k is only for schedule='parallel'")
        self._check_dream()
        num_windows = self.gen_length // self.window_length
        if self.steps % num_windows:
            raise ValueError(
                f"{WHERE}: steps ({self.steps}) must be a multiple of the number of blocks "
                f"({num_windows} = gen_length / block_length)"
            )

    def _check_dream(self) -> None:
        if self.alg is not None:
            check_choice(WHERE, "alg", self.alg, DREAM_ALGS)
            for name, default in LLADA_ONLY.items():
                if _differs(self, name, default):
                    raise ValueError(
                        f"{WHERE}: {name}={getattr(self, name)!r} is a LLaDA option, alg={self.alg!r} "
                        f"a Dream one: the options mix families"
                    )
        if self.alg_temp is not None:
            check_number(WHERE, "alg_temp", self.alg_temp, low=0)
        if self.top_p is not None:
            check_number(WHERE, "top_p", self.top_p, low=0)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"{WHERE}: top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            check_positive_int(WHERE, "top_k", self.top_k)
        check_number(WHERE, "eps", self.eps, low=0)
        if not 0 < self.eps < 1:
            raise ValueError(f"{WHERE}: eps must be in (0, 1), got {self.eps!r}")

    def check_family(self, family: str) -> None:
        """``ValueError`` naming the first option that is not ``family``'s (``"llada"``/``"dream"``)."""
        check_choice(WHERE, "family", family, FAMILIES)
        if family == "llada":
            for name in DREAM_ONLY:
                default = 1e-3 if name == "eps" else None
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{WHERE}: {name} is a Dream option; this planner's model is LLaDA-family "
                        f"(pass the options of its family, or load a Dream checkpoint)"
                    )
            return
        for name, default in LLADA_ONLY.items():
            if _differs(self, name, default):
                raise ValueError(
                    f"{WHERE}: {name}={getattr(self, name)!r} is a LLaDA option; this planner's model is "
                    "Dream (its options: alg, alg_temp, top_p, top_k, eps, temperature, steps, "
                    "block_length, threshold, cache)"
                )
        if self.dream_alg == "origin" and self.dream_blocks:
            raise ValueError(
                f"{WHERE}: alg='origin' has no block rule (block_length, threshold and cache use "
                "Fast-dLLM's Dream blocks); give another alg"
            )
        if self.cache_refresh is not None:
            raise ValueError(f"{WHERE}: cache_refresh is not a Dream option (a block refreshes once)")
        if self.threshold is not None and self.alg not in (None, "maskgit_plus"):
            raise ValueError(
                f"{WHERE}: threshold ranks by the max probability (Fast-dLLM's confidence_threshold); "
                f"alg must be None or 'maskgit_plus' with it, got alg={self.alg!r}"
            )

    @property
    def dream_alg(self) -> str:
        return DEFAULT_DREAM_ALG if self.alg is None else self.alg

    @property
    def dream_blocks(self) -> bool:
        """Whether a Dream generation runs Fast-dLLM's blocks (else Dream's own schedule)."""
        return self.block_length is not None or self.cache is not None or self.threshold is not None

    @property
    def window_length(self) -> int:
        """``block_length``, or ``gen_length`` when it is None."""
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def randomness(self) -> bool:
        """Whether a step draws random numbers (sampling, random remasking, Dream's ``origin`` or
        ``alg_temp``)."""
        return (
            self.temperature > 0 or self.remasking == "random" or self.alg == "origin" or bool(self.alg_temp)
        )

    def replace(self, **changes) -> PlannerOptions:
        """A copy with ``changes`` (validated); ``TypeError`` naming an unknown option."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"{WHERE}: unknown option(s) {unknown}; PlannerOptions has {known}")
        return dataclasses.replace(self, **changes)

    def make_schedule(self, gen_start: int, family: str = "llada") -> Schedule:
        """The decoding rule over ``x[:, gen_start : gen_start + gen_length]`` for a ``family``
        (``"llada"`` or ``"dream"``) planner."""
        if isinstance(self.schedule, Schedule):
            if self.schedule.gen_start != gen_start:
                raise ValueError(
                    f"{WHERE}: the schedule starts at position {self.schedule.gen_start}, the generation "
                    f"at {gen_start} (the prompt length)"
                )
            return self.schedule
        if family == "dream":
            if not self.dream_blocks:
                return DreamSchedule(
                    gen_start, self.gen_length, self.steps, self.eps, origin=self.dream_alg == "origin"
                )
            return DreamBlockSchedule(
                gen_start, self.gen_length, self.window_length, self.steps, self.eps, self.threshold
            )
        if self.schedule == "parallel":
            k = max(1, self.gen_length // self.steps) if self.parallel_k is None else self.parallel_k
            return ParallelForcedSchedule(gen_start, self.gen_length, k, self.steps)
        if self.threshold is not None:
            return ThresholdSchedule(gen_start, self.gen_length, self.window_length, self.threshold)
        return LLaDASchedule(gen_start, self.gen_length, self.window_length, self.steps)


def _differs(options: PlannerOptions, name: str, default) -> bool:
    """Whether LLaDA-only option ``name`` is set (a given :class:`Schedule` drives any family)."""
    value = getattr(options, name)
    return not (name == "schedule" and isinstance(value, Schedule)) and value != default
