"""Issue 16 §2: inputs that failed late or were accepted and wrong: meta tensors in the ops that
read values (``kv_append``, ``decode_attention``, ``unmask_step``), NaN / inf ``prefix_embeds``
and attention_mask values other than 0/1 in ``ARExecutor.generate`` (the planner rejects them)."""

import pytest
import torch

from hybridkernels import _cuda, ops
from hybridkernels.models import ARExecutor, Transformer, TransformerConfig

META = torch.device("meta")


@pytest.mark.parametrize("skip", [False, True], ids=["value-checks", "no-value-checks"])
def test_kv_append_refuses_meta_tensors(skip):
    kc, vc = torch.empty(2, 8, 2, 16, device=META), torch.empty(2, 8, 2, 16, device=META)
    kn, vn = torch.empty(2, 1, 2, 16, device=META), torch.empty(2, 1, 2, 16, device=META)
    pos = torch.zeros(2, dtype=torch.int64, device=META)
    with pytest.raises(ValueError, match="kv_append: k_cache is on meta"):
        if skip:
            with ops.skip_value_checks():
                ops.kv_append(kc, vc, kn, vn, pos)
        else:
            ops.kv_append(kc, vc, kn, vn, pos)


def test_decode_attention_refuses_meta_tensors():
    q = torch.empty(2, 4, 16, device=META)
    kc = torch.empty(2, 8, 2, 16, device=META)
    lens = torch.ones(2, dtype=torch.int32, device=META)
    with pytest.raises(ValueError, match="decode_attention: q is on meta"):
        ops.decode_attention(q, kc, kc, lens)


@pytest.mark.parametrize("rule", [{"num_transfer": 1}, {"threshold": 0.5}])
def test_unmask_step_refuses_meta_tensors(rule):
    x = torch.zeros(2, 6, dtype=torch.int64, device=META)
    logits = torch.empty(2, 6, 11, device=META)
    with pytest.raises(ValueError, match="unmask_step: x is on meta"):
        ops.unmask_step(x, mask_id=3, logits=logits, **rule)


@pytest.fixture(scope="module")
def executor():
    config = TransformerConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )
    torch.manual_seed(0)
    return ARExecutor(Transformer(config))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_executor_refuses_non_finite_prefix_embeds(executor, bad):
    prefix = torch.randn(2, 3, 32)
    prefix[1, 2, 5] = bad
    with pytest.raises(ValueError, match="prefix_embeds.*(NaN|inf)"):
        executor.generate(torch.ones(2, 4, dtype=torch.long), prefix_embeds=prefix, max_new_tokens=2)
    with pytest.raises(ValueError, match="prefix_embeds.*(NaN|inf)"):
        executor.generate(prefix_embeds=prefix, max_new_tokens=2)


@pytest.mark.parametrize("value", [2, -1, 7])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_executor_refuses_attention_mask_values_other_than_0_1(executor, value, dtype):
    if value < 0 and dtype == torch.uint8:
        pytest.skip("uint8 has no negative values")
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=dtype)
    mask[0, 1] = value
    with pytest.raises(ValueError, match="attention_mask must hold 0/1"):
        executor.generate(ids, mask, max_new_tokens=2)


def test_executor_still_takes_0_1_and_bool_masks(executor):
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    a = executor.generate(ids, mask, max_new_tokens=2).tokens
    b = executor.generate(ids, mask.bool(), max_new_tokens=2).tokens
    assert torch.equal(a, b)


def test_executor_refuses_meta_inputs(executor):
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids is on meta"):
        executor.generate(ids.to(META), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        executor.generate(ids, torch.ones(2, 4, dtype=torch.long, device=META), max_new_tokens=2)
    with pytest.raises(ValueError, match="prefix_embeds is on meta"):
        executor.generate(ids, prefix_embeds=torch.empty(2, 3, 32, device=META), max_new_tokens=2)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_kv_append_refuses_self_overlapping_caches(backend, which):
    if backend == "cuda" and not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    caches = {"k_cache": torch.zeros(2, 8, 2, 16), "v_cache": torch.zeros(2, 8, 2, 16)}
    caches[which] = torch.zeros(1, 8, 2, 16).expand(2, 8, 2, 16)  # both rows one memory
    new = torch.randn(2, 1, 2, 16)
    with pytest.raises(ValueError, match=rf"kv_append: {which} .* share memory .*expand"):
        ops.kv_append(caches["k_cache"], caches["v_cache"], new, new, torch.tensor([0, 3]), backend=backend)


def test_kv_append_takes_caches_sliced_with_gaps():
    wide = torch.zeros(2, 8, 5, 16)
    kc, vc = wide[:, :, 0:2], wide[:, :, 3:5]  # k and v of a fused [B, L, 2H+1, D] buffer
    new = torch.randn(2, 1, 2, 16)
    ops.kv_append(kc, vc, new, new + 1, torch.tensor([0, 3]), backend="reference")
    assert torch.equal(kc[0, 0], new[0, 0]) and torch.equal(vc[1, 3], new[1, 0] + 1)
    assert wide[:, :, 2].abs().sum() == 0


def test_unmask_step_refuses_self_overlapping_x():
    x = torch.full((1, 6), 7).expand(3, 6)
    with pytest.raises(ValueError, match=r"unmask_step: x .* share memory"):
        ops.unmask_step(x, logits=torch.randn(3, 6, 8), mask_id=7, num_transfer=1)
