"""``HybridPipeline``: a diffusion planner thinks, an autoregressive executor answers.

Three modes on the same questions ("Planner and Executor", arXiv 2510.15244; "Parallel Thinking,
Sequential Answering", arXiv 2509.20744):

* ``"text"``: the planner (:class:`~hybridkernels.models.DiffusionPlanner`) generates a plan for
  ``templates.planner``; the plan, cut at its first EOS and decoded with the planner's tokenizer,
  goes into the executor's ``templates.text`` prompt; the executor
  (:class:`~hybridkernels.models.ARExecutor`) answers.
* ``"latent"``: the planner's final hidden states over its generated positions go through the
  :class:`~hybridkernels.models.LatentProjector` and are placed before the executor's
  ``templates.latent`` prompt as ``prefix_embeds``: no plan text at all.
* ``"ar"``: the AR->AR baseline, no planner: the executor writes its own plan after
  ``templates.ar_plan``, then ``templates.ar_answer`` is appended and it answers.

``naive=True`` runs the same pipeline on the reference loops instead of the fast paths: LLaDA's
sampler with a full forward per step (:func:`hybridkernels.reference.llada_generate`, plus one
forward for the hidden states) and the no-cache AR loop
(:func:`hybridkernels.reference.ar_loop.ar_generate`), on the same models: the baseline of
``benches/bench_pipeline.py``.

Every call returns the answers, the plans and a per-stage breakdown (:class:`PipelineStats`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import torch

from .models.block_diffusion import BlockDiffusionPlanner
from .models.executor import ARExecutor, plan_then_answer
from .models.planner import DiffusionPlanner
from .models.projector import LatentProjector, check_projector_fits
from .models.prompting import (
    PromptTemplates,
    check_questions,
    decode,
    encode,
    encode_prompts,
    load_tokenizer,
)
from .models.training import DEFAULT_PLANNER_KWARGS
from .reference.ar_loop import ar_generate
from .reference.block_diffusion import block_diffusion_generate
from .reference.dream import dream_generate
from .reference.llada import llada_generate

MODES = ("latent", "text", "ar")
PLANNERS = (DiffusionPlanner, BlockDiffusionPlanner)
# A block-diffusion planner's steps and rule are its family's (BlockDiffusionOptions).
BLOCK_PLANNER_KWARGS = {"gen_length": DEFAULT_PLANNER_KWARGS["gen_length"]}
WHERE = "HybridPipeline"
DEFAULT_EXECUTOR_KWARGS = {"max_new_tokens": 64}
# Options of a Dream DiffusionPlanner.generate that Dream's naive diffusion_generate also takes.
NAIVE_DREAM_KWARGS = (
    "gen_length",
    "steps",
    "temperature",
    "top_p",
    "top_k",
    "alg",
    "alg_temp",
    "eps",
    "generator",
)
# Options of DiffusionPlanner.generate the naive LLaDA loop also takes.
NAIVE_PLANNER_KWARGS = (
    "gen_length",
    "steps",
    "block_length",
    "temperature",
    "cfg_scale",
    "remasking",
    "logits_eos_inf",
    "confidence_eos_eot_inf",
    "generator",
)


@dataclasses.dataclass
class PipelineStats:
    """Per-stage breakdown of one pipeline call (seconds are wall time, GPU synchronised).

    plan_s / plan_steps / plan_forward_passes: the planner's generation (denoising steps; in
    ``ar`` mode the executor's plan generation: its decode steps + 1 prefill). plan_tokens: plan
    tokens generated over all questions (up to EOS in ``ar`` mode; the planner always fills
    ``gen_length``). projector_s and latent_vectors (prefix vectors per question): latent mode.
    executor_prefill_s / executor_decode_s: the answer's ``ARExecutor`` stats (None for the naive
    loop); executor_s: the whole answer generation. answer_tokens: up to and including EOS.
    """

    mode: str
    naive: bool
    questions: int
    plan_s: float
    plan_steps: int
    plan_forward_passes: int
    plan_tokens: int
    projector_s: float
    latent_vectors: int
    executor_prefill_s: float | None
    executor_decode_s: float | None
    executor_s: float
    answer_tokens: int
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (plan + answer) per second of the whole call."""
        return (self.plan_tokens + self.answer_tokens) / self.total_s if self.total_s > 0 else 0.0

    @property
    def seconds_per_question(self) -> float:
        return self.total_s / self.questions


class PipelineOutput(NamedTuple):
    """answers: decoded answers (one per question and sample). plans: the plan text (in ``latent``
    mode the planner's tokens decoded, what its hidden states encode; ``stats.latent_vectors``
    says how many vectors the executor read). answer_ids /
    plan_ids: token ids (answers without their EOS; the planner's plan up to its EOS).
    stats: :class:`PipelineStats`."""

    answers: list[str]
    plans: list[str]
    answer_ids: list[list[int]]
    plan_ids: list[list[int]]
    stats: PipelineStats


class _Gen(NamedTuple):
    tokens: torch.Tensor
    lengths: torch.Tensor
    prefill_s: float | None
    decode_s: float | None
    steps: int
    seconds: float
    eos: set[int]


class HybridPipeline:
    """Planner -> executor reasoning in ``text``, ``latent`` or ``ar`` mode.

    Args:
        planner: a :class:`DiffusionPlanner` (unused, may be None, in ``ar`` mode).
        executor: an :class:`ARExecutor`.
        projector: a :class:`LatentProjector` mapping the planner's hidden size to the
            executor's (required in ``latent`` mode).
        mode: ``"latent"``, ``"text"`` or ``"ar"``.
        planner_tokenizer, executor_tokenizer: tokenizers or local directories (``save_pretrained``
            layout); ``text`` and ``latent`` need both, ``ar`` the executor's.
        templates: :class:`PromptTemplates` (use the ones the projector was trained with).
        planner_kwargs: defaults for ``DiffusionPlanner.generate`` (``gen_length``, ``steps``,
            ``block_length``, ``cache``, ``threshold``, ...).
        executor_kwargs: defaults for ``ARExecutor.generate`` (``max_new_tokens``,
            ``temperature``, ``eos_token_id`` (default: the executor tokenizer's EOS), ...) and,
            in ``ar`` mode, ``plan_max_new_tokens`` (default: the planner's ``gen_length``).
        naive: run the reference loops instead of the fast paths (see the module docstring).
    """

    def __init__(
        self,
        planner: DiffusionPlanner | None,
        executor: ARExecutor,
        projector: LatentProjector | None = None,
        *,
        mode: str = "latent",
        planner_tokenizer=None,
        executor_tokenizer=None,
        templates: PromptTemplates | None = None,
        planner_kwargs: dict | None = None,
        executor_kwargs: dict | None = None,
        naive: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"{WHERE}: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(executor, ARExecutor):
            raise TypeError(f"{WHERE}: executor must be an ARExecutor, got {type(executor).__name__}")
        if mode != "ar" and not isinstance(planner, PLANNERS):
            raise TypeError(
                f"{WHERE}: mode={mode!r} needs a DiffusionPlanner or BlockDiffusionPlanner as planner, got "
                f"{type(planner).__name__}"
            )
        if mode == "latent":
            if projector is None:
                raise ValueError(
                    f"{WHERE}: mode='latent' needs a projector (LatentProjector.from_pretrained, or "
                    "train one with train_projector)"
                )
            check_projector_fits(WHERE, projector, planner, executor)
        self.planner_tokenizer = load_tokenizer(planner_tokenizer, where=WHERE, name="planner_tokenizer")
        self.executor_tokenizer = load_tokenizer(executor_tokenizer, where=WHERE, name="executor_tokenizer")
        missing = [
            name
            for name, tok, needed in (
                ("planner_tokenizer", self.planner_tokenizer, mode != "ar"),
                ("executor_tokenizer", self.executor_tokenizer, True),
            )
            if needed and tok is None
        ]
        if missing:
            what = " and ".join(missing)
            raise ValueError(f"{WHERE}: mode={mode!r} needs {what} (a tokenizer or a local directory)")
        if templates is not None and not isinstance(templates, PromptTemplates):
            raise TypeError(f"{WHERE}: templates must be a PromptTemplates, got {type(templates).__name__}")
        self.planner, self.executor, self.projector = planner, executor, projector
        self.mode, self.naive = mode, bool(naive)
        self.templates = templates or PromptTemplates()
        defaults = (
            BLOCK_PLANNER_KWARGS if isinstance(planner, BlockDiffusionPlanner) else DEFAULT_PLANNER_KWARGS
        )
        self.planner_kwargs = defaults | dict(planner_kwargs or {})
        self.executor_kwargs = DEFAULT_EXECUTOR_KWARGS | dict(executor_kwargs or {})

    # ------------------------------------------------------------------ the call
    def __call__(
        self, questions, *, planner_kwargs: dict | None = None, executor_kwargs: dict | None = None
    ) -> PipelineOutput:
        """Answer ``questions`` (a list of strings, or one string) as one batch; ``planner_kwargs``
        / ``executor_kwargs`` override the constructor's for this call."""
        questions = check_questions(WHERE, questions)
        pk = self.planner_kwargs | dict(planner_kwargs or {})
        ek = self.executor_kwargs | dict(executor_kwargs or {})
        if "eos_token_id" not in ek and self.executor_tokenizer.eos_token_id is not None:
            ek["eos_token_id"] = int(self.executor_tokenizer.eos_token_id)
        started = _now(self.executor.model.device)
        if self.mode == "ar":
            return self._ar(questions, pk, ek, started)

        p_model = self.planner.model
        texts = [self.templates.planner.format(question=q) for q in questions]
        ids, mask = encode_prompts(
            self.planner_tokenizer, texts, device=p_model.device, avoid=self.planner.mask_id, where=WHERE
        )
        t0 = _now(p_model.device)
        tokens, hidden, steps, passes = self._plan(ids, mask, pk, hidden=self.mode == "latent")
        plan_s = _now(p_model.device) - t0
        plan_ids = [self._cut_plan(row) for row in tokens[:, ids.shape[1] :]]
        e_model = self.executor.model

        projector_s, latent_vectors, prefix = 0.0, 0, None
        if self.mode == "latent":
            t0 = _now(e_model.device)
            with torch.no_grad():
                prefix = self.projector(hidden, dtype=e_model.dtype).to(e_model.device)
            projector_s = _now(e_model.device) - t0
            latent_vectors = prefix.shape[1]
            prompts = [self.templates.latent.format(question=q) for q in questions]
        plans = [decode(self.planner_tokenizer, p) for p in plan_ids]
        if self.mode == "text":
            prompts = [
                self.templates.text.format(question=q, plan=p) for q, p in zip(questions, plans, strict=True)
            ]
        e_ids, e_mask = encode_prompts(self.executor_tokenizer, prompts, device=e_model.device, where=WHERE)
        answer = self._generate(e_ids, e_mask, prefix, ek)
        stats = dict(
            plan_s=plan_s,
            plan_steps=steps,
            plan_forward_passes=passes,
            plan_tokens=tokens.shape[0] * (tokens.shape[1] - ids.shape[1]),
            projector_s=projector_s,
            latent_vectors=latent_vectors,
        )
        return self._output(questions, plans, plan_ids, answer, stats, started)

    # ------------------------------------------------------------------ stages
    def _plan(self, ids, mask, kwargs, *, hidden: bool):
        """Planner tokens ``[B, Lp + G]``, hidden ``[B, G, d]`` (or None), steps, forward passes."""
        if not self.naive:
            out = self.planner.generate(ids, mask, return_hidden=hidden, **kwargs)
            return out.tokens, out.hidden, out.stats.steps, out.stats.forward_passes
        p = self.planner
        if isinstance(p, BlockDiffusionPlanner):
            out = block_diffusion_generate(p.model, ids, mask, **p.reference_kwargs(**kwargs))
            return out.tokens, out.hidden if hidden else None, out.steps, out.forward_passes
        dream = p.family == "dream"
        unknown = sorted(set(kwargs) - set(NAIVE_DREAM_KWARGS if dream else NAIVE_PLANNER_KWARGS))
        if unknown:
            loop = "Dream's diffusion_generate" if dream else "LLaDA's reference loop"
            raise ValueError(f"{WHERE}: naive=True runs {loop}, which has no {unknown}")
        if dream:
            kwargs = {"max_new_tokens" if k == "gen_length" else k: v for k, v in kwargs.items()}
            x = dream_generate(
                lambda t, attention_mask=None: p.model(t, attention_mask, causal=False).logits,
                ids,
                mask,
                mask_id=p.mask_id,
                **kwargs,
            )
            h = self._naive_hidden(x, ids, mask) if hidden else None
            return x, h, kwargs["steps"], kwargs["steps"] + hidden
        ids_kw = {k: v for k, v in (("eos_id", p.eos_id), ("eot_id", p.eot_id)) if v is not None}
        if kwargs.get("block_length") is None:  # the planner's default: one block
            kwargs = kwargs | {"block_length": kwargs["gen_length"]}
        x, stats = llada_generate(
            p.model, ids, mask, mask_id=p.mask_id, return_stats=True, **ids_kw, **kwargs
        )
        h = self._naive_hidden(x, ids, mask) if hidden else None
        return x, h, stats.committed.shape[0], stats.forward_passes + hidden

    def _naive_hidden(self, x, ids, mask) -> torch.Tensor:
        """The planner's final hidden states over the generated positions of ``x`` (one forward)."""
        full_mask = torch.cat([mask, mask.new_ones(x.shape[0], x.shape[1] - ids.shape[1])], dim=1)
        with torch.no_grad():
            return self.planner.model(x, full_mask, causal=False, compute_logits=False).hidden[
                :, ids.shape[1] :
            ]

    def _cut_plan(self, row: torch.Tensor) -> list[int]:
        """The planner's generated tokens up to (not including) its first EOS / EoT."""
        stops = {t for t in (self.planner.eos_id, self.planner.eot_id) if t is not None}
        out = []
        for t in row.tolist():
            if t in stops:
                break
            out.append(t)
        return out

    def _generate(self, ids, mask, prefix, kwargs, *, max_new_tokens=None, eos=None) -> _Gen:
        """One executor generation (fast or naive) with its timings."""
        kwargs = dict(kwargs)
        kwargs.pop("plan_max_new_tokens", None)
        kwargs.pop("plan_eos_token_id", None)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        if eos is not None:
            kwargs["eos_token_id"] = eos
        dev = self.executor.model.device
        stops = _ids(kwargs.get("eos_token_id"))
        t0 = _now(dev)
        if not self.naive:
            out = self.executor.generate(ids, mask, prefix, **kwargs)
            s = out.stats
            steps = s.decode_steps + 1
            return _Gen(out.tokens, out.lengths, s.prefill_s, s.decode_s, steps, _now(dev) - t0, stops)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            kwargs["generator"] = torch.Generator(dev).manual_seed(seed)
        out = ar_generate(self.executor.model, ids, mask, prefix, **kwargs)
        return _Gen(out.tokens, out.lengths, None, None, out.tokens.shape[1], _now(dev) - t0, stops)

    def _ar(self, questions, pk, ek, started) -> PipelineOutput:
        """AR->AR (:func:`~hybridkernels.models.executor.plan_then_answer`): the executor plans
        (until ``plan_eos_token_id``, default its EOS), then answers."""
        tok, e_model = self.executor_tokenizer, self.executor.model
        ek = dict(ek)
        plan_max = ek.pop("plan_max_new_tokens", pk.get("gen_length", DEFAULT_PLANNER_KWARGS["gen_length"]))
        plan_eos = ek.pop("plan_eos_token_id", None)
        eos, new = ek.pop("eos_token_id", None), ek.pop("max_new_tokens")
        prompts = [self.templates.ar_plan.format(question=q) for q in questions]
        ids, mask = encode_prompts(tok, prompts, device=e_model.device, where=WHERE)
        times = []

        def generate(ids, mask, *, max_new_tokens, eos_token_id, **kw):
            gen = self._generate(ids, mask, None, kw, max_new_tokens=max_new_tokens, eos=eos_token_id)
            times.append(gen.seconds)
            return gen

        out = plan_then_answer(
            generate,
            ids,
            mask,
            plan_max_new_tokens=plan_max,
            max_new_tokens=new,
            answer_prefix_ids=encode(tok, self.templates.ar_answer, special=False),
            plan_eos_token_id=plan_eos,
            eos_token_id=eos,
            **ek,
        )
        plan = out.plan
        plan_ids = _strip_eos(plan)
        stats = dict(
            plan_s=times[0],
            plan_steps=plan.steps,
            plan_forward_passes=plan.steps,
            plan_tokens=int(plan.lengths.sum()),
            projector_s=0.0,
            latent_vectors=0,
        )
        plans = [decode(tok, p) for p in plan_ids]
        return self._output(questions, plans, plan_ids, out.answer, stats, started)

    def _output(self, questions, plans, plan_ids, answer: _Gen, stats: dict, started) -> PipelineOutput:
        answer_ids = _strip_eos(answer)
        rows = len(answer_ids)
        if rows != len(questions):  # num_samples > 1: rows b * n + s
            n = rows // len(questions)
            plans = [p for p in plans for _ in range(n)]
            plan_ids = [p for p in plan_ids for _ in range(n)]
        total = _now(self.executor.model.device) - started
        return PipelineOutput(
            answers=[decode(self.executor_tokenizer, a) for a in answer_ids],
            plans=plans,
            answer_ids=answer_ids,
            plan_ids=plan_ids,
            stats=PipelineStats(
                mode=self.mode,
                naive=self.naive,
                questions=len(questions),
                executor_prefill_s=answer.prefill_s,
                executor_decode_s=answer.decode_s,
                executor_s=answer.seconds,
                answer_tokens=int(answer.lengths.sum()),
                total_s=total,
                **stats,
            ),
        )


def _strip_eos(gen: _Gen) -> list[list[int]]:
    """Each row's tokens up to its length, without a closing EOS."""
    rows = []
    for row, n in zip(gen.tokens.tolist(), gen.lengths.tolist(), strict=True):
        row = row[:n]
        rows.append(row[:-1] if row and row[-1] in gen.eos else row)
    return rows


def _ids(eos) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _now(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
