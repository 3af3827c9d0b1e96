"""Drop-in use from transformers: ``attn_implementation="hybridkernels"`` and the Liger-style patch
give the logits of ``sdpa`` on tiny random HF Llama / Qwen2 / Qwen3 models (GQA, left padding,
odd lengths, batch > 1, cached decoding, gradients); unsupported features raise; the latent-prefix
decoding helper equals HF ``generate`` on ``inputs_embeds``."""

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

from hybridkernels.integrations import hf as hk_hf

V = 101
SHAPE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
)
HF = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TOL = dict(atol=1e-4, rtol=1e-4)


def hf_model(family, attn="sdpa", seed=0, **overrides):
    config_cls, model_cls = HF[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(SHAPE | overrides), attn_implementation=attn)).eval()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def inputs(B=3, L=13, seed=1, pads=(0, 4, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0  # left padding
    return ids, mask


def twin(model, attn):
    """A copy of ``model`` with the same weights and another attention implementation."""
    config = model.config.__class__(**(model.config.to_dict() | {"attn_implementation": attn}))
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_equal_sdpa(family):
    hk_hf.register()
    ref = hf_model(family)
    ours = twin(ref, "hybridkernels")
    assert ours.config._attn_implementation == "hybridkernels"
    ids, mask = inputs()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        got_unpadded = ours(ids[:1]).logits  # no mask at all: plain causal
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], **TOL)
    torch.testing.assert_close(got_unpadded, want[:1], **TOL)


def test_calls_our_op(monkeypatch):
    """The registered function really dispatches to ops.attention."""
    calls = []
    real = hk_hf.ops.attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), kw["causal"], kw["key_padding_mask"] is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hk_hf.ops, "attention", spy)
    model = twin(hf_model("llama"), "hybridkernels")
    ids, mask = inputs(B=2, L=5)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == [((2, 5, 4, 32), True, True)] * 2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_cache_equals_sdpa(family):
    """Prefill + cached decode steps (queries aligned to the end of the keys, padding kept)."""
    hk_hf.register()
    ref = hf_model(family, seed=3)
    ours = twin(ref, "hybridkernels")
    ids, mask = inputs(B=2, L=6, pads=(0, 3))
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
        got = ours.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_module_patch(family, monkeypatch):
    """apply_hybridkernels_to_*() with no model: sdpa and eager models of that type run our
    function (4-D masks decomposed into causal + padding, not the SDPA fallback) and still give
    sdpa's logits."""

    def no_fallback(*args):
        raise AssertionError("a causal + padding mask took the 4-D SDPA fallback")

    monkeypatch.setattr(hk_hf, "_sdpa_4d", no_fallback)
    ref = hf_model(family, seed=5)
    eager = twin(ref, "eager")
    ids, mask = inputs(B=3, L=9, pads=(2, 0, 5))
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    calls = []
    real = hk_hf.attention_forward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    apply = getattr(hk_hf, f"apply_hybridkernels_to_{family}")
    try:
        apply()
        module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
        module.ALL_ATTENTION_FUNCTIONS["sdpa"] = spy
        module.ALL_ATTENTION_FUNCTIONS["eager"] = spy
        with torch.no_grad():
            got_sdpa = ref(ids, attention_mask=mask).logits
            got_eager = eager(ids, attention_mask=mask).logits
    finally:
        hk_hf.revert_hybridkernels(family)
    assert len(calls) == 4  # 2 layers x 2 models
    valid = mask.bool()
    torch.testing.assert_close(got_sdpa[valid], want[valid], **TOL)
    torch.testing.assert_close(got_eager[valid], want[valid], **TOL)
    # reverted: the module's lookup is transformers' own again
    module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
    assert module.ALL_ATTENTION_FUNCTIONS["sdpa"] is not spy


def test_apply_to_instance_and_bad_type():
    model = hf_model("qwen2")
    hk_hf.apply_hybridkernels_to_qwen2(model=model)
    assert model.config._attn_implementation == "hybridkernels"
    with pytest.raises(ValueError, match="not 'llama'"):
        hk_hf.apply_hybridkernels_to_llama(model=model)
    with pytest.raises(ValueError, match="model_type must be one of"):
        hk_hf.apply_hybridkernels("gpt2")


def test_non_causal_4d_mask_falls_back_to_sdpa():
    """A 4-D mask that is not causal + padding runs torch SDPA with that mask (not ignored)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 32, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask[..., 0] = True
    module = torch.nn.Module()
    out, _ = hk_hf.attention_forward(module, q, k, v, mask, scaling=0.2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    torch.testing.assert_close(out, want.transpose(1, 2), **TOL)


def test_gradients_equal_sdpa():
    """Training through the registered attention: the op falls back to SDPA under autograd."""
    hk_hf.register()
    ref = hf_model("llama", seed=2)
    ours = twin(ref, "hybridkernels")
    ids, mask = inputs(B=2, L=7, pads=(0, 2))
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_unsupported_features_raise():
    q = torch.randn(1, 2, 3, 32)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="sliding_window"):
        hk_hf.attention_forward(module, q, q, q, None, sliding_window=2)
    with pytest.raises(ValueError, match="dropout"):
        hk_hf.attention_forward(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="attention_mask must be"):
        hk_hf.attention_forward(module, q, q, q, torch.ones(1, 9, dtype=torch.bool))


def test_odd_head_dim_runs_sdpa_with_a_warning():
    hk_hf.register()
    ref = hf_model("llama", head_dim=16, seed=4)
    ours = twin(ref, "hybridkernels")
    ids, mask = inputs(B=2, L=5, pads=(1, 0))
    with torch.no_grad(), pytest.warns(UserWarning, match="head_dim 16"):
        hk_hf._warned.clear()
        got = ours(ids, attention_mask=mask).logits
    want = ref(ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)


def test_generate_with_prefix_equals_hf_generate():
    """The executor's latent-prefix decoding on an HF model, no hybridkernels model class in sight."""
    model = hf_model("llama", attn="eager", seed=6, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    g = torch.Generator().manual_seed(7)
    prefix = torch.randn(2, 3, 64, generator=g) * 0.5
    ids, mask = inputs(B=2, L=5, pads=(0, 2))
    out = hk_hf.generate_with_prefix(model, ids, mask, prefix, max_new_tokens=6)
    embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        want = model.generate(
            inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out.tokens, want)
    assert hk_hf.executor_for(model) is hk_hf.executor_for(model)  # built once
