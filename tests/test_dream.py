"""The Dream planner family against the naive Dream samplers (reference.dream_generate, Dream's
``diffusion_generate``; reference.dream_block_generate, Fast-dLLM's Dream block / cache sampler),
token for token at temperature 0 for every ``alg``, batch 1 and left-padded batch 2, on tiny
random Dream checkpoints written here in Dream's naming (Qwen2 names, ``model_type: "Dream"``).

The cached reference runs :class:`CachedQwen2`, a plain-torch Qwen2 forward with Fast-dLLM's
cache semantics (its own K/V store), independent of the planner's cache and attention ops.
"""

import json

import pytest
import torch

from hybridkernels.models import (
    DiffusionPlanner,
    PlannerOptions,
    Transformer,
    TransformerConfig,
    save_pretrained,
)
from hybridkernels.ops._dispatch import triton_unavailable_reason
from hybridkernels.reference import dream as ref_dream
from hybridkernels.reference import dream_block_generate, dream_generate
from hybridkernels.schedules import DreamBlockSchedule, DreamSchedule

V, MASK, EOS = 96, 95, 0
LP = 7
ALGS = ["origin", "maskgit_plus", "topk_margin", "entropy"]


def dream_config(**changes):
    d = {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "mask_token_id": MASK,
        "pad_token_id": EOS,
        "bos_token_id": EOS,
        "eos_token_id": EOS,
    }
    return d | changes


def tiny(seed=0):
    """A random Dream-config model whose tokens vary; like a trained Dream it never proposes its
    mask token."""
    model = Transformer(TransformerConfig.from_dict(dream_config()), backend="reference")
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head_weight[MASK] = 0
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dream")
    save_pretrained(tiny(), path)
    return path


@pytest.fixture(scope="module")
def planner(checkpoint):
    return DiffusionPlanner.from_pretrained(checkpoint, backend="reference")


def prompts(B, seed=1):
    """``[B, LP]`` prompts; with ``B > 1`` row 1 is left-padded by 3."""
    ids = torch.randint(1, V - 2, (B, LP), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, LP, dtype=torch.long)
    if B > 1:
        mask[1, :3] = 0
        ids[1, :3] = EOS
    return ids, (mask if B > 1 else None)


def logits_fn(model):
    return lambda x, attention_mask=None: model(x, attention_mask, causal=False).logits


class CachedQwen2:
    """Plain-torch Qwen2 forward over a Transformer's weights with Fast-dLLM's Dream caches: a full
    call stores every layer's post-RoPE K/V; ``cache=(s, e)`` runs ``x[:, s:e]`` with its K/V
    written over positions ``[s, e)`` of the stored ones, attending all of them (Fast-dLLM's dual
    cache; with ``e == L`` its prefix cache, which keeps ``[0, s)`` and recomputes the rest)."""

    def __init__(self, model):
        self.w = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.c = model.config
        self.kv = None

    def _norm(self, h, name):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps) * self.w[name]

    def _rope(self, t, pos):  # t [B, H, T, D], pos [B, T]
        D = t.shape[-1]
        freqs = pos[:, None, :, None].float() / (self.c.rope_theta ** (torch.arange(0, D, 2).float() / D))
        emb = torch.cat([freqs, freqs], -1)
        return t * emb.cos() + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], -1) * emb.sin()

    def __call__(self, x, attention_mask=None, cache=None):
        c, w = self.c, self.w
        B, T = x.shape
        s, e = (0, T) if cache is None else cache
        L = T if cache is None else self.kv[0][0].shape[2]
        valid = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)[:, s:e]
        h = w["embed_tokens.weight"][x]
        stored = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            a = self._norm(h, p + "input_layernorm.weight")
            q, k, v = (
                (a @ w[p + f"self_attn.{n}_proj.weight"].T + w[p + f"self_attn.{n}_proj.bias"])
                .view(B, T, -1, c.head_dim)
                .transpose(1, 2)
                for n in "qkv"
            )
            q, k = self._rope(q, pos), self._rope(k, pos)
            if cache is not None:
                k_all, v_all = (t.clone() for t in self.kv[i])
                k_all[:, :, s:e], v_all[:, :, s:e] = k, v
                k, v = k_all, v_all
            stored.append((k, v))
            group = c.num_heads // c.num_kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            att = (q @ k.transpose(-1, -2)) / c.head_dim**0.5
            att = att.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
            h = h + (att @ v).transpose(1, 2).reshape(B, T, -1) @ w[p + "self_attn.o_proj.weight"].T
            a = self._norm(h, p + "post_attention_layernorm.weight")
            gate = torch.nn.functional.silu(a @ w[p + "mlp.gate_proj.weight"].T)
            h = h + (gate * (a @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        if cache is None:
            self.kv = stored
        return self._norm(h, "norm.weight") @ w["lm_head.weight"].T


# ------------------------------------------------------------------------------ loading
def test_checkpoint_is_in_dreams_naming_and_loads_as_dream(checkpoint, planner):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["mask_token_id"] == MASK
    assert config["pad_token_id"] == config["eos_token_id"] == EOS
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in names and "lm_head.weight" in names
    assert "model.embed_tokens.weight" in names
    assert planner.family == "dream" and planner.mask_id == MASK and planner.eos_id == EOS
    assert not planner.model.config.causal


def test_wrong_family_is_refused_both_ways(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="holds a Dream checkpoint"):
        DiffusionPlanner.from_pretrained(checkpoint, family="llada")
    llada = Transformer(
        TransformerConfig.from_dict(
            {
                "d_model": 32,
                "n_heads": 4,
                "n_layers": 1,
                "mlp_hidden_size": 48,
                "vocab_size": V,
                "mask_token_id": MASK,
            }
        )
    )
    llada.reset_parameters()
    save_pretrained(llada, tmp_path / "llada", names="llada")
    with pytest.raises(ValueError, match="holds a LLaDA checkpoint"):
        DiffusionPlanner.from_pretrained(tmp_path / "llada", family="dream")
    with pytest.raises(ValueError, match="family must be one of"):
        DiffusionPlanner.from_pretrained(checkpoint, family="sdar")
    assert DiffusionPlanner.from_pretrained(tmp_path / "llada").family == "llada"


def test_config_that_mixes_families_is_refused():
    with pytest.raises(ValueError, match="mixes families.*d_model"):
        TransformerConfig.from_dict(dream_config(d_model=32))
    with pytest.raises(ValueError, match="mask_token_id"):
        TransformerConfig.from_dict(dream_config(mask_token_id="x"))
    config = TransformerConfig.from_dict(dream_config())
    assert TransformerConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------ no cache
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("gen, steps", [(16, 16), (16, 5), (12, 12)])
def test_no_cache_equals_dreams_sampler(planner, alg, B, gen, steps):
    ids, mask = prompts(B, seed=gen + steps)
    ref = dream_generate(
        logits_fn(planner.model), ids, mask, max_new_tokens=gen, steps=steps, alg=alg, mask_id=MASK,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    out = planner.generate(
        ids, mask, gen_length=gen, steps=steps, alg=alg, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.tokens, ref)
    assert not (out.generated == MASK).any()
    assert out.stats.committed.sum() == B * gen


@pytest.mark.parametrize(
    "options", [{"alg_temp": 0.5}, {"top_p": 0.8}, {"top_k": 4}, {"top_p": 0.9, "top_k": 6}]
)
@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_alg_temp_top_p_top_k_equal_dreams_sampler(planner, options, alg):
    ids, mask = prompts(2, seed=4)
    ref = dream_generate(
        logits_fn(planner.model), ids, mask, max_new_tokens=12, steps=6, alg=alg, mask_id=MASK,
        generator=torch.Generator().manual_seed(9), **options,
    )  # fmt: skip
    out = planner.generate(
        ids, mask, gen_length=12, steps=6, alg=alg, generator=torch.Generator().manual_seed(9), **options
    )
    assert torch.equal(out.tokens, ref)


def test_the_window_is_scored_by_the_row_before_it(planner):
    """One step commits the argmax of the *previous* row's logits (the AR shift), not its own."""
    ids, _ = prompts(1, seed=5)
    out = planner.generate(ids, gen_length=4, steps=4, alg="maskgit_plus")
    x = torch.cat([ids, torch.full((1, 4), MASK)], dim=1)
    logits = logits_fn(planner.model)(x)
    first = out.stats.committed[0].item()
    assert first == 1
    p = torch.softmax(logits[0, LP - 1 : LP + 3], dim=-1)  # rows LP-1 .. LP+2 score LP .. LP+3
    pos = int(p.max(dim=-1).values.argmax())
    assert out.tokens[0, LP + pos] == p[pos].argmax()


def test_return_hidden_and_stream(planner):
    ids, mask = prompts(2)
    out = planner.generate(ids, mask, gen_length=8, steps=4, alg="entropy", return_hidden=True)
    assert out.hidden.shape == (2, 8, planner.model.config.hidden_size)
    blocks = list(planner.generate_stream(ids, mask, gen_length=8, steps=4, block_length=4, alg="entropy"))
    assert [(b.start, b.stop) for b in blocks] == [(LP, LP + 4), (LP + 4, LP + 8)]


# ------------------------------------------------------------------------------ blocks / caches
@pytest.mark.parametrize("cache", ["dual", "prefix", None])
@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("B", [1, 2])
def test_blocks_and_caches_equal_fast_dllms_dream_sampler(planner, cache, threshold, B):
    ids, mask = prompts(B, seed=7)
    kw = dict(steps=8, block_length=4, threshold=threshold, cache=cache)
    ref = dream_block_generate(CachedQwen2(planner.model), ids, mask, max_new_tokens=16, mask_id=MASK, **kw)
    out = planner.generate(ids, mask, gen_length=16, **kw)
    assert torch.equal(out.tokens, ref)
    assert out.stats.refreshes == (4 if cache else 0)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin"])
def test_dual_cache_with_other_rules_and_more_steps(planner, alg):
    ids, mask = prompts(2, seed=8)
    kw = dict(steps=12, block_length=6, cache="dual", alg=alg)
    ref = dream_block_generate(CachedQwen2(planner.model), ids, mask, max_new_tokens=12, mask_id=MASK, **kw)
    assert torch.equal(planner.generate(ids, mask, gen_length=12, **kw).tokens, ref)


def test_cached_reference_model_matches_the_transformer(planner):
    ids, mask = prompts(2)
    x = torch.cat([ids, torch.full((2, 5), MASK)], dim=1)
    full = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    ours = logits_fn(planner.model)(x, full)
    torch.testing.assert_close(CachedQwen2(planner.model)(x, full)[:, 3:], ours[:, 3:], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ schedules
def test_dream_schedule_counts_are_dreams():
    x = torch.full((2, 20), MASK)
    x[:, :4] = 1
    x[1, 10] = 2  # rows differ: Dream's count is the batch mean, capped per row
    sched = DreamSchedule(4, 16, steps=5, eps=1e-3)
    ts = ref_dream.dream_timesteps(5, 1e-3)
    for i in range(5):
        plan = sched.plan(x, MASK, 0, i)
        k = ref_dream.dream_num_transfer(x == MASK, ts, i, i == 4)
        assert plan.num_transfer.tolist() == [min(k, 16), min(k, 15)]
    origin = DreamSchedule(4, 16, steps=5, origin=True).plan(x, MASK, 0, 4)
    assert origin.num_transfer is None and float(origin.transfer_probability) == 1.0
    with pytest.raises(ValueError, match="not an unmask_step rule"):
        origin.kwargs()


def test_dream_block_schedule_starts_each_block_at_its_first_position():
    x = torch.full((1, 12), MASK)
    x[:, :4] = 1
    sched = DreamBlockSchedule(4, 8, 4, steps=4)
    plans = list(sched.stage_plans(x, MASK, 0))
    assert (plans[0].start, plans[0].stop, plans[0].num_transfer.tolist()) == (4, 5, [1])
    assert all((p.start, p.stop) == (5, 8) for p in plans[1:])
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        DreamBlockSchedule(4, 8, 4, steps=3)


# ------------------------------------------------------------------------------ bad input
def test_bad_options_name_the_argument(planner):
    ids, _ = prompts(1)
    with pytest.raises(ValueError, match="alg"):
        planner.generate(ids, gen_length=8, steps=4, alg="greedy")
    with pytest.raises(ValueError, match="block_length"):
        planner.generate(ids, gen_length=8, steps=4, block_length=3)
    with pytest.raises(ValueError, match="cfg_scale.*LLaDA option"):
        planner.generate(ids, gen_length=8, steps=4, cfg_scale=1.0)
    with pytest.raises(ValueError, match="remasking.*mix families"):
        PlannerOptions(alg="entropy", remasking="random")
    with pytest.raises(ValueError, match="origin.*no block rule"):
        planner.generate(ids, gen_length=8, steps=4, alg="origin", cache="dual")
    with pytest.raises(ValueError, match="threshold ranks by the max probability"):
        planner.generate(ids, gen_length=8, steps=4, threshold=0.5, alg="entropy")
    with pytest.raises(ValueError, match="top_p"):
        planner.generate(ids, gen_length=8, steps=4, top_p=1.5)
    with pytest.raises(ValueError, match="eps"):
        planner.generate(ids, gen_length=8, steps=4, eps=0.0)
    with pytest.raises(ValueError, match="alg"):
        dream_generate(logits_fn(planner.model), ids, max_new_tokens=4, steps=2, alg="greedy", mask_id=MASK)
    with pytest.raises(ValueError, match="block_length"):
        dream_block_generate(CachedQwen2(planner.model), ids, max_new_tokens=8, steps=2, block_length=3)


def test_llada_planner_refuses_dream_options():
    from test_planner import tiny as tiny_llada

    llada = DiffusionPlanner(tiny_llada())
    assert llada.family == "llada"
    ids = torch.randint(0, 100, (1, 5))
    for option in ({"alg": "entropy"}, {"top_k": 3}, {"eps": 0.01}, {"alg_temp": 0.5}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} is a Dream option"):
            llada.generate(ids, gen_length=8, steps=4, **option)


# ------------------------------------------------------------------------------ Triton backend
@pytest.mark.parametrize(
    "options",
    [
        {"alg": "entropy"},
        {"alg": "topk_margin"},
        {"cache": "dual", "block_length": 4},
        {"cache": "dual", "block_length": 4, "threshold": 0.3},
    ],
    ids=["entropy", "topk_margin", "dual", "dual-threshold"],
)
def test_triton_backend_equals_the_reference_backend(options):
    """The Triton attention and fused unmask kernels (the interpreter on the CPU) on the shifted
    rows commit what the reference ops commit (head_dim 32: the Triton attention's smallest)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if triton_unavailable_reason(device) is not None:
        pytest.skip(triton_unavailable_reason(device))
    config = TransformerConfig.from_dict(
        dream_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    )
    model = Transformer(config, backend="reference")
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.lm_head_weight[MASK] = 0
    model = model.to(device)
    ids, mask = (t.to(device) for t in prompts(2))
    ref = DiffusionPlanner(model, backend="reference").generate(ids, mask, gen_length=8, steps=4, **options)
    tri = DiffusionPlanner(model, backend="triton").generate(ids, mask, gen_length=8, steps=4, **options)
    assert torch.equal(tri.tokens, ref.tokens)


# ------------------------------------------------------------------------------ pipeline
def test_a_dream_planner_plugs_into_the_pipeline(tmp_path):
    """Latent mode (the plan's hidden states through the projector) and text mode with the cache."""
    from hybrid_helpers import COLORS, TEMPLATE_WORDS, tiny_model, word_tokenizer

    from hybridkernels.models import ARExecutor, LatentProjector
    from hybridkernels.pipeline import HybridPipeline

    words = TEMPLATE_WORDS + COLORS + "sky sea grass x y".split()
    p_tok, e_tok = word_tokenizer(words, tmp_path / "p"), word_tokenizer(words[::-1], tmp_path / "e")
    planner = DiffusionPlanner(tiny_model(p_tok, causal=False, seed=11, std=0.2), family="dream")
    executor = ARExecutor(tiny_model(e_tok, causal=True, seed=12, std=0.2))
    toks = dict(planner_tokenizer=p_tok, executor_tokenizer=e_tok, executor_kwargs={"max_new_tokens": 4})
    projector = LatentProjector.for_models(planner, executor, pool="mean", pool_stride=4)
    latent = HybridPipeline(
        planner, executor, projector, mode="latent", planner_kwargs={"gen_length": 6, "steps": 6}, **toks
    )
    out = latent(["what is the color of the sky ?", "sea ?"])
    direct = planner.generate(
        *_encode(p_tok, latent, ["what is the color of the sky ?", "sea ?"]), gen_length=6, steps=6
    )
    assert out.stats.plan_steps == direct.stats.steps and len(out.plans) == 2
    cached = {"gen_length": 6, "steps": 6, "block_length": 3, "cache": "dual"}
    text = HybridPipeline(planner, executor, mode="text", planner_kwargs=cached, **toks)
    assert len(text(["sea ?"]).plans) == 1


def _encode(tok, pipe, questions):
    from hybridkernels.models.prompting import encode_prompts

    texts = [pipe.templates.planner.format(question=q) for q in questions]
    return encode_prompts(tok, texts, device=torch.device("cpu"), avoid=pipe.planner.mask_id, where="test")
