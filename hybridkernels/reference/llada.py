"""The naive LLaDA sampler: LLaDA's published ``generate`` (ML-GSAI/LLaDA ``generate.py``).

A full forward over prompt + generation at every step: the baseline the planner's fast path is
benchmarked against and must match token for token at temperature 0. The model is any callable
``model(x, attention_mask=mask)`` returning ``[B, L, V]`` logits or an object with ``.logits``
(our :class:`~hybridkernels.models.Transformer`, an HF model).

Where this deliberately differs from the published code (all no-ops in its common use):

* Logits are cast to float32 before CFG, softmax and ranking (LLaDA keeps the model's dtype).
* The commit is LLaDA's per-row top-k over the confidences, restricted to the masked positions of
  the current block and with ties broken by the lowest index (``torch.topk`` leaves ties
  unspecified; this only differs when confidences tie, e.g. several ``-inf``).
* ``confidence_eos_eot_inf`` gives EOS / EoT candidates confidence ``-inf`` (LLaDA's intent,
  Appendix B.4; the published chained assignment sets logits to ``-inf`` after the argmax, which
  gives them confidence 0 at temperature 0 and misses EOS at temperature > 0).
* Random draws take an optional ``generator``; ``cfg_scale > 0`` without an attention mask works.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .unmask import get_num_transfer_tokens, rank_and_commit

REMASKING = ("low_confidence", "random")
# LLaDA-8B's special tokens (GSAI-ML/LLaDA-8B-*): [MASK], <|endoftext|> (EOS), <|eot_id|> (EoT).
LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
LLADA_EOT_ID = 126348


@dataclass
class LLaDAStats:
    """What a run did: ``forward_passes`` (model calls; a CFG step is one call on ``2B`` rows),
    ``committed`` int64 ``[total_steps, B]`` tokens committed per step and row, ``seconds``."""

    forward_passes: int
    committed: torch.Tensor
    seconds: float


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LLaDA's Gumbel-max rule in float64: ``exp(logits) / (-log u) ** temperature``.

    Its argmax samples ``softmax(logits / temperature)`` (the argmax of
    ``logits / T - log(-log u)``). Temperature 0 returns ``logits`` itself.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


def check_token_ids(where: str, name: str, ids) -> None:
    """``ids`` must be a non-empty integer ``[B, L]`` tensor; the error names ``where`` and ``name``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{where}: {name} must be a [B, L] tensor, got {got}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must hold integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{where}: empty {name} (shape {tuple(ids.shape)})")


def _model_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    out = model(x, attention_mask=attention_mask)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(
            f"llada_generate: model must return logits [B, L, V] = [{x.shape[0]}, {x.shape[1]}, V], "
            f"got {tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    return logits.float()


def _check_inputs(
    prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id
):
    check_token_ids("llada_generate", "prompt", prompt)
    if bool((prompt == mask_id).any()):
        row, col = (prompt == mask_id).nonzero()[0].tolist()
        raise ValueError(
            f"llada_generate: prompt[{row}, {col}] is the mask token {mask_id}; prompts (and their "
            "padding) must not contain mask_id"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt.shape:
            got = getattr(attention_mask, "shape", attention_mask)
            raise ValueError(
                f"llada_generate: attention_mask must have the prompt's shape {tuple(prompt.shape)}, "
                f"got {tuple(got) if isinstance(got, torch.Size) else got!r}"
            )
        if attention_mask.device != prompt.device:
            raise ValueError(
                f"llada_generate: attention_mask is on {attention_mask.device}, prompt on {prompt.device}"
            )
        valid = attention_mask != 0
        if attention_mask.dtype != torch.bool and not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()
        ):
            raise ValueError("llada_generate: attention_mask must hold 0/1 (or bool) values")
        empty = ~valid.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"llada_generate: prompt row {int(empty.nonzero()[0])} is empty (all padding)")
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError(
                "llada_generate: attention_mask must be left padding (zeros, then ones, per row)"
            )
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"llada_generate: {name} must be a positive int, got {value!r}")
    if gen_length % block_length:
        raise ValueError(
            f"llada_generate: gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"llada_generate: steps ({steps}) must be a multiple of the number of blocks "
            f"({num_blocks} = gen_length / block_length)"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"llada_generate: temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"llada_generate: cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if remasking not in REMASKING:
        raise ValueError(f"llada_generate: remasking must be one of {REMASKING}, got {remasking!r}")
    return num_blocks


@torch.no_grad()
def llada_generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int = LLADA_EOS_ID,
    eot_id: int = LLADA_EOT_ID,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
):
    """Masked-diffusion sampling with LLaDA's semi-autoregressive block schedule.

    Args:
        model: ``model(x, attention_mask=mask)`` -> logits ``[B, L, V]`` (or ``.logits``).
        prompt: int ``[B, Lp]``, left-padded; must not contain ``mask_id``.
        attention_mask: ``[B, Lp]`` bool or 0/1, 1 = real token (left padding), or None. It is
            extended with ones over the generation and passed to every model call.
        steps: total denoising steps, split evenly over the ``gen_length / block_length`` blocks.
        gen_length, block_length: ``gen_length % block_length == 0``.
        temperature: Gumbel-max sampling temperature (0 = greedy argmax).
        cfg_scale: classifier-free guidance: the batch is run with and without the prompt (prompt
            positions set to ``mask_id``) and ``un + (cfg_scale + 1) * (cond - un)`` is used.
        remasking: ``"low_confidence"`` (rank by the softmax probability of the candidate) or
            ``"random"`` (rank by a uniform draw).
        logits_eos_inf: EOS logit set to ``-inf`` (EOS never sampled).
        confidence_eos_eot_inf: EOS / EoT candidates get confidence ``-inf`` (committed last).
        generator: for the Gumbel noise and the random ranks.
        return_stats: also return a :class:`LLaDAStats`.

    One step, on ``x = [prompt | generation]``: ``mask_index = x == mask_id``; logits of a full
    forward; ``x0 = argmax(add_gumbel_noise(logits))``; confidence = ``softmax(logits)[x0]`` (or
    a uniform draw), ``-inf`` after the current block and where ``x`` is not masked; each row
    commits its ``num_transfer[row, step]`` most confident positions (LLaDA's
    ``get_num_transfer_tokens`` over the block's steps).

    Returns int64 ``x [B, Lp + gen_length]`` (and the stats).
    """
    started = time.perf_counter()
    num_blocks = _check_inputs(
        prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id
    )
    steps_per_block = steps // num_blocks
    B, Lp = prompt.shape
    device = prompt.device
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :Lp] = prompt
    if attention_mask is not None:
        ones = torch.ones(B, gen_length, dtype=attention_mask.dtype, device=device)
        attention_mask = torch.cat([attention_mask, ones], dim=1)
    prompt_index = x != mask_id
    columns = torch.arange(x.shape[1], device=device)
    committed_per_step = []

    for block in range(num_blocks):
        end = Lp + (block + 1) * block_length
        block_masked = x[:, end - block_length : end] == mask_id
        num_transfer = get_num_transfer_tokens(block_masked, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                cond, un = _model_logits(model, torch.cat([x, un_x]), mask2).chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = _model_logits(model, x, attention_mask)
            if mask_id >= logits.shape[-1]:
                raise ValueError(
                    f"llada_generate: mask_id {mask_id} is outside the vocabulary ({logits.shape[-1]})"
                )
            if logits_eos_inf:
                logits[:, :, eos_id] = float("-inf")

            x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
            if remasking == "low_confidence":
                confidence = torch.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
            else:
                confidence = torch.rand(x0.shape, generator=generator, device=device)
            if confidence_eos_eot_inf:
                confidence = confidence.masked_fill((x0 == eos_id) | (x0 == eot_id), float("-inf"))
            confidence[:, end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, confidence, float("-inf"))

            committable = mask_index & (columns < end)
            commit = rank_and_commit(confidence, committable, num_transfer=num_transfer[:, i], threshold=None)
            x[commit] = x0[commit]
            committed_per_step.append(commit.sum(dim=1))

    if not return_stats:
        return x
    # One model call per step (a CFG step runs cond and uncond as one batch).
    stats = LLaDAStats(steps, torch.stack(committed_per_step), time.perf_counter() - started)
    return x, stats
