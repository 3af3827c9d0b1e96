"""Batched accuracies of the toy models on Countdown problems (the benchmark reuses these).

Modes (each a fraction of ``problems`` solved, checked exactly by :mod:`.countdown`):

* ``plan``: the planner's plan (naive LLaDA decoding, :func:`hybridkernels.reference.llada_generate`,
  one token per step by default) passes :func:`check_plan`;
* ``gold_plan``: the executor's greedy answer from the gold plan (``templates.text``);
* ``no_plan``: the executor's answer from the question alone (``templates.latent``, no prefix);
* ``ar``: AR->AR, the executor writes its own plan (``templates.ar_plan``) then answers after
  ``templates.ar_answer`` (``ar_plan`` also reports whether that plan passes :func:`check_plan`);
* ``text``: the executor answers from the planner's decoded plan, re-tokenized (``templates.text``);
* ``latent``: the executor answers from the planner's final hidden states through the projector,
  placed before ``templates.latent`` as ``prefix_embeds``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..models.prompting import PromptTemplates, decode, encode, left_pad
from ..reference.llada import llada_generate
from .config import TEMPLATES, planner_kwargs
from .countdown import Problem, check_answer, check_plan

MODES = ("plan", "gold_plan", "no_plan", "ar", "text", "latent")
PLANNER_MODES = ("plan", "text", "latent")


def plan_accuracy(problems: Sequence[Problem], plans: Sequence[str]) -> float:
    """Fraction of ``plans`` (texts) that solve their problems."""
    return sum(check_plan(p.question, s) for p, s in zip(problems, plans, strict=True)) / len(problems)


def answer_accuracy(problems: Sequence[Problem], answers: Sequence[str]) -> float:
    """Fraction of ``answers`` (expressions) that solve their problems."""
    return sum(check_answer(p.question, a) for p, a in zip(problems, answers, strict=True)) / len(problems)


def cut_at(ids: Sequence[int], stops: set[int]) -> list[int]:
    """``ids`` up to (not including) the first id in ``stops``."""
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(t)
    return out


def generate_plans(
    planner_model,
    tokenizer,
    questions: Sequence[str],
    *,
    mask_id: int,
    eos_id: int,
    templates: PromptTemplates = TEMPLATES,
    return_hidden: bool = False,
    backend: str | None = None,
    **kwargs,
):
    """Naive LLaDA decoding of one batch: ``(plan texts, plan token lists, hidden)`` where hidden is
    the final hidden states ``[B, gen_length, d]`` of the generated positions (one more forward
    over the finished sequence, as the pipeline's naive latent mode), or None. ``kwargs``:
    ``llada_generate`` options (``gen_length``, ``steps``, ``block_length``, ...)."""
    rows = [encode(tokenizer, templates.planner.format(question=q), special=True) for q in questions]
    ids, mask = left_pad(rows, pad_id=tokenizer.pad_token_id, device=planner_model.device)

    def model(x, attention_mask=None):
        return planner_model(x, attention_mask, causal=False, backend=backend)

    x = llada_generate(model, ids, mask, mask_id=mask_id, eos_id=eos_id, **kwargs)
    generated = x[:, ids.shape[1] :]
    stops = {eos_id, tokenizer.pad_token_id}
    plan_ids = [cut_at(row, stops) for row in generated.tolist()]
    hidden = None
    if return_hidden:
        full = torch.cat([mask, mask.new_ones(generated.shape)], dim=1)
        with torch.no_grad():
            out = planner_model(x, full, causal=False, compute_logits=False, backend=backend)
        hidden = out.hidden[:, ids.shape[1] :]
    return [decode(tokenizer, p) for p in plan_ids], plan_ids, hidden


def executor_answers(
    executor, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, prefix_embeds=None
) -> list[str]:
    """Greedy answers of ``executor`` (an ``ARExecutor``) to ``prompts``, cut at EOS and decoded."""
    rows = [encode(tokenizer, p, special=True) for p in prompts]
    ids, mask = left_pad(rows, pad_id=tokenizer.pad_token_id, device=executor.model.device)
    return [
        decode(tokenizer, r) for r in _greedy(executor, tokenizer, ids, mask, max_new_tokens, prefix_embeds)
    ]


def _greedy(executor, tokenizer, ids, mask, max_new_tokens, prefix_embeds=None) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    out = executor.generate(
        ids, mask, prefix_embeds, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos
    )
    return [cut_at(row[:n], {eos}) for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True)]


def ar_plan_then_answer(
    executor, tokenizer, questions: Sequence[str], *, templates, plan_max_new_tokens, max_new_tokens
):
    """AR->AR as the pipeline runs it: ``(plans, answers)`` texts."""
    dev = executor.model.device
    prompts = [encode(tokenizer, templates.ar_plan.format(question=q), special=True) for q in questions]
    ids, mask = left_pad(prompts, pad_id=tokenizer.pad_token_id, device=dev)
    plans = _greedy(executor, tokenizer, ids, mask, plan_max_new_tokens)
    tail = encode(tokenizer, templates.ar_answer, special=False)
    rows = [p + plan + tail for p, plan in zip(prompts, plans, strict=True)]
    a_ids, a_mask = left_pad(rows, pad_id=tokenizer.pad_token_id, device=dev)
    answers = _greedy(executor, tokenizer, a_ids, a_mask, max_new_tokens)
    return [decode(tokenizer, p) for p in plans], [decode(tokenizer, a) for a in answers]


@torch.no_grad()
def evaluate(
    problems: Sequence[Problem],
    *,
    planner=None,
    executor=None,
    projector=None,
    planner_tokenizer=None,
    executor_tokenizer=None,
    templates: PromptTemplates = TEMPLATES,
    modes: Sequence[str] = MODES,
    batch_size: int = 256,
    planner_options: dict | None = None,
    plan_max_new_tokens: int = 24,
    max_new_tokens: int = 24,
    backend: str | None = None,
    return_outputs: bool = False,
) -> dict:
    """Accuracy of every mode in ``modes`` on ``problems`` (all with the same ``n``), batched.

    Args:
        problems: :class:`~hybridkernels.toy.countdown.Problem` list.
        planner: a ``DiffusionPlanner`` (its ``model``, ``mask_id``, ``eos_id`` are used; decoding
            is the naive reference loop). executor: an ``ARExecutor`` (greedy). projector: a
            ``LatentProjector`` (``latent`` mode).
        planner_options: ``llada_generate`` options; default :func:`~hybridkernels.toy.config.planner_kwargs`
            of the problems' ``n`` (gen_length = steps = block_length: one token per step).
        backend: attention backend of the planner's forwards (None: the model's).
        return_outputs: also return the plans and answers of every mode under ``"outputs"``.

    Returns ``{"count", "n", "accuracy": {mode: float}, "correct": {mode: int}, "seconds",
    "planner_options"}`` (``accuracy["ar_plan"]`` too with ``"ar"``).
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"evaluate: unknown modes {unknown}; known: {MODES}")
    if not problems:
        raise ValueError("evaluate: no problems")
    ns = {p.n for p in problems}
    if len(ns) != 1:
        raise ValueError(f"evaluate: problems mix difficulties {sorted(ns)}; evaluate one n at a time")
    n = ns.pop()
    opts = dict(planner_options or planner_kwargs(n))
    needs = {"planner": PLANNER_MODES, "executor": ("gold_plan", "no_plan", "ar", "text", "latent")}
    for name, value, needed_by in (
        ("planner", planner, needs["planner"]),
        ("planner_tokenizer", planner_tokenizer, needs["planner"]),
        ("executor", executor, needs["executor"]),
        ("executor_tokenizer", executor_tokenizer, needs["executor"]),
        ("projector", projector, ("latent",)),
    ):
        if value is None and any(m in modes for m in needed_by):
            raise ValueError(f"evaluate: modes {[m for m in modes if m in needed_by]} need {name}")

    started = time.perf_counter()
    outputs: dict[str, list[str]] = {m: [] for m in modes}
    if "ar" in modes:
        outputs["ar_plan"] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        questions = [p.question for p in batch]
        if any(m in modes for m in PLANNER_MODES):
            plans, _, hidden = generate_plans(
                planner.model,
                planner_tokenizer,
                questions,
                mask_id=planner.mask_id,
                eos_id=planner.eos_id,
                templates=templates,
                return_hidden="latent" in modes,
                backend=backend,
                **opts,
            )
            if "plan" in modes:
                outputs["plan"] += plans
        ask = dict(max_new_tokens=max_new_tokens)
        if "text" in modes:
            prompts = [
                templates.text.format(question=q, plan=s) for q, s in zip(questions, plans, strict=True)
            ]
            outputs["text"] += executor_answers(executor, executor_tokenizer, prompts, **ask)
        if "latent" in modes:
            prefix = projector(hidden, dtype=executor.model.dtype).to(executor.model.device)
            prompts = [templates.latent.format(question=q) for q in questions]
            outputs["latent"] += executor_answers(
                executor, executor_tokenizer, prompts, prefix_embeds=prefix, **ask
            )
        if "gold_plan" in modes:
            prompts = [templates.text.format(question=p.question, plan=p.plan) for p in batch]
            outputs["gold_plan"] += executor_answers(executor, executor_tokenizer, prompts, **ask)
        if "no_plan" in modes:
            prompts = [templates.latent.format(question=q) for q in questions]
            outputs["no_plan"] += executor_answers(executor, executor_tokenizer, prompts, **ask)
        if "ar" in modes:
            ar_plans, ar_answers = ar_plan_then_answer(
                executor,
                executor_tokenizer,
                questions,
                templates=templates,
                plan_max_new_tokens=plan_max_new_tokens,
                max_new_tokens=max_new_tokens,
            )
            outputs["ar_plan"] += ar_plans
            outputs["ar"] += ar_answers

    correct = {}
    for mode, texts in outputs.items():
        check = check_plan if mode in ("plan", "ar_plan") else check_answer
        correct[mode] = sum(check(p.question, t) for p, t in zip(problems, texts, strict=True))
    result = {
        "n": n,
        "count": len(problems),
        "accuracy": {m: c / len(problems) for m, c in correct.items()},
        "correct": correct,
        "planner_options": opts if any(m in modes for m in PLANNER_MODES) else None,
        "seconds": time.perf_counter() - started,
    }
    if return_outputs:
        result["outputs"] = outputs
    return result
