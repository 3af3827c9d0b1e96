"""The float32 CPU forward (``models/cpu_forward.py``) and its ``_C`` pieces (RMSNorm with the
residual add, RoPE from position tables, SiLU * up) against torch and the generic step: random
inputs, odd widths, strided rows, GQA, biases, tied embeddings, shared prefixes, bad input."""

import pytest
import torch
import torch.nn.functional as F

from hybridkernels import _cuda
from hybridkernels.models import ARExecutor, Transformer, cpu_forward
from hybridkernels.models.config import TransformerConfig
from hybridkernels.models.transformer import RMSNorm, apply_rotary, rope_cos_sin, signed_sin
from hybridkernels.reference.ar_loop import ar_generate

pytestmark = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")


def _norm(dim, weight, eps):
    n = RMSNorm(dim, eps)
    n.weight.data = weight
    return n


@pytest.mark.parametrize("rows,dim", [(1, 256), (3, 7), (5, 33), (2, 1000)])
def test_rms_norm_adds_the_residual_exactly_and_normalises_like_torch(rows, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(rows, dim + 5, generator=g)[:, 2 : 2 + dim]  # strided rows
    residual, weight = torch.randn(rows, dim, generator=g), torch.randn(dim, generator=g)
    want_stream = x + residual
    want = _norm(dim, weight, 1e-5)(want_stream)
    got = _cuda.rms_norm(x, weight, 1e-5, residual=residual)
    assert torch.equal(x, want_stream)  # the stream, updated in place, bitwise torch's add
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # out aliasing x, no residual
    y = torch.randn(rows, dim, generator=g)
    want = _norm(dim, weight, 1e-6)(y)
    assert _cuda.rms_norm(y, weight, 1e-6, out=y) is y
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("D,heads", [(64, 6), (128, 3), (2, 1), (10, 4)])
def test_rotary_is_bitwise_apply_rotary_at_each_rows_position(D, heads):
    g = torch.Generator().manual_seed(D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    P = 300
    cos, sin = rope_cos_sin(inv_freq, torch.arange(P)[None], torch.float32)
    cos, sin = cos[0, :, 0].contiguous(), signed_sin(sin)[0, :, 0].contiguous()
    positions = torch.tensor([0, 299, 17, 17, 128])
    x = torch.randn(5, heads + 2, D, generator=g)[:, 1 : 1 + heads]  # heads of a wider row
    c, s = rope_cos_sin(inv_freq, positions[:, None], torch.float32)
    want = apply_rotary(x[:, None], c, signed_sin(s))[:, 0]
    assert torch.equal(_cuda.rotary_(x, positions, cos, sin), want)


def test_grouped_rms_norm_normalises_each_head_of_a_row_in_place():
    """Qwen3's q/k norms: the heads of a fused q/k/v row, each over its head dim."""
    g = torch.Generator().manual_seed(3)
    rows, heads, D, stride = 5, 3, 64, 7 * 64
    qkv, weight = torch.randn(rows, stride, generator=g), torch.randn(D, generator=g)
    want = qkv.clone()
    part = want[:, D : D + heads * D].view(rows, heads, D)
    part.copy_(_norm(D, weight, 1e-6)(part))
    ptr = qkv.data_ptr() + 4 * D
    _cuda._C.rms_norm(ptr, stride, 0, 0, weight.data_ptr(), ptr, stride, rows, D, 1e-6, heads, D, D)
    torch.testing.assert_close(qkv, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, :D], want[:, :D]) and torch.equal(qkv[:, 4 * D :], want[:, 4 * D :])
    with pytest.raises(ValueError, match="a residual needs groups == 1"):
        _cuda._C.rms_norm(ptr, stride, ptr, stride, weight.data_ptr(), ptr, stride, rows, D, 1e-6, 2, D, D)
    with pytest.raises(ValueError, match="row stride"):
        _cuda._C.rms_norm(ptr, 64, 0, 0, weight.data_ptr(), ptr, 64, rows, D, 1e-6, 2, D, D)


def test_silu_mul_matches_torch_on_the_halves_of_a_fused_product():
    gu = 4 * torch.randn(6, 2 * 129, generator=torch.Generator().manual_seed(0))
    want = F.silu(gu[:, :129]) * gu[:, 129:]
    torch.testing.assert_close(_cuda.silu_mul(gu[:, :129], gu[:, 129:]), want, rtol=2e-6, atol=1e-6)


def test_bad_arguments_are_errors_not_crashes():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(TypeError, match="float32 CPU"):
        _cuda.rms_norm(x.double(), w.double(), 1e-5)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        _cuda.rms_norm(x, torch.randn(9), 1e-5)
    with pytest.raises(ValueError, match="residual has 3 rows"):
        _cuda.rms_norm(x, w, 1e-5, residual=torch.randn(3, 8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        _cuda.rms_norm(x, w, -1.0)
    cos = sin = torch.randn(4, 8)
    with pytest.raises(IndexError, match="position 4 of row 1 is outside the tables' 4 rows"):
        _cuda.rotary_(torch.randn(2, 1, 8), torch.tensor([0, 4]), cos, sin)
    with pytest.raises(IndexError, match="position -1"):
        _cuda.rotary_(torch.randn(2, 1, 8), torch.tensor([-1, 0]), cos, sin)
    with pytest.raises(ValueError, match="positions must be contiguous int64"):
        _cuda.rotary_(torch.randn(2, 1, 8), torch.tensor([0, 1], dtype=torch.int32), cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        _cuda._C.rotary(1, 1, 1, 7, 7, 7, 1, 1, 1, 1, 7)
    with pytest.raises(ValueError, match="null data pointer"):
        _cuda._C.silu_mul(0, 1, 8, 1, 8, 1, 8)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        _cuda._C.rms_norm(1, 8, 0, 0, 1, 1, 8, 0, 8, 1e-5)


# ---------------------------------------------------------------------------- the decode step
def _model(seed=0, **overrides):
    cfg = dict(
        vocab_size=131, hidden_size=64, intermediate_size=80, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=64, causal=True, family="llama",
    ) | overrides  # fmt: skip
    model = Transformer(TransformerConfig(**cfg))
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _prompts(B=3, L=9, pads=(0, 3, 5), V=131, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0
    return ids, mask


def _run(model, monkeypatch, fast, **kw):
    """generate() with the fast step on or off; returns (tokens, hidden states given to _emit per
    decode step, whether the fast step ran)."""
    if not fast:
        monkeypatch.setattr(cpu_forward, "unsupported_reason", lambda model: "forced off")
    ex = ARExecutor(model)
    hiddens, used = [], []
    emit = ARExecutor._emit

    def record(self, s, hidden, repeats=1):
        hiddens.append(hidden.clone())
        used.append(s.fast_forward is not None)
        emit(self, s, hidden, repeats)

    monkeypatch.setattr(ARExecutor, "_emit", record)
    out = ex.generate(**kw)
    monkeypatch.undo()
    return out.tokens, hiddens[1:], any(used[1:])


CASES = {
    "llama-gqa": dict(),
    "qwen2-biases-tied": dict(qkv_bias=True, family="qwen2", tie_word_embeddings=True),
    "all-biases-mha": dict(qkv_bias=True, o_bias=True, mlp_bias=True, num_kv_heads=4),
    "qwen3-qk-norms": dict(qk_norm=True, family="qwen3"),
    "llama3-rope-head128": dict(
        head_dim=128,
        num_heads=2,
        num_kv_heads=1,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            original_max_position_embeddings=16,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_forward_equals_the_generic_step_and_the_no_cache_loop(case, batch, monkeypatch):
    model = _model(**CASES[case])
    ids, mask = _prompts(B=batch)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7)
    fast, fast_h, used = _run(model, monkeypatch, True, **kw)
    slow, slow_h, slow_used = _run(model, monkeypatch, False, **kw)
    assert used and not slow_used
    assert torch.equal(fast, slow)
    for a, b in zip(fast_h, slow_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, ar_generate(model, ids, mask, max_new_tokens=7).tokens)


def test_fast_forward_with_a_shared_prefix_and_latent_prefix(monkeypatch):
    model = _model(seed=3)
    ids, mask = _prompts(B=1, pads=(2,))
    prefix = 0.5 * torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(4))
    for kw in (
        dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_samples=3),
        dict(input_ids=ids, attention_mask=mask, prefix_embeds=prefix, max_new_tokens=6),
        dict(input_ids=ids, max_new_tokens=6, num_samples=2, temperature=0.8, top_k=20, seed=5),
    ):
        fast, _, used = _run(model, monkeypatch, True, **kw)
        slow, _, _ = _run(model, monkeypatch, False, **kw)
        assert used and torch.equal(fast, slow)


def test_positions_up_to_the_last_table_row(monkeypatch):
    """A fixed cache filled to its last slot: the step reads the RoPE tables' last row."""
    model = _model(seed=5)
    ids, mask = _prompts(B=2, L=6, pads=(0, 1))
    ex = ARExecutor(model, max_cache_len=12)
    out = ex.generate(ids, mask, max_new_tokens=6)
    state = next(iter(ex._states.values()))
    assert state.fast_forward is not None and state.fast_forward.table_rows == 12
    assert torch.equal(out.tokens, ar_generate(model, ids, mask, max_new_tokens=6).tokens)


@torch.no_grad()
def test_unsupported_models_and_settings_run_the_generic_step():
    model = _model()
    assert cpu_forward.unsupported_reason(model) is None
    assert "float32 CPU" in cpu_forward.unsupported_reason(_model().to(torch.float64))
    handle = model.layers[1].mlp.register_forward_hook(lambda m, i, o: None)
    assert "forward hook" in cpu_forward.unsupported_reason(model)
    handle.remove()
    with torch.enable_grad():
        assert "gradients" in cpu_forward.unsupported_reason(model)
    assert cpu_forward.unsupported_reason(model) is None
    mlp = model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.clone())
    assert "not fused" in cpu_forward.unsupported_reason(model)


def test_a_hooked_model_is_decoded_by_the_generic_step(monkeypatch):
    """A user's forward hook must see every step: the fast step would skip it."""
    model = _model(seed=2)
    calls = []
    model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    ids, mask = _prompts(B=2)
    tokens, _, used = _run(model, monkeypatch, True, input_ids=ids, attention_mask=mask, max_new_tokens=5)
    assert not used and calls == [9, 1, 1, 1, 1]
    assert torch.equal(tokens, ar_generate(model, ids, mask, max_new_tokens=5).tokens)


def test_the_step_is_rebuilt_when_the_weights_are_new_tensors(monkeypatch):
    model = _model(seed=6)
    ex = ARExecutor(model)
    ids, mask = _prompts(B=2)
    ex.generate(ids, mask, max_new_tokens=4)
    with torch.no_grad():  # new tensors for every weight, refused, then fused again
        model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()}, assign=True)
        model.fuse_projections()
    out = ex.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(out.tokens, ar_generate(model, ids, mask, max_new_tokens=4).tokens)
    assert next(iter(ex._states.values())).cpu_forward.reads(model)


# ---------------------------------------------------------------------------- the planner
def _planner_model(seed=0, **overrides):
    cfg = dict(
        vocab_size=131, hidden_size=64, intermediate_size=80, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, causal=False, family="llada", mask_token_id=130,
        eos_token_ids=(1,), eot_token_id=2,
    ) | overrides  # fmt: skip
    model = Transformer(TransformerConfig(**cfg))
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(cache="dual"),
        dict(cache="prefix"),
        dict(cache="dual", threshold=0.2, cfg_scale=0.5),
        dict(cache="dual", remasking="random", temperature=0.7),
    ],
    ids=["dual", "prefix", "dual-threshold-cfg", "dual-random-sampled"],
)
def test_planner_cached_steps_on_cpu_forward_equal_the_generic_forward(kw, monkeypatch):
    from hybridkernels.models import DiffusionPlanner
    from hybridkernels.models import planner as planner_module

    model = _planner_model(qkv_bias=True)
    ids, mask = _prompts(B=3, L=7, pads=(0, 2, 4), V=129)
    calls = []
    real = cpu_forward.CPUForward.__call__
    monkeypatch.setattr(
        cpu_forward.CPUForward, "__call__", lambda self, *a: calls.append(1) or real(self, *a)
    )
    args = dict(gen_length=16, block_length=8, steps=16) | kw
    seeded = {"generator": torch.Generator().manual_seed(3)} if "temperature" in kw else {}
    fast = DiffusionPlanner(model).generate(ids, mask, **args, **seeded)
    assert calls  # the cached steps and refreshes ran on CPUForward
    monkeypatch.setattr(planner_module.cpu_forward, "unsupported_reason", lambda model: "forced off")
    calls.clear()
    seeded = {"generator": torch.Generator().manual_seed(3)} if "temperature" in kw else {}
    slow = DiffusionPlanner(model).generate(ids, mask, **args, **seeded)
    assert not calls
    assert torch.equal(fast.tokens, slow.tokens)
