"""The Triton ``unmask_step`` against the reference: logits and fused LM-head paths, both rules,
sampling (determinism, tiling independence, chi-square against softmax(logits / T)), bad input.

On the CPU the kernels run in the Triton interpreter, where every program costs milliseconds:
shapes stay tiny and ``split_len`` is set small so the merge of vocabulary splits is exercised.
"""

import pytest
import torch
from conftest import requires_cuda

from hybridkernels import ops, reference
from hybridkernels.triton import unmask as tri
from hybridkernels.triton.registry import all_compile_cases

FUSED_CONFIG = {"BLOCK_V": 32, "BLOCK_R": 16, "BLOCK_K": 16}


def make_tokens(B, L, V, mask_id, start, Lr, p_mask, generator):
    """Random tokens (never mask_id) with a fraction ``p_mask`` of the window masked."""
    x = torch.randint(0, V - 1, (B, L), generator=generator)
    x[x == mask_id] = (mask_id + 1) % V
    window = x[:, start : start + Lr]
    window[torch.rand(B, Lr, generator=generator) < p_mask] = mask_id
    return x


def run_both(x, device, *, split_len=None, config=None, atol=1e-7, **kwargs):
    """The reference and the Triton backend on copies of ``x``; checks they agree and returns both."""
    ref = reference.unmask_step(x.clone().to(device), **kwargs)
    out = tri.unmask_step(x.clone().to(device), split_len=split_len, config=config, **kwargs)
    assert_same(ref, out, atol)
    return ref, out


def assert_same(ref, out, atol=1e-7):
    assert torch.equal(out.x, ref.x)
    assert torch.equal(out.committed, ref.committed)
    assert torch.equal(out.tokens, ref.tokens)
    finite = torch.isfinite(ref.confidence)
    assert torch.equal(torch.isfinite(out.confidence), finite)
    assert torch.equal(out.confidence[~finite], ref.confidence[~finite])
    torch.testing.assert_close(out.confidence[finite], ref.confidence[finite], rtol=1e-5, atol=atol)


def num_masked(x, start, Lr, mask_id):
    return (x[:, start : start + Lr] == mask_id).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", ["num_transfer", "threshold"])
def test_logits_path_matches_reference(device, dtype, rule):
    g = torch.Generator().manual_seed(1)
    B, L, Lr, V, start, mask_id = 3, 12, 8, 80, 2, 79
    x = make_tokens(B, L, V, mask_id, start, Lr, 0.7, g)
    logits = (3 * torch.randn(B, Lr, V, generator=g)).to(dtype).to(device)
    if rule == "num_transfer":
        rule_args = {"num_transfer": (num_masked(x, start, Lr, mask_id) * 2 // 3).to(device)}
    else:
        rule_args = {"threshold": 0.3}
    ref, _ = run_both(x, device, split_len=32, logits=logits, mask_id=mask_id, start=start, **rule_args)
    assert ref.committed.any()


def test_logits_path_strided_views(device):
    """A window slice of bigger logits, and a view whose vocabulary stride is not 1."""
    g = torch.Generator().manual_seed(2)
    B, L, Lr, V, mask_id = 2, 10, 6, 70, 0
    x = make_tokens(B, L, V, mask_id, 3, Lr, 0.8, g)
    full = torch.randn(B, L, V, generator=g).to(device)
    nt = num_masked(x, 3, Lr, mask_id).clamp(max=2).to(device)
    run_both(x, device, split_len=32, logits=full[:, 3 : 3 + Lr], mask_id=mask_id, start=3, num_transfer=nt)
    vocab_major = torch.randn(B, V, Lr, generator=g).to(device).transpose(1, 2)  # stride(2) == Lr
    run_both(x, device, logits=vocab_major, mask_id=mask_id, start=3, num_transfer=nt)
    # x itself a view of a bigger token buffer: committed in place there.
    buffer = torch.zeros(B, L + 5, dtype=torch.long, device=device)
    buffer[:, 2 : 2 + L] = x.to(device)
    ref = reference.unmask_step(
        x.clone().to(device), logits=vocab_major, mask_id=mask_id, start=3, num_transfer=nt
    )
    tri.unmask_step(buffer[:, 2 : 2 + L], logits=vocab_major, mask_id=mask_id, start=3, num_transfer=nt)
    assert (
        torch.equal(buffer[:, 2 : 2 + L], ref.x)
        and (buffer[:, :2] == 0).all()
        and (buffer[:, -3:] == 0).all()
    )


def test_edge_cases(device):
    """A sequence with no mask left, num_transfer 0 and all remaining, thresholds none / all pass."""
    g = torch.Generator().manual_seed(3)
    B, L, V, mask_id = 4, 6, 40, 39
    x = make_tokens(B, L, V, mask_id, 0, L, 0.6, g)
    x[1] = 5  # nothing left to commit in sequence 1
    x[2, :] = mask_id
    logits = torch.randn(B, L, V, generator=g).to(device)
    left = num_masked(x, 0, L, mask_id)
    nt = torch.stack([left[0], torch.tensor(0), left[2], torch.tensor(0)]).to(device)
    ref, out = run_both(x, device, logits=logits, mask_id=mask_id, num_transfer=nt)
    assert out.committed.sum(dim=1).tolist() == nt.tolist()
    assert torch.equal(out.x[1].cpu(), x[1]) and torch.isinf(out.confidence[1]).all()

    _, out = run_both(x, device, logits=logits, mask_id=mask_id, threshold=1.5)  # nothing passes
    assert out.committed.sum(dim=1).tolist() == [int(n > 0) for n in left]
    _, out = run_both(x, device, logits=logits, mask_id=mask_id, threshold=0.0)  # everything passes
    assert out.committed.sum(dim=1).tolist() == left.tolist()


def test_ties_go_to_lowest_position_and_first_vocab_index(device):
    B, Lr, V, mask_id = 2, 8, 96, 95
    x = torch.full((B, Lr), mask_id)
    logits = torch.zeros(B, Lr, V)
    logits[:, :, 70] = 4.0  # the max twice, in different vocabulary splits: torch.argmax takes 7
    logits[:, :, 7] = 4.0
    logits[:, :, 3] = 1.0  # every row identical: equal confidences, lowest positions win
    logits = logits.to(device)
    _, out = run_both(
        x, device, split_len=32, logits=logits, mask_id=mask_id, num_transfer=torch.tensor([3, 5]).to(device)
    )
    assert (out.tokens == 7).all()
    assert out.committed[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert out.committed[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_banned_and_deferred_tokens(device):
    g = torch.Generator().manual_seed(4)
    B, Lr, V, mask_id = 2, 8, 64, 63
    x = torch.full((B, Lr), mask_id)
    logits = torch.randn(B, Lr, V, generator=g)
    logits[0, :, 10] = 9.0  # banned: would be every row's argmax
    logits[1, :4, 20] = 9.0  # deferred: rank last although most confident
    logits = logits.to(device)
    nt = torch.tensor([2, 5]).to(device)
    _, out = run_both(
        x, device, split_len=32, logits=logits, mask_id=mask_id, num_transfer=nt,
        banned_token_ids=(10, 11), deferred_token_ids=(20,),
    )  # fmt: skip
    assert not (out.tokens == 10).any()
    assert torch.isinf(out.confidence[1, :4]).all()
    assert out.committed[1].nonzero().flatten().tolist() == [
        0,
        4,
        5,
        6,
        7,
    ]  # deferred rows last, lowest first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", ["num_transfer", "threshold"])
def test_fused_lm_head_matches_reference(device, dtype, rule):
    """Masked rows of several sequences fill more than one row tile; hidden is a strided view."""
    g = torch.Generator().manual_seed(5)
    B, L, Lr, V, d, start, mask_id = 3, 14, 10, 72, 48, 3, 71
    x = make_tokens(B, L, V, mask_id, start, Lr, 0.75, g)
    hidden = torch.randn(B, L, d, generator=g).to(dtype).to(device)[:, start : start + Lr]
    lm_head = (torch.randn(V, d, generator=g) / 3).to(dtype).to(device)
    if rule == "num_transfer":
        rule_args = {"num_transfer": num_masked(x, start, Lr, mask_id).clamp(max=3).to(device)}
    else:
        rule_args = {"threshold": 0.2}
    cfg = FUSED_CONFIG if device.type == "cpu" else None
    ref, out = run_both(
        x, device, split_len=32, config=cfg, hidden=hidden, lm_head=lm_head, mask_id=mask_id, start=start,
        banned_token_ids=(4,), **rule_args,
    )  # fmt: skip
    assert num_masked(x, start, Lr, mask_id).sum() > FUSED_CONFIG["BLOCK_R"]
    assert ref.committed.any()


@requires_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_bf16_on_gpu(fused):
    g = torch.Generator().manual_seed(6)
    B, Lr, V, d, mask_id = 4, 32, 5000, 256, 4999
    x = make_tokens(B, Lr, V, mask_id, 0, Lr, 0.5, g)
    hidden = torch.randn(B, Lr, d, generator=g).bfloat16().cuda()
    lm_head = (torch.randn(V, d, generator=g) / 16).bfloat16().cuda()
    scores = {"hidden": hidden, "lm_head": lm_head} if fused else {"logits": (hidden @ lm_head.T)}
    nt = num_masked(x, 0, Lr, mask_id).clamp(max=4).cuda()
    run_both(x, torch.device("cuda"), mask_id=mask_id, num_transfer=nt, **scores)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() > 1), reason="needs 2 GPUs")
@pytest.mark.parametrize("fused", [False, True])
def test_runs_on_a_device_that_is_not_current(fused):
    """Triton launches on the current device: the wrapper must switch to the tensors' one."""
    g = torch.Generator().manual_seed(11)
    B, Lr, V, d, mask_id = 2, 32, 3000, 128, 0
    x = make_tokens(B, Lr, V, mask_id, 0, Lr, 0.6, g)
    hidden = torch.randn(B, Lr, d, generator=g).half().to("cuda:1")
    lm_head = (torch.randn(V, d, generator=g) / 8).half().to("cuda:1")
    scores = {"hidden": hidden, "lm_head": lm_head} if fused else {"logits": hidden @ lm_head.T}
    nt = num_masked(x, 0, Lr, mask_id).clamp(max=2).to("cuda:1")
    with torch.cuda.device(0):
        run_both(x, torch.device("cuda:1"), mask_id=mask_id, num_transfer=nt, **scores)


@requires_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_step_replays_in_a_cuda_graph(fused):
    """The step has no host sync (value checks are off while capturing): capture it, replay it."""
    g = torch.Generator().manual_seed(10)
    B, Lr, V, d, mask_id = 2, 32, 3000, 128, 0
    x0 = make_tokens(B, Lr, V, mask_id, 0, Lr, 0.6, g).cuda()
    hidden = torch.randn(B, Lr, d, generator=g).half().cuda()
    lm_head = (torch.randn(V, d, generator=g) / 8).half().cuda()
    scores = {"hidden": hidden, "lm_head": lm_head} if fused else {"logits": hidden @ lm_head.T}
    kw = dict(mask_id=mask_id, num_transfer=2, backend="triton", **scores)
    eager = ops.unmask_step(x0.clone(), **kw)  # also autotunes and compiles before the capture
    x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.unmask_step(x, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = ops.unmask_step(x, **kw)
    x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, eager.x) and torch.equal(res.committed, eager.committed)


def test_ops_dispatches_to_triton(device):
    g = torch.Generator().manual_seed(7)
    x = make_tokens(2, 6, 30, 29, 0, 6, 0.7, g).to(device)
    logits = torch.randn(2, 6, 30, generator=g).to(device)
    a = ops.unmask_step(x.clone(), logits=logits, mask_id=29, num_transfer=1, backend="reference")
    b = ops.unmask_step(x.clone(), logits=logits, mask_id=29, num_transfer=1, backend="triton")
    assert_same(a, b)


# ---------------------------------------------------------------------------------------------
# temperature > 0 and random remasking
# ---------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_independent_of_tiling(device):
    """Same seed -> same draws, whatever the vocabulary split / tile and in both paths (the noise of
    (row, token) is a function of the seed, the row and the token only)."""
    g = torch.Generator().manual_seed(8)
    B, Lr, V, d, mask_id = 2, 8, 96, 16, 0
    x = torch.full((B, Lr), mask_id)
    hidden = torch.randn(B, Lr, d, generator=g).to(device)
    lm_head = torch.randn(V, d, generator=g).to(device)
    logits = hidden @ lm_head.T
    common = dict(mask_id=mask_id, num_transfer=torch.tensor([2, 3]).to(device), temperature=1.3)

    def draw(seed, **kw):
        gen = torch.Generator(device).manual_seed(seed)
        return tri.unmask_step(x.clone().to(device), generator=gen, **common, **kw)

    a = draw(11, logits=logits, split_len=32, config={"BLOCK_V": 32} if device.type == "cpu" else None)
    b = draw(11, logits=logits, split_len=96, config={"BLOCK_V": 64} if device.type == "cpu" else None)
    c = draw(
        11,
        hidden=hidden,
        lm_head=lm_head,
        split_len=64,
        config=FUSED_CONFIG if device.type == "cpu" else None,
    )
    for other in (b, c):
        assert torch.equal(a.tokens, other.tokens) and torch.equal(a.committed, other.committed)
        torch.testing.assert_close(a.confidence, other.confidence, rtol=1e-5, atol=1e-7)
    assert not torch.equal(a.tokens, draw(12, logits=logits).tokens)
    # LLaDA's rule: the confidence is softmax(logits) at the sampled token; commits follow it.
    expected = torch.softmax(logits, dim=-1).gather(-1, a.tokens[..., None])[..., 0]
    torch.testing.assert_close(a.confidence, expected, rtol=1e-5, atol=1e-7)
    committable = torch.ones(B, Lr, dtype=torch.bool, device=device)
    assert torch.equal(
        a.committed,
        reference.rank_and_commit(
            a.confidence, committable, num_transfer=common["num_transfer"], threshold=None
        ),
    )
    # The op's seed= is deterministic too.
    kw = dict(logits=logits, mask_id=mask_id, num_transfer=2, temperature=0.8, backend="triton")
    r1 = ops.unmask_step(x.clone().to(device), seed=5, **kw)
    r2 = ops.unmask_step(x.clone().to(device), seed=5, **kw)
    assert torch.equal(r1.x, r2.x) and torch.equal(r1.tokens, r2.tokens)


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution: the regularized upper incomplete gamma."""
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )


def test_sampled_tokens_follow_softmax_over_temperature(device):
    """Chi-square goodness of fit of 2048 draws (6 categories, 5 dof) against softmax(logits / T):
    pass at p > 1e-3. The same draws must fail against softmax(logits) (T = 1): the test can fail."""
    assert abs(chi2_sf(11.0705, 5) - 0.05) < 1e-4  # the textbook critical value
    V, d, T = 6, 16, 0.6
    target = torch.tensor([1.2, 0.9, 0.5, 0.0, -0.4, -1.0])
    B, Lr = 32, 64
    hidden = torch.zeros(B, Lr, d)
    hidden[..., 0] = 1.0
    lm_head = torch.zeros(V, d)
    lm_head[:, 0] = target  # every row's logits are exactly `target`
    x = torch.full((B, Lr), 5)
    cfg = {"BLOCK_V": 16, "BLOCK_R": 128, "BLOCK_K": 16} if device.type == "cpu" else None
    out = tri.unmask_step(
        x.to(device), hidden=hidden.to(device), lm_head=lm_head.to(device), mask_id=5,
        num_transfer=torch.zeros(B, dtype=torch.long, device=device), temperature=T,
        generator=torch.Generator(device).manual_seed(2024), config=cfg,
    )  # fmt: skip
    counts = torch.bincount(out.tokens.flatten().cpu(), minlength=V).double()
    n = counts.sum()

    def p_value(probs):
        expected = n * probs.double()
        return chi2_sf(float(((counts - expected) ** 2 / expected).sum()), V - 1)

    assert p_value(torch.softmax(target / T, dim=0)) > 1e-3
    assert p_value(torch.softmax(target, dim=0)) < 1e-3


def test_random_remasking_ranks_by_uniform_draws(device):
    g = torch.Generator().manual_seed(9)
    B, Lr, V, mask_id = 2, 8, 50, 49
    x = make_tokens(B, Lr, V, mask_id, 0, Lr, 0.8, g)
    logits = torch.randn(B, Lr, V, generator=g).to(device)
    nt = num_masked(x, 0, Lr, mask_id).clamp(max=3).to(device)

    def run(seed):
        gen = torch.Generator(device).manual_seed(seed)
        return tri.unmask_step(
            x.clone().to(device),
            logits=logits,
            mask_id=mask_id,
            num_transfer=nt,
            remasking="random",
            generator=gen,
        )

    a, b = run(3), run(3)
    assert torch.equal(a.confidence, b.confidence) and torch.equal(a.x, b.x)
    committable = (x == mask_id).to(device)
    conf = a.confidence[committable]
    assert ((conf >= 0) & (conf < 1)).all() and conf.unique().numel() == conf.numel()
    assert torch.equal(a.tokens[committable], logits.argmax(-1)[committable])  # temperature 0
    assert torch.equal(
        a.committed, reference.rank_and_commit(a.confidence, committable, num_transfer=nt, threshold=None)
    )
    assert not torch.equal(a.confidence, run(4).confidence)


# ---------------------------------------------------------------------------------------------
# bad input and compile cases
# ---------------------------------------------------------------------------------------------


def test_bad_input_leaves_x_untouched():
    x = torch.full((2, 6), 9)
    logits = torch.randn(2, 6, 10)
    nt = torch.tensor([1, 1])
    call = dict(backend="triton")
    with pytest.raises(ValueError, match="mask_id = 10 is outside"):
        ops.unmask_step(x, logits=logits, mask_id=10, num_transfer=nt, **call)
    with pytest.raises(ValueError, match=r"num_transfer\[0\] = -1"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=torch.tensor([-1, 1]), **call)
    with pytest.raises(ValueError, match=r"num_transfer\[1\] = 7 but sequence 1 has 6 masked"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=torch.tensor([1, 7]), **call)
    with pytest.raises(ValueError, match="num_transfer = 7 is outside"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=7, **call)
    with pytest.raises(ValueError, match="exactly one of num_transfer and threshold"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, threshold=0.5, **call)
    with pytest.raises(ValueError, match="exactly one of num_transfer and threshold"):
        ops.unmask_step(x, logits=logits, mask_id=9, **call)
    with pytest.raises(ValueError, match=r"lm_head is \[V, 5\] but hidden's width is 4"):
        ops.unmask_step(
            x, hidden=torch.randn(2, 6, 4), lm_head=torch.randn(10, 5), mask_id=9, num_transfer=nt, **call
        )
    with pytest.raises(ValueError, match="banned_token_ids covers the whole vocabulary"):
        ops.unmask_step(x, logits=logits, mask_id=9, num_transfer=nt, banned_token_ids=range(10), **call)
    with pytest.raises(TypeError, match="lm_head has dtype"):
        ops.unmask_step(
            x,
            hidden=torch.randn(2, 6, 4).half(),
            lm_head=torch.randn(10, 4),
            mask_id=9,
            num_transfer=nt,
            **call,
        )
    assert torch.all(x == 9)


def test_compile_cases_cover_every_config_and_dtype():
    cases = [c for c in all_compile_cases() if c.name.startswith("unmask_")]
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    per_kernel = {
        k: [c for c in cases if c.kernel is k]
        for k in (tri._logits_partials_kernel, tri._lm_head_partials_kernel)
    }
    # every config x dtype at temperature 0, plus the sampling variant of each dtype's first config
    # and its margin / entropy variants
    assert len(per_kernel[tri._logits_partials_kernel]) == (len(tri.LOGITS_CONFIGS) + 3) * 3
    n_lm_head = sum(len(tri.lm_head_configs(dt)) + 3 for dt in (torch.float16, torch.bfloat16, torch.float32))
    assert len(per_kernel[tri._lm_head_partials_kernel]) == n_lm_head
    for c in per_kernel[tri._lm_head_partials_kernel]:
        assert (c.hopper_features == ("wgmma",)) == ("fp32" not in c.name)
        assert c.constexprs["BLOCK_V"] >= 64 and c.constexprs["BLOCK_R"] >= 16  # wgmma-sized tiles
    for c in cases:
        constexprs = {name for name, kind in c.signature.items() if kind == "constexpr"}
        assert constexprs == set(c.constexprs), c.name
        assert set(c.signature) == set(c.kernel.arg_names), c.name


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_num_transfer_views_are_read_by_their_strides(device, layout):
    # issue 16: the kernel read num_transfer[b] at b, ignoring the stride.
    g = torch.Generator().manual_seed(16)
    B, L, V, mask_id = 2, 8, 40, 39
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 1:7] = mask_id
    logits = torch.randn(B, 6, V, generator=g).to(device)
    if layout == "strided":
        num_transfer = torch.tensor([2, 99, 1, 99], device=device)[::2]
    else:
        num_transfer = torch.tensor([3], device=device).expand(B)
    ref = reference.unmask_step(
        x.clone().to(device), logits=logits, mask_id=mask_id, start=1, num_transfer=num_transfer.clone()
    )
    out = ops.unmask_step(
        x.clone().to(device),
        logits=logits,
        mask_id=mask_id,
        start=1,
        num_transfer=num_transfer,
        backend="triton",
    )
    assert_same(ref, out)
    assert out.committed.sum(dim=1).tolist() == num_transfer.tolist()


def _assert_same_with_nan(ref, out):
    assert torch.equal(out.committed, ref.committed)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.x, ref.x)
    assert torch.equal(out.confidence.isnan(), ref.confidence.isnan())
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=1e-5, atol=1e-7, equal_nan=True)


def _non_finite_logits(device, g):
    B, Lr, V = 2, 6, 150
    logits = torch.randn(B, Lr, V, generator=g)
    logits[0, 1, 7] = float("inf")  # two rows with +inf: confidence NaN, both "most confident"
    logits[0, 4, 100] = float("inf")
    logits[0, 4, 120] = float("inf")
    logits[1, 0, 3] = float("nan")  # NaN rows: candidate = first NaN (torch.argmax)
    logits[1, 2, 130] = float("nan")
    logits[1, 2, 20] = float("inf")  # +inf before a NaN: the NaN still wins
    logits[1, 5, 60:] = float("nan")
    logits[1, 3] = float("-inf")  # all -inf: confidence NaN too
    return logits.to(device)


@pytest.mark.parametrize("rule", [{"num_transfer": 1}, {"num_transfer": 3}, {"threshold": 0.5}])
@pytest.mark.parametrize("split_len", [None, 64])
def test_non_finite_logits_commit_what_the_reference_commits(device, rule, split_len):
    # issue 16: +inf / NaN logits committed more positions than asked, or other ones.
    g = torch.Generator().manual_seed(5)
    B, L, V, mask_id = 2, 8, 150, 149
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 1:7] = mask_id
    logits = _non_finite_logits(device, g)
    kwargs = dict(logits=logits, mask_id=mask_id, start=1)
    if "num_transfer" in rule:
        kwargs["num_transfer"] = torch.full((B,), rule["num_transfer"], device=device)
    else:
        kwargs["threshold"] = rule["threshold"]
    ref = reference.unmask_step(x.clone().to(device), **kwargs)
    out = tri.unmask_step(x.clone().to(device), split_len=split_len, **kwargs)
    _assert_same_with_nan(ref, out)
    if "num_transfer" in rule:
        assert out.committed.sum(dim=1).tolist() == [rule["num_transfer"]] * B


def test_non_finite_hidden_states_on_the_fused_path_match_the_reference(device):
    g = torch.Generator().manual_seed(6)
    B, L, Lr, V, d, mask_id = 2, 8, 6, 100, 16, 99
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 1:7] = mask_id
    hidden = torch.randn(B, Lr, d, generator=g)
    hidden[0, 2, 5] = float("nan")
    hidden[1, 4, 0] = float("inf")
    lm_head = torch.randn(V, d, generator=g)
    kwargs = dict(
        hidden=hidden.to(device), lm_head=lm_head.to(device), mask_id=mask_id, start=1,
        num_transfer=torch.tensor([1, 2], device=device),
    )  # fmt: skip
    ref = reference.unmask_step(x.clone().to(device), **kwargs)
    out = tri.unmask_step(x.clone().to(device), config=FUSED_CONFIG, split_len=32, **kwargs)
    assert torch.equal(out.committed, ref.committed)
    assert out.committed.sum(dim=1).tolist() == [1, 2]
    assert torch.equal(out.confidence.isnan(), ref.confidence.isnan())


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_non_finite_logits_when_sampling(device, remasking):
    g = torch.Generator().manual_seed(7)
    B, L, V, mask_id = 2, 8, 150, 149
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 1:7] = mask_id
    logits = _non_finite_logits(device, g)
    out = tri.unmask_step(
        x.clone().to(device), logits=logits, mask_id=mask_id, start=1, split_len=64, temperature=1.0,
        remasking=remasking, num_transfer=torch.tensor([2, 2], device=device),
        generator=torch.Generator(device).manual_seed(0),
    )  # fmt: skip
    assert out.committed.sum(dim=1).tolist() == [2, 2]
    assert out.tokens[1, 0] == 3 and out.tokens[1, 2] == 130 and out.tokens[1, 5] == 60  # first NaN
    nan_rows = torch.zeros(B, 6, dtype=torch.bool)
    nan_rows[0, [1, 4]] = nan_rows[1, [0, 2, 3, 5]] = True
    if remasking == "low_confidence":
        assert torch.equal(out.confidence.isnan().cpu(), nan_rows)
        assert out.committed[0, [1, 4]].all() and out.committed[1, [0, 2]].all()
    else:
        assert not out.confidence.isnan().any()


# ----------------------------------------------------------------------------------------------
# Dream's confidence rules: topk_margin (top-1 minus top-2 probability), entropy (sum p log p)
# ----------------------------------------------------------------------------------------------
DREAM_RULES = ["topk_margin", "entropy"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("remasking", DREAM_RULES)
@pytest.mark.parametrize("rule", ["num_transfer", "threshold"])
def test_dream_rules_logits_path_match_reference(device, dtype, remasking, rule):
    g = torch.Generator().manual_seed(11)
    B, L, Lr, V, start, mask_id = 3, 12, 9, 150, 2, 149
    x = make_tokens(B, L, V, mask_id, start, Lr, 0.7, g)
    logits = (2 * torch.randn(B, Lr, V, generator=g)).to(dtype).to(device)
    logits[0, 1, [5, 77]] = 9.0  # a tied maximum across splits: margin 0
    x[0, start + 1] = mask_id
    if rule == "num_transfer":
        rule_args = {"num_transfer": (num_masked(x, start, Lr, mask_id) // 2).to(device)}
    else:  # entropy is <= 0: a threshold between the rows' values
        rule_args = {"threshold": 0.2 if remasking == "topk_margin" else -3.5}
    ref, out = run_both(
        x, device, split_len=64, logits=logits, mask_id=mask_id, start=start, remasking=remasking,
        banned_token_ids=(3,), atol=2e-6, **rule_args,
    )  # fmt: skip
    assert ref.committed.any() and not ref.committed.all()
    if remasking == "topk_margin":
        assert out.confidence[0, 1] == 0
        assert (out.confidence[torch.isfinite(out.confidence)] >= 0).all()
    else:
        assert (out.confidence[torch.isfinite(out.confidence)] <= 0).all()


def test_dream_rules_definitions():
    """Margin and entropy as Dream writes them (sort; p * log(p + 1e-10)), up to its epsilon."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 5, 40, generator=g) * 2
    x = torch.full((2, 5), 39)
    p = torch.softmax(logits, dim=-1)
    srt = torch.sort(p, dim=-1, descending=True).values
    margin = reference.unmask_step(x.clone(), logits=logits, mask_id=39, num_transfer=torch.tensor([0, 0]),
                                   remasking="topk_margin").confidence  # fmt: skip
    torch.testing.assert_close(margin, srt[..., 0] - srt[..., 1])
    entropy = reference.unmask_step(x.clone(), logits=logits, mask_id=39, num_transfer=torch.tensor([0, 0]),
                                    remasking="entropy").confidence  # fmt: skip
    torch.testing.assert_close(entropy, (p * torch.log(p + 1e-10)).sum(-1), atol=40 * 1e-10 + 1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("remasking", DREAM_RULES)
def test_dream_rules_fused_path_match_reference(device, dtype, remasking):
    g = torch.Generator().manual_seed(13)
    B, L, Lr, V, d, start, mask_id = 2, 13, 11, 100, 40, 1, 99
    x = make_tokens(B, L, V, mask_id, start, Lr, 0.8, g)
    hidden = torch.randn(B, L, d, generator=g).to(dtype).to(device)[:, start : start + Lr]
    lm_head = (torch.randn(V, d, generator=g) / 2).to(dtype).to(device)
    cfg = FUSED_CONFIG if device.type == "cpu" else None
    ref, _ = run_both(
        x, device, split_len=32, config=cfg, hidden=hidden, lm_head=lm_head, mask_id=mask_id, start=start,
        remasking=remasking, atol=2e-6,
        num_transfer=num_masked(x, start, Lr, mask_id).clamp(max=4).to(device),
    )  # fmt: skip
    assert ref.committed.any()


@pytest.mark.parametrize("remasking", DREAM_RULES)
def test_dream_rules_non_finite_logits(device, remasking):
    g = torch.Generator().manual_seed(5)
    B, L, V, mask_id = 2, 8, 150, 149
    x = torch.randint(0, V - 1, (B, L), generator=g)
    x[:, 1:7] = mask_id
    kwargs = dict(logits=_non_finite_logits(device, g), mask_id=mask_id, start=1, remasking=remasking,
                  num_transfer=torch.tensor([3, 3], device=device))  # fmt: skip
    ref = reference.unmask_step(x.clone().to(device), **kwargs)
    out = tri.unmask_step(x.clone().to(device), split_len=64, **kwargs)
    _assert_same_with_nan(ref, out)
    assert out.committed.sum(dim=1).tolist() == [3, 3]


@pytest.mark.parametrize("remasking", DREAM_RULES)
def test_dream_rules_when_sampling_do_not_depend_on_the_draw_or_tiling(device, remasking):
    """At temperature > 0 the candidate is sampled, the margin / entropy are the row's."""
    g = torch.Generator().manual_seed(14)
    B, L, V, mask_id = 2, 10, 130, 129
    x = torch.full((B, L), mask_id)
    logits = torch.randn(B, L, V, generator=g).to(device)
    kwargs = dict(logits=logits, mask_id=mask_id, remasking=remasking, temperature=0.7,
                  num_transfer=torch.tensor([4, 4], device=device))  # fmt: skip
    greedy = reference.unmask_step(x.clone().to(device), **{**kwargs, "temperature": 0.0})
    runs = [
        tri.unmask_step(
            x.clone().to(device), split_len=split, generator=torch.Generator(device).manual_seed(3), **kwargs
        )
        for split in (64, 128)
    ]  # fmt: skip
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for out in runs:
        torch.testing.assert_close(out.confidence, greedy.confidence, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.committed, greedy.committed)


# ---------------------------------------------------------------------------------------------
# Vocabulary shards (tensor parallel): ranks simulated in one process
# ---------------------------------------------------------------------------------------------

SHARD_CASES = {
    "greedy": dict(num_transfer=torch.tensor([2, 3])),
    "threshold": dict(threshold=0.05),
    "sampled": dict(num_transfer=torch.tensor([2, 1]), temperature=0.8),
    "random": dict(num_transfer=torch.tensor([3, 1]), remasking="random", temperature=0.5),
    "topk_margin": dict(threshold=0.1, remasking="topk_margin"),
    "entropy": dict(num_transfer=torch.tensor([3, 2]), remasking="entropy", temperature=0.7),
    # a banned id in every shard but the first; a deferred id; two masked rows fewer
    "banned": dict(
        num_transfer=torch.tensor([1, 2]), banned_token_ids=(40, 70, 100), deferred_token_ids=(3,)
    ),
}


def shard_inputs(seed, V, dtype, device):
    g = torch.Generator().manual_seed(seed)
    B, L, Lr, d, start = 2, 11, 7, 16, 3
    x = make_tokens(B, L, V, V - 1, start, Lr, 0.8, g)
    hidden = torch.randn(B, Lr, d, generator=g).to(device, dtype)
    lm_head = torch.randn(V, d, generator=g).to(device, dtype)
    return x.to(device), hidden, lm_head, dict(mask_id=V - 1, start=start)


def run_sharded(x, hidden, lm_head, world, seed, split_len, config=FUSED_CONFIG, **kwargs):
    """Every simulated rank's kernel on its rows ``[r * chunk, (r + 1) * chunk)`` of the head, the
    partials "all-gathered" (stacked in rank order, each row's splits side by side) between the two
    stages. Returns every rank's result and every rank's own partials (what ``exchange`` got)."""
    V = lm_head.shape[0]
    chunk = -(-V // world)
    bounds = [(r * chunk, min(V, (r + 1) * chunk)) for r in range(world)]

    def step(r, exchange):
        v0, v1 = bounds[r]
        gen = torch.Generator(x.device).manual_seed(seed)  # the same state on every rank
        return tri.unmask_step(
            x.clone(), hidden=hidden, lm_head=lm_head[v0:v1], config=config, split_len=split_len,
            vocab_start=v0, vocab_size=V, vocab_chunk=chunk, exchange=exchange, generator=gen, **kwargs,
        )  # fmt: skip

    own = []
    for r in range(world):

        def grab(part_f, part_i, n_rows, n_splits):
            own.append((part_f.clone(), part_i.clone(), n_rows, n_splits))
            return part_f, part_i, n_splits

        step(r, grab)

    def gathered(part_f, part_i, n_rows, n_splits):
        assert all(o[2:] == (n_rows, n_splits) for o in own)  # every rank sized the same splits

        def cat(k):
            every = torch.stack([o[k].view(-1, n_rows, n_splits) for o in own], dim=2)
            return every.reshape(every.shape[0], -1).contiguous()  # [fields, row, rank, split]

        return cat(0), cat(1), world * n_splits

    return [step(r, gathered) for r in range(world)], own, bounds


@pytest.mark.parametrize("case", SHARD_CASES)
@pytest.mark.parametrize(
    "V, world, split_len, dtype",
    [
        (128, 2, 32, torch.float32),  # splits aligned with the single device's: bit-identical
        (130, 4, 32, torch.float16),  # shards of 33, 33, 33, 31 rows: partial and empty splits
        (100, 3, None, torch.float32),  # splits sized from vocab_chunk = 34
    ],
)
def test_vocabulary_shards_equal_the_single_device_kernel(device, case, V, world, split_len, dtype):
    """Global token ids on every shard: the same tokens, samples (the Philox counter row * V + id),
    ban list and commits as the kernel on the whole head, on every rank; the confidences bit-equal
    when the shards' splits are the single device's, else equal up to the sum's rounding."""
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in SHARD_CASES[case].items()}
    x, hidden, lm_head, common = shard_inputs(len(case) + V, V, dtype, device)
    kwargs.update(common)
    gen = torch.Generator(device).manual_seed(5)
    ref = tri.unmask_step(
        x.clone(),
        hidden=hidden,
        lm_head=lm_head,
        config=FUSED_CONFIG,
        split_len=split_len,
        generator=gen,
        **kwargs,
    )
    outs, _, _ = run_sharded(x, hidden, lm_head, world, 5, split_len, **kwargs)
    for out in outs:
        if V % (world * 32) == 0 and split_len == 32:
            _assert_same_with_nan(ref, out)
            assert torch.equal(torch.isnan(out.confidence), torch.isnan(ref.confidence))
            assert torch.equal(out.confidence.nan_to_num(), ref.confidence.nan_to_num())
        else:
            assert_same(ref, out)
    if case == "banned":
        assert not torch.isin(
            outs[0].tokens[outs[0].committed], torch.tensor([40, 70, 100], device=device)
        ).any()


@requires_cuda
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_vocabulary_shards_bf16_autotuned_on_gpu(temperature):
    """bf16 tensor-core dots, autotuned configs and the device's own split sizing on 4 uneven
    shards (4997 = 3 x 1250 + 1247 rows): the single-device kernel's tokens and samples."""
    g = torch.Generator().manual_seed(16)
    B, Lr, V, d, mask_id = 4, 32, 4997, 256, 4996
    x = make_tokens(B, Lr, V, mask_id, 0, Lr, 0.5, g).cuda()
    hidden = torch.randn(B, Lr, d, generator=g).bfloat16().cuda()
    lm_head = (torch.randn(V, d, generator=g) / 16).bfloat16().cuda()
    nt = num_masked(x, 0, Lr, mask_id).clamp(max=4)
    kwargs = dict(mask_id=mask_id, num_transfer=nt, temperature=temperature)
    gen = torch.Generator("cuda").manual_seed(2)
    ref = tri.unmask_step(x.clone(), hidden=hidden, lm_head=lm_head, generator=gen, **kwargs)
    outs, _, _ = run_sharded(x, hidden, lm_head, 4, 2, None, config=None, **kwargs)
    for out in outs:
        assert_same(ref, out, atol=1e-6)


def test_vocabulary_shard_partials_layout(device):
    """What ``exchange`` receives: the shard's float32 / int32 partials, column row * n_splits +
    split, with the max and the first argmax of the split's global token range (the reference's
    scores), a banned token never the argmax, and empty splits of a short last shard -inf."""
    V, world, split_len = 130, 4, 32
    x, hidden, lm_head, common = shard_inputs(3, V, torch.float32, device)
    banned = (34,)
    _, own, bounds = run_sharded(
        x,
        hidden,
        lm_head,
        world,
        0,
        split_len,
        num_transfer=torch.tensor([1, 1], device=device),
        banned_token_ids=banned,
        **common,
    )
    scores = (hidden.double() @ lm_head.double().T).float()  # [B, Lr, V]
    scores[..., list(banned)] = float("-inf")
    B, Lr = hidden.shape[:2]
    masked = (x[:, common["start"] : common["start"] + Lr] == common["mask_id"]).reshape(-1)
    for r, ((part_f, part_i, n_rows, n_splits), (v0, v1)) in enumerate(zip(own, bounds, strict=True)):
        assert (n_rows, n_splits) == (B * Lr, 2)  # from vocab_chunk = 33, the same on every rank
        assert part_f.dtype == torch.float32 and part_f.shape == (2, n_rows * n_splits)
        assert part_i.dtype == torch.int32 and part_i.shape == (1, n_rows * n_splits)
        m = part_f[0].view(n_rows, n_splits)[masked]
        arg = part_i[0].view(n_rows, n_splits)[masked]
        for split in range(n_splits):
            g0, g1 = v0 + split * split_len, min(v1, v0 + (split + 1) * split_len)
            if g0 >= g1:  # rank 3 holds 31 rows: its second split is empty
                assert r == 3 and torch.all(m[:, split] == float("-inf"))
                continue
            window = scores.reshape(n_rows, V)[masked, g0:g1]
            torch.testing.assert_close(m[:, split], window.max(dim=-1).values, rtol=1e-5, atol=1e-5)
            assert torch.equal(arg[:, split].long(), window.argmax(dim=-1) + g0)
    assert not torch.isin(torch.cat([o[1][0] for o in own]), torch.tensor(banned, device=device)).any()


def test_vocabulary_shard_bad_arguments_leave_x_untouched():
    x, hidden, lm_head, common = shard_inputs(1, 64, torch.float32, "cpu")
    x0 = x.clone()
    shard = lm_head[32:]
    call = dict(hidden=hidden, config=FUSED_CONFIG, split_len=32, num_transfer=torch.tensor([1, 1]), **common)
    logits = (hidden @ lm_head.T).contiguous()
    for kw in (dict(vocab_start=32), dict(vocab_size=64), dict(vocab_chunk=64), dict(exchange=lambda *a: a)):
        with pytest.raises(ValueError, match="need the fused path"):
            tri.unmask_step(x, logits=logits, num_transfer=torch.tensor([1, 1]), **common, **kw)
    with pytest.raises(
        ValueError, match=r"rows \[vocab_start, vocab_start \+ V_local\) = \[40, 72\) are outside"
    ):
        tri.unmask_step(x, lm_head=shard, vocab_start=40, vocab_size=64, **call)
    with pytest.raises(ValueError, match=r"rows .* = \[-1, 31\) are outside"):
        tri.unmask_step(x, lm_head=shard, vocab_start=-1, vocab_size=64, **call)
    with pytest.raises(ValueError, match="vocab_chunk = 16 is shorter than the shard's 32 rows"):
        tri.unmask_step(x, lm_head=shard, vocab_start=32, vocab_size=64, vocab_chunk=16, **call)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        tri.unmask_step(x, lm_head=shard, vocab_start=32.0, vocab_size=64, **call)
    with pytest.raises(TypeError, match="exchange must be callable"):
        tri.unmask_step(x, lm_head=shard, vocab_start=32, vocab_size=64, exchange=1, **call)
    shard_call = dict(lm_head=shard, vocab_start=32, vocab_size=64, vocab_chunk=32, **call)
    with pytest.raises(TypeError, match=r"exchange must return \(part_f, part_i, n_splits\)"):
        tri.unmask_step(x, exchange=lambda f, i, rows, n: (f, i), **shard_call)
    with pytest.raises(ValueError, match="exchange returned n_splits = 0"):
        tri.unmask_step(x, exchange=lambda f, i, rows, n: (f, i, 0), **shard_call)
    with pytest.raises(ValueError, match=r"exchange's part_f must be a contiguous \[2, 28\] tensor"):
        tri.unmask_step(x, exchange=lambda f, i, rows, n: (f, i, 2), **shard_call)
    with pytest.raises(TypeError, match="exchange's part_i must be a torch.int32 tensor"):
        tri.unmask_step(x, exchange=lambda f, i, rows, n: (f, i.long(), n), **shard_call)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
def test_vocab_parallel_triton_path_reads_the_shard_by_its_strides(device, layout):
    """``vocab_parallel_unmask_step(backend="triton")`` (one rank: the whole vocabulary) on an LM
    head stored column-major (``W.T.contiguous().T``) commits what the kernel commits on ``W``."""
    from hybridkernels.distributed import TPGroup, vocab_parallel_unmask_step

    x, hidden, lm_head, common = shard_inputs(9, 64, torch.float32, device)
    head = lm_head if layout == "contiguous" else lm_head.T.contiguous().T
    nt = torch.tensor([2, 1], device=device)
    ref = ops.unmask_step(
        x.clone(), hidden=hidden, lm_head=lm_head, num_transfer=nt, backend="triton", **common
    )
    out = vocab_parallel_unmask_step(
        x.clone(), hidden=hidden, lm_head_shard=head, vocab_start=0, vocab_size=64, group=TPGroup.single(),
        num_transfer=nt, backend="triton", **common,
    )  # fmt: skip
    assert_same(ref, out)
