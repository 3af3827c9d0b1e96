"""The shared transformer against HF transformers (Llama, Qwen2, Qwen3), its loaders and its
cache hook. Tiny random fp32 models on the CPU, reference attention backend."""

import json

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

from hybridkernels import ops
from hybridkernels.models import Transformer, TransformerConfig, save_pretrained
from hybridkernels.models.loading import map_state_dict

V = 97
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
# LLaDA needs heads * head_dim == hidden.
LLADA_SHAPE = SHAPE | dict(num_attention_heads=2, num_key_value_heads=1)
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
HF = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def randomize_(model: torch.nn.Module, std: float = 0.3, seed: int = 0):
    """Every weight and bias N(0, std), norm weights 1 + N(0, 0.1): nothing left at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    return model


def hf_model(family="llama", rope=None, seed=0, **overrides):
    config_cls, model_cls = HF[family]
    kw = SHAPE | overrides
    if rope is not None:
        kw["rope_scaling" if family == "llama" else "rope_parameters"] = dict(rope)
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(model_cls(config), seed=seed).eval()


def left_padded(B=3, L=9, pads=(0, 3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def full_4d_mask(mask):
    """HF's custom 4D additive mask: every query sees every valid key (no causality)."""
    B, L = mask.shape
    visible = mask.bool()[:, None, None, :].expand(B, 1, L, L)
    return torch.zeros(B, 1, L, L).masked_fill(~visible, torch.finfo(torch.float32).min)


BACKENDS = ["reference", "triton"]


def skip_missing(backend):
    if backend not in ops.OP_BACKENDS["bidirectional_attention"].implementations:
        pytest.skip(f"bidirectional_attention has no {backend} backend yet")


@pytest.mark.parametrize("rope", ["default", "linear", "llama3"])
@pytest.mark.parametrize("tied", [False, True])
def test_bidirectional_matches_hf_llama_with_full_mask(rope, tied):
    hf = hf_model(rope=ROPE[rope], tie_word_embeddings=tied)
    ours = Transformer.from_hf(hf, causal=False, attention_backend="reference")
    assert hf.config.rope_parameters["rope_type"] == rope
    assert (ours.config.rope_scaling or {"rope_type": "default"})["rope_type"] == rope
    assert (ours.lm_head is None) == tied
    ids, mask, pos = left_padded()
    with torch.no_grad():
        ref = hf.model(ids, attention_mask=full_4d_mask(mask), position_ids=pos).last_hidden_state
        out = ours(ids, mask, position_ids=pos)
    torch.testing.assert_close(out.hidden, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, hf.lm_head(ref), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_backends_agree(backend):
    skip_missing(backend)
    hf = hf_model()
    ours = Transformer.from_hf(hf, causal=False)
    ids, mask, pos = left_padded(B=2, L=7, pads=(0, 2))
    with torch.no_grad():
        ref = hf.model(ids, attention_mask=full_4d_mask(mask), position_ids=pos).last_hidden_state
        out = ours(ids, mask, attention_backend=backend).hidden
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_causal_matches_hf_logits_with_left_padding(family):
    rope = ROPE["llama3"] if family == "llama" else None
    hf = hf_model(family, rope=rope, attention_bias=family == "llama")
    ours = Transformer.from_hf(hf, attention_backend="reference")
    assert ours.causal
    names = dict(ours.named_parameters())
    assert ("layers.0.self_attn.q_proj.bias" in names) == (family in ("llama", "qwen2"))
    assert ("layers.0.self_attn.q_norm.weight" in names) == (family == "qwen3")
    ids, mask, pos = left_padded()
    valid = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask, position_ids=pos).logits
        default_pos = ours(ids, mask).logits  # positions from the mask by default
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(default_pos[valid], out[valid], atol=0, rtol=0)


def test_padded_row_equals_unpadded_prompt():
    ours = Transformer.from_hf(hf_model(), causal=False, backend="reference")
    ids, mask, _ = left_padded(B=2, L=8, pads=(0, 3))
    with torch.no_grad():
        batch = ours(ids, mask).logits
        alone = ours(ids[1:, 3:]).logits
    torch.testing.assert_close(batch[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_and_separate_head():
    ours = Transformer.from_hf(hf_model(), backend="reference")
    ids, mask, _ = left_padded()
    with torch.no_grad():
        a = ours(ids, mask)
        b = ours(inputs_embeds=ours.embed(ids), attention_mask=mask, compute_logits=False)
    assert b.logits is None
    torch.testing.assert_close(b.hidden, a.hidden, atol=0, rtol=0)
    torch.testing.assert_close(ours.logits(b.hidden), a.logits, atol=0, rtol=0)
    assert ours.lm_head_weight.shape == (V, 64)


class BlockCache:
    """Planner-style hook: full-sequence K/V buffers; a call overwrites its block's slots and
    attends over the whole buffer (no concatenation)."""

    def __init__(self, kv, start, key_padding_mask):
        self.k = [k.clone() for k, _ in kv]
        self.v = [v.clone() for _, v in kv]
        self.start, self.mask = start, key_padding_mask

    def attend(self, layer, q, k, v):
        T = q.shape[1]
        self.k[layer][:, self.start : self.start + T] = k
        self.v[layer][:, self.start : self.start + T] = v
        return ops.bidirectional_attention(
            q, self.k[layer], self.v[layer], key_padding_mask=self.mask, backend="reference"
        )


class StaticCache:
    """Executor-style hook: ``kv_append`` into static caches, ``decode_attention`` for one token."""

    def __init__(self, kv, lens, Lmax):
        B, _, H, D = kv[0][0].shape
        self.k = [torch.zeros(B, Lmax, H, D) for _ in kv]
        self.v = [torch.zeros(B, Lmax, H, D) for _ in kv]
        for i, (k, v) in enumerate(kv):
            ops.kv_append(self.k[i], self.v[i], k, v, torch.zeros(B, dtype=torch.long))
        self.lens = lens.clone()

    def attend(self, layer, q, k, v):
        ops.kv_append(self.k[layer], self.v[layer], k, v, self.lens)
        lens = (self.lens + 1).int()
        return ops.decode_attention(q[:, 0], self.k[layer], self.v[layer], lens, backend="reference")[:, None]


def test_kv_cache_hook_block_overwrite_matches_full_forward():
    ours = Transformer.from_hf(hf_model(), causal=False, backend="reference")
    ids, mask, pos = left_padded(B=2, L=10, pads=(0, 2))
    mask = mask.bool()
    with torch.no_grad():
        full = ours(ids, mask, return_kv=True)
        assert len(full.kv) == 2 and full.kv[0][0].shape == (2, 10, 2, 32)
        # Refreshed cache (exact, as a cache refreshed every step must be), with garbage in the
        # block's slots: the call must overwrite them before attending.
        cache = BlockCache(full.kv, 6, mask)
        for buf in cache.k + cache.v:
            buf[:, 6:] = 1e3
        block = ours(ids[:, 6:], position_ids=pos[:, 6:], kv_cache=cache)
        for layer in range(2):
            torch.testing.assert_close(cache.k[layer], full.kv[layer][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(block.hidden, full.hidden[:, 6:], atol=2e-5, rtol=1e-5)


def test_kv_cache_hook_static_decode_matches_full_causal_forward():
    ours = Transformer.from_hf(hf_model("qwen3"), backend="reference")
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        prefill = ours(ids[:, :6], return_kv=True)
        cache = StaticCache(prefill.kv, torch.full((2,), 6), Lmax=12)
        steps = []
        for t in (6, 7):
            out = ours(ids[:, t : t + 1], position_ids=torch.full((2, 1), t), kv_cache=cache)
            cache.lens += 1
            steps.append(out.logits[:, 0])
    torch.testing.assert_close(prefill.logits, full.logits[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full.logits[:, 6:], atol=1e-4, rtol=1e-5)


def test_loaded_llada_safetensors_single_and_sharded_match_llama_names(tmp_path):
    hf = hf_model(**LLADA_SHAPE)
    ref = Transformer.from_hf(hf, causal=False, attention_backend="reference")
    ids, mask, pos = left_padded()
    with torch.no_grad():
        want = ref(ids, mask).logits
        hf_full = hf(ids, attention_mask=full_4d_mask(mask), position_ids=pos).logits
    torch.testing.assert_close(want, hf_full, atol=1e-4, rtol=1e-5)

    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # HF's own sharded files
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    save_pretrained(ref, tmp_path / "llada", names="llada")
    save_pretrained(ref, tmp_path / "llada_sharded", names="llada", max_shard_bytes=30_000)
    assert (tmp_path / "llada_sharded" / "model.safetensors.index.json").exists()
    config = json.loads((tmp_path / "llada" / "config.json").read_text())
    assert config["d_model"] == 64 and config["n_kv_heads"] == 1 and config["mask_token_id"] == 126336

    from safetensors import safe_open

    with safe_open(str(tmp_path / "llada" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {
        "model.transformer.wte.weight",
        "model.transformer.ff_out.weight",
        "model.transformer.blocks.1.ff_proj.weight",
        "model.transformer.blocks.1.attn_out.weight",
        "model.transformer.ln_f.weight",
    } <= keys

    for name, causal in (("hf", False), ("llada", None), ("llada_sharded", None)):
        model = Transformer.from_pretrained(tmp_path / name, causal=causal, backend="reference")
        assert not model.causal
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask).logits, want, atol=0, rtol=0)
    llada = Transformer.from_pretrained(tmp_path / "llada")
    assert llada.config.family == "llada" and llada.config.mask_token_id == 126336


def test_load_dtype_and_device(tmp_path):
    ref = Transformer.from_hf(hf_model(**LLADA_SHAPE), causal=False, backend="reference")
    save_pretrained(ref, tmp_path, names="llada")
    model = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask, _ = left_padded()
    with torch.no_grad():
        out = model(ids, mask, backend="reference").logits.float()
        want = ref(ids, mask).logits
    assert (out - want).norm() < 0.05 * want.norm()  # bf16 weights and activations


def test_bad_checkpoint_names_and_shapes_are_listed(tmp_path):
    ref = Transformer.from_hf(hf_model(**LLADA_SHAPE), causal=False)
    save_pretrained(ref, tmp_path, names="llada")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.transformer.blocks.0.mystery.weight"] = torch.zeros(3)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(64, 63)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        Transformer.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "unknown names (1): model.transformer.blocks.0.mystery.weight" in msg
    assert "missing names (1): model.transformer.blocks.1.up_proj.weight" in msg
    assert "wrong shapes (1): model.transformer.blocks.0.q_proj.weight: (64, 63), expected (64, 64)" in msg


def test_hf_state_dict_errors_and_tied_head():
    hf = hf_model()
    config = TransformerConfig.from_dict(hf.config.to_dict())
    state = dict(hf.state_dict())
    state.pop("lm_head.weight")
    with pytest.raises(ValueError, match=r"missing names \(1\): lm_head.weight"):
        map_state_dict(state, config)
    tied = config.replace(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        map_state_dict(dict(hf.state_dict()), tied)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert "lm_head.weight" not in map_state_dict(state, tied)


def test_config_parsing():
    llada = TransformerConfig.from_dict(
        {
            "model_type": "llada",
            "d_model": 4096,
            "n_heads": 32,
            "n_kv_heads": 32,
            "n_layers": 32,
            "mlp_hidden_size": 12288,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "vocab_size": 126464,
            "embedding_size": 126464,
            "weight_tying": False,
            "block_type": "llama",
            "include_bias": False,
            "include_qkv_bias": False,
            "layer_norm_type": "rms",
            "activation_type": "silu",
        }
    )
    assert (llada.head_dim, llada.intermediate_size, llada.causal) == (128, 12288, False)
    assert (llada.mask_token_id, llada.eos_token_ids, llada.eot_token_id) == (126336, (126081,), 126348)
    # transformers 4.x style keys.
    v4 = TransformerConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 64,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 5e5,
            "rope_scaling": {"type": "linear", "factor": 4.0},
            "eos_token_id": [1, 2],
        }
    )
    assert v4.rope_scaling == {"rope_type": "linear", "factor": 4.0} and v4.rope_theta == 5e5
    assert v4.num_kv_heads == 2 and v4.head_dim == 32 and v4.eos_token_ids == (1, 2)
    for bad, match in (
        ({"model_type": "gpt2"}, "unsupported model_type"),
        ({"d_model": 64, "n_heads": 2, "n_layers": 1, "vocab_size": 10, "alibi": True}, "alibi"),
        (
            {"d_model": 64, "n_heads": 2, "n_layers": 1, "vocab_size": 10, "include_bias": True},
            "include_bias",
        ),
        (SHAPE | {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        (SHAPE | {"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
        (SHAPE | {"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
        (SHAPE | {"model_type": "llama", "num_key_value_heads": 3}, "multiple"),
    ):
        with pytest.raises(ValueError, match=match):
            TransformerConfig.from_dict(bad)


def test_forward_input_errors():
    ours = Transformer.from_hf(hf_model(), backend="reference")
    ids, mask, pos = left_padded()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(ids, inputs_embeds=ours.embed(ids))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="position_ids must be"):
        ours(ids, position_ids=pos[:, 1:])
    with pytest.raises(ValueError, match="with kv_cache, give position_ids"):
        ours(ids, kv_cache=BlockCache([], 0, None))
    with pytest.raises(TypeError, match="kv_cache must have an attend"):
        ours(ids, position_ids=pos, kv_cache=object())
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        ours(ids.float())


def test_random_tiny_model_gives_varied_tokens():
    config = TransformerConfig.from_dict(
        {"d_model": 64, "n_heads": 2, "n_layers": 2, "mlp_hidden_size": 96, "vocab_size": 128}
    )
    model = Transformer(config, attention_backend="reference").reset_parameters(
        std=0.3, generator=torch.Generator().manual_seed(0)
    )
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model(ids).logits.argmax(-1)
    assert tokens.unique().numel() >= 16


def _hf_llama_dict(**changes):
    d = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
    }  # fmt: skip
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_hidden_layers": 10**6}, "num_layers"),
        ({"num_hidden_layers": 10**9}, "num_layers"),
        ({"head_dim": 2 * 10**11}, "head_dim"),
        ({"vocab_size": 10**12}, "vocab_size"),
        ({"intermediate_size": 10**12}, "intermediate_size"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps"),
        ({"max_position_embeddings": -5}, "max_position_embeddings"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"max_position_embeddings": 10**15}, "max_position_embeddings"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 0.0,
                    "high_freq_factor": 4.0,
                }
            },
            "low_freq_factor",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": float("inf"),
                }
            },
            "high_freq_factor",
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": float("nan")}},
            "factor",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 0,
                }
            },
            "original_max_position_embeddings",
        ),
    ],
)
def test_config_rejects_hostile_or_meaningless_values(changes, words):
    # issue 16: hostile sizes hung or exhausted memory; eps -1 / NaN made every logit NaN.
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        TransformerConfig.from_dict(_hf_llama_dict(**changes))
    assert time.perf_counter() - t0 < 1.0


def test_llada_config_rejects_a_hostile_layer_count():
    d = {
        "model_type": "llada",
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 10**9,
        "mlp_hidden_size": 48,
        "vocab_size": 64,
    }
    with pytest.raises(ValueError, match="num_layers"):
        TransformerConfig.from_dict(d)


def _views_of_one_tensor(model):
    """Per layer: q/k/v_proj (and gate/up_proj) weights share one storage, rows in order."""
    ok = []
    for block in model.layers:
        a, m = block.self_attn, block.mlp
        for group in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
            base = group[0].weight
            row_bytes = base.shape[1] * base.element_size()
            offsets = [lin.weight.data_ptr() - base.data_ptr() for lin in group]
            rows = [0] + [sum(lin.weight.shape[0] for lin in group[:i]) for i in range(1, len(group))]
            ok.append(
                all(
                    lin.weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                    for lin in group
                )
                and offsets == [r * row_bytes for r in rows]
            )
    return all(ok)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_projections_give_the_unfused_values_and_keep_names(family):
    """fuse_projections (q/k/v and gate/up as views of one tensor per layer, one matmul each):
    the same state_dict (names, values) and bitwise the same logits and K/V as the three / two
    separate products, with biases (Qwen2), q/k norms (Qwen3), left padding, batch 3."""
    hf = hf_model(family, attention_bias=family == "llama")
    plain = Transformer.from_hf(hf, attention_backend="reference")
    assert not _views_of_one_tensor(plain)  # from_hf shares the HF tensors, unfused
    fused = Transformer.from_hf(hf, attention_backend="reference", dtype=torch.float32)
    fused.load_state_dict({n: t.clone() for n, t in plain.state_dict().items()}, assign=True)
    fused.fuse_projections()
    assert _views_of_one_tensor(fused)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for (n, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    ids, mask, pos = left_padded()
    with torch.no_grad():
        want = plain(ids, mask, position_ids=pos, return_kv=True)
        got = fused(ids, mask, position_ids=pos, return_kv=True)
    assert torch.equal(got.logits, want.logits)
    for (k1, v1), (k2, v2) in zip(want.kv, got.kv, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_fused_projections_follow_loads_moves_and_training():
    """A model built from a config is fused; load_state_dict (copy) writes through the views;
    .to() fuses the moved tensors again; load_state_dict(assign=True) of other tensors, or a
    forward recording gradients, runs the separate products (and gradients reach every
    projection parameter)."""
    config = TransformerConfig.from_dict(SHAPE | {"model_type": "llama"})
    model = Transformer(config).eval()
    assert _views_of_one_tensor(model)
    other = Transformer(config).reset_parameters(generator=torch.Generator().manual_seed(3)).eval()
    model.load_state_dict(other.state_dict())
    assert _views_of_one_tensor(model)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = other(ids).logits
        assert torch.equal(model(ids).logits, want)
        q_before = model.layers[0].self_attn.q_proj.weight
        model.to(torch.float64)
        assert model.layers[0].self_attn.q_proj.weight is q_before  # same Parameter object
        assert _views_of_one_tensor(model) and model.dtype == torch.float64
        model.to(torch.float32)
        assert torch.equal(model(ids).logits, want)
    replaced = {n: t.clone() * 1.5 if "proj" in n else t for n, t in other.state_dict().items()}
    model.load_state_dict(replaced, assign=True)  # views replaced: the separate products run
    assert not _views_of_one_tensor(model)
    check = Transformer(config).eval()
    check.load_state_dict(replaced)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, check(ids).logits)
    check.train()
    check(ids).logits.square().mean().backward()  # grad mode: the separate products
    for name, p in check.named_parameters():
        if "proj" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_apply_rotary_is_bitwise_apply_rope():
    """The forward's RoPE (sign moved into the table, roll instead of chunk/neg/cat) gives
    exactly apply_rope's values: strided head views of a fused projection, batch 3, odd L, fp32
    and bf16."""
    from hybridkernels.models.config import TransformerConfig as Cfg
    from hybridkernels.models.transformer import (
        apply_rope,
        apply_rotary,
        rope_cos_sin,
        rope_inv_freq,
        signed_sin,
    )

    g = torch.Generator().manual_seed(0)
    inv = rope_inv_freq(Cfg.from_dict(SHAPE | {"model_type": "llama"}))
    for dtype in (torch.float32, torch.bfloat16):
        pos = torch.randint(0, 500, (3, 7), generator=g)
        cos, sin = rope_cos_sin(inv, pos, dtype)
        qkv = torch.randn(3, 7, 8, 32, generator=g).to(dtype)
        x = qkv[:, :, :6]  # q and k heads of a fused [B, L, Hq + 2 Hkv, D] product
        assert torch.equal(apply_rotary(x, cos, signed_sin(sin)), apply_rope(x, cos, sin))
