"""DiffusionPlanner against the naive LLaDA loop (reference.llada_generate), token for token at
temperature 0, on tiny random LLaDA-config transformers (fp32, CPU); its caches, schedules, EOS
options, CUDA-graph path and input errors."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda
from transformers import LlamaConfig, LlamaForCausalLM

from hybridkernels.models import (
    DiffusionKVCache,
    DiffusionPlanner,
    PlannerOptions,
    Transformer,
    TransformerConfig,
    save_pretrained,
)
from hybridkernels.models.loading import to_external_name
from hybridkernels.models.planner import _ends_in_eos
from hybridkernels.ops._dispatch import triton_unavailable_reason
from hybridkernels.reference import get_num_transfer_tokens as reference_num_transfer
from hybridkernels.reference import llada_generate
from hybridkernels.schedules import FixedKSchedule

V, MASK, EOS, EOT = 128, 127, 5, 6
LP = 7  # prompt length


def tiny(seed=1, layers=2, kv_heads=1, device="cpu"):
    """A random LLaDA-config model whose tokens vary (init std 0.3 at width 64)."""
    config = TransformerConfig.from_dict(
        {
            "d_model": 64,
            "n_heads": 2,
            "n_kv_heads": kv_heads,
            "n_layers": layers,
            "mlp_hidden_size": 96,
            "vocab_size": V,
            "mask_token_id": MASK,
            "eos_token_id": EOS,
        }
    ).replace(eot_token_id=EOT)
    model = Transformer(config, backend="reference", device=device)
    model.reset_parameters(std=0.3, generator=torch.Generator(device).manual_seed(seed))
    with torch.no_grad():
        model.lm_head_weight[MASK] = 0  # like a trained LLaDA, [MASK] is (almost) never predicted
    return model.eval()


def prompts(B=3, seed=1, device="cpu"):
    """Left-padded prompts ``[B, LP]`` and their mask (row 2 is a single token)."""
    ids = torch.randint(0, V - 1, (B, LP), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, LP, dtype=torch.long)
    mask[1, :2] = 0
    if B > 2:
        mask[2, :-1] = 0
    return ids.to(device), mask.to(device)


def reference(model, prompt, mask, **kw):
    return llada_generate(model, prompt, mask, mask_id=MASK, eos_id=EOS, eot_id=EOT, return_stats=True, **kw)


def seeded(kw):
    """Copy of ``kw`` with a fresh generator when the run draws random numbers."""
    if kw.get("remasking") == "random" or kw.get("temperature", 0) > 0:
        return kw | {"generator": torch.Generator().manual_seed(11)}
    return kw


CASES = {
    "one-per-step": dict(gen_length=16, block_length=8, steps=16),
    "uneven-split": dict(gen_length=12, block_length=4, steps=6),
    "one-window": dict(gen_length=8, block_length=8, steps=3),
    "cfg": dict(gen_length=16, block_length=8, steps=8, cfg_scale=1.0),
    "random": dict(gen_length=16, block_length=8, steps=8, remasking="random"),
    "random-cfg": dict(gen_length=8, block_length=4, steps=4, remasking="random", cfg_scale=0.5),
}


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, padded):
    model = tiny()
    prompt, mask = prompts()
    mask = mask if padded else None
    kw = CASES[case]
    ref, ref_stats = reference(model, prompt, mask, **seeded(kw))
    out = DiffusionPlanner(model).generate(prompt, mask, **seeded(kw))
    assert torch.equal(out.tokens, ref)
    assert out.generated.unique().numel() >= 8  # the test model really varies its tokens
    assert torch.equal(out.stats.committed, ref_stats.committed)
    assert out.stats.forward_passes == ref_stats.forward_passes == out.stats.steps


def test_extra_steps_are_skipped():
    # 16 steps for 8 masks: LLaDA runs 8 more forward passes that commit nothing.
    model, (prompt, mask) = tiny(), prompts()
    kw = dict(gen_length=8, block_length=4, steps=16)
    ref, ref_stats = reference(model, prompt, mask, **kw)
    out = DiffusionPlanner(model).generate(prompt, mask, **kw)
    assert torch.equal(out.tokens, ref)
    assert ref_stats.forward_passes == 16 and out.stats.forward_passes == 8
    assert torch.equal(out.stats.committed, ref_stats.committed[ref_stats.committed.sum(1) > 0])


def test_eos_options_match_reference():
    model, (prompt, mask) = tiny(), prompts()
    kw = dict(gen_length=16, block_length=4, steps=16)
    plain = DiffusionPlanner(model).generate(prompt, mask, **kw).generated
    # Make the options bite: EOS and EoT are the two most frequent generated tokens.
    eos, eot = torch.bincount(plain.flatten(), minlength=V).topk(2).indices.tolist()
    planner = DiffusionPlanner(model, eos_id=eos, eot_id=eot)
    for option in ("logits_eos_inf", "confidence_eos_eot_inf"):
        ref = llada_generate(
            model, prompt, mask, mask_id=MASK, eos_id=eos, eot_id=eot, **kw, **{option: True}
        )
        out = planner.generate(prompt, mask, **kw, **{option: True})
        assert torch.equal(out.tokens, ref), option
        assert not torch.equal(out.generated, plain), option
    never = planner.generate(prompt, mask, **kw, logits_eos_inf=True).generated
    assert not (never == eos).any()


def test_triton_backends_match_reference():
    if triton_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")
    model = tiny()
    prompt, mask = prompts(B=2)
    kw = dict(gen_length=8, block_length=4, steps=4, cfg_scale=0.5)
    ref, _ = reference(model, prompt, mask, **kw)
    out = DiffusionPlanner(model, backend="triton").generate(prompt, mask, **kw)
    assert torch.equal(out.tokens, ref)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(cache):
    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    for kw in (
        dict(gen_length=16, block_length=4, steps=8),
        dict(gen_length=8, block_length=4, steps=4, cfg_scale=1.0),
    ):
        exact = planner.generate(prompt, mask, **kw)
        out = planner.generate(prompt, mask, cache=cache, cache_refresh=1, **kw)
        assert torch.equal(out.tokens, exact.tokens)
        assert out.stats.refreshes == out.stats.forward_passes == exact.stats.forward_passes


def test_one_layer_caches_are_exact():
    # With one layer, a position's keys and values depend only on its own token: between two
    # refreshes only the window's tokens change, and the window is recomputed. So the dual cache
    # gives the no-cache tokens exactly, and so does the prefix cache (it recomputes the window and
    # the masked suffix, as Fast-dLLM's does; only the prefix is as of the refresh).
    model = tiny(seed=1, layers=1, kv_heads=2)
    prompt, mask = prompts()
    planner = DiffusionPlanner(model)
    for kw in (
        dict(gen_length=24, block_length=8, steps=24),
        dict(gen_length=16, block_length=8, steps=8, cfg_scale=0.5),
    ):
        exact = planner.generate(prompt, mask, **kw)
        dual = planner.generate(prompt, mask, cache="dual", **kw)
        assert torch.equal(dual.tokens, exact.tokens)
        assert dual.stats.refreshes == kw["gen_length"] // kw["block_length"] < dual.stats.forward_passes
    kw = dict(gen_length=16, steps=16)
    assert torch.equal(
        planner.generate(prompt, mask, cache="prefix", **kw).tokens,
        planner.generate(prompt, mask, **kw).tokens,
    )
    kw = dict(gen_length=24, block_length=8, steps=24)  # with a masked suffix too
    assert torch.equal(
        planner.generate(prompt, mask, cache="prefix", **kw).tokens,
        planner.generate(prompt, mask, **kw).tokens,
    )


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto-sdpa"])
def test_kv_cache_hook_overwrites_its_slots_and_respects_key_length(backend):
    """With the reference op a refresh is bitwise the no-cache forward; by default the CPU
    cache attends with torch SDPA (same contract, another summation order)."""
    model = tiny()
    exact = dict(atol=0, rtol=0) if backend == "reference" else dict(atol=1e-5, rtol=1e-5)
    ids, mask = prompts()
    valid = mask.bool()
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    c = model.config
    cache = DiffusionKVCache(
        num_layers=c.num_layers,
        batch=3,
        length=LP,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        dtype=torch.float32,
        device=torch.device("cpu"),
        key_padding_mask=valid,
        attention_backend=backend,
    )
    assert cache._sdpa == (backend is None)
    with torch.no_grad():
        full = model(ids, valid, compute_logits=False)
        cache.set_queries(torch.arange(LP), LP)
        refreshed = model(ids, position_ids=pos, kv_cache=cache, compute_logits=False)
        torch.testing.assert_close(refreshed.hidden, full.hidden, **exact)
        slots = torch.tensor([3, 4, 5])
        for buf in cache.k + cache.v:
            buf[:, 3:6] = 1e3  # stale garbage in the window's slots: must be overwritten
        cache.set_queries(slots, LP)
        step = model(ids[:, 3:6], position_ids=pos[:, 3:6], kv_cache=cache, compute_logits=False)
        torch.testing.assert_close(step.hidden, full.hidden[:, 3:6], atol=1e-5, rtol=1e-5)
        # key_length 6: whatever the last slot holds is ignored.
        cache.set_queries(slots, 6)
        outs = []
        for junk in (0.0, float("nan")):
            for buf in cache.k + cache.v:
                buf[:, 6:] = junk
            outs.append(
                model(ids[:, 3:6], position_ids=pos[:, 3:6], kv_cache=cache, compute_logits=False).hidden
            )
        assert outs[1].isfinite().all()
        torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="key_length"):
        cache.set_queries(slots, LP + 1)


def test_padded_rows_equal_unpadded_with_dual_cache():
    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=16, block_length=8, steps=8, cache="dual")
    batch = planner.generate(prompt, mask, **kw).tokens
    alone = planner.generate(prompt[1:2, 2:], **kw).tokens
    assert torch.equal(batch[1, 2:], alone[0])


def test_threshold_limits():
    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    # Never reached: one token per step, LLaDA with one step per position.
    out = planner.generate(prompt, mask, gen_length=8, block_length=4, steps=2, threshold=1.5)
    ref, _ = reference(model, prompt, mask, gen_length=8, block_length=4, steps=8)
    assert torch.equal(out.tokens, ref) and out.stats.steps == 8
    # Always reached: each window in one step, LLaDA with one step per block.
    out = planner.generate(prompt, mask, gen_length=8, block_length=4, steps=2, threshold=0.0)
    ref, _ = reference(model, prompt, mask, gen_length=8, block_length=4, steps=2)
    assert torch.equal(out.tokens, ref) and out.stats.committed.tolist() == [[4] * 3] * 2
    # In between: at least one per step, and the window is finished before the next starts.
    out = planner.generate(prompt, mask, gen_length=16, block_length=8, steps=2, threshold=0.05, cache="dual")
    committed = out.stats.committed
    assert (committed >= 1).all() and (committed.sum(0) == 16).all() and 2 <= out.stats.steps < 16
    assert (out.generated != MASK).all()


def test_parallel_schedule():
    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    # k = gen_length // steps: LLaDA's split over one window of the whole generation.
    out = planner.generate(prompt, mask, gen_length=12, steps=5, schedule="parallel")
    ref, ref_stats = reference(model, prompt, mask, gen_length=12, block_length=12, steps=5)
    assert torch.equal(out.tokens, ref) and torch.equal(out.stats.committed, ref_stats.committed)
    # At least k per step: 5, 5, then the 2 left.
    out = planner.generate(
        prompt, mask, gen_length=12, steps=3, schedule="parallel", parallel_k=5, cache="dual"
    )
    assert out.stats.committed.tolist() == [[5] * 3, [5] * 3, [2] * 3]
    assert (out.generated != MASK).all()


def test_eos_early_stop():
    model = tiny(seed=2)
    with torch.no_grad():  # masked positions lean towards EOS: some rows end early in EOS
        u = model.lm_head_weight[EOS]
        model.embed_tokens.weight[MASK] = 16 * u / u.norm()
    prompt = torch.randint(0, V - 1, (4, LP), generator=torch.Generator().manual_seed(1))
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=32, block_length=8, steps=16)
    plain = planner.generate(prompt, **kw).generated
    ended = _ends_in_eos(plain[:, :8], EOS)
    assert ended.tolist() == [False, True, True, False]  # the rig works as intended
    assert not (plain[1:3] == EOS).all()  # ... and without the option they do not stay EOS
    out = planner.generate(prompt, eos_early_stop=True, **kw)
    assert torch.equal(out.generated[[0, 3]], plain[[0, 3]])
    assert torch.equal(out.generated[1:3, :8], plain[1:3, :8]) and (out.generated[1:3, 8:] == EOS).all()
    assert out.stats.skipped_blocks == 0
    # When every row has ended, the remaining blocks are not computed.
    out = planner.generate(prompt[1:3], eos_early_stop=True, **kw)
    assert torch.equal(out.generated[:, :8], plain[1:3, :8]) and (out.generated[:, 8:] == EOS).all()
    assert out.stats.skipped_blocks == 3 and out.stats.forward_passes == 4


def test_ends_in_eos():
    E, t = EOS, 9
    gen = torch.tensor([[t, t, E, E], [t, E, t, E], [t, t, t, t], [E, E, E, E], [t, t, t, E]])
    assert _ends_in_eos(gen, E).tolist() == [True, False, False, True, True]


def test_return_hidden_stats_and_stream():
    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=16, block_length=8, steps=8)
    out = planner.generate(prompt, mask, return_hidden=True, cache="dual", **kw)
    with torch.no_grad():
        full = model(out.tokens, torch.cat([mask, torch.ones(3, 16, dtype=torch.long)], 1))
    torch.testing.assert_close(out.hidden, full.hidden[:, LP:], atol=0, rtol=0)
    s = out.stats
    assert out.hidden.shape == (3, 16, 64) and s.forward_passes == 9 and s.steps == 8 and s.refreshes == 2
    assert s.committed.shape == (8, 3) and (s.committed.sum(0) == 16).all() and s.tokens_per_step == 2.0
    assert s.graph_replays == 0 and s.seconds > 0
    blocks = []
    for block in planner.generate_stream(prompt, mask, **kw):
        blocks.append((block.index, block.start, block.stop, (block.tokens[:, LP:] == MASK).sum().item()))
        break
    assert blocks == [(0, LP, LP + 8, 3 * 8)]
    assert [b.index for b in planner.generate_stream(prompt, mask, **kw)] == [0, 1]


@requires_cuda
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_cuda_graph_replays_the_eager_step(cache):
    model = tiny(device="cuda")
    prompt, mask = prompts(device="cuda")
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=16, block_length=8, steps=16, cfg_scale=0.5, cache=cache)
    eager = planner.generate(prompt, mask, cuda_graph=False, **kw)
    graphed = planner.generate(prompt, mask, cuda_graph=True, **kw)
    again = planner.generate(prompt, mask, cuda_graph=True, **kw)
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    assert 0 < graphed.stats.graph_replays < again.stats.graph_replays == again.stats.steps


@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.device_count() > 1), reason="needs 2 GPUs")
def test_cuda_graph_on_a_device_that_is_not_current():
    """Capture follows the current device: the planner must capture on its model's device."""
    model = tiny(device="cuda:1")
    prompt, mask = prompts(device="cuda:1")
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=16, block_length=8, steps=16, cache="dual")
    with torch.cuda.device(0):
        eager = planner.generate(prompt, mask, cuda_graph=False, **kw)
        graphed = planner.generate(prompt, mask, cuda_graph=True, **kw)
    assert graphed.stats.graph_replays > 0 and torch.equal(graphed.tokens, eager.tokens)


def test_input_errors():
    model = tiny()
    planner = DiffusionPlanner(model)
    p = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(gen_length=6, block_length=4), "multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
        (dict(prompt_ids=torch.tensor([[1, MASK]])), r"prompt_ids\[0, 1\] is the mask token"),
        (dict(prompt_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt_ids"),
        (dict(prompt_ids=torch.tensor([[1, V]])), r"token ids in \[0, 128\)"),
        (dict(prompt_ids=torch.tensor([1, 2])), r"prompt_ids must be a \[B, L\] tensor"),
        (dict(attention_mask=torch.ones(1, 4)), "attention_mask must have prompt_ids' shape"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), "row 0 is empty"),
        (dict(attention_mask=torch.tensor([[1, 0, 1]])), "left padding"),
        (dict(attention_mask=torch.tensor([[2, 1, 1]])), "0/1"),
        (dict(remasking="top_p"), "remasking"),
        (dict(cache="full"), "cache must be one of"),
        (dict(schedule="nap"), "schedule must be one of"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(threshold="high"), "threshold"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(cache_refresh=2), "cache_refresh needs cache"),
        (dict(cache="dual", cache_refresh=0), "cache_refresh must be a positive int"),
        (dict(schedule="parallel", gen_length=8, block_length=4, steps=4), "leave block_length None"),
        (dict(schedule="parallel", gen_length=8, steps=16), "steps <= gen_length"),
        (dict(parallel_k=2), "parallel_k is only for"),
        (dict(cuda_graph=True), "cuda_graph=True needs the model on a CUDA device"),
    ]
    for kw, match in cases:
        kw = dict(prompt_ids=p, gen_length=8, block_length=8, steps=8) | kw
        with pytest.raises((ValueError, TypeError), match=match):
            planner.generate(**kw)
    with pytest.raises(TypeError, match="prompt_ids must hold integer"):
        planner.generate(p.float(), gen_length=8, steps=8)
    planner.eot_id = None  # e.g. a config without EoT
    with pytest.raises(ValueError, match="needs the planner's eot_id"):
        planner.generate(p, gen_length=8, steps=8, confidence_eos_eot_inf=True)
    with pytest.raises(ValueError, match="mask_id must be a token id"):
        DiffusionPlanner(model, mask_id=V)
    with pytest.raises(TypeError, match="model must be a Transformer"):
        DiffusionPlanner(lambda x: x)


def test_options_object_and_overrides():
    """``generate(ids, mask, PlannerOptions(...))`` equals the keyword form; overrides apply on
    top; an unknown option is a TypeError naming it."""
    model = tiny()
    prompt, mask = prompts()
    planner = DiffusionPlanner(model)
    opts = PlannerOptions(gen_length=16, steps=8, block_length=8)
    by_object = planner.generate(prompt, mask, opts)
    by_keywords = planner.generate(prompt, mask, gen_length=16, steps=8, block_length=8)
    assert torch.equal(by_object.tokens, by_keywords.tokens)
    assert torch.equal(planner.generate(prompt, mask, opts, steps=16).tokens, planner.generate(
        prompt, mask, gen_length=16, steps=16, block_length=8).tokens)  # fmt: skip
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stepz'\]"):
        planner.generate(prompt, mask, opts, stepz=4)
    with pytest.raises(TypeError, match="options must be a PlannerOptions"):
        planner.generate(prompt, mask, {"gen_length": 16})
    with pytest.raises(ValueError, match="multiple of block_length"):
        PlannerOptions(gen_length=16, block_length=5)


def test_a_schedule_object_drives_the_window_loop():
    """A Schedule given as ``schedule=`` is what the loop runs: FixedKSchedule(k=2) over blocks of 8
    commits what LLaDA's split of 8 masks over 4 steps commits, step for step."""
    model = tiny()
    prompt, mask = prompts()
    planner = DiffusionPlanner(model)
    fixed = planner.generate(prompt, mask, gen_length=16, schedule=FixedKSchedule(LP, 16, 8, k=2))
    llada = planner.generate(prompt, mask, gen_length=16, steps=8, block_length=8)
    assert torch.equal(fixed.tokens, llada.tokens)
    assert fixed.stats.steps == 8 and (fixed.stats.committed == 2).all()
    with pytest.raises(ValueError, match="the schedule starts at position 3"):
        planner.generate(prompt, mask, gen_length=16, schedule=FixedKSchedule(3, 16, 8, k=2))
    with pytest.raises(ValueError, match="the schedule generates 8 tokens"):
        planner.generate(prompt, mask, gen_length=16, schedule=FixedKSchedule(LP, 8, 8, k=2))


def test_from_pretrained_takes_the_constructor_ids(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, names="llada")
    planner = DiffusionPlanner.from_pretrained(
        tmp_path, mask_id=MASK - 1, eos_id=EOS + 1, eot_id=EOT, backend="reference"
    )
    assert (planner.mask_id, planner.eos_id, planner.eot_id) == (MASK - 1, EOS + 1, EOT)


def _fastdllm_prefix_cache(hf, prompt, *, gen_length, block_length, steps):
    """Fast-dLLM's ``generate_with_prefix_cache`` (low confidence, temperature 0, no padding) on an
    HF Llama run bidirectionally, written from its published algorithm: a full forward at each
    block start fills the cache and makes the block's first commit; the cache is cut to the prefix;
    every later step runs ``x[:, start:]`` (block and masked suffix) over that prefix cache."""
    B, Lp = prompt.shape
    L = Lp + gen_length
    x = torch.full((B, L), MASK)
    x[:, :Lp] = prompt
    per_block = steps // (gen_length // block_length)

    def forward(ids, start, cache):
        q = ids.shape[1]
        mask4d = torch.zeros(B, 1, q, L)  # every query sees every key
        pos = torch.arange(start, L).expand(B, -1)
        return hf(
            input_ids=ids, attention_mask=mask4d, position_ids=pos, past_key_values=cache, use_cache=True
        )

    def commit(logits, x_part, block_rows, n):
        masked = x_part == MASK
        masked[:, block_rows:] = False
        p = torch.softmax(logits.double(), -1)
        x0 = p.argmax(-1)
        conf = torch.where(masked, p.gather(-1, x0[..., None])[..., 0], -torch.inf)
        for b in range(B):
            idx = torch.topk(conf[b], int(n[b])).indices
            x_part[b, idx] = x0[b, idx]

    for start in range(Lp, L, block_length):
        stop = start + block_length
        table = reference_num_transfer(x[:, start:stop] == MASK, per_block)
        with torch.no_grad():
            out = forward(x, 0, None)
            commit(out.logits, x, stop, table[:, 0])  # x[:, :stop]: positions after the block never
            cache = out.past_key_values
            cache.crop(start - L)  # keep the prefix (a negative crop works across transformers versions)
            i = 1
            while (x[:, start:stop] == MASK).any():
                logits = forward(x[:, start:], start, cache).logits
                cache.crop(start - L)
                commit(logits, x[:, start:], block_length, table[:, i])
                i += 1
    return x


def test_prefix_cache_equals_fast_dllm_prefix_cache():
    """cache='prefix' commits what Fast-dLLM's prefix cache commits, token for token at T=0, on
    the same weights in HF's (independent) Llama implementation; 2 layers, so it is not exact."""
    model = tiny(layers=2, kv_heads=2)
    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_dict("llama"), attn_implementation="eager"))
    hf.load_state_dict({to_external_name(n, "hf"): t for n, t in model.state_dict().items()}, strict=False)
    hf.eval()
    prompt = torch.randint(0, V - 1, (2, LP), generator=torch.Generator().manual_seed(3))
    planner = DiffusionPlanner(model)
    for kw in (dict(gen_length=16, block_length=4, steps=16), dict(gen_length=16, block_length=8, steps=8)):
        want = _fastdllm_prefix_cache(hf, prompt, **kw)
        got = planner.generate(prompt, cache="prefix", **kw)
        assert torch.equal(got.tokens, want), kw
        assert not torch.equal(got.tokens, planner.generate(prompt, **kw).tokens)  # an approximation


def test_a_second_concurrent_generation_raises_instead_of_sharing_buffers():
    """The planner keeps one set of static buffers: a generation started while another runs (a
    stream being iterated, or another thread) is refused; afterwards the planner works again."""
    import threading

    model, (prompt, mask) = tiny(), prompts()
    planner = DiffusionPlanner(model)
    kw = dict(gen_length=16, block_length=8, steps=16)
    want = planner.generate(prompt, mask, **kw).tokens
    stream = planner.generate_stream(prompt, mask, **kw)
    next(stream)  # the stream holds the planner
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_raises(planner.generate, prompt, mask, **kw)))
    worker.start()
    worker.join()
    assert errors == ["DiffusionPlanner is already generating"]
    assert [b.index for b in stream] == [1]  # the stream itself was not disturbed
    assert torch.equal(planner.generate(prompt, mask, **kw).tokens, want)


def _raises(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as exc:
        return str(exc).split(" (")[0]
    return None


@pytest.mark.parametrize(
    "extra",
    [{}, {"cache": "prefix"}, {"cache": "dual"}, {"cache": "dual", "threshold": 0.5}, {"threshold": 0.7}],
)
def test_batch_invariance(extra):
    """At temperature 0 a row's tokens do not depend on what it is batched with or on its left
    padding (Fast-dLLM users report scores that change with the batch size)."""
    planner = DiffusionPlanner(tiny())
    ids = torch.randint(0, V - 1, (4, LP), generator=torch.Generator().manual_seed(5))
    kw = dict(gen_length=16, block_length=8, steps=16) | extra
    batched = planner.generate(ids, **kw).generated
    pads = torch.zeros(1, 3, dtype=torch.long)
    for b in range(4):
        alone = planner.generate(ids[b : b + 1], **kw).generated
        padded_ids = torch.cat([pads, ids[b : b + 1]], dim=1)
        padded_mask = torch.cat([pads, torch.ones(1, LP, dtype=torch.long)], dim=1)
        padded = planner.generate(padded_ids, padded_mask, **kw).generated
        assert torch.equal(alone[0], batched[b]) and torch.equal(padded[0], batched[b]), b
