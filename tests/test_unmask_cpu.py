"""``_C``'s CPU scoring pass of the fused ``unmask_step`` (``_cuda.unmask_scores``) and the op's
``cuda`` backend on CPU tensors.

The partials are compared with float64 logits (``hidden.double() @ lm_head.double().T``) and
torch's argmax rules; the op's commits and tokens with ``reference.unmask_step`` exactly (the
backend falls back to the reference when its margins cannot prove equality: ties, NaN)."""

import math

import pytest
import torch

from hybridkernels import _cuda, ops, reference
from hybridkernels.ops import _unmask as unmask_mod
from hybridkernels.ops import _unmask_cpu

pytestmark = pytest.mark.skipif(not _cuda.available(), reason=f"_C not importable: {_cuda.IMPORT_ERROR}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def exact_logits(h, w, banned=()):
    logits = h.double() @ w.double().T
    if banned:
        logits[:, list(banned)] = float("-inf")
    return logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("R", "V", "d"),
    [(1, 1, 1), (1, 7, 3), (3, 130, 16), (5, 1001, 33), (9, 517, 64), (16, 4099, 256), (40, 777, 47)],
)
def test_partials_match_float64_logits(R, V, d, dtype):
    g = torch.Generator().manual_seed(R * 1000 + V + d)
    h = torch.randn(R, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    banned = sorted({0, V // 2, V - 1}) if V > 3 else []
    am, top, second, s = _cuda.unmask_scores(h, w, banned)
    logits = exact_logits(h, w, banned)
    ref_top = logits.max(dim=1).values
    ref_second = logits.topk(min(2, V), dim=1).values[:, -1] if V > 1 else torch.full((R,), float("-inf"))
    bound = (d + 20) * 2.0**-24 * h.double().norm(dim=1) * w.double().norm(dim=1).max() + 1e-30
    clear = ref_top - ref_second > 2 * bound  # argmax decided in any float32 order
    assert torch.equal(am[clear], logits.argmax(dim=1)[clear])
    finite = torch.isfinite(ref_top)
    assert ((top.double() - ref_top).abs()[finite] <= bound[finite]).all()
    if V > 1 and len(banned) < V - 1:
        assert ((second.double() - ref_second).abs() <= bound).all()
    ref_sum = torch.exp(logits - ref_top[:, None]).sum(dim=1)
    torch.testing.assert_close(s[finite], ref_sum[finite], rtol=1e-5 + 2 * float(bound.max()), atol=0)


def test_strided_hidden_and_repeated_banned_ids():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 40, generator=g)[:, ::2]  # column stride 2
    w = torch.randn(300, 20, generator=g)
    am, top, *_ = _cuda.unmask_scores(h, w, [5, 5, 299, 0])
    logits = exact_logits(h, w, [0, 5, 299])
    assert torch.equal(am, logits.argmax(dim=1))
    torch.testing.assert_close(top.double(), logits.max(dim=1).values, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_first_index():
    g = torch.Generator().manual_seed(4)
    R, V, d = 5, 700, 24
    h = torch.randn(R, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.1
    w[[37, 301, 650]] = h[0] * 10  # three identical rows: the same logit in every row
    am, top, second, _ = _cuda.unmask_scores(h, w)
    assert int(am[0]) == 37
    assert float(top[0]) == float(second[0])  # the tie shows as a zero top-2 gap
    # Every logit -inf (all banned but one, that one -inf too via a banned list covering it): first id.
    am, top, _, s = _cuda.unmask_scores(h[:1], w[:3], [0, 1, 2])
    assert int(am[0]) == 0 and float(top[0]) == float("-inf") and torch.isnan(s[0])


def test_non_finite_hidden_follows_torch_argmax():
    g = torch.Generator().manual_seed(5)
    R, V, d = 4, 333, 17
    h = torch.randn(R, d, generator=g)
    w = torch.randn(V, d, generator=g)
    w[10, 3] = 0.0
    h[0, 2] = float("nan")  # every logit NaN: argmax the first id that is not banned
    h[1, 3] = float("inf")  # +-inf logits, NaN at id 10 (inf * 0)
    h[2, 5] = float("-inf")
    banned = [0, 1]
    am, top, second, s = _cuda.unmask_scores(h, w, banned)
    logits = h @ w.T  # with an inf in the row every order gives the same value
    logits[:, banned] = float("-inf")
    assert torch.equal(am, logits.argmax(dim=1))
    assert int(am[0]) == 2 and torch.isnan(top[0]) and torch.isnan(s[0])
    assert torch.isnan(s[1]) and torch.isnan(s[2])
    assert torch.isfinite(s[3])


def test_bad_inputs():
    h, w = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="lm_head is torch.float16"):
        _cuda.unmask_scores(h, w.half())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _cuda.unmask_scores(h.double(), w.double())
    with pytest.raises(ValueError, match="2-d"):
        _cuda.unmask_scores(h[0], w)
    with pytest.raises(ValueError, match="lm_head_shape"):
        _cuda.unmask_scores(h, torch.randn(10, 9))
    with pytest.raises(ValueError, match="banned"):
        _cuda.unmask_scores(h, w, [10])
    with pytest.raises(ValueError, match="every size"):
        _cuda.unmask_scores(h[:0], w)


def random_case(g, B, Lr, d, V, dtype, p_mask=0.6):
    L = Lr + 3
    x = torch.randint(0, V - 1, (B, L), generator=g)
    window = x[:, 2 : 2 + Lr]
    window[torch.rand(B, Lr, generator=g) < p_mask] = V - 1
    hidden = torch.randn(B, Lr, d, generator=g).to(dtype)
    lm_head = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    return x, hidden, lm_head


def run_both(x, **kwargs):
    ref = reference.unmask_step(x.clone(), **kwargs)
    out = ops.unmask_step(x.clone(), backend="cuda", **kwargs)
    assert torch.equal(out.x, ref.x)
    assert torch.equal(out.committed, ref.committed)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(torch.isfinite(out.confidence), torch.isfinite(ref.confidence))
    finite = torch.isfinite(ref.confidence)
    torch.testing.assert_close(out.confidence[finite], ref.confidence[finite], rtol=2e-3, atol=0)
    return ref, out


def _rule_args(rule, x, Lr, V, trial):
    """``num_transfer`` (1-3, capped at each row's masks in the window at 2) or a threshold."""
    if rule == "num_transfer":
        masked = (x[:, 2 : 2 + Lr] == V - 1).sum(dim=1)
        return {"num_transfer": torch.minimum(masked, torch.full((x.shape[0],), 1 + trial % 3))}
    return {"threshold": (0.0, 0.05, 0.5, 2.0)[trial % 4]}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("rule", ("num_transfer", "threshold"))
def test_op_commits_what_the_reference_commits(rule, dtype):
    g = torch.Generator().manual_seed(7 if rule == "threshold" else 8)
    for trial in range(12):
        B, Lr = 1 + trial % 3, 1 + (5 * trial) % 23
        d, V = (1, 2, 17, 32, 63)[trial % 5], (2, 40, 999, 2051)[trial % 4]
        x, hidden, lm_head = random_case(g, B, Lr, d, V, dtype)
        extra = _rule_args(rule, x, Lr, V, trial)
        run_both(
            x, mask_id=V - 1, hidden=hidden, lm_head=lm_head, start=2,
            banned_token_ids=[0] if V > 2 else [], deferred_token_ids=[1], **extra,
        )  # fmt: skip


def test_uncertain_steps_run_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(9)
    x, hidden, lm_head = random_case(g, 2, 6, 16, 50, torch.float32, p_mask=1.0)
    lm_head[20] = lm_head[3]  # every row ties ids 3 and 20: the margins cannot decide
    hidden[1, 2, 0] = float("nan")
    calls = []
    real = reference.unmask_step
    monkeypatch.setattr(unmask_mod.reference, "unmask_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(mask_id=49, hidden=hidden, lm_head=lm_head, start=2, num_transfer=2)
    assert _unmask_cpu.fused_cpu_unmask_step(
        x.clone(), hidden=hidden, lm_head=lm_head, mask_id=49, start=2, num_transfer=torch.full((2,), 2),
        threshold=None, banned_token_ids=(), deferred_token_ids=(),
    ) is None  # fmt: skip
    out = ops.unmask_step(x.clone(), backend="cuda", **kw)
    monkeypatch.undo()
    ref = reference.unmask_step(x.clone(), **{**kw, "num_transfer": torch.full((2,), 2)})
    assert calls and torch.equal(out.x, ref.x) and torch.equal(out.committed, ref.committed)
    assert torch.equal(out.confidence.isnan(), ref.confidence.isnan())


def test_a_near_tie_in_confidence_is_not_trusted():
    # Two rows with the same hidden state have bitwise equal partials, so their confidences tie:
    # the cut of num_transfer = 1 between them is left to the reference (lowest position wins).
    g = torch.Generator().manual_seed(10)
    x, hidden, lm_head = random_case(g, 1, 4, 8, 30, torch.float32, p_mask=1.0)
    hidden[0, 3] = hidden[0, 1]
    nt = torch.ones(1, dtype=torch.int64)
    args = dict(hidden=hidden, lm_head=lm_head, mask_id=29, start=2, threshold=None)
    hidden[0, 0] = hidden[0, 2] = hidden[0, 1] * 0.01  # flatter rows: rows 1 and 3 rank first
    res = _unmask_cpu.fused_cpu_unmask_step(
        x.clone(), num_transfer=nt, banned_token_ids=(), deferred_token_ids=(), **args
    )
    assert res is None
    run_both(x, hidden=hidden, lm_head=lm_head, mask_id=29, start=2, num_transfer=nt)


def _scores_on_three_threads(monkeypatch, h, w, banned):
    """``_unmask_cpu.scores`` with the vocabulary split over 3 threads (however small the work)."""
    monkeypatch.setattr(_unmask_cpu, "_MIN_SPLIT_WORK", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        return _unmask_cpu.scores(h, w, banned)
    finally:
        torch.set_num_threads(threads)


def test_vocabulary_split_over_threads_merges_like_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(7, 33, generator=g)
    w = torch.randn(1001, 33, generator=g)
    banned = [0, 400, 401, 1000]
    one = _cuda.unmask_scores(h, w, banned)
    am, top, second, s, finite, _ = _scores_on_three_threads(monkeypatch, h, w, banned)
    assert finite.all()
    assert torch.equal(am, one[0]) and torch.equal(top, one[1]) and torch.equal(second, one[2])
    torch.testing.assert_close(s, one[3], rtol=1e-6, atol=0)  # float32 exps, other running maxima


def test_backend_choice():
    x = torch.full((1, 4), 9)
    hidden, lm_head, logits = torch.randn(1, 4, 8), torch.randn(10, 8), torch.randn(1, 4, 10)

    def chosen(**kw):
        reason = unmask_mod._compiled_reason(
            x, kw.get("logits"), kw.get("hidden"), kw.get("lm_head"), kw["args"]
        )
        return unmask_mod.DISPATCH.choose(None, x.device, {"cuda": reason}, warn=False)

    def args(temperature=0.0, remasking="low_confidence"):
        return ops._checks.UnmaskArgs(9, 0, torch.ones(1), None, temperature, remasking, (), (), None)

    assert chosen(hidden=hidden, lm_head=lm_head, args=args()) == "cuda"
    assert chosen(logits=logits, args=args()) == "reference"
    assert chosen(hidden=hidden, lm_head=lm_head, args=args(temperature=1.0)) == "reference"
    assert chosen(hidden=hidden, lm_head=lm_head, args=args(remasking="entropy")) == "reference"
    with pytest.raises(ValueError, match="not logits"):
        ops.unmask_step(x.clone(), mask_id=9, logits=logits, num_transfer=1, backend="cuda")
    with pytest.raises(ValueError, match="temperature 0"):
        ops.unmask_step(
            x.clone(),
            mask_id=9,
            hidden=hidden,
            lm_head=lm_head,
            num_transfer=1,
            temperature=0.5,
            backend="cuda",
        )


# ---------------------------------------------------------------- the packed LM head (issue 19)
needs_packed = pytest.mark.skipif(
    not _cuda.available() or not _cuda._C.unmask_panel, reason="no packed path on this CPU (no AVX2)"
)


def packed_now(w):
    """``packed_lm_head(w)``, made now (it packs on a tensor version's second sighting)."""
    _unmask_cpu.packed_lm_head(w)
    packed = _unmask_cpu.packed_lm_head(w)
    assert packed is not None
    return packed


def packed_scores(h, w, banned=()):
    return _cuda.unmask_scores(h, w, banned, packed_now(w), _unmask_cpu.k_chunk(w.shape[1]))


def product_bound(h, w, terms):
    """``1.01 terms u sum_k |h_k w_vk|`` per row and id, float64 ``[R, V]``."""
    return 1.01 * terms * 2.0**-24 * (h.double().abs() @ w.double().abs().T) + 1e-30


@needs_packed
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize(
    ("R", "V", "d"),
    [(1, 1, 1), (2, 47, 3), (5, 49, 16), (8, 481, 17), (9, 1001, 64), (17, 4099, 33), (64, 530, 256),
     (70, 97, 100), (33, 960, 31), (10, 1000, 600), (3, 1500, 1030)],
)  # fmt: skip
def test_packed_partials_within_their_rounding_bound(R, V, d, dtype):
    g = torch.Generator().manual_seed(R * 7919 + V + d)
    h = torch.randn(R, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.3).to(dtype)
    # Banned ids at the edges of panels (48 ids) and tiles (192); d = 600, 1030: several k blocks.
    banned = sorted({t for t in (0, 47, 48, 191, 192, 193, 479, 480, V - 1) if t < V - 1})
    am, top, second, s = packed_scores(h, w, banned)
    logits = exact_logits(h, w, banned)
    bound = product_bound(h, w, _unmask_cpu.rounding_terms(d, packed=True))
    bound[:, banned] = 0
    ref = logits.topk(min(2, V), dim=1)
    # Every logit within its bound: the top within the largest bound, the top-2 too.
    worst = bound.max(dim=1).values
    assert ((top.double() - ref.values[:, 0]).abs() <= worst).all()
    if V - len(banned) >= 2:
        assert ((second.double() - ref.values[:, 1]).abs() <= worst).all()
    clear = ref.values[:, 0] - (ref.values[:, 1] if V > 1 else -math.inf) > 2 * worst
    assert torch.equal(am[clear], ref.indices[clear, 0])
    ref_sum = torch.exp(logits - ref.values[:, :1]).sum(dim=1)
    torch.testing.assert_close(s, ref_sum, rtol=1e-5 + 2 * float(worst.max()), atol=0)
    # The row-major path agrees wherever the margins decide.
    am_rows = _cuda.unmask_scores(h, w, banned)[0]
    assert torch.equal(am_rows[clear], am[clear])


def test_packed_rounding_bound_is_never_looser_than_the_row_major_one():
    assert _unmask_cpu.rounding_terms(256, packed=True) == 31
    assert _unmask_cpu.rounding_terms(4096, packed=True) == 127
    for d in range(1, 20000):
        assert _unmask_cpu.rounding_terms(d, packed=True) <= d // 16 + 21, d


@needs_packed
def test_packed_ties_across_panels_and_tiles_go_to_the_first_index():
    g = torch.Generator().manual_seed(12)
    R, V, d = 11, 1500, 40
    h = torch.randn(R, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.05
    w[[47, 48, 530, 1499]] = h[0] * 10  # ids in two panels of one tile, another tile, the last
    w[[960, 959]] = h[1] * 10  # across a tile edge (192 ids a tile), the later id first
    am, top, second, _ = packed_scores(h, w)
    assert int(am[0]) == 47 and float(top[0]) == float(second[0])
    assert int(am[1]) == 959 and float(top[1]) == float(second[1])
    # Banned: the tie moves to the next unbanned copy.
    am, *_ = packed_scores(h, w, [47, 48])
    assert int(am[0]) == 530


@needs_packed
def test_packed_non_finite_hidden_follows_torch_argmax():
    g = torch.Generator().manual_seed(13)
    R, V, d = 4, 533, 17
    h = torch.randn(R, d, generator=g)
    w = torch.randn(V, d, generator=g)
    w[100, 3] = 0.0
    h[0, 2] = float("nan")
    h[1, 3] = float("inf")  # +-inf logits, NaN at id 100 (inf * 0)
    h[2, 5] = float("-inf")
    banned = [0, 1, 48]
    am, top, second, s = packed_scores(h, w, banned)
    logits = h @ w.T
    logits[:, banned] = float("-inf")
    assert torch.equal(am, logits.argmax(dim=1))
    assert int(am[0]) == 2 and torch.isnan(top[0]) and torch.isnan(s[0]) and torch.isnan(second[0])
    assert torch.isnan(s[1]) and torch.isnan(s[2]) and torch.isfinite(s[3])


@needs_packed
def test_packed_copy_is_cached_per_version_and_never_stale():
    g = torch.Generator().manual_seed(14)
    h = torch.randn(6, 24, generator=g)
    w = torch.randn(100, 24, generator=g)
    assert _unmask_cpu.packed_lm_head(w) is None  # first sighting: scored row-major
    first = _unmask_cpu.packed_lm_head(w)
    assert first is not None and _unmask_cpu.packed_lm_head(w) is first
    assert torch.equal(first.transpose(1, 2).reshape(-1, 24)[:100], w)
    assert not first.transpose(1, 2).reshape(-1, 24)[100:].any()  # zero past V
    before = _unmask_cpu.scores(h, w, ())
    w[int(before[0][0])] *= -1  # in place: the cached copy is stale
    after = _unmask_cpu.scores(h, w, ())
    assert after[5] == _unmask_cpu.rounding_terms(24, packed=False)  # the new version: row-major
    logits = exact_logits(h, w)
    torch.testing.assert_close(after[1].double(), logits.max(dim=1).values, rtol=1e-5, atol=1e-5)
    again = _unmask_cpu.scores(h, w, ())  # packed anew
    assert again[5] == _unmask_cpu.rounding_terms(24, packed=True)
    assert torch.equal(again[0], after[0])
    assert _unmask_cpu.packed_lm_head(w) is not first


@needs_packed
def test_packed_copies_respect_the_memory_limit(monkeypatch):
    w = torch.randn(500, 16)
    monkeypatch.setattr(_unmask_cpu, "_PACK_LIMIT_BYTES", 500 * 16 * 4)  # 528 ids padded: too big
    assert _unmask_cpu.packed_lm_head(w) is None and _unmask_cpu.packed_lm_head(w) is None
    monkeypatch.setattr(_unmask_cpu, "_PACK_LIMIT_BYTES", 528 * 16 * 4)
    assert _unmask_cpu.packed_lm_head(w) is not None
    other = torch.randn(48, 16)
    _unmask_cpu.packed_lm_head(other)
    assert _unmask_cpu.packed_lm_head(other) is None  # the limit is for all copies together


@needs_packed
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_packed_vocabulary_split_over_threads_matches_one_pass(monkeypatch, dtype):
    g = torch.Generator().manual_seed(15)
    h = torch.randn(9, 33, generator=g).to(dtype)
    w = torch.randn(1001, 33, generator=g).to(dtype)
    banned = [0, 47, 48, 400, 1000]
    one = packed_scores(h, w, banned)
    am, top, second, s, finite, terms = _scores_on_three_threads(monkeypatch, h, w, banned)
    assert finite.all() and terms == _unmask_cpu.rounding_terms(33, packed=True)
    # Each logit is summed alike in every range: bitwise the same partials.
    assert torch.equal(am, one[0]) and torch.equal(top, one[1]) and torch.equal(second, one[2])
    torch.testing.assert_close(s, one[3], rtol=1e-6, atol=0)


@needs_packed
@pytest.mark.parametrize("rule", ("num_transfer", "threshold"))
def test_op_on_the_packed_lm_head_commits_what_the_reference_commits(rule):
    g = torch.Generator().manual_seed(16)
    for trial in range(8):
        B, Lr = 1 + trial % 3, (1, 9, 23, 70)[trial % 4]
        d, V = (3, 17, 64, 100)[trial % 4], (50, 481, 999, 2051)[trial % 4]
        x, hidden, lm_head = random_case(g, B, Lr, d, V, torch.float32)
        packed_now(lm_head)
        extra = _rule_args(rule, x, Lr, V, trial)
        run_both(
            x, mask_id=V - 1, hidden=hidden, lm_head=lm_head, start=2,
            banned_token_ids=[0, 47, 48], deferred_token_ids=[1], **extra,
        )  # fmt: skip


@needs_packed
def test_packed_bad_inputs():
    h, w = torch.randn(2, 8), torch.randn(50, 8)
    good = packed_now(w)
    with pytest.raises(ValueError, match="packed must have shape"):
        _cuda.unmask_scores(h, w, (), good[:1], 3)
    with pytest.raises(TypeError, match="contiguous float32"):
        _cuda.unmask_scores(h, w, (), good.double(), 3)
    with pytest.raises(TypeError, match="contiguous float32"):
        _cuda.unmask_scores(h, w, (), good.transpose(1, 2).contiguous().transpose(1, 2), 3)
    with pytest.raises(ValueError, match="k_chunk"):
        _cuda.unmask_scores(h, w, (), good, 0)


def test_inference_tensor_lm_head_is_scored_without_a_cache():
    # Inference tensors have no version counter: no packed copy, the norm computed each call.
    g = torch.Generator().manual_seed(17)
    with torch.inference_mode():
        x, hidden, lm_head = random_case(g, 2, 7, 20, 300, torch.float32)
    assert _unmask_cpu.packed_lm_head(lm_head) is None and _unmask_cpu.packed_lm_head(lm_head) is None
    expected = float(lm_head.double().norm(dim=1).max())
    assert _unmask_cpu.lm_head_max_norm(lm_head) == pytest.approx(expected, rel=1e-12)
    run_both(x, mask_id=299, hidden=hidden, lm_head=lm_head, start=2, num_transfer=torch.tensor([2, 1]))


def test_no_packed_copy_where_the_cpu_has_no_packed_path(monkeypatch):
    h, w = torch.randn(3, 8), torch.randn(60, 8)
    packed = torch.zeros(2, 8, 48)
    monkeypatch.setattr(_cuda._C, "unmask_panel", 0)
    assert _unmask_cpu.packed_lm_head(w) is None and _unmask_cpu.packed_lm_head(w) is None
    assert _unmask_cpu.scores(h, w, ())[5] == _unmask_cpu.rounding_terms(8, packed=False)
    with pytest.raises(ValueError, match="no packed path"):
        _cuda.unmask_scores(h, w, (), packed, 3)
