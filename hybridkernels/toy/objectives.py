"""Training rows and losses of the toy's planner (LLaDA SFT) and executor (next-token CE).

Planner rows are ``prompt | response``: the prompt is the question in the planner's template,
left-padded; the response is the plan followed by EOS up to the fixed generation length (LLaDA
pads SFT answers with EOS, and the planner then learns to end its plans). The executor's rows are
``prompt | target`` pairs in the three formats the pipeline uses (see :func:`executor_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.prompting import PromptTemplates
from .countdown import Problem
from .sdpa import train_forward
from .tokenization import check_encodable

MASK_EPS = 1e-3  # LLaDA's lower bound on the mask ratio


# --------------------------------------------------------------------------- planner
def planner_row(tokenizer, problem: Problem, gen_length: int, templates: PromptTemplates):
    """``(prompt_ids, response_ids)`` of one problem: the prompt (with the tokenizer's special
    tokens) and ``plan + EOS * (gen_length - len(plan))``. ``ValueError`` when the plan does not fit
    (at least one EOS is required, so the planner learns to stop)."""
    prompt = templates.planner.format(question=problem.question)
    check_encodable(tokenizer, prompt, where="planner_row", what="question", name="planner")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    plan_ids = check_encodable(tokenizer, problem.plan, where="planner_row", what="plan", name="planner")
    if len(plan_ids) >= gen_length:
        raise ValueError(
            f"planner_row: plan {problem.plan!r} has {len(plan_ids)} tokens; gen_length {gen_length} "
            "leaves no room for its EOS"
        )
    return prompt_ids, plan_ids + [tokenizer.eos_token_id] * (gen_length - len(plan_ids))


def planner_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Stack rows of one generation length: int64 ``ids [B, P + G]`` (prompts left-padded with
    ``pad_id``), bool ``valid [B, P + G]`` (False on padding) and the prompt width ``P``."""
    P = max(len(p) for p, _ in rows)
    G = len(rows[0][1])
    if any(len(r) != G for _, r in rows):
        raise ValueError("planner_batch: every response of a batch must have the same length")
    ids = torch.full((len(rows), P + G), pad_id, dtype=torch.long)
    valid = torch.ones(len(rows), P + G, dtype=torch.bool)
    for b, (p, r) in enumerate(rows):
        ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        ids[b, P:] = torch.tensor(r, dtype=torch.long)
        valid[b, : P - len(p)] = False
    return ids, valid, P


def planner_loss(
    model, ids: torch.Tensor, valid: torch.Tensor, prompt_len: int, mask_id: int, generator: torch.Generator
) -> torch.Tensor:
    """LLaDA's SFT loss (float32 scalar) on one batch.

    Per row a mask ratio ``t ~ U(0, 1]`` (``(1 - eps) u + eps``); every response token is replaced
    by ``mask_id`` with probability ``t``; the prompt never is. The loss is the cross-entropy of
    the masked tokens weighted ``1 / t``, summed, divided by the response length (the gen length,
    EOS padding included) and by the batch size, as LLaDA's SFT code normalises it.
    ``ids``/``valid`` ``[B, L]`` as from :func:`planner_batch` (on the model's device).
    """
    B, L = ids.shape
    G = L - prompt_len
    t = torch.rand(B, generator=generator)
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS)[:, None].expand(B, G)
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[:, prompt_len:] = torch.rand(B, G, generator=generator) < p_mask
    masked = masked.to(ids.device)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    hidden = train_forward(model, noisy, valid, causal=False)
    logits = model.logits(hidden[masked]).float()
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    weights = 1.0 / p_mask.to(ids.device)[masked[:, prompt_len:]]
    return (ce * weights).sum() / (G * B)


# --------------------------------------------------------------------------- executor
def executor_rows(
    tokenizer, problem: Problem, templates: PromptTemplates
) -> list[tuple[list[int], list[int]]]:
    """The executor's three rows of one problem, ``(prompt_ids, target_ids)``:

    1. ``text``: ``templates.text(question, plan)`` -> `` answer`` + EOS (text mode, and the
       answer half of AR->AR: ``ar_plan + plan + ar_answer`` tokenizes to the same ids);
    2. ``ar_plan``: ``templates.ar_plan(question)`` -> `` plan`` + EOS (AR->AR writes its plan);
    3. ``latent``: ``templates.latent(question)`` -> `` answer`` + EOS (the no-plan baseline, and
       the prompt after the latent prefix).
    """
    eos = [tokenizer.eos_token_id]
    q, plan, answer = problem.question, problem.plan, problem.answer

    def ids(text, special):
        check_encodable(tokenizer, text, where="executor_rows", what="text", name="executor")
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    return [
        (ids(templates.text.format(question=q, plan=plan), True), ids(" " + answer, False) + eos),
        (ids(templates.ar_plan.format(question=q), True), ids(" " + plan, False) + eos),
        (ids(templates.latent.format(question=q), True), ids(" " + answer, False) + eos),
    ]


def executor_loss(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 scalar) over the target tokens of ``rows``.

    Rows are right-padded and attention is causal, so padding needs no mask and positions are
    ``0 .. n-1``, as the executor's packed prefill sees a left-padded prompt."""
    L = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    b_idx, cols, targets = [], [], []
    for b, (p, t) in enumerate(rows):
        ids[b, : len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        b_idx += [b] * len(t)
        cols += range(len(p) - 1, len(p) - 1 + len(t))
        targets += t
    dev = model.device
    hidden = train_forward(model, ids.to(dev), causal=True)
    logits = model.logits(hidden[torch.tensor(b_idx, device=dev), torch.tensor(cols, device=dev)]).float()
    return F.cross_entropy(logits, torch.tensor(targets, device=dev))
