"""ARExecutor against HF ``generate`` (its default dynamic cache) and the naive no-cache loop.

GPU: a Llama-3-8B-shaped random model in bf16 (HF ``LlamaForCausalLM``; the executor shares its
weights), prompt 512, 256 new tokens, greedy, no EOS (every run decodes all 256 tokens):

* ``test_batch1``: batch 1. Also the no-cache loop (one run) and the decode rate against the
  weight-streaming roofline: measured copy bandwidth / bytes read per step (the weights without
  the embedding table, which decoding reads one row of; ``roofline_tokens_per_s_with_kv`` adds
  the KV cache).
* ``test_batch16``: 16 prompts of 512 tokens.
* ``test_shared_prefix_samples``: one 512-token prompt, ``num_samples = 16`` sampled answers
  decoded against the prompt's K/V stored once (cascade), vs HF ``num_return_sequences = 16``
  (which copies the prompt 16 times) and vs the executor on 16 copies of the prompt.

The timed figure is a whole ``generate`` call (prefill + decode, the executor's decode step
replayed from its CUDA graph, captured by a warm-up call); ``extra_info`` splits off the decode
rate (HF's decode time = its call minus a ``max_new_tokens = 1`` call). Before timing, every
greedy output is checked by teacher forcing through the HF model: each emitted token must be the
argmax of HF's logits up to bf16 rounding (exact token equality is checked on the CPU, fp32).
On the CPU: a tiny fp32 model, the same tests as a smoke run.

    pytest benches/bench_executor.py --benchmark-json=out.json
"""

from __future__ import annotations

import pytest
import torch
from _common import DEVICE, ON_GPU, QUICK, compare
from transformers import LlamaConfig, LlamaForCausalLM

from hybridkernels.benchmarking import copy_bandwidth_gbs, step_floor, streamed_weight_bytes, time_ms
from hybridkernels.models import ARExecutor
from hybridkernels.reference.ar_loop import ar_generate

if ON_GPU:  # Llama-3-8B
    CONFIG = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )
    DTYPE, PROMPT, NEW, BATCH, SAMPLES, ROUNDS = torch.bfloat16, 512, 256, 16, 16, 3
    if QUICK:  # gpu_check.sh: HF generate runs ~30 ms a token eagerly; 64 tokens still time the decode
        NEW, ROUNDS = 64, 2
else:
    CONFIG = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    DTYPE, PROMPT, NEW, BATCH, SAMPLES, ROUNDS = torch.float32, 12, 6, 3, 4, 3


@pytest.fixture(scope="module")
def models():
    config = LlamaConfig(**CONFIG, rms_norm_eps=1e-5, eos_token_id=None, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(DEVICE):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    if not ON_GPU:  # wider weights than the default init so greedy tokens vary
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                p.copy_(torch.ones_like(p) if "norm" in name else 0.3 * torch.randn(p.shape, generator=g))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, ARExecutor.from_hf(hf)


def _prompt(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (B, PROMPT), generator=g).to(DEVICE)


def _hf_generate(hf, ids, new=NEW, **kw):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0) | kw
    with torch.no_grad():
        return hf.generate(ids, **kw)[:, ids.shape[1] :]


def _check_greedy(hf, ids, tokens):
    """Every token of ``tokens [N, NEW]`` (N = a multiple of ids' rows) is HF's argmax given what
    precedes it, exactly in fp32, up to bf16 rounding of the logits otherwise."""
    ids = ids.repeat_interleave(tokens.shape[0] // ids.shape[0], 0)
    with torch.no_grad():
        logits = hf(torch.cat([ids, tokens], dim=1), logits_to_keep=NEW + 1).logits[:, :-1].float()
    chosen = logits.gather(-1, tokens[..., None])[..., 0]
    best = logits.max(-1).values
    tol = 0.0 if DTYPE == torch.float32 else 0.02 * best.abs().clamp_min(1.0)
    gap = best - chosen
    assert (gap <= tol).all(), f"greedy token {float(gap.max()):.4f} below HF's argmax"


def _kv_bytes(model, rows, length) -> int:
    c = model.config
    return 2 * c.num_layers * rows * length * c.num_kv_heads * c.head_dim * model.dtype.itemsize


def _roofline(ex, rows, tokens_per_s) -> dict:
    if not ON_GPU:
        return {}
    bw = copy_bandwidth_gbs(str(DEVICE)) * 1e9
    weights = streamed_weight_bytes(ex.model)
    kv = _kv_bytes(ex.model, rows, PROMPT + NEW // 2)  # mean cache length over the decode
    return dict(
        copy_bandwidth_gbs=bw / 1e9,
        weight_gb=weights / 1e9,
        roofline_tokens_per_s=rows * bw / weights,
        roofline_tokens_per_s_with_kv=rows * bw / (weights + kv),
        roofline_fraction=tokens_per_s / (rows * bw / weights),
    )


def _hf_decode_rate(hf, ids, total_ms, **kw) -> dict:
    prefill_ms = time_ms(lambda: _hf_generate(hf, ids, new=1, **kw), DEVICE, warmup=1, reps=ROUNDS)
    rows = ids.shape[0] * kw.get("num_return_sequences", 1)
    decode_ms = total_ms - prefill_ms  # None where timing noise swamps it (tiny CPU runs)
    rate = rows * (NEW - 1) / (decode_ms / 1e3) if decode_ms > 0 else None
    return dict(hf_prefill_ms=prefill_ms, hf_decode_tokens_per_s=rate)


def _step_vs_floor(ex, st, rows) -> dict:
    """The decode step's time against its floor (:func:`hybridkernels.benchmarking.step_floor`:
    weights + K/V over the measured copy bandwidth vs flops over the measured matmul rate), on
    the CPU and the GPU."""
    if not st.decode_steps:
        return {}
    step_ms = st.decode_s * 1e3 / st.decode_steps
    floor = step_floor(ex.model, rows=rows, queries=1, keys=PROMPT + NEW // 2, head_rows=rows)
    return dict(
        decode_step_ms=step_ms,
        decode_step_floor_ms=floor["floor_s"] * 1e3,
        decode_step_over_floor=step_ms / (floor["floor_s"] * 1e3),
        decode_step_bound=floor["bound"],
    )


def _ours_extra(ex, out, rows) -> dict:
    st = out.stats
    return dict(
        ours_prefill_ms=st.prefill_s * 1e3,
        ours_decode_tokens_per_s=st.decode_tokens_per_s,
        cuda_graph=st.cuda_graph,
        shared_prefix=st.shared_prefix,
        kv_cache_gb=st.cache_bytes / 1e9,
        **_roofline(ex, rows, st.decode_tokens_per_s),
        **_step_vs_floor(ex, st, rows),
    )


def _shape(B, **kw):
    return dict(
        model="Llama-3-8B-shaped" if ON_GPU else "tiny", B=B, prompt=PROMPT, new=NEW, dtype=str(DTYPE), **kw
    )


def test_batch1(benchmark, models):
    hf, ex = models
    ids = _prompt(1)

    def ours():
        return ex.generate(ids, max_new_tokens=NEW)

    out = ours()  # warm-up (captures the decode graph)
    _check_greedy(hf, ids, out.tokens)
    ref = _hf_generate(hf, ids)
    naive = ar_generate(ex.model, ids, max_new_tokens=NEW).tokens
    _check_greedy(hf, ids, naive)
    if not ON_GPU:
        assert torch.equal(out.tokens, ref) and torch.equal(naive, ref)
    extra = dict(tokens_equal_hf=int((out.tokens == ref).cumprod(-1).sum()))
    if not benchmark.disabled:
        extra.update(_ours_extra(ex, ours(), 1))
        naive_ms = time_ms(lambda: ar_generate(ex.model, ids, max_new_tokens=NEW), DEVICE, warmup=0, reps=1)
        extra.update(no_cache_loop_ms=naive_ms, no_cache_tokens_per_s=NEW / (naive_ms / 1e3))
    compare(
        benchmark,
        ours,
        lambda: _hf_generate(hf, ids),
        rounds=ROUNDS,
        warmup=1,  # whole generate calls (seconds each); ours captured its graph already
        baseline_name="HF generate (dynamic cache)",
        shape=_shape(1),
        **extra,
    )
    if not benchmark.disabled:
        info = benchmark.extra_info
        info.update(_hf_decode_rate(hf, ids, info["baseline_ms"]))
        info["speedup_vs_no_cache"] = info["no_cache_loop_ms"] / info["ours_ms"]


def test_batch16(benchmark, models):
    hf, ex = models
    ids = _prompt(BATCH, seed=1)

    def ours():
        return ex.generate(ids, max_new_tokens=NEW)

    out = ours()
    _check_greedy(hf, ids, out.tokens)
    ref = _hf_generate(hf, ids)
    if not ON_GPU:
        assert torch.equal(out.tokens, ref)
    extra = dict(tokens_equal_hf=int((out.tokens == ref).cumprod(-1).sum()))
    if not benchmark.disabled:
        extra.update(_ours_extra(ex, ours(), BATCH))
    compare(
        benchmark,
        ours,
        lambda: _hf_generate(hf, ids),
        rounds=ROUNDS,
        warmup=1,  # whole generate calls (seconds each); ours captured its graph already
        baseline_name="HF generate (dynamic cache)",
        shape=_shape(BATCH),
        **extra,
    )
    if not benchmark.disabled:
        benchmark.extra_info.update(_hf_decode_rate(hf, ids, benchmark.extra_info["baseline_ms"]))


def test_shared_prefix_samples(benchmark, models):
    hf, ex = models
    ids = _prompt(1, seed=2)
    copies = ids.expand(SAMPLES, -1).contiguous()
    sample_kw = dict(temperature=0.8, top_k=50, top_p=0.95)

    def ours():
        return ex.generate(ids, max_new_tokens=NEW, num_samples=SAMPLES, seed=0, **sample_kw)

    def hf_samples():
        with torch.no_grad():
            return hf.generate(
                ids,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=True,
                num_return_sequences=SAMPLES,
                pad_token_id=0,
                **sample_kw,
            )

    # Correctness at temperature 0: the cascade gives identical samples, each HF's greedy answer.
    greedy = ex.generate(ids, max_new_tokens=NEW, num_samples=SAMPLES)
    assert greedy.stats.shared_prefix and (greedy.tokens == greedy.tokens[:1]).all()
    assert torch.equal(greedy.tokens[:1], ex.generate(ids, max_new_tokens=NEW).tokens)
    _check_greedy(hf, ids, greedy.tokens[:1])
    out = ours()
    assert out.stats.shared_prefix and out.tokens.shape == (SAMPLES, NEW)
    extra = {}
    if not benchmark.disabled:
        extra.update(_ours_extra(ex, ours(), SAMPLES))
        copies_out = ex.generate(copies, max_new_tokens=NEW, seed=0, **sample_kw)  # warm-up
        copies_ms = time_ms(
            lambda: ex.generate(copies, max_new_tokens=NEW, seed=0, **sample_kw),
            DEVICE,
            warmup=0,
            reps=ROUNDS,
        )
        extra.update(
            ours_on_prompt_copies_ms=copies_ms,
            ours_on_prompt_copies_decode_tokens_per_s=copies_out.stats.decode_tokens_per_s,
        )
    compare(
        benchmark,
        ours,
        hf_samples,
        rounds=ROUNDS,
        warmup=1,  # whole generate calls (seconds each); ours captured its graph already
        baseline_name="HF generate num_return_sequences (dynamic cache)",
        shape=_shape(1, num_samples=SAMPLES, **sample_kw),
        **extra,
    )
    if not benchmark.disabled:
        kw = dict(do_sample=True, num_return_sequences=SAMPLES, **sample_kw)
        benchmark.extra_info.update(_hf_decode_rate(hf, ids, benchmark.extra_info["baseline_ms"], **kw))
