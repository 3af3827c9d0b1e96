"""BlockDiffusionPlanner (SDAR, Fast-dLLM v2): the exact block cache against the naive block-causal
loop (hybridkernels.reference.block_diffusion, a full forward with the block-causal mask every
step) token for token at T=0, batch invariance, stop tokens, loading tiny checkpoints written in
each model's own naming, and bad inputs."""

import json

import pytest
import torch

from hybridkernels.models import Transformer, TransformerConfig
from hybridkernels.models.block_diffusion import BlockDiffusionOptions, BlockDiffusionPlanner
from hybridkernels.models.loading import save_pretrained
from hybridkernels.ops._dispatch import triton_interpreting
from hybridkernels.reference.block_diffusion import block_diffusion_generate, sdar_num_transfer_tokens

VOCAB, MASK = 97, 96
BASE = {"sdar": "qwen3", "fast_dllm_v2": "qwen2"}


def _model(family, seed=0, dtype=torch.float32):
    base = BASE[family]
    config = TransformerConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,  # GQA
        head_dim=32,
        family=base,
        qk_norm=base == "qwen3",
        qkv_bias=base == "qwen2",
        max_position_embeddings=256,
    )
    model = Transformer(config, dtype=dtype)
    # std 0.5: peaked enough that low thresholds commit several tokens per step
    model.reset_parameters(std=0.5, generator=torch.Generator().manual_seed(seed))
    if base == "qwen2":  # non-zero q/k/v biases, so their loading is tested
        with torch.no_grad():
            for layer in model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return model


def _planner(family, seed=0, **kwargs):
    kwargs.setdefault("block_length", 4 if family == "sdar" else 8)
    kwargs.setdefault("stop_token_ids", ())
    return BlockDiffusionPlanner(_model(family, seed), family=family, mask_id=MASK, **kwargs)


def _prompts(B, Lp, seed=0, short=(3,)):
    """Left-padded random prompts: row ``1 + i`` has ``short[i]`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, Lp), generator=g)
    mask = torch.ones(B, Lp, dtype=torch.long)
    for i, n in enumerate(short[: B - 1]):
        mask[1 + i, : Lp - n] = 0
        ids[1 + i, : Lp - n] = 0
    return ids, mask


RULES = {
    # family -> commit rules as (commit, options)
    "sdar": [("threshold", dict(threshold=0.2, steps=2)), ("topk", dict(steps=4)), ("topk", dict(steps=3))],
    "fast_dllm_v2": [("threshold", dict(threshold=0.2, sub_block=4)), ("topk", dict(k=2, sub_block=8))],
}
CASES = [(f, c, o) for f, rules in RULES.items() for c, o in rules]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family, commit, opts", CASES)
def test_cached_equals_naive_block_causal_loop(family, commit, opts, batch):
    planner = _planner(family)
    ids, mask = _prompts(batch, 7, short=(3,))  # 7 and 3 tokens: partial first blocks
    options = BlockDiffusionOptions(gen_length=16, commit=commit, **opts)
    out = planner.generate(ids, mask, options, return_hidden=True)
    ref = block_diffusion_generate(planner.model, ids, mask, **planner.reference_kwargs(options))
    assert out.tokens.shape == (batch, 7 + 16) and torch.equal(out.tokens[:, :7], ids)
    assert torch.equal(out.tokens, ref.tokens)
    assert not (out.generated == MASK).any()
    torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-4, rtol=1e-4)
    assert out.stats.steps == ref.steps
    # the cache runs one forward per step plus one store pass per block and the prefill, each over
    # one block instead of the whole sequence
    assert out.stats.forward_passes <= ref.steps + 16 // planner.block_length + 3
    if commit == "threshold" or opts.get("k", 1) > 1 or opts.get("steps", 4) < 4:
        assert int(out.stats.committed.max()) > 1, "the rule never committed two tokens in a step"


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_batch_rows_equal_their_solo_runs(family):
    """Front-aligned rows (Fast-dLLM v2's batching) run exactly as alone: left padding, prompts of
    5, 8 (a block boundary for v2's AR first token) and 2 tokens."""
    planner = _planner(family)
    ids, mask = _prompts(3, 8, seed=4, short=(5, 2))
    ids, mask = ids[[1, 0, 2]], mask[[1, 0, 2]]
    kw = dict(gen_length=16, threshold=0.2)
    batched = planner.generate(ids, mask, **kw)
    for r in range(3):
        n = int(mask[r].sum())
        solo = planner.generate(ids[r : r + 1, 8 - n :], **kw)
        assert torch.equal(batched.generated[r], solo.generated[0]), r


def test_sdar_prompt_at_a_block_boundary_and_one_block_prompt():
    planner = _planner("sdar")
    for Lp in (8, 1, 4):
        ids, _ = _prompts(1, Lp, seed=Lp)
        out = planner.generate(ids, gen_length=8, commit="topk")
        ref = block_diffusion_generate(
            planner.model, ids, **planner.reference_kwargs(gen_length=8, commit="topk")
        )
        assert torch.equal(out.tokens, ref.tokens), Lp


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_stop_token_ends_a_row_after_its_block(family):
    planner = _planner(family)
    ids, mask = _prompts(2, 6, seed=2, short=(4,))
    free = planner.generate(ids, mask, gen_length=24, threshold=0.2)
    stop = int(free.generated[0, 9])  # row 0 makes this token in its third generated block
    out = planner.generate(
        ids, mask, gen_length=24, threshold=0.2, stop_token_ids=(stop,), return_hidden=True
    )
    ref = block_diffusion_generate(
        planner.model,
        ids,
        mask,
        **planner.reference_kwargs(gen_length=24, threshold=0.2, stop_token_ids=(stop,)),
    )
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-4, rtol=1e-4)  # the padding's too
    b = planner.block_length
    for r in range(2):
        gen, n = out.generated[r], int(mask[r].sum())
        hits = (free.generated[r] == stop).nonzero()
        if len(hits):  # the row stops after the block of its first stop token: pad (= stop) after
            end_of_block = ((n + int(hits[0]) + b) // b) * b - n
            assert torch.equal(gen[:end_of_block], free.generated[r, :end_of_block])
            assert (gen[end_of_block:] == stop).all()
    if all((free.generated[r] == stop).any() for r in range(2)):  # the blocks after every stop are skipped
        assert out.stats.forward_passes < free.stats.forward_passes and out.stats.skipped_blocks > 0


@pytest.mark.skipif(not torch.cuda.is_available() and not triton_interpreting(), reason="needs triton")
def test_triton_attention_and_unmask_backends_match_the_reference():
    """The cached planner on the Triton block-causal attention and the Triton unmask_step."""
    model = _model("sdar", seed=3)
    planner = BlockDiffusionPlanner(
        model, family="sdar", mask_id=MASK, block_length=4, stop_token_ids=(),
        attention_backend="triton", unmask_backend="triton",
    )  # fmt: skip
    ids, mask = _prompts(2, 5, seed=3, short=(2,))
    out = planner.generate(ids, mask, gen_length=8, threshold=0.2, steps=2)
    ref = block_diffusion_generate(
        model, ids, mask, **planner.reference_kwargs(gen_length=8, threshold=0.2, steps=2)
    )
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_cuda_cached_equals_naive_loop_on_the_kernels(family):
    """On a GPU: Triton block-causal attention and unmask kernels (fp32 model: exact at T = 0),
    then a bf16 run that must finish and agree with the naive loop on most tokens."""
    from hybridkernels import ops

    for dtype in (torch.float32, torch.bfloat16):
        model = _model(family, seed=5, dtype=dtype).cuda()
        planner = BlockDiffusionPlanner(
            model, family=family, mask_id=MASK, block_length=4 if family == "sdar" else 8, stop_token_ids=()
        )
        ids, mask = _prompts(2, 7, seed=5, short=(3,))
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(gen_length=16, threshold=0.2)
        out = planner.generate(ids, mask, **kw)
        ref = block_diffusion_generate(
            model, ids, mask, attention=ops.attention, **planner.reference_kwargs(**kw)
        )
        if dtype == torch.float32:
            assert torch.equal(out.tokens, ref.tokens)
        else:
            assert not (out.generated == MASK).any()
            assert (out.tokens == ref.tokens).float().mean() > 0.5


def test_temperature_sampling_is_reproducible_with_a_generator():
    planner = _planner("fast_dllm_v2")
    ids, mask = _prompts(2, 5, short=(3,))
    runs = [
        planner.generate(ids, mask, gen_length=8, temperature=1.0, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert not (runs[0].generated == MASK).any()


def test_sdar_split_matches_the_published_rule():
    assert sdar_num_transfer_tokens(4, 4) == [1, 1, 1, 1]
    assert sdar_num_transfer_tokens(8, 3) == [3, 3, 2]
    assert sum(sdar_num_transfer_tokens(32, 5)) == 32


# ------------------------------------------------------------------------------------ loading


def _write_checkpoint(path, family, seed=0):
    """A tiny checkpoint in the model's own naming: HF Qwen3 tensors + an SDAR config
    (model_type "sdar", block_size, mask_token_id), or HF Qwen2 tensors + a Fast-dLLM v2 config
    (model_type "Fast_dLLM_Qwen", bd_size, architectures Fast_dLLM_QwenForCausalLM)."""
    model = _model(family, seed)
    save_pretrained(model, path, names="hf")
    config = json.loads((path / "config.json").read_text())
    if family == "sdar":
        config.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=4, mask_token_id=MASK)
        config["eos_token_id"] = 5
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    else:
        config.update(model_type="Fast_dLLM_Qwen", architectures=["Fast_dLLM_QwenForCausalLM"], bd_size=8)
        config["eos_token_id"] = 6
    (path / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_from_pretrained_in_each_models_naming(tmp_path, family):
    model = _write_checkpoint(tmp_path, family)
    kwargs = {} if family == "sdar" else {"mask_id": MASK}
    planner = BlockDiffusionPlanner.from_pretrained(tmp_path, family=family, **kwargs)
    assert planner.family == family and planner.mask_id == MASK
    assert planner.block_length == (4 if family == "sdar" else 8)
    assert planner.stop_token_ids == ((7, 5) if family == "sdar" else (6,))
    assert planner.model.config.qk_norm == (family == "sdar")
    assert planner.model.config.qkv_bias == (family == "fast_dllm_v2")
    for name, t in model.state_dict().items():
        assert torch.equal(planner.model.state_dict()[name], t), name
    ids, _ = _prompts(1, 5)
    out = planner.generate(ids, gen_length=planner.block_length * 2, stop_token_ids=())
    ref = block_diffusion_generate(
        model, ids, **planner.reference_kwargs(gen_length=planner.block_length * 2, stop_token_ids=())
    )
    assert torch.equal(out.tokens, ref.tokens)


def test_loading_another_family_names_what_the_directory_holds(tmp_path):
    _write_checkpoint(tmp_path / "sdar", "sdar")
    with pytest.raises(ValueError, match="family='fast_dllm_v2', but .* holds a sdar checkpoint"):
        BlockDiffusionPlanner.from_pretrained(tmp_path / "sdar", family="fast_dllm_v2")
    llama = _model("sdar")
    save_pretrained(llama, tmp_path / "qwen3", names="hf")
    with pytest.raises(ValueError, match="holds a 'qwen3' checkpoint, not a block-diffusion one"):
        BlockDiffusionPlanner.from_pretrained(tmp_path / "qwen3")
    llada = Transformer(llama.config.replace(family="llada", qk_norm=False, causal=False, hidden_size=128))
    save_pretrained(llada, tmp_path / "llada", names="llada")
    with pytest.raises(ValueError, match="holds a LLaDA checkpoint"):
        BlockDiffusionPlanner.from_pretrained(tmp_path / "llada")


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_the_other_loaders_name_the_block_diffusion_family(tmp_path, family):
    """DiffusionPlanner / ARExecutor / Transformer loading an SDAR or Fast-dLLM v2 directory: an
    error naming the family and the loader to use, never a model run in the wrong attention mode."""
    _write_checkpoint(tmp_path, family)
    held = "an SDAR" if family == "sdar" else "a Fast-dLLM v2"
    with pytest.raises(
        ValueError, match=f"this is {held} checkpoint .*BlockDiffusionPlanner.from_pretrained"
    ):
        Transformer.from_pretrained(tmp_path)


def test_a_config_that_mixes_families_is_an_error(tmp_path):
    _write_checkpoint(tmp_path, "sdar")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"bd_size": 32}))
    with pytest.raises(ValueError, match="block key 'bd_size': a config that mixes SDAR and Fast-dLLM v2"):
        BlockDiffusionPlanner.from_pretrained(tmp_path)


def test_sdar_directory_with_qwen2_tensors_fails_on_the_tensors(tmp_path):
    _write_checkpoint(tmp_path, "fast_dllm_v2")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["bd_size"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "sdar", "block_size": 4}))
    with pytest.raises(ValueError, match="bias"):
        BlockDiffusionPlanner.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "family, kwargs, error, match",
    [
        ("sdar", dict(gen_length=10), ValueError, r"block_length \(4\) must divide gen_length \(10\)"),
        ("fast_dllm_v2", dict(gen_length=16, block_length=6), ValueError, r"block_length \(6\) must divide"),
        ("sdar", dict(sub_block=2), ValueError, "sub_block is Fast-dLLM v2's option"),
        ("fast_dllm_v2", dict(steps=4), ValueError, "steps is SDAR's option"),
        ("fast_dllm_v2", dict(sub_block=3), ValueError, r"sub_block \(3\) must divide block_length \(8\)"),
        ("sdar", dict(steps=5), ValueError, r"steps \(5\) must be <= block_length \(4\)"),
        ("sdar", dict(commit="dynamic"), ValueError, "commit"),
        ("sdar", dict(threshold=1.5), ValueError, "threshold must be in"),
        ("sdar", dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        ("sdar", dict(top_p=0.9), TypeError, r"unknown option\(s\) \['top_p'\]"),
    ],
)
def test_bad_options(family, kwargs, error, match):
    planner = _planner(family)
    ids, _ = _prompts(1, 4)
    kwargs.setdefault("gen_length", 16)
    with pytest.raises(error, match=match):
        planner.generate(ids, **kwargs)


def test_bad_prompts_and_constructor():
    planner = _planner("sdar")
    ids, mask = _prompts(2, 4)
    with pytest.raises(ValueError, match="contains mask_id"):
        planner.generate(torch.full((1, 3), MASK), gen_length=4)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        planner.generate(ids, empty, gen_length=4)
    with pytest.raises(ValueError, match="prompt_ids must be a"):
        planner.generate(ids[0], gen_length=4)
    with pytest.raises(ValueError, match="positions"):
        planner.generate(ids, gen_length=512)
    with pytest.raises(ValueError, match="family must be one of"):
        BlockDiffusionPlanner(planner.model, family="llada", mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id must be in"):
        BlockDiffusionPlanner(planner.model, family="sdar", mask_id=VOCAB)
    with pytest.raises(TypeError, match="model must be a Transformer"):
        BlockDiffusionPlanner(object(), family="sdar", mask_id=MASK)
    with pytest.raises(ValueError, match="gen_length .* must be a multiple of block_length"):
        block_diffusion_generate(
            planner.model, ids, family="sdar", mask_id=MASK, gen_length=6, block_length=4
        )


def test_backend_names_every_op_and_the_per_op_ones_override_it():
    model = _model("sdar")
    both = BlockDiffusionPlanner(model, family="sdar", mask_id=MASK, backend="reference")
    assert (both.backend, both.unmask_backend) == ("reference", "reference")
    one = BlockDiffusionPlanner(
        model, family="sdar", mask_id=MASK, backend="reference", unmask_backend="triton"
    )
    assert (one.backend, one.unmask_backend) == ("reference", "triton")
