"""The Dream planner family against Dream's naive sampler, tokens/s in the same run.

GPU: a Dream-7B-shaped random model in bf16 (Qwen2.5-7B: d 3584, 28 layers, 28 heads / 4 KV
heads, MLP 18944, V 152,064), built as an HF ``Qwen2ForCausalLM`` (SDPA attention) whose weights
our ``Transformer`` shares. The baseline is Dream's published loop
(:func:`hybridkernels.reference.dream_generate`, Dream's ``diffusion_generate``) on that HF model
with an all-visible 4D mask: a full forward and ``[B, L, V]`` logits every step. Ours
(``DiffusionPlanner`` with ``family="dream"``, ``alg="entropy"``): no cache (Dream's schedule,
a full forward per step, the LM head fused into the unmask op on the generation's shifted rows),
Fast-dLLM's dual cache (block 32), and the dual cache with Fast-dLLM's threshold rule (0.9).

Every no-cache step costs the same whatever it commits, so the naive loop and ours are timed over
a generation of ``TIMED_STEPS`` steps and reported per step; tokens/s is at Dream's default of one
token per step (``steps = max_new_tokens``). The cached rows are timed over one block (one full
forward, then window steps; random weights commit one token per step, the threshold rule's worst
case) and report the block's tokens/s.

Before timing, a tiny fp32 Dream model on the same device must give the naive loop's tokens
exactly (no cache), and Fast-dLLM's block sampler's (:func:`reference.dream_block_generate`,
dual cache); on the CPU everything is tiny and checked the same way.

    pytest benches/bench_dream.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, ON_GPU, QUICK
from transformers import Qwen2Config, Qwen2ForCausalLM

from hybridkernels.benchmarking import environment, time_alternating
from hybridkernels.models import DiffusionPlanner, Transformer
from hybridkernels.reference import dream_block_generate, dream_generate
from hybridkernels.reference.dream import DREAM_MASK_ID

DREAM_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1e6,
    max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e4,
    max_position_embeddings=256,
)
TINY_MASK = 95

if ON_GPU:
    CONFIG, DTYPE, MASK = DREAM_7B, torch.bfloat16, DREAM_MASK_ID
    BLOCK, TIMED_STEPS, ROUNDS = 32, 4, 3
    CASES = [(512, 256, 1), (512, 256, 8)] if not QUICK else [(512, 256, 1)]
else:
    CONFIG, DTYPE, MASK = TINY, torch.float32, TINY_MASK
    BLOCK, TIMED_STEPS, ROUNDS = 4, 4, 2
    CASES = [(8, 16, 2)]
VARIANTS = {
    "no-cache": dict(),
    "dual-cache": dict(cache="dual", block_length=BLOCK),
    "dual-threshold": dict(cache="dual", block_length=BLOCK, threshold=0.9),
}


def _hf_model(config: dict, dtype: torch.dtype, mask_id: int, std: float | None = None) -> Qwen2ForCausalLM:
    hf_config = Qwen2Config(
        **config, rms_norm_eps=1e-6, attn_implementation="sdpa", tie_word_embeddings=False
    )
    with torch.device(DEVICE):
        hf = Qwen2ForCausalLM._from_config(hf_config, dtype=dtype).eval()
    if std is not None:  # wide weights so that a tiny model's tokens vary
        g = torch.Generator(DEVICE).manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, std, generator=g)
    with torch.no_grad():
        hf.lm_head.weight[mask_id] = 0  # a trained Dream never proposes <|mask|>
    return hf


def _naive(hf):
    """``model(x, attention_mask)`` for dream_generate: HF with every valid key visible."""

    def model(x, attention_mask=None, cache=None):
        if cache is not None:
            raise ValueError("the naive model has no cache")
        B, L = x.shape
        valid = torch.ones_like(x, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
        mask4d = valid[:, None, None, :].expand(B, 1, L, L)
        with torch.no_grad():
            return hf(input_ids=x, attention_mask=mask4d, position_ids=pos).logits

    return model


class _Cached:
    """Fast-dLLM's dual cache for the reference block sampler, on our planner's own model run
    through the reference ops (the benchmark's tiny check; tests/test_dream.py checks it against
    an independent plain-torch cache)."""

    def __init__(self, planner):
        from hybridkernels.models import DiffusionKVCache

        self.model, self.cache_cls, self.kv = planner.model, DiffusionKVCache, None

    def __call__(self, x, attention_mask=None, cache=None):
        m, c = self.model, self.model.config
        B, T = x.shape
        if cache is None:
            L = T
            self.valid = (
                torch.ones(B, L, dtype=torch.bool, device=x.device)
                if attention_mask is None
                else attention_mask.bool()
            )
            self.pos = (self.valid.long().cumsum(-1) - 1).clamp_min(0)
            self.kv = self.cache_cls(
                num_layers=c.num_layers, batch=B, length=L, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                dtype=m.dtype, device=x.device, key_padding_mask=self.valid, attention_backend="reference",
            )  # fmt: skip
            slots = torch.arange(L, device=x.device)
        else:
            slots = torch.arange(cache[0], cache[1], device=x.device)
        self.kv.set_queries(slots, self.kv.length)
        out = m(x, position_ids=self.pos.index_select(1, slots), kv_cache=self.kv, causal=False)
        return out.logits


def _planner(hf) -> DiffusionPlanner:
    return DiffusionPlanner(Transformer.from_hf(hf, causal=False), family="dream", mask_id=MASK)


def _prompts(B: int, Lp: int, vocab: int, seed: int = 0):
    """Random prompts, the odd rows left-padded by a quarter (the key padding mask at work)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, Lp), generator=g)
    mask = torch.ones(B, Lp, dtype=torch.long)
    mask[1::2, : Lp // 4] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _check_exact(hf, planner, Lp, G, B, vocab, mask_id) -> None:
    """No cache: Dream's naive loop's tokens; dual cache: Fast-dLLM's block sampler's."""
    prompt, mask = _prompts(B, Lp, vocab)
    ref = dream_generate(
        _naive(hf), prompt, mask, max_new_tokens=G, steps=G // 2, alg="entropy", mask_id=mask_id
    )
    assert torch.equal(planner.generate(prompt, mask, gen_length=G, steps=G // 2, alg="entropy").tokens, ref)
    kw = dict(steps=G // 2, block_length=G // 4, cache="dual")
    ref = dream_block_generate(_Cached(planner), prompt, mask, max_new_tokens=G, mask_id=mask_id, **kw)
    assert torch.equal(planner.generate(prompt, mask, gen_length=G, **kw).tokens, ref)


@pytest.fixture(scope="module")
def models():
    hf = _hf_model(CONFIG, DTYPE, MASK, std=None if ON_GPU else 0.3)
    return hf, _planner(hf)


@pytest.fixture(scope="module")
def tiny_exact(models):
    """The fast path's tokens equal the naive samplers' on a tiny fp32 model, same device and
    backends as the timed runs, before anything is timed."""
    if ON_GPU:
        hf = _hf_model(TINY, torch.float32, TINY_MASK, std=0.3)
        planner = DiffusionPlanner(Transformer.from_hf(hf, causal=False), family="dream", mask_id=TINY_MASK)
        _check_exact(hf, planner, 8, 16, 3, TINY["vocab_size"] - 2, TINY_MASK)
    else:
        _check_exact(*models, 8, 16, 3, TINY["vocab_size"] - 2, MASK)
    return True


def _blocks(planner, prompt, mask, n: int, **kw) -> None:
    for block in planner.generate_stream(prompt, mask, **kw):
        if block.index + 1 == n:
            break
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("Lp, G, B", CASES, ids=[f"p{c[0]}-g{c[1]}-b{c[2]}" for c in CASES])
def test_dream_planner_vs_naive_loop(benchmark, models, tiny_exact, Lp, G, B, variant):
    hf, planner = models
    naive = _naive(hf)
    prompt, mask = _prompts(B, Lp, CONFIG["vocab_size"] - 300 if ON_GPU else CONFIG["vocab_size"] - 2)
    options = VARIANTS[variant]
    extra = dict(
        model="Dream-7B-shaped" if ON_GPU else "tiny",
        dtype=str(DTYPE),
        B=B,
        prompt=Lp,
        gen=G,
        variant=variant,
        alg="entropy",
        baseline="dream_generate (Dream's diffusion_generate) on HF Qwen2 (SDPA)",
    )
    if variant == "no-cache":

        def ours():
            planner.generate(prompt, mask, gen_length=G, steps=TIMED_STEPS, alg="entropy")
            if ON_GPU:
                torch.cuda.synchronize()

        per_call_steps = TIMED_STEPS
    else:
        steps = G  # one token per step: steps = max_new_tokens, BLOCK steps per block

        def ours():
            _blocks(planner, prompt, mask, 1, gen_length=G, steps=steps, alg=None, **options)

        per_call_steps = BLOCK

    def baseline():
        dream_generate(naive, prompt, mask, max_new_tokens=G, steps=TIMED_STEPS, alg="entropy", mask_id=MASK)
        if ON_GPU:
            torch.cuda.synchronize()

    if not benchmark.disabled:
        timings, _ = time_alternating({"naive": baseline, "ours": ours}, DEVICE, rounds=ROUNDS, warmup=1)
        naive_step_ms = timings["naive"].median * 1e3 / TIMED_STEPS
        ours_ms = timings["ours"].median * 1e3
        naive_tps = B / (naive_step_ms * 1e-3)
        # one token per step on both sides; a timed call of ours is per_call_steps steps
        ours_tps = B * per_call_steps / (ours_ms * 1e-3)
        extra.update(
            naive_step_ms=naive_step_ms,
            ours_step_ms=ours_ms / per_call_steps,
            naive_tokens_per_s=naive_tps,
            ours_tokens_per_s=ours_tps,
            speedup=ours_tps / naive_tps,
            **environment(DEVICE),
        )
    benchmark.extra_info.update(extra)
    benchmark.pedantic(ours, rounds=1, warmup_rounds=0)
