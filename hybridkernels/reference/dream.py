"""The naive Dream samplers, re-implemented from the published code (the spec of the Dream planner).

* :func:`dream_generate`: Dream's ``diffusion_generate`` / ``_sample`` (HKUNLP/Dream
  ``generation_utils.py``, as vendored in NVlabs/Fast-dLLM ``dream/model/generation_utils.py``):
  no cache, the whole generation denoised at once over Dream's timestep schedule.
* :func:`dream_block_generate`: Fast-dLLM's Dream block sampler
  (``dream/model/generation_utils_block.py``): block by block, each block started by a full
  forward that commits the block's first position, then cached steps (prefix or dual K/V cache)
  committing by confidence threshold or over the block's timestep schedule.

Dream is initialised from an autoregressive model: the token at position ``i`` is predicted by the
model's output at ``i - 1`` (``logits = cat([logits[:, :1], logits[:, :-1]])``).

The model is a callable ``model(x, attention_mask=mask)`` returning logits ``[B, L, V]`` (or an
object with ``.logits``) where ``mask`` is None or ``[B, L]`` 0/1 (1 = real token; left padding;
positions ``cumsum(mask) - 1`` as Dream's ``tok_idx``, pads' positions do not matter). For the
cached sampler it also takes ``model(x_part, attention_mask=mask, cache=(start, stop))``: the
logits ``[B, stop - start, V]`` of the tokens ``x_part = x[:, start:stop]`` whose keys/values
replace positions ``[start, stop)`` of the cache filled by the last full call, attending to every
cached position (the dual cache: ``stop`` < L) or to the prefix ``[0, start)`` and themselves
(the prefix cache: ``stop == L``). ``mask`` is always the full ``[B, L]`` one.

Where this deliberately differs from the published code (no-ops in their common use):

* Logits are cast to float32 (Dream keeps the model's dtype, bf16 for Dream-7B).
* Top-k over the confidences breaks ties by the lowest index (``torch.topk`` leaves ties
  unspecified; they only happen between equal confidences).
* Random draws take an optional ``generator`` (None: torch's global one, as Dream).
* ``dream_block_generate`` ranks with the given ``alg``; Fast-dLLM's block sampler always ranks by
  negative entropy (``neg_entropy=True`` whatever ``alg``), so the two agree for ``alg="entropy"``
  and with a ``threshold`` (Fast-dLLM's ``alg="confidence_threshold"``, max-probability
  confidence). It also runs batches > 1 with a threshold (Fast-dLLM's commits only row 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .llada import check_token_ids

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# Dream-v0-*-7B's special tokens: <|mask|>, <|endoftext|> (pad, bos and eos).
DREAM_MASK_ID = 151666
DREAM_PAD_ID = 151643
ENTROPY_EPS = 1e-10


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: tokens past cumulative probability ``top_p`` get ``finfo.min``
    (the first one is always kept)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's top-k filter: logits below the ``top_k``-th largest get ``finfo.min``."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    rule: str = "maskgit_plus",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens`` on ``logits [N, V]``: ``(confidence [N], tokens [N])``.

    ``logits / temperature`` (temperature > 0), then top-p, then top-k; ``p = softmax``; the token
    is a draw from ``p`` (temperature > 0) or its argmax. Confidence by ``rule``:
    ``"maskgit_plus"`` ``p[token]``, ``"topk_margin"`` top-1 minus top-2 probability,
    ``"entropy"`` ``sum(p * log(p + 1e-10))`` (negative entropy).
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:  # torch.distributions.Categorical(probs).sample() is this multinomial
            x0 = torch.multinomial(probs, 1, True, generator=generator)[:, 0]
            confidence = torch.gather(probs, -1, x0[:, None])[:, 0]
        except RuntimeError:  # Dream falls back to the argmax when the draw fails (NaN probs)
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if rule == "topk_margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values
        confidence = top2[:, 0] - top2[:, 1]
    elif rule == "entropy":
        confidence = torch.sum(probs * torch.log(probs + ENTROPY_EPS), dim=-1)
    return confidence, x0


def dream_timesteps(steps: int, eps: float, device=None) -> torch.Tensor:
    """Dream's schedule ``linspace(1, eps, steps + 1)`` (float32): step ``i`` goes from time
    ``t = ts[i]`` to ``s = ts[i + 1]``."""
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_num_transfer(mask_index: torch.Tensor, ts: torch.Tensor, i: int, last: bool) -> int:
    """Dream's commit count of a step: the batch's *mean* mask count ``n`` (float32),
    ``int(n * (1 - s / t))``, and ``int(n)`` at the last step."""
    n = mask_index.sum() / mask_index.shape[0]
    return int(n) if last else int(n * (1 - ts[i + 1] / ts[i]))


def _logits(model, x, mask, **kw) -> torch.Tensor:
    out = model(x, attention_mask=mask, **kw)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(
            f"dream_generate: model must return logits [B, L, V] = [{x.shape[0]}, {x.shape[1]}, V], got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    return logits.float()


def _shift(logits: torch.Tensor) -> torch.Tensor:
    """Row ``i`` predicts position ``i``: Dream's ``cat([logits[:, :1], logits[:, :-1]])``."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def _topk_lowest_index(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` largest per row, ties to the lowest index."""
    return torch.sort(score.double(), dim=1, descending=True, stable=True).indices[:, :k]


def _check(
    where, prompt, attention_mask, max_new_tokens, steps, temperature, top_p, top_k, alg, alg_temp, eps
):
    check_token_ids(where, "prompt", prompt)
    for name, value in (("max_new_tokens", max_new_tokens), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if alg not in ALGS:
        raise ValueError(f"{where}: alg must be one of {ALGS}, got {alg!r}")
    for name, value in (("temperature", temperature), ("alg_temp", alg_temp or 0.0)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{where}: top_p must be in (0, 1] or None, got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"{where}: top_k must be a positive int or None, got {top_k!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"{where}: eps must be in (0, 1), got {eps!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(prompt.shape):
        raise ValueError(
            f"{where}: attention_mask must have the prompt's shape {tuple(prompt.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )


def _full_mask(attention_mask, B, L, device):
    """Dream passes a mask only when the prompt has padding (else ``"full"`` attention)."""
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return None
    return F.pad(attention_mask.long(), (0, L - attention_mask.shape[1]), value=1).to(device)


def _commit_topk(x, cols, mask_index, confidence, x0, k, alg_temp, mask_id, generator):
    """Dream's commit: the ``k`` best of ``full_confidence`` over the columns ``cols`` of ``x``
    (``-inf`` where not masked), or ``k`` draws from ``softmax(full_confidence / alg_temp)``;
    the chosen columns get ``x0`` (``mask_id`` where the column was not masked, as Dream)."""
    B = x.shape[0]
    view = x[:, cols]
    full = torch.full(view.shape, float("-inf"), device=x.device)
    full[mask_index] = confidence
    if alg_temp is None or alg_temp == 0:
        index = _topk_lowest_index(full, k)
    else:
        index = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=k, generator=generator)
    proposal = torch.full_like(view, mask_id)
    proposal[mask_index] = x0
    rows = torch.arange(B, device=x.device)[:, None].expand_as(index)
    view[rows, index] = proposal[rows, index]
    x[:, cols] = view


@torch.no_grad()
def dream_generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    steps: int = 512,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: str = "origin",
    alg_temp: float | None = None,
    eps: float = 1e-3,
    mask_id: int = DREAM_MASK_ID,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dream's ``diffusion_generate`` (no cache): int64 ``[B, Lp + max_new_tokens]``.

    Args:
        model: ``model(x, attention_mask=mask)`` -> logits ``[B, L, V]`` (see the module).
        prompt: int ``[B, Lp]``, left-padded; attention_mask: ``[B, Lp]`` 0/1 or bool, or None.
        steps: denoising steps; ``timesteps = linspace(1, eps, steps + 1)``.
        temperature, top_p, top_k: Dream's token choice (:func:`sample_tokens`).
        alg: ``"origin"``: each masked position is committed with probability ``1 - s / t``
            (1 at the last step), one uniform draw per masked position of the batch in row-major
            order; the others rank the masked positions by their confidence (``"maskgit_plus"``
            max probability, ``"topk_margin"`` top-1 minus top-2, ``"entropy"`` negative entropy)
            and commit :func:`dream_num_transfer` of them in every row (the count is the batch's).
        alg_temp: > 0: the committed positions are drawn from ``softmax(confidence / alg_temp)``
            instead of the top ones.
    """
    _check(
        "dream_generate",
        prompt,
        attention_mask,
        max_new_tokens,
        steps,
        temperature,
        top_p,
        top_k,
        alg,
        alg_temp,
        eps,
    )
    B, Lp = prompt.shape
    L = Lp + max_new_tokens
    device = prompt.device
    x = F.pad(prompt.long(), (0, max_new_tokens), value=mask_id)
    mask = _full_mask(attention_mask, B, L, device)
    ts = dream_timesteps(steps, eps, device)
    every = slice(None)
    choose = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    for i in range(steps):
        mask_index = x == mask_id
        logits = _shift(_logits(model, x, mask))
        mask_logits = logits[mask_index]
        last = i == steps - 1
        if alg == "origin":
            p_transfer = 1 if last else 1 - ts[i + 1] / ts[i]
            x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=device)
            transfer = torch.rand(x0.shape, generator=generator, device=device) < p_transfer
            _, x0[transfer] = sample_tokens(mask_logits[transfer], **choose)
            x[mask_index] = x0
            continue
        confidence, x0 = sample_tokens(mask_logits, rule=alg, **choose)
        k = dream_num_transfer(mask_index, ts, i, last)
        if k > 0:
            _commit_topk(x, every, mask_index, confidence, x0, k, alg_temp, mask_id, generator)
    return x


@torch.no_grad()
def dream_block_generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    steps: int,
    block_length: int = 32,
    threshold: float | None = None,
    cache: str | None = "dual",
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: str | None = None,
    alg_temp: float | None = None,
    eps: float = 1e-3,
    mask_id: int = DREAM_MASK_ID,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fast-dLLM's Dream block sampler: int64 ``[B, Lp + max_new_tokens]``.

    Each block ``[s, e)``: a full forward (which refreshes the model's cache) commits position
    ``s`` with its token (argmax at temperature 0); then, until the block holds no mask:

    * ``threshold`` given (Fast-dLLM's ``alg="confidence_threshold"``): every masked position of
      the block whose max-probability confidence is ``>= threshold``, and the most confident one
      (``alg`` must be None or ``"maskgit_plus"``);
    * else: steps ``i = 1 .. steps_per_block - 1`` of ``linspace(1, eps, steps_per_block + 1)``,
      each committing :func:`dream_num_transfer` of the block's masks ranked by ``alg``
      (None: ``"entropy"``, Fast-dLLM's; ``"origin"`` is not a block rule).

    ``cache``: ``"dual"`` (the steps run the block, ``model(x[:, s:e], cache=(s, e))``),
    ``"prefix"`` (they run ``x[:, s:]``), or None (a full forward each step). The steps' logits
    are shifted within what was run, so position ``s`` is scored by its own row: it is already
    committed, and position ``s + j`` is scored by row ``s + j - 1`` as everywhere else.
    """
    where = "dream_block_generate"
    if threshold is not None and alg not in (None, "maskgit_plus"):
        raise ValueError(f"{where}: a threshold ranks by max probability; alg must be None or 'maskgit_plus'")
    alg = ("maskgit_plus" if threshold is not None else "entropy") if alg is None else alg
    _check(
        where, prompt, attention_mask, max_new_tokens, steps, temperature, top_p, top_k, alg, alg_temp, eps
    )
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length <= 0:
        raise ValueError(f"{where}: block_length must be a positive int, got {block_length!r}")
    if max_new_tokens % block_length:
        raise ValueError(
            f"{where}: max_new_tokens ({max_new_tokens}) must be a multiple of block_length ({block_length})"
        )
    num_blocks = max_new_tokens // block_length
    if steps % num_blocks:
        raise ValueError(
            f"{where}: steps ({steps}) must be a multiple of the number of blocks ({num_blocks})"
        )
    if cache not in (None, "prefix", "dual"):
        raise ValueError(f"{where}: cache must be None, 'prefix' or 'dual', got {cache!r}")
    if threshold is None and alg == "origin":
        raise ValueError(f"{where}: alg='origin' has no block rule; give another alg or a threshold")
    spb = steps // num_blocks
    B, Lp = prompt.shape
    L = Lp + max_new_tokens
    device = prompt.device
    x = F.pad(prompt.long(), (0, max_new_tokens), value=mask_id)
    mask = _full_mask(attention_mask, B, L, device)
    ts = dream_timesteps(spb, eps, device)
    choose = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    for block in range(num_blocks):
        s = Lp + block * block_length
        e = s + block_length
        logits = _shift(_logits(model, x, mask))
        _, x0 = sample_tokens(logits[:, s], **choose)
        x[:, s] = x0
        stop = e if cache == "dual" else L
        i = 1
        while True:
            if cache is None:
                logits = _shift(_logits(model, x, mask))[:, s:stop]
            else:
                logits = _shift(_logits(model, x[:, s:stop], mask, cache=(s, stop)))
            mask_index = x[:, s:stop] == mask_id
            mask_index[:, block_length:] = False
            if threshold is not None:
                confidence, x0 = sample_tokens(logits[mask_index], **choose)
                full = torch.full(mask_index.shape, float("-inf"), device=device)
                full[mask_index] = confidence
                # Fast-dLLM's rule: the most confident, and every other one >= threshold.
                rank = torch.empty_like(full, dtype=torch.long)
                order = _topk_lowest_index(full, full.shape[1])
                rank.scatter_(1, order, torch.arange(full.shape[1], device=device).expand_as(order))
                chosen = mask_index & ((full >= threshold) | (rank == 0))
                proposal = x[:, s:stop].clone()
                proposal[mask_index] = x0
                x[:, s:stop] = torch.where(chosen, proposal, x[:, s:stop])
            else:
                if i == spb:
                    break
                confidence, x0 = sample_tokens(logits[mask_index], rule=alg, **choose)
                k = dream_num_transfer(mask_index, ts, i, i == spb - 1)
                if k > 0:
                    _commit_topk(
                        x, slice(s, stop), mask_index, confidence, x0, k, alg_temp, mask_id, generator
                    )
                i += 1
            if not bool((x[:, s:e] == mask_id).any()):
                break
    return x
