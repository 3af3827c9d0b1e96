"""``BlockDiffusionPlanner``: SDAR and Fast-dLLM v2 generation with an exact block K/V cache.

Block-diffusion models attend causally across blocks of ``b`` tokens and bidirectionally inside
one (``ops.attention(..., block_causal=b)``). A finished block's keys and values never change, so
they are cached exactly: each block's K/V are written once into a static per-layer buffer by one
pass over the finished block (the "store" pass both peers run), and every denoising step runs the
model on the current block only, attending to the cache and itself. No refresh, no approximation:
the tokens equal :func:`hybridkernels.reference.block_diffusion.block_diffusion_generate` (a full
forward with the block-causal mask every step) token for token at temperature 0.

The rules (block grid, prompt prefill, SDAR's steps and commit rules, Fast-dLLM v2's token shift,
AR first token and sub-blocks, stop tokens) are the reference's module docstring. Commits run on
the fused :func:`hybridkernels.ops.unmask_step` (LM head + argmax + confidence, no ``[B, b, V]``
logits); SDAR's dynamic rule reads its candidates and confidences and ranks with
:func:`hybridkernels.common.rank_and_commit`.

Checkpoints load from local directories in the models' own naming: SDAR (``model_type`` ``"sdar"``,
Qwen3 tensors with ``q_norm``/``k_norm``, ``block_size``, ``mask_token_id``) and Fast-dLLM v2
(``model_type`` ``"Fast_dLLM_Qwen"``, Qwen2 tensors with q/k/v biases, ``bd_size``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from ..common import rank_and_commit
from ..validation import check_attention_mask, check_choice, check_positive_int, check_token_ids
from . import checkpoint
from .config import TransformerConfig
from .planner import PlannerOutput, PlannerStats
from .transformer import Transformer, build_model, parameter_shapes

WHERE = "BlockDiffusionPlanner"
FAMILIES = ("sdar", "fast_dllm_v2")
COMMITS = ("threshold", "topk")
# config.json model_type (lower case) -> family, and the HF architecture its weights follow.
MODEL_TYPES = {"sdar": "sdar", "fast_dllm_qwen": "fast_dllm_v2"}
_BASE_MODEL_TYPE = {"sdar": "qwen3", "fast_dllm_v2": "qwen2"}
# The config key of each family's block length, and the keys only the other family has.
_BLOCK_KEY = {"sdar": "block_size", "fast_dllm_v2": "bd_size"}
# Published defaults: SDAR generate.py (block 4, low_confidence_dynamic at 0.85, <MASK> 151669);
# Fast-dLLM v2 eval.py / generation_functions.py (bd_size 32, sub-blocks of 8, threshold 0.9,
# |<MASK>| 151665, stop <|im_end|> 151645).
_DEFAULTS = {
    "sdar": dict(block_length=4, threshold=0.85, mask_id=151669, stop=(151645, 151643)),
    "fast_dllm_v2": dict(block_length=32, threshold=0.9, mask_id=151665, stop=(151645,)),
}


@dataclass(frozen=True)
class BlockDiffusionOptions:
    """Decoding options (None = the family's default).

    gen_length: tokens generated per row, a multiple of ``block_length`` (the prompt's partial
        last block is generated too and not returned, as SDAR's ``total_length``).
    block_length: the model's block (its training block: SDAR ``block_size``, v2 ``bd_size``).
    steps: SDAR only: denoising steps per block (default ``block_length``).
    sub_block: Fast-dLLM v2 only: sub-block length, dividing ``block_length`` (default 8).
    commit: ``"threshold"`` (SDAR ``low_confidence_dynamic``; v2's threshold rule) or ``"topk"``
        (SDAR ``low_confidence_static``; v2: ``k`` per step).
    threshold: the confidence threshold (SDAR 0.85, v2 0.9). k: v2 ``topk`` commits per step.
    stop_token_ids: a row stops after the block holding one (default: the checkpoint's).
    temperature: 0 = greedy (the peers' comparison); > 0 samples ``softmax(logits / T)``.
    """

    gen_length: int = 128
    block_length: int | None = None
    steps: int | None = None
    sub_block: int | None = None
    commit: str = "threshold"
    threshold: float | None = None
    k: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0


@dataclass(frozen=True)
class _Rule:
    family: str
    block: int
    steps: int
    sub: int
    commit: str
    threshold: float
    k: int
    stops: tuple[int, ...]
    gen_length: int
    temperature: float


class _BlockCache:
    """Static exact cache, the :class:`~hybridkernels.models.KVCacheHook` of every pass: per-layer
    post-RoPE ``k``/``v`` ``[B, L, Hkv, D]``. A pass over positions ``[start, stop)`` (whole
    blocks) writes its K/V into those slots and attends block-causally over slots
    ``[0, stop)``. Denoising steps rewrite the current block's slots each step (no
    concatenation); the store pass leaves the final ones, which no later pass changes."""

    def __init__(self, config: TransformerConfig, batch, length, block, *, dtype, device, backend):
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.block, self.backend = block, backend
        self.start = self.stop = 0

    def window(self, start: int, stop: int) -> _BlockCache:
        self.start, self.stop = start, stop
        return self

    def attend(self, layer, q, k, v):
        kb, vb = self.k[layer], self.v[layer]
        kb[:, self.start : self.stop].copy_(k)
        vb[:, self.start : self.stop].copy_(v)
        return ops.attention(
            q, kb[:, : self.stop], vb[:, : self.stop], block_causal=self.block, backend=self.backend
        )


def _strictly_above(threshold: float) -> float:
    """The smallest float32 above ``float32(threshold)``: ``conf >= it`` is torch's float32
    ``conf > threshold`` (the peers' rule), for the ``>=`` of ``unmask_step``."""
    t = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(float("inf"))))


def read_family(path: str | Path) -> tuple[str, dict]:
    """``(family, config dict)`` of checkpoint directory ``path``; ValueError naming what the
    directory holds when it is not SDAR or Fast-dLLM v2."""
    file = Path(path) / "config.json"
    data = checkpoint.read_config_json(path, f"{WHERE}.from_pretrained")
    model_type = str(data.get("model_type", "")).lower()
    if model_type not in MODEL_TYPES:
        held = "LLaDA" if (model_type == "llada" or "d_model" in data) else repr(data.get("model_type"))
        raise ValueError(
            f"{WHERE}.from_pretrained: {path} holds a {held} checkpoint, not a block-diffusion one "
            "(SDAR: model_type 'sdar'; Fast-dLLM v2: model_type 'Fast_dLLM_Qwen'); load LLaDA / Dream "
            "with DiffusionPlanner and AR models with ARExecutor"
        )
    family = MODEL_TYPES[model_type]
    other = _BLOCK_KEY[FAMILIES[1 - FAMILIES.index(family)]]
    if other in data:
        raise ValueError(
            f"{file}: a {family} config (model_type {data['model_type']!r}) with the other family's "
            f"block key {other!r}: a config that mixes SDAR and Fast-dLLM v2"
        )
    return family, data


def _stop_ids_of(path: Path, data: dict, family: str) -> tuple[int, ...]:
    """generation_config.json's eos ids, else config.json's, else the family's published ones."""
    for source in (path / "generation_config.json", None):
        d = data
        if source is not None:
            if not source.is_file():
                continue
            try:
                d = json.loads(source.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
        eos = d.get("eos_token_id") if isinstance(d, dict) else None
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                return tuple(ids)
    return _DEFAULTS[family]["stop"]


class BlockDiffusionPlanner:
    """Block-diffusion planner over a :class:`Transformer` (SDAR or Fast-dLLM v2 weights).

    Plugs into :class:`~hybridkernels.pipeline.HybridPipeline` like
    :class:`~hybridkernels.models.DiffusionPlanner`: ``generate(ids, mask, return_hidden=...)``
    returns a :class:`~hybridkernels.models.PlannerOutput` with the final hidden states of the
    plan, and ``model``, ``mask_id``, ``eos_id``, ``eot_id`` are there. ``backend`` is the backend
    of every op it runs (as ``DiffusionPlanner``'s); ``attention_backend`` / ``unmask_backend``
    override it for one op.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        family: str,
        mask_id: int,
        block_length: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        backend: str | None = None,
        attention_backend: str | None = None,
        unmask_backend: str | None = None,
    ):
        if not isinstance(model, Transformer):
            raise TypeError(f"{WHERE}: model must be a Transformer, got {type(model).__name__}")
        self.family = check_choice(WHERE, "family", family, FAMILIES)
        self.model = model
        self.mask_id = int(mask_id)
        if not 0 <= self.mask_id < model.config.vocab_size:
            raise ValueError(f"{WHERE}: mask_id must be in [0, {model.config.vocab_size}), got {mask_id}")
        default_block = _DEFAULTS[family]["block_length"] if block_length is None else block_length
        self.block_length = check_positive_int(WHERE, "block_length", default_block)
        stops = _DEFAULTS[family]["stop"] if stop_token_ids is None else tuple(stop_token_ids)
        self.stop_token_ids = tuple(int(t) for t in stops)
        self.backend = attention_backend or backend
        self.unmask_backend = unmask_backend or backend

    @property
    def eos_id(self) -> int | None:
        return self.stop_token_ids[0] if self.stop_token_ids else None

    @property
    def eot_id(self) -> int | None:
        return self.stop_token_ids[1] if len(self.stop_token_ids) > 1 else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        family: str | None = None,
        dtype: torch.dtype | None = None,
        device=None,
        mask_id: int | None = None,
        backend: str | None = None,
        attention_backend: str | None = None,
    ) -> BlockDiffusionPlanner:
        """Load an SDAR or Fast-dLLM v2 directory (``config.json`` + ``*.safetensors``).

        ``family``: the family you expect (an error names the one the directory holds);
        ``mask_id``: default the config's ``mask_token_id``, else the family's published id.
        """
        path = Path(path)
        held, data = read_family(path)
        if family is not None and family != held:
            check_choice(WHERE, "family", family, FAMILIES)
            raise ValueError(
                f"{WHERE}.from_pretrained: family={family!r}, but {path} holds a {held} checkpoint"
            )
        base = dict(data, model_type=_BASE_MODEL_TYPE[held])
        try:
            config = TransformerConfig.from_dict(base)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{path / 'config.json'}: {exc}") from None
        tensors = dict(checkpoint.iter_safetensors(path))
        state = checkpoint.map_state_dict(
            tensors, config, parameter_shapes(config), names="hf", source=str(path)
        )
        model = build_model(
            config,
            state,
            dtype=dtype or state["embed_tokens.weight"].dtype,
            device=device or "cpu",
            causal=False,
            attention_backend=attention_backend or backend,
        )
        if mask_id is None:
            mask_id = data.get("mask_token_id", _DEFAULTS[held]["mask_id"])
        return cls(
            model,
            family=held,
            mask_id=mask_id,
            block_length=data.get(_BLOCK_KEY[held]),
            stop_token_ids=_stop_ids_of(path, data, held),
            backend=backend,
            attention_backend=attention_backend,
        )

    # ------------------------------------------------------------------ options
    def resolve(self, options: BlockDiffusionOptions | None = None, **overrides) -> _Rule:
        """The options with the family's defaults filled in and checked."""
        opts = options or BlockDiffusionOptions()
        if not isinstance(opts, BlockDiffusionOptions):
            raise TypeError(f"{WHERE}: options must be a BlockDiffusionOptions, got {type(opts).__name__}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(BlockDiffusionOptions)}
        if unknown:
            raise TypeError(f"{WHERE}.generate: unknown option(s) {sorted(unknown)}")
        opts = dataclasses.replace(opts, **overrides)
        fam = self.family
        block = check_positive_int(WHERE, "block_length", opts.block_length or self.block_length)
        gen = check_positive_int(WHERE, "gen_length", opts.gen_length)
        if gen % block:
            raise ValueError(
                f"{WHERE}: block_length ({block}) must divide gen_length ({gen}): the generation is "
                "whole blocks after the prompt's block"
            )
        check_choice(WHERE, "commit", opts.commit, COMMITS)
        if fam == "sdar" and opts.sub_block is not None:
            raise ValueError(f"{WHERE}: sub_block is Fast-dLLM v2's option; this planner runs SDAR")
        if fam == "fast_dllm_v2" and opts.steps is not None:
            raise ValueError(
                f"{WHERE}: steps is SDAR's option (denoising steps per block); Fast-dLLM v2 decodes "
                "each sub-block until it is full (use threshold / commit='topk' with k)"
            )
        steps = check_positive_int(WHERE, "steps", block if opts.steps is None else opts.steps)
        if steps > block:
            raise ValueError(f"{WHERE}: steps ({steps}) must be <= block_length ({block})")
        sub = block
        if fam == "fast_dllm_v2":
            sub = check_positive_int(
                WHERE, "sub_block", min(8, block) if opts.sub_block is None else opts.sub_block
            )
            if block % sub:
                raise ValueError(f"{WHERE}: sub_block ({sub}) must divide block_length ({block})")
        threshold = _DEFAULTS[fam]["threshold"] if opts.threshold is None else float(opts.threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{WHERE}: threshold must be in [0, 1], got {threshold}")
        k = check_positive_int(WHERE, "k", opts.k)
        stops = (
            self.stop_token_ids if opts.stop_token_ids is None else tuple(int(t) for t in opts.stop_token_ids)
        )
        temperature = float(opts.temperature)
        if not temperature >= 0:
            raise ValueError(f"{WHERE}: temperature must be >= 0, got {opts.temperature}")
        return _Rule(fam, block, steps, sub, opts.commit, threshold, k, stops, gen, temperature)

    def reference_kwargs(self, options: BlockDiffusionOptions | None = None, **overrides) -> dict:
        """The keywords of :func:`hybridkernels.reference.block_diffusion.block_diffusion_generate`
        that run the same rule (for tests and benchmarks)."""
        r = self.resolve(options, **overrides)
        return dict(
            family=r.family,
            mask_id=self.mask_id,
            gen_length=r.gen_length,
            block_length=r.block,
            steps=r.steps if r.family == "sdar" else None,
            sub_block=r.sub if r.family == "fast_dllm_v2" else None,
            commit=r.commit,
            threshold=r.threshold,
            k=r.k,
            stop_token_ids=r.stops,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        options: BlockDiffusionOptions | None = None,
        *,
        return_hidden: bool = False,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> PlannerOutput:
        """Generate ``gen_length`` tokens after each prompt with the exact block cache.

        Args:
            prompt_ids: int ``[B, Lp]`` on the model's device, left-padded, without ``mask_id``;
                every row has at least one token.
            attention_mask: ``[B, Lp]`` bool or 0/1 (1 = token, zeros first), or None.
            options / overrides: :class:`BlockDiffusionOptions` fields.
            return_hidden: also return the final hidden states ``[B, gen_length, d]`` of the
                generated positions (from the store passes: no extra forward but the blocks left
                after every row stopped).
            generator: randomness of ``temperature > 0``.

        Returns :class:`~hybridkernels.models.PlannerOutput` ``(tokens [B, Lp + gen_length],
        hidden, stats, prompt_length)``.
        """
        started = time.perf_counter()
        rule = self.resolve(options, **overrides)
        model, mask_id, b = self.model, self.mask_id, rule.block
        device = model.device
        check_token_ids(WHERE, "prompt_ids", prompt_ids, vocab_size=model.config.vocab_size)
        if prompt_ids.device != device:
            raise ValueError(f"{WHERE}: prompt_ids is on {prompt_ids.device}, the model on {device}")
        B, Lp = prompt_ids.shape
        if attention_mask is not None:
            mask = check_attention_mask(
                WHERE, attention_mask, (B, Lp), device, like="prompt_ids", binary=True, left_padded=True
            )
            lengths = [int(n) for n in mask.sum(dim=1)]
        else:
            mask, lengths = None, [Lp] * B
        if min(lengths) == 0:
            raise ValueError(
                f"{WHERE}: every prompt needs at least one token (attention_mask has an empty row)"
            )
        real = prompt_ids if mask is None else prompt_ids[mask]
        if bool((real == mask_id).any()):
            raise ValueError(f"{WHERE}: prompt_ids contains mask_id ({mask_id})")

        ends = [-(-n // b) * b + rule.gen_length for n in lengths]
        L = max(ends)
        if L > model.config.max_position_embeddings:
            raise ValueError(
                f"{WHERE}: prompt + gen_length needs {L} positions, the model has "
                f"{model.config.max_position_embeddings}"
            )
        stops = torch.tensor(rule.stops, dtype=torch.long, device=device)
        pad = rule.stops[0] if rule.stops else (0 if mask_id != 0 else 1)
        x = torch.full((B, L), pad, dtype=torch.long, device=device)
        for r, n in enumerate(lengths):
            x[r, :n] = prompt_ids[r, Lp - n :]
            x[r, n : ends[r]] = mask_id
        positions = torch.arange(L, device=device).expand(B, L)
        cache = _BlockCache(model.config, B, L, b, dtype=model.dtype, device=device, backend=self.backend)
        hidden_all = (
            torch.zeros(B, L, model.config.hidden_size, dtype=model.dtype, device=device)
            if return_hidden
            else None
        )
        lm_head = model.lm_head_weight
        shift = rule.family == "fast_dllm_v2"
        unmask = dict(
            lm_head=lm_head,
            mask_id=mask_id,
            banned_token_ids=(mask_id,),
            temperature=rule.temperature,
            generator=generator,
            backend=self.unmask_backend,
        )
        ar = dict(temperature=0.0, generator=None)
        k_steps = [rule.sub] if shift else _sdar_split(b, rule.steps)
        passes, committed = 0, []

        def run(start: int, stop: int) -> torch.Tensor:
            nonlocal passes
            passes += 1
            h = model(
                x[:, start:stop],
                position_ids=positions[:, start:stop],
                kv_cache=cache.window(start, stop),
                compute_logits=False,
            ).hidden
            if hidden_all is not None:
                hidden_all[:, start:stop] = h
            return h

        first = min(lengths) // b
        last_h = run(0, first * b)[:, -1:] if first > 0 else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        starts_t = torch.tensor(lengths, device=device)
        ends_t = torch.tensor(ends, device=device)
        cols = torch.arange(L, device=device)
        num_blocks = L // b
        i = first
        while i < num_blocks:
            s0, s1 = i * b, (i + 1) * b
            if shift and last_h is not None:  # the block's first token, AR-style
                at_start = (x[:, s0] == mask_id).long()
                if bool(at_start.any()):  # an argmax at any temperature, as the peer
                    ops.unmask_step(x, hidden=last_h, start=s0, num_transfer=at_start, **(unmask | ar))
            windows = (
                [(max(a, s0 + 1), a + rule.sub) for a in range(s0, s1, rule.sub)] if shift else [(s0, s1)]
            )
            for w0, w1 in windows:
                for step in range(rule.sub if shift else rule.steps):
                    masked = x[:, w0:w1] == mask_id
                    left = masked.sum(dim=1)
                    if not bool(left.any()):
                        break
                    h = run(s0, s1)
                    rows = h[:, w0 - 1 - s0 : w1 - 1 - s0] if shift else h[:, w0 - s0 : w1 - s0]
                    self._commit(x, rows, w0, masked, left, rule, k_steps[0 if shift else step], unmask)
                    committed.append(left - (x[:, w0:w1] == mask_id).sum(dim=1))
            if rule.stops:  # rows with a stop token in their generation are done after this block
                generating = (starts_t < s1) & (s1 <= ends_t)
                hit = (torch.isin(x[:, :s1], stops) & (cols[:s1] >= starts_t[:, None])).any(dim=1)
                done |= hit & generating
                x.masked_fill_(done[:, None] & (cols >= s1) & (cols < ends_t[:, None]), pad)
            i += 1
            if bool(done.all()):
                if hidden_all is not None:  # the finished blocks and the padding after them
                    run(s0, L)
                break
            if i < num_blocks or hidden_all is not None:  # the store pass: exact K/V of the block
                last_h = run(s0, s1)[:, -1:]

        out = torch.empty(B, Lp + rule.gen_length, dtype=torch.long, device=device)
        out[:, :Lp] = prompt_ids
        hidden = None
        if hidden_all is not None:
            hidden = hidden_all.new_empty(B, rule.gen_length, hidden_all.shape[-1])
        for r, n in enumerate(lengths):
            out[r, Lp:] = x[r, n : n + rule.gen_length]
            if hidden is not None:
                hidden[r] = hidden_all[r, n : n + rule.gen_length]
        counts = torch.stack(committed) if committed else torch.zeros(0, B, dtype=torch.long, device=device)
        stats = PlannerStats(
            forward_passes=passes,
            steps=len(committed),
            committed=counts,
            refreshes=0,
            skipped_blocks=num_blocks - i,
            graph_replays=0,
            seconds=time.perf_counter() - started,
        )
        return PlannerOutput(out, hidden, stats, Lp)

    def _commit(self, x, rows, w0, masked, left, rule: _Rule, k_step: int, unmask: dict) -> None:
        """One denoising commit of window ``x[:, w0 : w0 + rows.shape[1]]`` (see the reference)."""
        if rule.family == "fast_dllm_v2":
            if rule.commit == "threshold":
                ops.unmask_step(x, hidden=rows, start=w0, threshold=_strictly_above(rule.threshold), **unmask)
            else:
                ops.unmask_step(x, hidden=rows, start=w0, num_transfer=left.clamp(max=rule.k), **unmask)
            return
        k_s = torch.full_like(left, k_step).clamp(max=left)
        if rule.commit == "topk":
            ops.unmask_step(x, hidden=rows, start=w0, num_transfer=k_s, **unmask)
            return
        # low_confidence_dynamic: every confidence > threshold when there are >= k_s of them.
        res = ops.unmask_step(x, hidden=rows, start=w0, num_transfer=torch.zeros_like(left), **unmask)
        high = ((res.confidence > rule.threshold) & masked).sum(dim=1)
        n = torch.where(high >= k_s, high, k_s)
        chosen = rank_and_commit(res.confidence, masked, num_transfer=n, threshold=None)
        window = x[:, w0 : w0 + rows.shape[1]]
        window[chosen] = res.tokens[chosen]


def _sdar_split(block_length: int, steps: int) -> list[int]:
    """SDAR's ``get_num_transfer_tokens(block_length, steps)``."""
    base, rem = divmod(block_length, steps)
    return [base + (s < rem) for s in range(steps)]
