"""DiffusionPlanner against the naive LLaDA loop, tokens/s in the same run.

GPU: a LLaDA-8B-shaped random model in bf16 (d 4096, 32 layers, 32 heads, MLP 12288, V 126,464),
built as an HF ``LlamaForCausalLM`` (SDPA attention) whose weights our ``Transformer`` shares.
The baseline is LLaDA's published loop (:func:`hybridkernels.reference.llada_generate`) on that HF
model with an all-visible 4D mask: a full forward and ``[B, L, V]`` logits every step. Ours:
``DiffusionPlanner.generate`` without a cache (Triton attention, LM head fused into the unmask op
on the block's rows only, CUDA-graph steps) and with the dual cache. Random weights give no
confident tokens, so the schedules are fixed: 1, 2 or 4 tokens per step (``steps = gen / k``),
block 32, prompt 512 + gen 256 (and prompt 128 + gen 512), batch 1 and 16.

Every step of the naive loop costs the same (a full forward over ``L``), and so does every block
of ours (the dual cache attends to all ``L`` keys; no cache runs ``L`` tokens): the naive loop is
timed over ``NAIVE_STEPS`` steps and ours over ``TIMED_BLOCKS`` block(s), each reported as
tokens/s. Floors, per DESIGN.md: a step costs at least max(weight bytes / copy bandwidth, flops /
matmul peak), both measured here; ``extra_info`` holds the floors, MFU (model flops / time /
peak) and MBU (weight bytes / time / bandwidth) of both sides.

Before timing: a tiny fp32 model on the same device and backends must give the naive loop's
tokens exactly; on the 8B model the first step's candidates must be the HF argmax up to bf16
rounding. On the CPU everything is tiny and the whole generation must match token for token.

    pytest benches/bench_planner.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, ON_GPU, QUICK
from transformers import LlamaConfig, LlamaForCausalLM

from hybridkernels import benchmarking, ops
from hybridkernels.benchmarking import (
    copy_bandwidth_gbs,
    environment,
    matmul_peak_tflops,
    streamed_weight_bytes,
    time_ms,
)
from hybridkernels.models import DiffusionPlanner, Transformer
from hybridkernels.reference import llada_generate
from hybridkernels.reference.llada import LLADA_EOS_ID, LLADA_EOT_ID, LLADA_MASK_ID

# LLaDA-8B's shape as an HF Llama config (the benchmark builds an HF model of it).
LLADA_8B = {
    k: v
    for k, v in benchmarking.LLADA_8B.to_dict("llama").items()
    if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings")
}  # fmt: skip
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
)
TINY_IDS = dict(mask_id=127, eos_id=5, eot_id=6)

if ON_GPU:
    CONFIG, DTYPE, IDS = (
        LLADA_8B,
        torch.bfloat16,
        dict(mask_id=LLADA_MASK_ID, eos_id=LLADA_EOS_ID, eot_id=LLADA_EOT_ID),
    )
    BLOCK, NAIVE_STEPS, TIMED_BLOCKS, ROUNDS = 32, 2, 1, 2
    CASES = [(512, 256, B, k) for B in (1, 16) for k in (1, 2, 4)] + [(128, 512, B, 1) for B in (1, 16)]
    if QUICK:  # gpu_check.sh: a no-cache block at batch 16 and k = 1 alone is ~32 x 0.35 s
        CASES = [(512, 256, 1, 1), (512, 256, 1, 4), (512, 256, 16, 4)]
else:
    CONFIG, DTYPE, IDS = TINY, torch.float32, TINY_IDS
    BLOCK, NAIVE_STEPS, TIMED_BLOCKS, ROUNDS = 8, 2, 1, 1
    CASES = [(8, 16, 2, 1), (8, 16, 2, 4)]


def _hf_model(config: dict, dtype: torch.dtype, std: float | None = None) -> LlamaForCausalLM:
    hf_config = LlamaConfig(**config, rms_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device(DEVICE):
        hf = LlamaForCausalLM._from_config(hf_config, dtype=dtype).eval()
    if std is not None:  # wide weights so that a tiny model's tokens vary
        g = torch.Generator(DEVICE).manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, std, generator=g)
            hf.lm_head.weight[TINY_IDS["mask_id"]] = 0  # [MASK] is never predicted, as in LLaDA
    return hf


def _naive(hf):
    """``model(x, attention_mask)`` for llada_generate: HF with every valid key visible."""

    def model(x, attention_mask=None):
        B, L = x.shape
        valid = torch.ones_like(x, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
        mask4d = valid[:, None, None, :].expand(B, 1, L, L)
        with torch.no_grad():
            return hf(input_ids=x, attention_mask=mask4d, position_ids=pos).logits

    return model


def _planner(hf, ids) -> DiffusionPlanner:
    return DiffusionPlanner(Transformer.from_hf(hf, causal=False), **ids)


@pytest.fixture(scope="module")
def models():
    hf = _hf_model(CONFIG, DTYPE, std=None if ON_GPU else 0.3)
    return hf, _planner(hf, IDS)


@pytest.fixture(scope="module")
def tiny_exact():
    """On a GPU: the fast path's tokens equal the naive loop's on a tiny fp32 model (same device,
    same backends as the timed runs) before anything is timed."""
    if ON_GPU:
        hf = _hf_model(TINY, torch.float32, std=0.3)
        planner = _planner(hf, TINY_IDS)
        prompt, mask = _prompts(3, 8, TINY["vocab_size"] - 1)
        for kw in (
            dict(gen_length=16, block_length=8, steps=16),
            dict(gen_length=16, block_length=4, steps=8),
        ):
            ref = llada_generate(_naive(hf), prompt, mask, mask_id=TINY_IDS["mask_id"], **kw)
            assert torch.equal(planner.generate(prompt, mask, **kw).tokens, ref), kw
    return True


def _prompts(B: int, Lp: int, vocab: int, seed: int = 0):
    """Random prompts, the odd rows left-padded by a quarter (the key padding mask at work)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, Lp), generator=g)
    mask = torch.ones(B, Lp, dtype=torch.long)
    mask[1::2, : Lp // 4] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


class _Enough(Exception):
    pass


def _naive_steps(naive, prompt, mask, n: int, **kw) -> None:
    """The naive loop, stopped when it asks for forward ``n + 1``: ``n`` complete steps."""
    calls = 0

    def model(x, attention_mask=None):
        nonlocal calls
        if calls == n:
            raise _Enough
        calls += 1
        return naive(x, attention_mask)

    try:
        llada_generate(model, prompt, mask, **kw)
    except _Enough:
        pass


def _ours_blocks(planner, prompt, mask, n: int, **kw) -> None:
    for block in planner.generate_stream(prompt, mask, **kw):
        if block.index + 1 == n:
            break
    if ON_GPU:
        torch.cuda.synchronize()


def _check_first_step(planner, naive, prompt, mask, Lp, k):
    """From the all-masked start: every candidate of our first step (fused LM head on the block's
    hidden states) is the HF argmax up to bf16 rounding of the logits."""
    B = prompt.shape[0]
    x = torch.cat([prompt, torch.full((B, BLOCK * 2), IDS["mask_id"], device=DEVICE)], dim=1)
    full_mask = torch.cat([mask, torch.ones(B, BLOCK * 2, dtype=mask.dtype, device=DEVICE)], dim=1)
    with torch.no_grad():
        hidden = planner.model(x, full_mask, compute_logits=False, causal=False).hidden[:, Lp : Lp + BLOCK]
    res = ops.unmask_step(
        x.clone(),
        hidden=hidden.contiguous(),
        lm_head=planner.model.lm_head_weight,
        mask_id=IDS["mask_id"],
        start=Lp,
        num_transfer=k,
    )
    logits = naive(x, full_mask)[:, Lp : Lp + BLOCK].float()
    best = logits.max(-1).values
    gap = best - logits.gather(-1, res.tokens[..., None])[..., 0]
    tol = 0.0 if DTYPE == torch.float32 else 0.02 * best.abs().clamp_min(1.0)
    assert (gap <= tol).all(), f"a candidate is {float(gap.max()):.4f} below the HF argmax"
    return dict(
        first_step_candidates_equal_argmax=float((gap == 0).float().mean()),
        first_step_max_logit_gap=float(gap.max()),
    )


def _step_flops(model, rows: int, q_len: int, k_len: int, head_rows: int) -> float:
    """Matmul flops of a forward of ``rows x q_len`` tokens against ``k_len`` keys, with the LM head
    on ``head_rows`` rows in total."""
    c = model.config
    d, V = c.hidden_size, c.vocab_size
    per_token = (
        2 * c.num_layers * (d * (c.q_size + 2 * c.kv_size) + c.q_size * d + 3 * d * c.intermediate_size)
    )
    attention = 4 * c.num_layers * rows * q_len * k_len * c.q_size
    return per_token * rows * q_len + attention + 2 * V * d * head_rows


def _roofline(model, steps: list[tuple[int, int, int, int]], ms: float) -> dict:
    """Floor (sum over steps of max(weights / bandwidth, flops / peak)), MFU and MBU of ``ms``."""
    flops = sum(_step_flops(model, *s) for s in steps)
    if not ON_GPU:
        return dict(flops=flops)
    bw = copy_bandwidth_gbs(str(DEVICE)) * 1e9
    peak = matmul_peak_tflops(str(DEVICE)) * 1e12
    weights = streamed_weight_bytes(model)
    floor = sum(max(weights / bw, _step_flops(model, *s) / peak) for s in steps)
    return dict(
        floor_ms=floor * 1e3,
        of_floor=floor * 1e3 / ms,
        mfu=flops / (ms * 1e-3) / peak,
        mbu=len(steps) * weights / (ms * 1e-3) / bw,
        copy_bandwidth_gbs=bw / 1e9,
        matmul_peak_tflops=peak / 1e12,
    )


@pytest.mark.parametrize("cache", [None, "dual"], ids=["no-cache", "dual-cache"])
@pytest.mark.parametrize("Lp, G, B, k", CASES, ids=[f"p{c[0]}-g{c[1]}-b{c[2]}-k{c[3]}" for c in CASES])
def test_planner_vs_naive_loop(benchmark, models, tiny_exact, Lp, G, B, k, cache):
    hf, planner = models
    naive = _naive(hf)
    prompt, mask = _prompts(B, Lp, CONFIG["vocab_size"] - 300 if ON_GPU else CONFIG["vocab_size"] - 1)
    L = Lp + G
    kw = dict(gen_length=G, block_length=BLOCK, steps=G // k)
    extra = dict(
        model="LLaDA-8B-shaped" if ON_GPU else "tiny",
        dtype=str(DTYPE),
        B=B,
        prompt=Lp,
        gen=G,
        block=BLOCK,
        tokens_per_step=k,
        cache=cache or "none",
        baseline="llada_generate on HF Llama (SDPA)",
    )
    if ON_GPU:
        extra.update(_check_first_step(planner, naive, prompt, mask, Lp, k))
    else:  # the whole generation, token for token
        ref = llada_generate(naive, prompt, mask, mask_id=IDS["mask_id"], **kw)
        out = planner.generate(prompt, mask, **kw)
        assert torch.equal(out.tokens, ref)
        cached = planner.generate(prompt, mask, cache=cache, **kw)
        extra["agreement_with_no_cache"] = float((cached.generated == out.generated).float().mean())

    def ours():
        _ours_blocks(planner, prompt, mask, TIMED_BLOCKS, cache=cache, **kw)

    def baseline():
        _naive_steps(naive, prompt, mask, NAIVE_STEPS, mask_id=IDS["mask_id"], **kw)

    if not benchmark.disabled:
        _ours_blocks(planner, prompt, mask, 2 if cache else 1, cache=cache, **kw)  # compile, capture graphs
        naive_ms = time_ms(baseline, DEVICE, warmup=1, reps=ROUNDS) / NAIVE_STEPS
        ours_ms = time_ms(ours, DEVICE, warmup=0, reps=ROUNDS) / TIMED_BLOCKS
        steps = BLOCK // k
        naive_tps = B * k / (naive_ms * 1e-3)
        ours_tps = B * BLOCK / (ours_ms * 1e-3)
        if cache is None:
            ours_steps = [(B, L, L, B * BLOCK)] * steps
        else:
            ours_steps = [(B, L, L, B * BLOCK)] + [(B, BLOCK, L, B * BLOCK)] * (steps - 1)
        naive_roof = _roofline(planner.model, [(B, L, L, B * L)], naive_ms)
        extra.update(
            naive_step_ms=naive_ms,
            ours_block_ms=ours_ms,
            ours_step_ms=ours_ms / steps,
            naive_tokens_per_s=naive_tps,
            ours_tokens_per_s=ours_tps,
            speedup=ours_tps / naive_tps,
            **{f"naive_{key}": v for key, v in naive_roof.items()},
            **{f"ours_{key}": v for key, v in _roofline(planner.model, ours_steps, ours_ms).items()},
            **environment(DEVICE),
        )
    benchmark.extra_info.update(extra)
    benchmark.pedantic(ours, rounds=1, warmup_rounds=0)
