"""The naive LLaDA sampler (reference.llada_generate) on hand-checked fake models whose logits
the test controls, and on tiny random transformers."""

import pytest
import torch

from hybridkernels.models import Transformer, TransformerConfig
from hybridkernels.reference import get_num_transfer_tokens, llada_generate
from hybridkernels.reference.llada import add_gumbel_noise

V, MASK, EOS, EOT = 16, 15, 12, 13


class Fake:
    """``model(x, attention_mask)`` whose logits are ``fn(x)``; records every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, attention_mask=None):
        self.calls.append((x.clone(), None if attention_mask is None else attention_mask.clone()))
        return self.fn(x)


def prefer(x, token_of, score_of):
    """Logits with ``score_of(j)`` on ``token_of(j)`` at column ``j`` (0 elsewhere)."""
    B, L = x.shape
    logits = torch.zeros(B, L, V)
    for j in range(L):
        logits[:, j, token_of(j)] = score_of(j)
    return logits


def masked_sets(model, start):
    """Per call, the generation columns still masked (row 0)."""
    return [set((x[0, start:] == MASK).nonzero().flatten().tolist()) for x, _ in model.calls]


def gen(model, prompt, **kw):
    kw = dict(mask_id=MASK, eos_id=EOS, eot_id=EOT) | kw
    return llada_generate(model, prompt, **kw)


def test_block_order_and_schedule():
    # Confidence grows with the column, so inside a block the last columns commit first; the
    # second block's columns are more confident still but must wait for the first block.
    model = Fake(lambda x: prefer(x, lambda j: j % 10, lambda j: 1.0 + 0.5 * j))
    prompt = torch.tensor([[1, 2, 3]])
    x, stats = gen(model, prompt, gen_length=8, block_length=4, steps=4, return_stats=True)
    assert x[0].tolist() == [1, 2, 3] + [j % 10 for j in range(3, 11)]
    # Generation columns 0-3 are block 0, 4-7 block 1; two commits per step.
    assert masked_sets(model, 3) == [set(range(8)), {0, 1, 4, 5, 6, 7}, {4, 5, 6, 7}, {4, 5}]
    assert stats.forward_passes == 4 and stats.committed[:, 0].tolist() == [2, 2, 2, 2]


def test_num_transfer_schedule_uneven():
    model = Fake(lambda x: prefer(x, lambda j: 4, lambda j: 2.0))
    x, stats = gen(model, torch.tensor([[1, 2]]), gen_length=10, block_length=5, steps=6, return_stats=True)
    # 5 masked per block over 3 steps: 2, 2, 1 (LLaDA's get_num_transfer_tokens).
    assert stats.committed[:, 0].tolist() == [2, 2, 1, 2, 2, 1]
    assert get_num_transfer_tokens(torch.ones(1, 5, dtype=torch.bool), 3).tolist() == [[2, 2, 1]]
    # Equal confidences everywhere: ties go to the lowest column.
    assert masked_sets(model, 2)[:3] == [set(range(10)), set(range(2, 10)), set(range(4, 10))]
    assert (x[0, 2:] == 4).all()


def test_steps_beyond_block_length_commit_nothing_extra():
    model = Fake(lambda x: prefer(x, lambda j: 3, lambda j: 1.0 + j))
    x, stats = gen(model, torch.tensor([[1]]), gen_length=2, block_length=2, steps=4, return_stats=True)
    assert stats.committed[:, 0].tolist() == [1, 1, 0, 0] and (x[0, 1:] == 3).all()


def test_cfg_combination_and_unconditional_batch():
    # cond favours token 1 (2.0 vs 1.5); uncond strongly disfavours token 2: with cfg_scale 1,
    # un + 2 (cond - un) gives token 1: 0 + 2 * 2 = 4, token 2: -3 + 2 * 4.5 = 6.
    def fn(x):
        logits = torch.zeros(x.shape[0], x.shape[1], V)
        uncond = x[:, 0] == MASK
        logits[:, :, 1] = 2.0 * ~uncond[:, None]
        logits[:, :, 2] = torch.where(uncond, -3.0, 1.5)[:, None]
        return logits

    prompt = torch.tensor([[5, 6], [7, 8]])
    mask = torch.tensor([[0, 1], [1, 1]])
    plain = gen(Fake(fn), prompt, attention_mask=mask, gen_length=4, block_length=4, steps=2)
    assert (plain[:, 2:] == 1).all()
    model = Fake(fn)
    x, stats = gen(
        model,
        prompt,
        attention_mask=mask,
        gen_length=4,
        block_length=4,
        steps=2,
        cfg_scale=1.0,
        return_stats=True,
    )
    assert (x[:, 2:] == 2).all() and stats.forward_passes == 2
    batch, batch_mask = model.calls[0]
    assert batch.shape == (4, 6)
    assert (batch[2:, :2] == MASK).all() and (batch[:2, :2] == prompt).all()
    assert batch_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1] * 6] * 2
    # cfg without an attention mask works too (LLaDA's published code fails there).
    assert (gen(Fake(fn), prompt, gen_length=4, block_length=4, steps=2, cfg_scale=1.0)[:, 2:] == 2).all()


def test_logits_eos_inf():
    def model(x):  # EOS strongly preferred, token 4 second
        return prefer(x, lambda j: EOS, lambda j: 9.0) + prefer(x, lambda j: 4, lambda j: 1.0)

    prompt = torch.tensor([[1, 2]])
    assert (gen(Fake(model), prompt, gen_length=4, block_length=4, steps=4)[0, 2:] == EOS).all()
    x = gen(Fake(model), prompt, gen_length=4, block_length=4, steps=4, logits_eos_inf=True)
    assert (x[0, 2:] == 4).all()


def test_confidence_eos_eot_inf_commits_eos_last():
    # Generation columns 0 and 1 predict EOS / EoT with high confidence, 2 and 3 token 4 with low.
    def fn(x):
        return prefer(x, lambda j: {2: EOS, 3: EOT}.get(j, 4), lambda j: 8.0 if j < 4 else 0.5)

    prompt = torch.tensor([[1, 2]])
    model = Fake(fn)
    x = gen(model, prompt, gen_length=4, block_length=4, steps=4)
    assert masked_sets(model, 2)[1:] == [{1, 2, 3}, {2, 3}, {3}]
    model = Fake(fn)
    y = gen(model, prompt, gen_length=4, block_length=4, steps=4, confidence_eos_eot_inf=True)
    assert masked_sets(model, 2)[1:] == [{0, 1, 3}, {0, 1}, {1}]
    assert x.tolist() == y.tolist() == [[1, 2, EOS, EOT, 4, 4]]


def test_random_remasking_replays_the_generator():
    model = Fake(lambda x: prefer(x, lambda j: 7, lambda j: 1.0 + j))
    prompt = torch.tensor([[1, 2, 3]])
    x = gen(
        model,
        prompt,
        gen_length=6,
        block_length=6,
        steps=6,
        remasking="random",
        generator=torch.Generator().manual_seed(5),
    )
    assert (x[0, 3:] == 7).all()
    # The order must follow uniform draws [B, L] per step from the same generator, not the logits.
    g = torch.Generator().manual_seed(5)
    masked, order = set(range(3, 9)), []
    for _ in range(6):
        draws = torch.rand((1, 9), generator=g)[0]
        col = max(masked, key=lambda c: draws[c].item())
        order.append(col)
        masked.remove(col)
    seen = [set((xc[0] == MASK).nonzero().flatten().tolist()) for xc, _ in model.calls]
    assert [sorted(seen[i] - (seen[i + 1] if i + 1 < 6 else set())) for i in range(6)] == [[c] for c in order]
    assert order != [8, 7, 6, 5, 4, 3]


def test_gumbel_rule():
    logits = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(0))
    assert add_gumbel_noise(logits, 0.0) is logits
    noisy = add_gumbel_noise(logits, 0.7, torch.Generator().manual_seed(1))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert noisy.dtype == torch.float64
    # exp(l) / (-log u)^T has the argmax of l / T + Gumbel(u): a sample of softmax(l / T).
    assert torch.equal(noisy.argmax(-1), (logits.double() / 0.7 - torch.log(-torch.log(u))).argmax(-1))


def test_temperature_sampling_is_seeded():
    def uniform(x):  # every token but [MASK] equally likely
        logits = torch.zeros(x.shape[0], x.shape[1], V)
        logits[..., MASK] = float("-inf")
        return logits

    model = Fake(uniform)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return gen(
            model, torch.tensor([[1]]), gen_length=8, block_length=8, steps=8, temperature=1.0, generator=g
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c) and a[0, 1:].unique().numel() > 2


def tiny_llada(seed=0):
    config = TransformerConfig.from_dict(
        {
            "d_model": 64,
            "n_heads": 2,
            "n_kv_heads": 1,
            "n_layers": 2,
            "mlp_hidden_size": 96,
            "vocab_size": 64,
            "mask_token_id": 63,
        }
    )
    model = Transformer(config, attention_backend="reference")
    model.reset_parameters(std=0.3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head_weight[63] = 0  # like a trained LLaDA, never predict [MASK]
    return model.eval()


def test_tiny_transformer_varied_tokens_and_padding_invariance():
    model = tiny_llada()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 60, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    prompt[1, :2] = 62  # pad token
    kw = dict(mask_id=63, gen_length=8, block_length=4, steps=4)
    x = llada_generate(model, prompt, mask, **kw)
    assert (x[:, 6:] != 63).all() and x[:, 6:].unique().numel() >= 6
    alone = llada_generate(model, prompt[1:, 2:], **kw)
    assert torch.equal(x[1, 2:], alone[0])

    # The model returns an object with .logits (like HF); a callable returning the tensor works too.
    def plain(x, attention_mask):
        return model(x, attention_mask).logits

    assert torch.equal(llada_generate(plain, prompt, mask, **kw), x)


def test_input_errors():
    model = Fake(lambda x: prefer(x, lambda j: 3, lambda j: 1.0))
    p = torch.tensor([[1, 2]])
    cases = [
        (dict(gen_length=6, block_length=4), "multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
        (dict(prompt=torch.tensor([[1, MASK]])), r"prompt\[0, 1\] is the mask token"),
        (dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask must have the prompt's shape"),
        (dict(attention_mask=torch.tensor([[0, 0]])), "row 0 is empty"),
        (dict(attention_mask=torch.tensor([[1, 0]])), "left padding"),
        (dict(attention_mask=torch.tensor([[2, 1]])), "0/1"),
        (dict(remasking="top_p"), "remasking"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(prompt=torch.tensor([1, 2])), r"prompt must be a \[B, L\] tensor"),
        (dict(mask_id=99), "outside the vocabulary"),
    ]
    for kw, match in cases:
        args = dict(prompt=p, gen_length=4, block_length=4, steps=2) | kw
        with pytest.raises(ValueError, match=match):
            gen(model, args.pop("prompt"), **args)
    with pytest.raises(TypeError, match="integer token ids"):
        gen(model, p.float(), gen_length=4, block_length=4, steps=2)
    with pytest.raises(ValueError, match="model must return logits"):
        gen(Fake(lambda x: torch.zeros(1, V)), p, gen_length=4, block_length=4, steps=2)
