"""ARExecutor against HF ``generate`` and the naive no-cache loop: tiny random Llama / Qwen2 /
Qwen3 models in fp32 on the CPU (decode through ``_C``'s C++ path), left padding, latent
prefixes, EOS, num_samples (shared prefix), sampling filters, the AR->AR helper, bad inputs.
A CUDA test (skipped without a GPU) checks the graph-captured step against the eager one."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from hybridkernels import _cuda
from hybridkernels.models import ARExecutor, cuda_graphs
from hybridkernels.ops import OP_BACKENDS
from hybridkernels.reference.ar_loop import ar_generate

V = 97
SHAPE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # a head dim the _C decode kernels take
    rms_norm_eps=1e-5,
)
HF = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
NEW = 10
HAS_CUDA = torch.cuda.is_available()


def hf_model(family="llama", seed=0, **overrides):
    """A tiny HF causal LM with every weight N(0, 0.3) (norms 1 + N(0, 0.1)): varied greedy tokens."""
    config_cls, model_cls = HF[family]
    config = config_cls(**(SHAPE | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model


@pytest.fixture(scope="module")
def llama():
    hf = hf_model("llama")
    return hf, ARExecutor.from_hf(hf)


def prompts(B=3, L=9, pads=(0, 3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


def latents(B, P=4, seed=2):
    return 0.5 * torch.randn(B, P, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, ids, mask, prefix=None, **kw):
    """HF generate(do_sample=False): the new tokens only."""
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0) | kw
    with torch.no_grad():
        if prefix is None:
            return hf.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
        embeds = torch.cat([prefix, hf.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype), mask], dim=1)
        return hf.generate(inputs_embeds=embeds, attention_mask=full_mask, **kw)


@pytest.mark.parametrize("with_prefix", [False, True], ids=["text", "latent-prefix"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_hf_and_naive_loop(family, with_prefix):
    hf = hf_model(family)
    ex = ARExecutor.from_hf(hf)
    ids, mask = prompts()
    prefix = latents(3) if with_prefix else None
    ref = hf_greedy(hf, ids, mask, prefix)
    assert len(set(ref.flatten().tolist())) > 5  # the tiny model's tokens vary
    out = ex.generate(ids, mask, prefix, max_new_tokens=NEW)
    assert torch.equal(out.tokens, ref)
    assert out.lengths.tolist() == [NEW] * 3
    naive = ar_generate(ex.model, ids, mask, prefix, max_new_tokens=NEW)
    assert torch.equal(naive.tokens, ref)
    st = out.stats
    assert (st.rows, st.decode_steps, st.new_tokens, st.shared_prefix) == (3, NEW - 1, 3 * NEW, False)
    assert st.prompt_len == 9 + (4 if with_prefix else 0) and st.cache_len == st.prompt_len + NEW


def test_decode_runs_through_the_compiled_extension(llama, monkeypatch):
    if not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    hf, ex = llama
    calls = {"decode": 0, "append": 0}

    def counting(table, key, name):
        impl = table[key]

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return impl(*args, **kwargs)

        monkeypatch.setitem(table, key, wrapped)

    counting(OP_BACKENDS["decode_attention"].implementations, "cuda", "decode")
    counting(OP_BACKENDS["kv_append"].implementations, "cuda", "append")
    ids, mask = prompts(B=2, pads=(0, 2))
    out = ex.generate(ids, mask, max_new_tokens=4)
    layers = hf.config.num_hidden_layers
    assert calls == {"decode": 3 * layers, "append": 4 * layers}  # 3 decode steps + the prefill
    assert torch.equal(out.tokens, hf_greedy(hf, ids, mask, max_new_tokens=4))


class _CountingC:
    """Stands in for ``hybridkernels._C``: counts kv_append / decode_attention calls."""

    def __init__(self, real):
        self.real, self.calls = real, {"decode_attention": 0, "kv_append": 0}

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name not in self.calls:
            return fn

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted


@pytest.mark.parametrize("shared", [False, True], ids=["rows", "shared-prefix"])
def test_cpu_decode_steps_call_the_extension_directly(llama, monkeypatch, shared):
    """On the CPU the decode steps call ``_C`` straight (StaticDecodeKernels: no op dispatch),
    once per layer and step for each kernel, and give HF's tokens; with the shared prompt
    prefix (num_samples > 1 of one row) too. The prefill still goes through ops.kv_append."""
    if not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    hf, ex = llama
    counting = _CountingC(_cuda._C)
    monkeypatch.setattr(_cuda, "_C", counting)
    layers = hf.config.num_hidden_layers
    if shared:
        ids, mask = prompts(B=1, pads=(2,))
        out = ex.generate(ids, mask, max_new_tokens=4, num_samples=3)
        assert out.stats.shared_prefix
        assert torch.equal(out.tokens, hf_greedy(hf, ids, mask, max_new_tokens=4).repeat(3, 1))
    else:
        ids, mask = prompts(B=2, pads=(0, 2))
        out = ex.generate(ids, mask, max_new_tokens=4)
        assert torch.equal(out.tokens, hf_greedy(hf, ids, mask, max_new_tokens=4))
    assert counting.calls == {"decode_attention": 3 * layers, "kv_append": 4 * layers}
    state = next(reversed(ex._states.values()))
    assert state.hook._direct is not None


def test_decode_backend_reference_skips_the_direct_path(llama):
    hf, _ = llama
    ex = ARExecutor.from_hf(hf, decode_backend="reference")
    ids, mask = prompts(B=2, pads=(0, 2))
    out = ex.generate(ids, mask, max_new_tokens=4)
    assert next(iter(ex._states.values())).hook._direct is None
    assert torch.equal(out.tokens, hf_greedy(hf, ids, mask, max_new_tokens=4))


def test_reference_backend_and_head_dim_outside_the_kernels():
    hf = hf_model(head_dim=32)  # _C decodes D in {64, 128}: auto falls back to the reference op
    ids, mask = prompts()
    ref = hf_greedy(hf, ids, mask)
    assert torch.equal(ARExecutor.from_hf(hf).generate(ids, mask, max_new_tokens=NEW).tokens, ref)
    ex = ARExecutor.from_hf(hf, decode_backend="reference")
    assert torch.equal(ex.generate(ids, mask, max_new_tokens=NEW).tokens, ref)


def test_slots_past_each_row_are_never_read(llama):
    """NaN in every cache slot before a call: prefill and decode overwrite exactly what they
    attend (the _C kernels read a row's first cache_lens slots only)."""
    if not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    _, ex = llama
    ids, mask = prompts()
    prefix = latents(3)
    for kw in (dict(), dict(num_samples=3)):
        rows = slice(None) if not kw else slice(0, 1)
        ref = ex.generate(ids[rows], mask[rows], prefix[rows], max_new_tokens=NEW, **kw)
        for state in ex._states.values():
            for cache in (state.cache, state.prefix):
                if cache is not None:
                    cache.k.fill_(float("nan"))
                    cache.v.fill_(float("nan"))
        out = ex.generate(ids[rows], mask[rows], prefix[rows], max_new_tokens=NEW, **kw)
        assert torch.equal(out.tokens, ref.tokens)


def test_padded_row_equals_unpadded_and_prefix_only(llama):
    hf, ex = llama
    ids, mask = prompts()
    both = ex.generate(ids, mask, max_new_tokens=NEW).tokens
    alone = ex.generate(ids[2:, 5:], max_new_tokens=NEW).tokens
    assert torch.equal(both[2:], alone)
    prefix = latents(2, P=5)
    ours = ex.generate(prefix_embeds=prefix, max_new_tokens=NEW).tokens
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=prefix, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_eos_stops_rows_like_hf(llama):
    hf, ex = llama
    ids, mask = prompts()
    free = ex.generate(ids, mask, max_new_tokens=NEW).tokens
    step = next(t for t in range(2, NEW) if free[1, t] not in free[1, :t])
    eos = int(free[1, step])  # row 1 first emits it at `step` (other rows maybe elsewhere)
    ref = hf_greedy(hf, ids, mask, eos_token_id=eos, pad_token_id=5)
    out = ex.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(out.tokens, ref)
    first = (free == eos).long().argmax(-1)
    expected = torch.where((free == eos).any(-1), first + 1, NEW)
    assert torch.equal(out.lengths, expected) and out.lengths[1] == step + 1
    for row, n in enumerate(out.lengths.tolist()):
        assert (out.tokens[row, n:] == 5).all()
    naive = ar_generate(ex.model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(naive.tokens, ref)
    eos_list = [eos, int(free[0, 5])]  # several EOS ids
    out = ex.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos_list, pad_token_id=5)
    assert torch.equal(out.tokens, hf_greedy(hf, ids, mask, eos_token_id=eos_list, pad_token_id=5))


def test_all_rows_stop_early_and_the_output_is_trimmed(llama):
    hf, ex = llama
    ids, mask = prompts(B=2, pads=(0, 1))
    free = ex.generate(ids, mask, max_new_tokens=NEW).tokens
    eos = [int(free[0, 1]), int(free[1, 2])]
    out = ex.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos)
    stopped = ARExecutor(ex.model, stop_check_every=1).generate(
        ids, mask, max_new_tokens=NEW, eos_token_id=eos
    )
    ref = hf_greedy(hf, ids, mask, eos_token_id=eos, pad_token_id=eos[0])
    assert torch.equal(out.tokens, ref) and torch.equal(stopped.tokens, ref)
    assert out.tokens.shape[1] == int(out.lengths.max()) <= 3
    assert stopped.stats.decode_steps == out.tokens.shape[1] - 1  # checked every step: no extra steps


def test_num_samples_greedy_identical_shared_and_replicated(llama):
    _, ex = llama
    ids, mask = prompts()
    prefix = latents(3)
    one = ex.generate(ids[:1], mask[:1], prefix[:1], max_new_tokens=NEW)
    many = ex.generate(ids[:1], mask[:1], prefix[:1], max_new_tokens=NEW, num_samples=4)
    assert many.stats.shared_prefix and many.stats.rows == 4
    assert many.stats.cache_len == NEW  # each sample's own rows hold only its new tokens
    assert torch.equal(many.tokens, one.tokens.expand(4, -1))
    # a B = 1 prompt with left padding: the pads drop out of the shared prefix
    padded = ex.generate(ids[2:], mask[2:], prefix[2:], max_new_tokens=NEW, num_samples=3)
    unpadded = ex.generate(ids[2:, 5:], None, prefix[2:], max_new_tokens=NEW)
    assert padded.stats.shared_prefix and torch.equal(padded.tokens, unpadded.tokens.expand(3, -1))
    # B > 1: the prompt's K/V replicated per sample, rows b * n + s
    batch = ex.generate(ids, mask, prefix, max_new_tokens=NEW)
    rep = ex.generate(ids, mask, prefix, max_new_tokens=NEW, num_samples=2)
    assert not rep.stats.shared_prefix
    assert torch.equal(rep.tokens, batch.tokens.repeat_interleave(2, 0))


def test_sampling_is_seeded_and_matches_the_naive_loop(llama):
    _, ex = llama
    ids, mask = prompts()
    kw = dict(max_new_tokens=NEW, temperature=0.9, top_k=20, top_p=0.95, num_samples=2)
    a = ex.generate(ids, mask, **kw, seed=3).tokens
    b = ex.generate(ids, mask, **kw, seed=3).tokens
    c = ex.generate(ids, mask, **kw, seed=4).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0::2], a[1::2])  # samples of one prompt differ
    # same draws in the same order: the no-cache loop with the same seed picks the same tokens
    naive = ar_generate(ex.model, ids, mask, **kw, generator=torch.Generator().manual_seed(3))
    assert torch.equal(naive.tokens, a)
    shared = ex.generate(ids[:1], mask[:1], **kw | dict(num_samples=5), seed=7)
    assert shared.stats.shared_prefix
    naive = ar_generate(
        ex.model, ids[:1], mask[:1], **kw | dict(num_samples=5), generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(naive.tokens, shared.tokens)
    assert len({tuple(r) for r in shared.tokens.tolist()}) > 1


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5), (8, 0.6)])
def test_sampled_tokens_stay_in_the_kept_set(llama, top_k, top_p):
    _, ex = llama
    ids, mask = prompts()
    temperature = 1.5
    out = ex.generate(
        ids,
        mask,
        max_new_tokens=NEW,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=3,
        seed=0,
    )
    # teacher-forced logits of every generated token, filtered by HF's own warpers
    seq = torch.cat([ids.repeat_interleave(3, 0), out.tokens], dim=1)
    full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones_like(out.tokens)], dim=1)
    with torch.no_grad():
        logits = ex.model(seq, full_mask).logits[:, ids.shape[1] - 1 : -1].float() / temperature
    flat = logits.reshape(-1, V)
    if top_k is not None:
        flat = TopKLogitsWarper(top_k)(None, flat)
    if top_p is not None:
        flat = TopPLogitsWarper(top_p)(None, flat)
    kept = torch.isfinite(flat).reshape(logits.shape)
    chosen = kept.gather(-1, out.tokens[..., None])[..., 0]
    assert chosen.all()
    assert (kept.sum(-1) < V).all()  # the filters did drop tokens


def test_plan_then_answer(llama):
    hf, ex = llama
    ids, mask = prompts(B=2, pads=(0, 3))
    free = ex.generate(ids, mask, max_new_tokens=6).tokens
    plan_eos = int(free[0, 2])
    res = ex.plan_then_answer(
        ids,
        mask,
        plan_max_new_tokens=6,
        max_new_tokens=5,
        answer_prefix_ids=[7, 8],
        plan_eos_token_id=plan_eos,
    )
    assert torch.equal(
        res.plan.tokens, ex.generate(ids, mask, max_new_tokens=6, eos_token_id=plan_eos).tokens
    )
    for b in range(2):
        n = int(res.plan.lengths[b])
        plan = res.plan.tokens[b, :n].tolist()
        if plan and plan[-1] == plan_eos:
            plan = plan[:-1]
        expected = ids[b][mask[b] != 0].tolist() + plan + [7, 8]
        assert res.answer_input_ids[b][res.answer_attention_mask[b]].tolist() == expected
    assert res.plan.lengths[0] == 3
    assert torch.equal(
        res.answer.tokens, hf_greedy(hf, res.answer_input_ids, res.answer_attention_mask, max_new_tokens=5)
    )


def test_fixed_cache_len_reuses_the_state_and_from_pretrained(llama, tmp_path):
    hf, ex = llama
    hf.save_pretrained(tmp_path)
    fixed = ARExecutor.from_pretrained(tmp_path, max_cache_len=32)
    ids, mask = prompts()
    for L in (9, 6):
        ref = ex.generate(ids[:, -L:], mask[:, -L:], max_new_tokens=NEW)
        out = fixed.generate(ids[:, -L:], mask[:, -L:], max_new_tokens=NEW)
        assert torch.equal(out.tokens, ref.tokens) and out.stats.cache_len == 32
    assert len(fixed._states) == 1
    with pytest.raises(ValueError, match="overflows the KV cache"):
        fixed.generate(ids, mask, max_new_tokens=24)


class _ReplayGraph:
    """Stands in for a captured CUDA graph on the CPU: replay() re-runs the captured function."""

    captures = 0

    def __init__(self, fn):
        self.fn = fn
        type(self).captures += 1

    def replay(self):
        self.fn()


def test_graph_branch_replays_the_same_step(llama, monkeypatch):
    """The graph path's control flow (warm-up step, capture once, replays, stop checks) on the
    CPU, with the capture replaced by a function that records the step it was given."""
    _, ex = llama
    ids, mask = prompts()
    free = ex.generate(ids, mask, max_new_tokens=NEW)
    eos = int(free.tokens[0, 4])
    plain = ex.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, temperature=0.7, seed=5)
    monkeypatch.setattr(cuda_graphs, "capture", lambda fn, pool, generator: _ReplayGraph(fn))
    monkeypatch.setattr(cuda_graphs, "warm_up", lambda fn: fn())
    monkeypatch.setattr(ARExecutor, "_graph_enabled", lambda self, s: True)
    graphed = ARExecutor(ex.model, stop_check_every=2)
    for kw in (dict(), dict(eos_token_id=eos, temperature=0.7, seed=5)):
        expected = free if not kw else plain
        for _ in range(2):  # the second call replays the first call's graph
            out = graphed.generate(ids, mask, max_new_tokens=NEW, **kw)
            assert out.stats.cuda_graph and torch.equal(out.tokens, expected.tokens)
    assert _ReplayGraph.captures == 2  # once per decode configuration


def test_bad_inputs(llama):
    _, ex = llama
    ids, mask = prompts()
    d = SHAPE["hidden_size"]
    cases = [
        (ValueError, "prefix_embeds must be", dict(prefix_embeds=torch.randn(3, 4, d + 1))),
        (ValueError, "prefix_embeds must be", dict(prefix_embeds=torch.randn(3, d))),
        (TypeError, "prefix_embeds has dtype", dict(prefix_embeds=torch.randn(3, 4, d, dtype=torch.float64))),
        (ValueError, "prefix_embeds has batch 2", dict(prefix_embeds=torch.randn(2, 4, d))),
        (ValueError, "input_ids must be a non-empty", dict(input_ids=ids[0])),
        (TypeError, "integer token ids", dict(input_ids=ids.float())),
        (ValueError, r"in \[0, vocab_size", dict(input_ids=ids + V)),
        (ValueError, "attention_mask must have", dict(attention_mask=mask[:, 1:])),
        (ValueError, "row 1 has no tokens", dict(attention_mask=mask * torch.tensor([[1], [0], [1]]))),
        (ValueError, "give input_ids, prefix_embeds", dict(input_ids=None, attention_mask=None)),
        (ValueError, "max_new_tokens must be >= 1", dict(max_new_tokens=0)),
        (TypeError, "max_new_tokens must be an int", dict(max_new_tokens=2.0)),
        (ValueError, "temperature must be >= 0", dict(temperature=-1.0)),
        (ValueError, "top_k must be >= 1", dict(top_k=0)),
        (ValueError, r"top_p must be in \(0, 1\]", dict(top_p=0.0)),
        (ValueError, "num_samples must be >= 1", dict(num_samples=0)),
        (ValueError, "eos_token_id", dict(eos_token_id=V)),
        (ValueError, "eos_token_id must be", dict(eos_token_id=[-1])),
        (ValueError, "pad_token_id", dict(pad_token_id=V)),
    ]
    for exc, match, kw in cases:
        args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2) | kw
        with pytest.raises(exc, match=match):
            ex.generate(**args)
    with pytest.raises(ValueError, match="attention_mask is given without input_ids"):
        ex.generate(None, mask, latents(3), max_new_tokens=2)
    with pytest.raises(TypeError, match="must be a hybridkernels Transformer"):
        ARExecutor(hf_model())
    with pytest.raises(ValueError, match="max_cache_len must be >= 2"):
        ARExecutor(ex.model, max_cache_len=1)
    with pytest.raises(ValueError, match=r"overflows the KV cache \(max_cache_len = 12\)"):
        ARExecutor(ex.model, max_cache_len=12).generate(ids, mask, max_new_tokens=4)


@pytest.mark.skipif(
    not (HAS_CUDA and _cuda.available() and _cuda.has_cuda()), reason="needs a GPU and _C with CUDA"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_matches_eager_and_hf(dtype):
    hf = hf_model().to("cuda", dtype)
    ids, mask = (t.cuda() for t in prompts())
    prefix = latents(3).to("cuda", dtype)
    graphed = ARExecutor.from_hf(hf)
    eager = ARExecutor(graphed.model, cuda_graph=False)
    for kw in (dict(), dict(temperature=0.8, top_k=10, top_p=0.9, seed=1, num_samples=2)):
        a = graphed.generate(ids, mask, prefix, max_new_tokens=NEW, **kw)
        b = eager.generate(ids, mask, prefix, max_new_tokens=NEW, **kw)
        again = graphed.generate(ids, mask, prefix, max_new_tokens=NEW, **kw)  # replays the captured graph
        assert a.stats.cuda_graph and not b.stats.cuda_graph
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, again.tokens)
    if dtype == torch.float32:
        assert torch.equal(
            graphed.generate(ids, mask, prefix, max_new_tokens=NEW).tokens, hf_greedy(hf, ids, mask, prefix)
        )
    shared = graphed.generate(ids[:1], mask[:1], prefix[:1], max_new_tokens=NEW, num_samples=4)
    assert shared.stats.shared_prefix and shared.stats.cuda_graph
    assert (shared.tokens == shared.tokens[:1]).all()


@pytest.mark.skipif(
    not (HAS_CUDA and torch.cuda.device_count() > 1 and _cuda.available() and _cuda.has_cuda()),
    reason="needs 2 GPUs and _C with CUDA",
)
def test_cuda_graph_on_a_device_that_is_not_current():
    """Streams and capture follow the current device: the executor must use its model's device."""
    hf = hf_model().to("cuda:1")
    ids, mask = (t.to("cuda:1") for t in prompts())
    with torch.cuda.device(0):
        graphed = ARExecutor.from_hf(hf)
        eager = ARExecutor(graphed.model, cuda_graph=False)
        for kw in (dict(), dict(temperature=0.8, top_k=10, seed=1)):
            a = graphed.generate(ids, mask, max_new_tokens=NEW, **kw)
            b = eager.generate(ids, mask, max_new_tokens=NEW, **kw)
            assert a.stats.cuda_graph and torch.equal(a.tokens, b.tokens)


def test_a_second_concurrent_generation_raises_instead_of_sharing_buffers(llama, monkeypatch):
    """The executor keeps static decode buffers: a second thread's generate while one runs raises
    RuntimeError (never a silent wrong answer); the first finishes with the right tokens."""
    import threading

    _, ex = llama
    ids, mask = prompts()
    want = ex.generate(ids, mask, max_new_tokens=NEW).tokens
    entered, release = threading.Event(), threading.Event()
    packed = ARExecutor._packed_prompt

    def slow_packed(self, *args):
        entered.set()
        release.wait(10)
        return packed(self, *args)

    monkeypatch.setattr(ARExecutor, "_packed_prompt", slow_packed)
    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault("first", ex.generate(ids, mask, max_new_tokens=NEW))
    )
    first.start()
    assert entered.wait(10)
    with pytest.raises(RuntimeError, match="ARExecutor is already generating"):
        ex.generate(ids, mask, max_new_tokens=NEW)
    release.set()
    first.join()
    assert torch.equal(results["first"].tokens, want)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_batch_invariance(llama, num_samples):
    """Greedy tokens of a row do not depend on its batch companions, on its left padding, or on
    being decoded as one of several samples over a shared prefix."""
    _, ex = llama
    ids, mask = prompts()
    batched = ex.generate(ids, mask, max_new_tokens=NEW, num_samples=num_samples).tokens
    for b in range(ids.shape[0]):
        row = ids[b : b + 1, mask[b].bool()]
        alone = ex.generate(row, max_new_tokens=NEW, num_samples=num_samples).tokens
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], dim=1)
        padded_mask = (torch.arange(padded.shape[1]) >= 4)[None]
        repadded = ex.generate(padded, padded_mask, max_new_tokens=NEW, num_samples=num_samples).tokens
        for s in range(num_samples):
            want = batched[b * num_samples + s]
            assert torch.equal(alone[s, : want.numel()], want[: alone.shape[1]]), (b, s)
            assert torch.equal(repadded[s, : want.numel()], want[: repadded.shape[1]]), (b, s)


@pytest.mark.parametrize("eos", [2.5, "2", {2}])
def test_eos_token_id_of_the_wrong_kind_is_a_clear_error(llama, eos):
    _, ex = llama
    ids, mask = prompts()
    with pytest.raises(ValueError, match="eos_token_id must be a non-negative int or a list of them"):
        ex.generate(ids, mask, max_new_tokens=2, eos_token_id=eos)
