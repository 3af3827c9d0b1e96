"""BlockDiffusionPlanner (exact block K/V cache) against the naive block-causal loop, tokens/s in the
same run.

The naive loop is :func:`hybridkernels.reference.block_diffusion.block_diffusion_generate`: a full
forward over prompt + generation with the block-causal mask every step (on a GPU through the Triton
``block_causal`` kernel, so the comparison is the cache, not the attention). Ours:
``BlockDiffusionPlanner.generate`` (each step runs the current block only over the cache, one store
pass per finished block). Both generate the whole sequence and are timed end to end.

GPU: a LLaDA-8B-shaped random model in bf16 (d 4096, 32 layers, 32 heads, MLP 12288), run as SDAR
(Qwen3-style q/k norms, block 4, 4 steps, ``low_confidence_static``) and as Fast-dLLM v2 (Qwen2-style
q/k/v biases, block 32, sub-blocks 8, threshold 0.9), prompt 512 + gen 64, batch 1 and 8. Random
weights give no confident tokens, so each step commits one token and the step counts are fixed.
Before timing, a tiny fp32 model on the same device and backends must give the naive loop's tokens
exactly; on the 8B model the token agreement of the two (bf16 rounding differs between a full and a
block forward) is recorded. Floors (DESIGN.md): a naive step costs at least the forward's flops
over ``L`` tokens at the matmul peak; a cached step streams the weights once.

CPU: tiny fp32 models, the whole generation must match token for token.

    pytest benches/bench_block_diffusion.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, ON_GPU, QUICK, compare

from hybridkernels import benchmarking, ops
from hybridkernels.benchmarking import floor_s, forward_flops, streamed_weight_bytes, token_agreement
from hybridkernels.models import Transformer, TransformerConfig
from hybridkernels.models.block_diffusion import BlockDiffusionPlanner
from hybridkernels.reference.block_diffusion import block_diffusion_generate

TINY = TransformerConfig(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=32, max_position_embeddings=1024,
)  # fmt: skip
FAMILY_OPTIONS = {  # the published defaults, with SDAR's static (top-k) rule
    "sdar": dict(block_length=4, steps=4, commit="topk"),
    "fast_dllm_v2": dict(block_length=32, sub_block=8, commit="threshold", threshold=0.9),
}
if ON_GPU:
    CONFIG, DTYPE, ROUNDS = benchmarking.LLADA_8B, torch.bfloat16, 2
    CASES = [(f, 512, 64, B) for f in FAMILY_OPTIONS for B in (1, 8)]
    if QUICK:
        CASES = [("sdar", 512, 64, 1), ("fast_dllm_v2", 512, 64, 8)]
else:
    CONFIG, DTYPE, ROUNDS = TINY, torch.float32, 1
    CASES = [("sdar", 8, 16, 2), ("fast_dllm_v2", 8, 16, 2)]
    FAMILY_OPTIONS["fast_dllm_v2"] = dict(FAMILY_OPTIONS["fast_dllm_v2"], block_length=8, sub_block=4)


def _config(config: TransformerConfig, family: str) -> TransformerConfig:
    base = "qwen3" if family == "sdar" else "qwen2"
    return config.replace(family=base, qk_norm=base == "qwen3", qkv_bias=base == "qwen2", causal=False)


def _planner(
    config: TransformerConfig, family: str, dtype, std: float | None = None
) -> BlockDiffusionPlanner:
    cfg = _config(config, family)
    model = Transformer(cfg, dtype=dtype, device=DEVICE)
    if std is not None:  # wide weights so that a tiny model's tokens vary
        model.reset_parameters(std=std, generator=torch.Generator(DEVICE).manual_seed(0))
    mask_id = cfg.vocab_size - 1
    return BlockDiffusionPlanner(model, family=family, mask_id=mask_id, stop_token_ids=())


def _naive_attention(q, k, v, *, block_causal):
    return ops.attention(q, k, v, block_causal=block_causal)


def _prompts(B: int, Lp: int, vocab: int, seed: int = 0):
    """Random prompts (no mask token), the odd rows left-padded by a quarter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (B, Lp), generator=g)
    mask = torch.ones(B, Lp, dtype=torch.long)
    mask[1::2, : Lp // 4] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture(scope="module")
def tiny_exact():
    """The cached planner equals the naive loop token for token on a tiny fp32 model, on this
    device and these backends, before anything is timed."""
    for family, opts in FAMILY_OPTIONS.items():
        planner = _planner(TINY, family, torch.float32, std=0.5)
        prompt, mask = _prompts(3, 9, TINY.vocab_size)
        kw = (
            dict(opts, gen_length=64, threshold=0.2)
            if family == "fast_dllm_v2"
            else dict(opts, gen_length=16)
        )
        out = planner.generate(prompt, mask, **kw)
        ref = block_diffusion_generate(
            planner.model, prompt, mask, attention=_naive_attention, **planner.reference_kwargs(**kw)
        )
        assert torch.equal(out.tokens, ref.tokens), family
    return True


@pytest.mark.parametrize("family, Lp, G, B", CASES, ids=[f"{f}-P{p}-G{g}-B{b}" for f, p, g, b in CASES])
def test_block_cache_vs_naive_loop(benchmark, tiny_exact, family, Lp, G, B):
    planner = _planner(CONFIG, family, DTYPE, std=None if ON_GPU else 0.5)
    prompt, mask = _prompts(B, Lp, CONFIG.vocab_size)
    kw = dict(FAMILY_OPTIONS[family], gen_length=G)
    ref_kw = planner.reference_kwargs(**kw)

    def ours():
        return planner.generate(prompt, mask, **kw)

    def naive():
        return block_diffusion_generate(planner.model, prompt, mask, attention=_naive_attention, **ref_kw)

    got, expected = ours(), naive()
    agreement = token_agreement(got.generated, expected.tokens[:, Lp:])
    if not ON_GPU:
        assert torch.equal(got.tokens, expected.tokens)
    tokens = B * G
    floors = {}
    if ON_GPU:  # a naive step: the forward over L tokens (weights streamed once, or its flops)
        L = Lp + G + planner.block_length
        step = floor_s(
            DEVICE, streamed_weight_bytes(planner.model), forward_flops(planner.model.config, B * L, L)
        )
        floors["naive_step_floor_ms"] = 1e3 * step
    compare(
        benchmark,
        ours,
        naive,
        rounds=ROUNDS,
        warmup=1,
        family=family,
        shape=dict(B=B, prompt=Lp, gen=G, dtype=str(DTYPE), **FAMILY_OPTIONS[family]),
        tokens=tokens,
        token_agreement=agreement,
        ours_forward_passes=got.stats.forward_passes,
        naive_forward_passes=expected.forward_passes,
        steps=got.stats.steps,
        **floors,
    )
    if not benchmark.disabled:
        info = benchmark.extra_info
        info["tokens_per_s_ours"] = tokens / (info["ours_ms"] / 1e3)
        info["tokens_per_s_naive"] = tokens / (info["baseline_ms"] / 1e3)
