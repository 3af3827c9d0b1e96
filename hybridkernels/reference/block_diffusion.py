"""The naive block-diffusion sampler (SDAR, Fast-dLLM v2): the spec of
:class:`~hybridkernels.models.BlockDiffusionPlanner`.

Every denoising step runs the model over the **whole** sequence (prompt, finished blocks, the
current block, the masked blocks after it) with the block-causal mask (``block_causal=b``: causal
across blocks of ``b`` tokens counted from position 0, bidirectional inside one), and reads the
rows of the current block. Because a block sees nothing after it, this is what the cached sampler
computes with its exact K/V cache: the two must agree token for token at temperature 0.

The samplers, as published (JetAstra/SDAR ``generate.py``; NVlabs/Fast-dLLM ``v2/``
``generation_functions.py`` ``batch_sample``):

* Blocks are absolute: block ``i`` is positions ``[i * b, (i + 1) * b)``. The prompt fills the
  first blocks; its tail shares the first generated block (unmasked, never committed). Position
  ids are ``0 .. L - 1`` per row: a batch is front-aligned (Fast-dLLM v2's right padding with
  masks), so every row runs exactly as it would alone.
* SDAR (``family="sdar"``): logits at position ``p`` predict ``p``. Each block runs ``steps``
  denoising steps; step ``s`` commits ``k_s`` tokens, SDAR's ``get_num_transfer_tokens(b, steps)``
  (``b // steps``, the first ``b % steps`` steps one more). ``commit="topk"`` is its
  ``low_confidence_static`` (the ``k_s`` most confident masked positions), ``"threshold"`` its
  ``low_confidence_dynamic`` (every masked position with confidence ``> threshold`` when there are
  at least ``k_s`` of them, else the ``k_s`` most confident).
* Fast-dLLM v2 (``family="fast_dllm_v2"``): logits are shifted (position ``p`` is predicted by the
  hidden state at ``p - 1``, its "token shift"). The first token of every block is decoded like an
  AR model's, by argmax at the last position of the finished block before it (or of the
  prefill). The block is denoised one sub-block of ``sub_block`` tokens at a time; each step
  commits, inside the sub-block, every masked position with confidence ``> threshold`` and the
  most confident one (``commit="threshold"``), or the ``k`` most confident (``commit="topk"``, our
  addition: ``k = 1`` is its ``threshold >= 1``).
* Confidence: ``softmax(logits)`` at the candidate, the argmax (temperature 0). A row is done
  after the block in which a stop token appears in its generation; the rest of its generation is
  ``pad_id``. The run ends when every row is done or its generation is full.

Deliberate differences from the published code (none arises in the peers' default settings):

* ``k_s`` is capped at the masked positions left (SDAR's ``topk`` over a block with fewer masks
  than ``k_s`` overwrites committed or prompt tokens with fresh predictions).
* ``mask_id`` is never a candidate (a committed mask would leave the block unfinished).
* The candidate ranking breaks ties by the lowest position (``torch.topk`` leaves them unspecified).
* Fast-dLLM v2 with a prompt of exactly ``b`` tokens: the peer skips the prefill and decodes the
  next block attending to itself only; here the prompt is prefilled like any other length.
* A stop token decoded as a block's first (AR) token ends the row too (the peer only checks
  denoised commits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import bidirectional_attention
from .unmask import rank_and_commit

FAMILIES = ("sdar", "fast_dllm_v2")
COMMITS = ("threshold", "topk")


@dataclass
class BlockDiffusionResult:
    """tokens: int64 ``[B, Lp + gen_length]``: the prompt as given (left-padded), then each row's
    first ``gen_length`` generated tokens. hidden: ``[B, gen_length, d]`` final hidden states (after
    the final norm) of those positions in the finished sequence. forward_passes: model calls;
    steps: denoising steps (commits of the AR first token not counted); seconds: wall time."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    forward_passes: int
    steps: int
    seconds: float


def sdar_num_transfer_tokens(block_length: int, steps: int) -> list[int]:
    """SDAR's split of a block over its steps: ``block_length // steps`` per step, the first
    ``block_length % steps`` steps one more."""
    base, rem = divmod(block_length, steps)
    return [base + (s < rem) for s in range(steps)]


class _FullBlockCausal:
    """``KVCacheHook`` of the naive loop: every layer attends over the call's own tokens with the
    block-causal mask (no cache)."""

    def __init__(self, block: int, attention: Callable):
        self.block, self.attention = block, attention

    def attend(self, layer, q, k, v):
        return self.attention(q, k, v, block_causal=self.block)


def front_align(prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Left-padded ``prompt_ids [B, Lp]`` -> (list of each row's real tokens, lengths ``[B]``)."""
    B, Lp = prompt_ids.shape
    if attention_mask is None:
        return [prompt_ids[b] for b in range(B)], [Lp] * B
    lengths = [int(n) for n in attention_mask.bool().sum(dim=1)]
    return [prompt_ids[b, Lp - n :] for b, n in enumerate(lengths)], lengths


@torch.no_grad()
def block_diffusion_generate(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    family: str,
    mask_id: int,
    gen_length: int,
    block_length: int,
    steps: int | None = None,
    sub_block: int | None = None,
    commit: str = "threshold",
    threshold: float = 0.9,
    k: int = 1,
    stop_token_ids: Sequence[int] = (),
    pad_id: int | None = None,
    attention: Callable = bidirectional_attention,
) -> BlockDiffusionResult:
    """Naive block-diffusion generation (see the module docstring for the rules).

    Args:
        model: a :class:`~hybridkernels.models.Transformer` (``forward(..., kv_cache=hook)`` and
            ``logits(hidden)``).
        prompt_ids: int64 ``[B, Lp]``, left-padded; ``attention_mask`` ``[B, Lp]`` (1 = token).
        family: ``"sdar"`` or ``"fast_dllm_v2"``.
        gen_length: a multiple of ``block_length``: each row generates its prompt's partial block
            and ``gen_length / block_length`` blocks after it; the first ``gen_length`` are returned.
        steps: SDAR's denoising steps per block (default ``block_length``).
        sub_block: Fast-dLLM v2's sub-block length, dividing ``block_length`` (default 8, or the
            block when it is shorter).
        commit, threshold, k: the rule (``k``: Fast-dLLM v2 ``topk`` only).
        stop_token_ids: a row stops after the block holding one of them.
        pad_id: the token written after a row stops (default: the first stop token, else 0).
        attention: ``attention(q, k, v, block_causal=b)`` (default: the reference op).
    """
    started = time.perf_counter()
    if family not in FAMILIES:
        raise ValueError(f"block_diffusion_generate: family must be one of {FAMILIES}, got {family!r}")
    if commit not in COMMITS:
        raise ValueError(f"block_diffusion_generate: commit must be one of {COMMITS}, got {commit!r}")
    b = block_length
    if gen_length % b:
        raise ValueError(
            f"block_diffusion_generate: gen_length ({gen_length}) must be a multiple of block_length ({b})"
        )
    steps = b if steps is None else steps
    sub = (min(8, b) if sub_block is None else sub_block) if family == "fast_dllm_v2" else b
    if b % sub:
        raise ValueError(f"block_diffusion_generate: sub_block ({sub}) must divide block_length ({b})")
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=prompt_ids.device)
    pad = (int(stop_token_ids[0]) if len(stop_token_ids) else 0) if pad_id is None else pad_id
    shift = family == "fast_dllm_v2"

    rows, lengths = front_align(prompt_ids, attention_mask)
    B, device = len(rows), prompt_ids.device
    ends = [-(-n // b) * b + gen_length for n in lengths]  # each row's generation ends here
    L = max(ends)
    x = torch.full((B, L), pad, dtype=torch.long, device=device)
    for r, (tokens, n) in enumerate(zip(rows, lengths, strict=True)):
        x[r, :n] = tokens
        x[r, n : ends[r]] = mask_id
    positions = torch.arange(L, device=device).expand(B, L)
    hook = _FullBlockCausal(b, attention)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    passes = total_steps = 0

    def forward() -> torch.Tensor:
        nonlocal passes
        passes += 1
        return model(x, position_ids=positions, kv_cache=hook, compute_logits=False).hidden

    def candidates(hidden_rows: torch.Tensor):
        logits = model.logits(hidden_rows).float()  # in the model's dtype, as the peers
        logits[..., mask_id] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        conf, tok = probs.max(dim=-1)
        return tok, conf

    first_block = min(lengths) // b
    for i in range(first_block, L // b):
        s0, s1 = i * b, (i + 1) * b
        if shift and s0 > 0:  # the block's first token, AR-style, from the sequence so far
            at_start = x[:, s0] == mask_id
            if at_start.any():
                tok, _ = candidates(forward()[:, s0 - 1])
                x[:, s0] = torch.where(at_start, tok, x[:, s0])
        if shift:
            windows = [(max(a, s0 + 1), a + sub) for a in range(s0, s1, sub)]
        else:
            windows = [(s0, s1)]
        for w0, w1 in windows:
            for step in range(sub if shift else steps):
                masked = x[:, w0:w1] == mask_id
                if not masked.any():
                    break
                hidden = forward()
                total_steps += 1
                tok, conf = candidates(hidden[:, w0 - 1 : w1 - 1] if shift else hidden[:, w0:w1])
                left = masked.sum(dim=1)
                if shift:
                    if commit == "threshold":
                        best = rank_and_commit(
                            conf, masked, num_transfer=torch.ones_like(left), threshold=None
                        )
                        chosen = ((conf > threshold) & masked) | best
                    else:
                        chosen = rank_and_commit(conf, masked, num_transfer=left.clamp(max=k), threshold=None)
                else:
                    k_s = torch.full_like(left, sdar_num_transfer_tokens(b, steps)[step]).clamp(max=left)
                    if commit == "threshold":
                        high = ((conf > threshold) & masked).sum(dim=1)
                        k_s = torch.where(high >= k_s, high, k_s)
                    chosen = rank_and_commit(conf, masked, num_transfer=k_s, threshold=None)
                window = x[:, w0:w1]
                window[chosen] = tok[chosen]
        # The block is finished: rows whose generation now holds a stop token are done.
        if len(stops):
            for r in range(B):
                if not done[r] and lengths[r] < s1 <= ends[r]:
                    done[r] = torch.isin(x[r, lengths[r] : s1], stops).any()
            for r in range(B):
                if done[r]:  # nothing is generated after a row's last block
                    x[r, max(s1, lengths[r]) : ends[r]] = pad
            if done.all():
                break
    hidden = forward()
    Lp = prompt_ids.shape[1]
    out = torch.empty(B, Lp + gen_length, dtype=torch.long, device=device)
    out[:, :Lp] = prompt_ids
    gen_hidden = hidden.new_empty(B, gen_length, hidden.shape[-1])
    for r, n in enumerate(lengths):
        out[r, Lp:] = x[r, n : n + gen_length]
        gen_hidden[r] = hidden[r, n : n + gen_length]
    return BlockDiffusionResult(out, gen_hidden, passes, total_steps, time.perf_counter() - started)
