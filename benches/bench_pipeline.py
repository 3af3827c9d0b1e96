"""HybridPipeline end to end: ``ar``, ``text`` and ``latent`` modes, naive loops vs our fast paths,
on the same models and questions in one run.

GPU: a LLaDA-8B-shaped planner and a Llama-3-8B-shaped executor, random weights in bf16, word-level
tokenizers covering each model's whole vocabulary ("t0" .. "t<V-1>" plus the template words), so a
decoded plan re-encodes to as many tokens as it had. Budgets of the papers: 64 planning tokens + 8
answer tokens (batch 1 and 16), and 256 + 256 (batch 1); questions of 48 words; planner steps =
planning tokens (one token per step: random weights are never confident), block 32; the executor
decodes every answer token (no EOS). ``ar`` mode: the executor writes a plan of the same length,
then answers. Latent mode: the planner's 64 / 256 hidden states through a random
:class:`LatentProjector` (no pooling). On the CPU: tiny fp32 models, a smoke run.

* naive: :class:`HybridPipeline` with ``naive=True``: LLaDA's published sampler (a full forward and
  ``[B, L, V]`` logits per step) and the no-cache AR loop (a full forward per token), on the same
  :class:`Transformer` objects (so the same attention op: Triton on a GPU).
* ours: the fast paths: :class:`DiffusionPlanner` without a cache (fused LM head + commit, CUDA-graph
  steps), :class:`ARExecutor` (static cache, ``_C`` decode attention, CUDA-graph decode step). On
  the GPU the planner with ``cache="dual"`` is timed too (``dual_cache_*``; its plan differs from the
  exact one, the agreement is reported).

Figures (``extra_info``): tokens/s (plan + answer tokens of the batch per second) and seconds per
question of both sides, the speedup, the fast path's stage breakdown, and its floor: per model call,
max(weight bytes / measured copy bandwidth, matmul flops / measured bf16 matmul peak), summed over
the calls the pipeline makes (``floor_ms``, ``fraction_of_floor`` = floor / time).

Checks before timing: a tiny fp32 pipeline on the same device must give the naive loops' answers
and plans exactly in every mode; on the 8B models (bf16: near-ties of random logits flip under
rounding, so exact equality is not expected) every answer token of the fast path must be the argmax
of a teacher-forced forward over its own prefix + prompt + answer, up to bf16 rounding.

    pytest benches/bench_pipeline.py --benchmark-json=out.json
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _common import DEVICE, ON_GPU, QUICK

from hybridkernels.benchmarking import (
    LLADA_8B,
    LLAMA_8B,
    call_floor_s,
    environment,
    synchronize,
    time_alternating,
    token_agreement,
)
from hybridkernels.models import ARExecutor, DiffusionPlanner, LatentProjector, Transformer, TransformerConfig
from hybridkernels.models.prompting import vocabulary_tokenizer
from hybridkernels.pipeline import HybridPipeline

MODES = ("ar", "text", "latent")


def _tiny(causal: bool) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
        num_kv_heads=1 if causal else 2, head_dim=64 if causal else 32, causal=causal,
        family="llama" if causal else "llada",
        mask_token_id=None if causal else 159, eos_token_ids=(158,), eot_token_id=None if causal else 157,
        initializer_range=0.2,
    )  # fmt: skip


if ON_GPU:
    PLANNER, EXECUTOR, DTYPE = LLADA_8B, LLAMA_8B, torch.bfloat16
    CASES = [(64, 8, 1), (64, 8, 16), (256, 256, 1)]  # (plan tokens, answer tokens, batch)
    QUESTION_WORDS, BLOCK, REPS = 48, 32, 3
    if QUICK:  # gpu_check.sh: batch 16 and 256 + 256 take minutes per mode
        CASES, REPS = [(64, 8, 1)], 2
else:
    PLANNER, EXECUTOR, DTYPE = _tiny(causal=False), _tiny(causal=True), torch.float32
    CASES = [(8, 4, 2)]
    QUESTION_WORDS, BLOCK, REPS = 6, 4, 1


def _model(config: TransformerConfig, seed: int, dtype: torch.dtype = DTYPE) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config, device=DEVICE, dtype=dtype)
    if config.mask_token_id is not None:  # [MASK] is never predicted, as in LLaDA
        model.lm_head.weight.data[config.mask_token_id] = 0
    return model.eval()


def _questions(n: int, words: int, vocab: int, seed: int = 0) -> list[str]:
    """Questions of ``words`` random ordinary words (ids 8 .. min(4096, vocab - 8)); every other one
    a quarter shorter (left padding in the batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = words - (i % 2) * (words // 4)
        ids = torch.randint(8, min(4096, vocab - 8), (length,), generator=g).tolist()
        out.append(" ".join(f"t{t}" for t in ids))
    return out


def _pipelines(parts, mode: str, plan: int, answer: int, **planner_extra):
    planner, executor, projector, p_tok, e_tok = parts
    kw = dict(
        mode=mode,
        planner_tokenizer=p_tok,
        executor_tokenizer=e_tok,
        planner_kwargs={"gen_length": plan, "steps": plan, "block_length": min(BLOCK, plan)},
        executor_kwargs={"max_new_tokens": answer, "eos_token_id": None, "plan_max_new_tokens": plan},
    )
    naive = HybridPipeline(planner, executor, projector, naive=True, **kw)
    kw["planner_kwargs"] = kw["planner_kwargs"] | planner_extra
    return naive, HybridPipeline(planner, executor, projector, **kw)


@pytest.fixture(scope="module")
def parts():
    planner = DiffusionPlanner(_model(PLANNER, seed=1))
    executor = ARExecutor(_model(EXECUTOR, seed=2))
    torch.manual_seed(3)
    projector = LatentProjector.for_models(planner, executor)
    return planner, executor, projector, vocabulary_tokenizer(PLANNER), vocabulary_tokenizer(EXECUTOR)


@pytest.fixture(scope="module")
def tiny_exact():
    """The fast pipeline gives the naive loops' plans and answers exactly on tiny fp32 models on the
    benchmark's device (same backends as the timed runs), in every mode."""
    planner_cfg, executor_cfg = _tiny(causal=False), _tiny(causal=True)
    planner = DiffusionPlanner(_model(planner_cfg, seed=1, dtype=torch.float32))
    executor = ARExecutor(_model(executor_cfg, seed=2, dtype=torch.float32))
    torch.manual_seed(0)
    parts = (planner, executor, LatentProjector.for_models(planner, executor))
    parts += (vocabulary_tokenizer(planner_cfg), vocabulary_tokenizer(executor_cfg))
    questions = _questions(3, 6, planner_cfg.vocab_size)
    for mode in MODES:
        naive, fast = _pipelines(parts, mode, plan=8, answer=5)
        want, got = naive(questions), fast(questions)
        assert got.plan_ids == want.plan_ids and got.answer_ids == want.answer_ids, mode
    return True


def _check_answers(pipe: HybridPipeline, out, questions) -> dict:
    """Every answer token of ``out`` is the argmax of the executor's logits over its own context
    (teacher forcing: latent prefix + prompt + answer so far), up to bf16 rounding."""
    model, tok = pipe.executor.model, pipe.executor_tokenizer
    prefixes = _latent_prefixes(pipe, questions) if pipe.mode == "latent" else None
    gaps = []
    for i, q in enumerate(questions):
        if pipe.mode == "latent":
            ids = tok(pipe.templates.latent.format(question=q))["input_ids"]
            prefix = prefixes[i : i + 1]
        elif pipe.mode == "text":
            ids = tok(pipe.templates.text.format(question=q, plan=out.plans[i]))["input_ids"]
            prefix = None
        else:
            ids = tok(pipe.templates.ar_plan.format(question=q))["input_ids"] + out.plan_ids[i]
            ids += tok(pipe.templates.ar_answer, add_special_tokens=False)["input_ids"]
            prefix = None
        answer = out.answer_ids[i]
        x = model.embed(torch.tensor([ids + answer], device=model.device))
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        with torch.no_grad():
            logits = model(inputs_embeds=x).logits[0, -len(answer) - 1 : -1].float()
        best = logits.max(-1).values
        gap = best - logits.gather(-1, torch.tensor(answer, device=model.device)[:, None])[:, 0]
        tol = 0.0 if DTYPE == torch.float32 else 0.02 * best.abs().clamp_min(1.0)
        assert (gap <= tol).all(), f"{pipe.mode}: answer token {float(gap.max()):.4f} below the argmax"
        gaps.append(gap)
    gap = torch.cat(gaps)
    return {
        "answer_tokens_equal_argmax": float((gap == 0).float().mean()),
        "answer_max_logit_gap": float(gap.max()),
    }


def _latent_prefixes(pipe: HybridPipeline, questions) -> torch.Tensor:
    """The batch's prefixes, recomputed the way the pipeline computes them (same inputs and shapes)."""
    tok, planner = pipe.planner_tokenizer, pipe.planner
    texts = [pipe.templates.planner.format(question=q) for q in questions]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"].to(DEVICE), enc["attention_mask"].to(DEVICE).bool()
    with torch.no_grad():
        hidden = planner.generate(ids, mask, return_hidden=True, **pipe.planner_kwargs).hidden
        return pipe.projector(hidden, dtype=pipe.executor.model.dtype)


def _floor_s(pipe: HybridPipeline, out, question: str, B: int) -> float:
    """Floor of the fast pipeline's model calls for ``B`` questions as long as ``question`` (no
    planner cache: each step runs every position; the executor: one prefill, then one call a token)."""
    s, t, e_tok = out.stats, pipe.templates, pipe.executor_tokenizer
    e_model = pipe.executor.model

    def n(text, tok=e_tok):
        return len(tok(text)["input_ids"])

    def generation(prompt_len: int, new: int) -> float:
        return call_floor_s(e_model, B * prompt_len) + (new - 1) * call_floor_s(e_model, B)

    answer_steps = max(1, s.answer_tokens // B)
    if pipe.mode == "ar":
        plan = max(1, s.plan_tokens // B)
        plan_prompt = n(t.ar_plan.format(question=question))
        return generation(plan_prompt, plan) + generation(plan_prompt + plan + n(t.ar_answer), answer_steps)
    G = pipe.planner_kwargs["gen_length"]
    planner_len = n(t.planner.format(question=question), pipe.planner_tokenizer) + G
    planner = s.plan_steps * call_floor_s(pipe.planner.model, B * planner_len)
    if pipe.mode == "latent":
        prompt = s.latent_vectors + n(t.latent.format(question=question))
    else:
        prompt = n(t.text.format(question=question, plan=out.plans[0]))
    return planner + generation(prompt, answer_steps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plan, answer, B", CASES, ids=[f"plan{p}-answer{a}-b{b}" for p, a, b in CASES])
def test_pipeline(benchmark, parts, tiny_exact, mode, plan, answer, B):
    questions = _questions(B, QUESTION_WORDS, PLANNER.vocab_size)
    naive, fast = _pipelines(parts, mode, plan, answer)
    out = fast(questions)
    extra = _check_answers(fast, out, questions)
    if not ON_GPU:  # fp32: the naive loops give exactly the same plans and answers
        want = naive(questions)
        assert out.plan_ids == want.plan_ids and out.answer_ids == want.answer_ids

    def run():
        fast(questions)
        synchronize(DEVICE)

    if benchmark.disabled:
        benchmark(run)
        return
    fns = {"naive": partial(naive, questions), "ours": partial(fast, questions)}
    if ON_GPU and mode != "ar":
        fns["dual"] = partial(_pipelines(parts, mode, plan, answer, cache="dual")[1], questions)
    timings, outs = time_alternating(fns, DEVICE, rounds=REPS)
    (naive_s, naive_out), (ours_s, out) = ((timings[k].median, outs[k]) for k in ("naive", "ours"))
    s = out.stats
    tokens = s.plan_tokens + s.answer_tokens
    floor = _floor_s(fast, out, questions[0], B)
    extra |= dict(
        mode=mode,
        batch=B,
        plan_tokens_per_question=plan,
        answer_tokens_per_question=answer,
        naive_s=naive_s,
        ours_s=ours_s,
        speedup=naive_s / ours_s,
        naive_tokens_per_s=tokens / naive_s,
        ours_tokens_per_s=tokens / ours_s,
        naive_s_per_question=naive_s / B,
        ours_s_per_question=ours_s / B,
        ours_plan_s=s.plan_s,
        ours_plan_steps=s.plan_steps,
        ours_projector_s=s.projector_s,
        ours_executor_prefill_s=s.executor_prefill_s,
        ours_executor_decode_s=s.executor_decode_s,
        latent_vectors=s.latent_vectors,
        floor_ms=floor * 1e3,
        fraction_of_floor=floor / ours_s,
        plan_agreement_with_naive=token_agreement(out.plan_ids, naive_out.plan_ids),
        **environment(DEVICE),
    )
    if "dual" in fns:
        cached_s, cached_out = timings["dual"].median, outs["dual"]
        extra |= dict(
            dual_cache_s=cached_s,
            dual_cache_tokens_per_s=tokens / cached_s,
            dual_cache_speedup=naive_s / cached_s,
            dual_cache_plan_agreement=token_agreement(cached_out.plan_ids, out.plan_ids),
        )
    benchmark.extra_info.update(extra)
    benchmark.pedantic(run, rounds=REPS, warmup_rounds=0)
