"""``ARExecutor``: autoregressive decoding over a static KV cache (the "sequential answering" half).

One generate call packs the rows (optional ``prefix_embeds`` then the left-padded prompt, valid
tokens moved to the front), prefills them once with the causal attention op writing K/V through
``ops.kv_append``, then decodes one token per step with ``ops.kv_append`` + ``ops.decode_attention``
(``_C``'s split-KV kernel). The decode step reads and writes only static buffers, so on CUDA it is
captured in a CUDA graph and replayed; the only host syncs are the periodic stop checks.
``num_samples > 1`` decodes several samples per prompt from one prefill, sharing the prompt's K/V
(cascade) when there is one prompt. Token choice and stopping follow HF ``generate``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch

from ..common import emit_tokens, eos_tensor, generated_lengths, sample_tokens
from ..ops import skip_value_checks
from ..validation import check_int, renamed
from . import cpu_forward
from .cpu_forward import CPUForward
from .cuda_graphs import StepGraphs
from .kv_cache import DecodeHook, PrefillHook, StaticKVCache
from .one_at_a_time import OneCallAtATime, one_at_a_time
from .prompting import left_pad
from .transformer import Transformer

WHERE = "ARExecutor.generate"


@dataclasses.dataclass
class GenerationStats:
    """What a generate call did. ``decode_tokens_per_s`` = rows x decode steps / decode seconds
    (finished rows still occupy their slot of each step); ``new_tokens`` counts the tokens up to
    each row's EOS. ``graph_capture_s`` (first call of a shape only) is not in ``decode_s``."""

    prefill_s: float
    decode_s: float
    decode_steps: int
    decode_tokens_per_s: float
    new_tokens: int
    rows: int
    prompt_len: int
    cache_len: int
    cache_bytes: int
    shared_prefix: bool
    cuda_graph: bool
    graph_capture_s: float


class GenerationOutput(NamedTuple):
    """``tokens [N, T]`` int64 new tokens (``N = B * num_samples``, row ``b * num_samples + s``;
    after its EOS a row holds ``pad_token_id``; ``T <= max_new_tokens`` is where the last row
    finished), ``lengths [N]`` int64 tokens per row including its EOS, ``stats``."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stats: GenerationStats


class PlanAnswerOutput(NamedTuple):
    """:func:`plan_then_answer`: the ``plan`` generation, the ``answer`` generation,
    and the answer's left-padded prompt (``answer_input_ids``, ``answer_attention_mask``)."""

    plan: GenerationOutput
    answer: GenerationOutput
    answer_input_ids: torch.Tensor
    answer_attention_mask: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None
    eos: tuple[int, ...]
    pad: int


class _DecodeState:
    """Static buffers of one decode configuration (kept between calls, and its CUDA graph)."""

    def __init__(self, model, *, rows, cache_len, prefix_len, max_new_tokens, sampling, decode_backend):
        cfg, dev, dtype = model.config, model.device, model.dtype
        self.sampling = sampling
        self.shared = prefix_len > 0
        self.prefix = (
            StaticKVCache.for_model(cfg, 1, prefix_len, dtype=dtype, device=dev) if self.shared else None
        )
        self.cache = StaticKVCache.for_model(cfg, rows, cache_len, dtype=dtype, device=dev)
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.append_at = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.cache_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.out = torch.empty(rows, max_new_tokens, dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.eos_ids = eos_tensor(list(sampling.eos), dev) if sampling.eos else None
        self.generator = torch.Generator(dev)
        self.hook = DecodeHook(
            self.cache,
            self.append_at,
            self.cache_lens,
            prefix=self.prefix,
            prefix_len=prefix_len,
            decode_backend=decode_backend,
            num_heads=cfg.num_heads,
        )
        self.graphs = StepGraphs(dev)
        self.cpu_forward: CPUForward | None = None  # built on first use, kept with the buffers
        self.fast_forward: CPUForward | None = None  # what the coming decode runs, if anything
        self.positions = prefix_len + cache_len  # every position a step sees is below this

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + (self.prefix.nbytes if self.prefix is not None else 0)

    def reset(self, seed: int | None) -> None:
        self.finished.zero_()
        self.out.fill_(self.sampling.pad)
        self.col.zero_()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)


class ARExecutor:
    """Autoregressive generation with a static KV cache over a causal :class:`Transformer`.

    Args:
        model: a causal :class:`~hybridkernels.models.Transformer` (Llama / Qwen2 / Qwen3
            weights; see :meth:`from_pretrained` and :meth:`from_hf`). Its ``attention_backend`` is
            the prefill attention backend.
        max_cache_len: fixed cache length (prompt incl. prefix + ``max_new_tokens`` must fit, else
            ``ValueError``); default: sized per call for the longest row + ``max_new_tokens``.
            A fixed length lets calls with different prompt lengths reuse one cache and graph.
        cuda_graph: capture the decode step in a CUDA graph (default: on CUDA devices; sampled
            decoding needs ``torch.cuda.CUDAGraph.register_generator_state``, else it runs eagerly).
        stop_check_every: steps between the host-side "all rows finished?" checks.
        decode_backend: backend of ``kv_append`` / ``decode_attention`` (None = auto: the ``_C``
            extension, else the reference). ``backend`` is its former name.
        max_cached_states: decode configurations (cache + buffers + graph) kept between calls.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_cache_len: int | None = None,
        cuda_graph: bool | None = None,
        stop_check_every: int = 16,
        decode_backend: str | None = None,
        max_cached_states: int = 2,
        backend: str | None = None,
    ):
        if not isinstance(model, Transformer):
            raise TypeError(
                f"ARExecutor: model must be a hybridkernels Transformer, got {type(model).__name__}"
            )
        if max_cache_len is not None:
            check_int("ARExecutor", "max_cache_len", max_cache_len, low=2)
        check_int("ARExecutor", "stop_check_every", stop_check_every, low=1)
        check_int("ARExecutor", "max_cached_states", max_cached_states, low=1)
        self.model = model.eval()
        self.max_cache_len = max_cache_len
        self.cuda_graph = cuda_graph
        self.stop_check_every = stop_check_every
        self.decode_backend = renamed("ARExecutor", "decode_backend", decode_backend, "backend", backend)
        self.max_cached_states = max_cached_states
        self._states: OrderedDict[tuple, _DecodeState] = OrderedDict()
        self._busy = OneCallAtATime("ARExecutor")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=None, device=None, attention_backend=None, **kwargs):
        """Load a local HF checkpoint directory (``config.json`` + safetensors); ``kwargs`` go to
        the constructor."""
        model = Transformer.from_pretrained(
            path, dtype=dtype, device=device, causal=True, attention_backend=attention_backend
        )
        return cls(model, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, *, dtype=None, device=None, attention_backend=None, **kwargs):
        """Wrap an in-memory HF causal LM (weights shared when dtype and device already match)."""
        model = Transformer.from_hf(
            hf_model, dtype=dtype, device=device, causal=True, attention_backend=attention_backend
        )
        return cls(model, **kwargs)

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ generate
    @one_at_a_time
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        num_samples: int = 1,
        seed: int | None = None,
    ) -> GenerationOutput:
        """Generate ``max_new_tokens`` tokens (fewer if every row hits an EOS id) per row and sample.

        Args:
            input_ids: int ``[B, L]`` token ids, left-padded; may be None with ``prefix_embeds``.
            attention_mask: ``[B, L]`` bool or 0/1, 1 = token (default: all tokens).
            prefix_embeds: ``[B, P, d_model]`` in the model's dtype, placed before the prompt.
            temperature: 0 = greedy argmax; else sample ``softmax(logits / temperature)``
                after ``top_k`` (keep the k most likely) and ``top_p`` (nucleus) filtering.
            eos_token_id: int or list of ints; a row stops after emitting one.
            pad_token_id: what finished rows emit (default: the first EOS id, else 0).
            num_samples: samples per row (the prompt's K/V shared when ``B == 1``, see below).
            seed: seeds the sampling generator (reproducible); None draws a fresh seed.

        Returns a :class:`GenerationOutput`.

        Positions count valid tokens only (the prefix gets ``0 .. P-1``, the prompt continues after
        it), as HF ``generate`` computes them for ``inputs_embeds = cat(prefix_embeds,
        embed(input_ids))`` and a ``cat(ones, attention_mask)`` mask. Packing each row's valid
        tokens to the front means causal attention needs no mask, a row's cache holds its tokens in
        slots ``0 .. n_b - 1``, and ``decode_attention``'s per-row ``cache_lens`` is all the masking
        decoding needs.

        Samples: output row ``b * n + s``. With one prompt row (the planner's case: one latent
        prefix, many answers) its K/V are stored once, ``[1, n_0, Hkv, D]`` per layer, each sample's
        own tokens in its row of an ``[n, max_new_tokens]`` cache, and ``decode_attention(prefix=(k,
        v, n_0))`` merges the two by log-sum-exp. With ``B > 1`` rows the op's single prefix cannot
        serve every row, so the prefill's K/V are written ``n`` times (computed once).
        """
        x, lengths = self._packed_prompt(input_ids, attention_mask, prefix_embeds)
        sampling = self._sampling(temperature, top_k, top_p, eos_token_id, pad_token_id)
        check_int(WHERE, "max_new_tokens", max_new_tokens, low=1)
        check_int(WHERE, "num_samples", num_samples, low=1)
        if seed is not None:
            check_int(WHERE, "seed", seed, low=0)
        B, S = x.shape[:2]
        need = S + max_new_tokens
        if self.max_cache_len is not None and need > self.max_cache_len:
            raise ValueError(
                f"{WHERE}: the longest row ({S} tokens incl. prefix) + max_new_tokens ({max_new_tokens}) "
                f"= {need} overflows the KV cache (max_cache_len = {self.max_cache_len})"
            )
        shared = num_samples > 1 and B == 1
        rows = B * num_samples
        key = (rows, S if shared else 0, max_new_tokens, self.max_cache_len or need, sampling)
        s = self._state(key, rows=rows, prefix_len=S if shared else 0, max_new_tokens=max_new_tokens)
        s.reset(seed)

        dev = x.device
        _synchronize(dev)
        t0 = time.perf_counter()
        hook = PrefillHook(
            s.prefix if shared else s.cache,
            repeats=1 if shared else num_samples,
            attention_backend=self.model.attention_backend,
            decode_backend=self.decode_backend,
        )
        positions = torch.arange(S, device=dev)
        hidden = self.model(
            inputs_embeds=x, position_ids=positions, kv_cache=hook, compute_logits=False
        ).hidden
        last = hidden[torch.arange(B, device=dev), lengths - 1]
        row_lens = lengths.repeat_interleave(num_samples)
        s.pos.copy_(row_lens[:, None])
        if shared:
            s.append_at.zero_()
        else:
            s.append_at.copy_(row_lens)
        self._emit(s, last, num_samples)
        _synchronize(dev)
        t1 = time.perf_counter()

        steps_run, capture_s = self._decode(s, max_new_tokens - 1)
        _synchronize(dev)
        decode_s = time.perf_counter() - t1 - capture_s

        tokens = s.out[:, : 1 + steps_run]
        out_lengths = generated_lengths(tokens, s.eos_ids)
        tokens = tokens[:, : int(out_lengths.max())].clone()
        stats = GenerationStats(
            prefill_s=t1 - t0,
            decode_s=decode_s,
            decode_steps=steps_run,
            decode_tokens_per_s=rows * steps_run / decode_s if steps_run and decode_s > 0 else 0.0,
            new_tokens=int(out_lengths.sum()),
            rows=rows,
            prompt_len=S,
            cache_len=s.cache.max_len,
            cache_bytes=s.nbytes,
            shared_prefix=shared,
            cuda_graph=len(s.graphs) > 0,
            graph_capture_s=capture_s,
        )
        return GenerationOutput(tokens, out_lengths, stats)

    # ------------------------------------------------------------------ the step (eager == graph)
    def _emit(self, s: _DecodeState, hidden: torch.Tensor, repeats: int = 1) -> None:
        """Choose the next token of each row from the last hidden states ``hidden [N, d]``, each
        row standing for ``repeats`` consecutive rows of the state (a prompt's samples), write it
        to the output column ``col`` and make it the next step's input. A model with
        ``next_tokens`` (tensor parallel: chosen from the vocabulary shards, the same on every
        rank) chooses them; otherwise its logits are sampled here."""
        p = s.sampling
        if hasattr(self.model, "next_tokens"):
            hidden = hidden.repeat_interleave(repeats, 0) if repeats > 1 else hidden
            sampled = self.model.next_tokens(hidden, p.temperature, p.top_k, p.top_p, s.generator)
        else:
            logits = self.model.logits(hidden)
            logits = logits.repeat_interleave(repeats, 0) if repeats > 1 else logits
            sampled = sample_tokens(logits, p.temperature, p.top_k, p.top_p, s.generator)
        # Without EOS ids no row ever finishes: the tokens are the sampled ones.
        tokens = sampled if s.eos_ids is None else emit_tokens(sampled, s.finished, s.eos_ids, p.pad)
        s.out.index_copy_(1, s.col, tokens[:, None])
        s.col += 1
        s.tok.copy_(tokens)

    def _decode_step(self, s: _DecodeState) -> None:
        """One decode step on the static buffers: no allocation the graph cannot own, no host sync."""
        torch.add(s.append_at, 1, out=s.cache_lens)
        if s.fast_forward is not None:
            hidden = s.fast_forward(s.tok[:, None], s.pos, s.hook)[:, -1]
        else:
            x = self.model.embed(s.tok[:, None])
            out = self.model(inputs_embeds=x, position_ids=s.pos, kv_cache=s.hook, compute_logits=False)
            hidden = out.hidden[:, -1]
        self._emit(s, hidden)
        s.pos += 1
        s.append_at.copy_(s.cache_lens)

    def _decode(self, s: _DecodeState, steps: int) -> tuple[int, float]:
        """Run up to ``steps`` decode steps; returns (steps run, seconds spent capturing)."""
        check_stop = s.eos_ids is not None
        if steps == 0 or (check_stop and bool(s.finished.all())):
            return 0, 0.0
        use_graph = self._graph_enabled(s)
        direct = s.hook.prepare()  # the backends of every step, chosen once
        s.fast_forward = None
        if direct and not use_graph and cpu_forward.unsupported_reason(self.model) is None:
            if s.cpu_forward is None or not s.cpu_forward.reads(self.model):
                rows = s.tok.shape[0]
                s.cpu_forward = CPUForward(self.model, batch=rows, length=1, table_rows=s.positions)
            s.fast_forward = s.cpu_forward
        generator = s.generator if s.sampling.temperature else None
        captured_before, i = s.graphs.capture_s, 0
        with skip_value_checks():  # indices are in bounds by construction; checks would sync
            while i < steps:
                if use_graph:
                    s.graphs.run("decode", lambda: self._decode_step(s), generator=generator)
                else:
                    self._decode_step(s)
                i += 1
                if check_stop and i % self.stop_check_every == 0 and bool(s.finished.all()):
                    break
        return i, s.graphs.capture_s - captured_before

    def _graph_enabled(self, s: _DecodeState) -> bool:
        if self.cuda_graph is False or self.model.device.type != "cuda":
            return False
        return not s.sampling.temperature or hasattr(torch.cuda.CUDAGraph, "register_generator_state")

    # ------------------------------------------------------------------ AR -> AR
    def plan_then_answer(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        plan_max_new_tokens: int,
        max_new_tokens: int,
        answer_prefix_ids: list[int] | torch.Tensor | None = None,
        plan_eos_token_id: int | list[int] | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ) -> PlanAnswerOutput:
        """The pipeline's AR->AR baseline: the executor writes its own plan, then answers
        (:func:`plan_then_answer` with this executor's :meth:`generate`; ``kwargs``: its sampling
        options, ``seed``, ``pad_token_id``, ``num_samples``)."""
        return plan_then_answer(
            self.generate,
            input_ids,
            attention_mask,
            plan_max_new_tokens=plan_max_new_tokens,
            max_new_tokens=max_new_tokens,
            answer_prefix_ids=answer_prefix_ids,
            plan_eos_token_id=plan_eos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    # ------------------------------------------------------------------ inputs
    def _packed_prompt(self, input_ids, attention_mask, prefix_embeds):
        """Validate and assemble the rows: packed embeddings ``[B, S, d]`` (valid tokens first,
        ``S`` = the longest row) and the valid lengths ``[B]`` int64."""
        dev, d = self.model.device, self.config.hidden_size
        if input_ids is None and prefix_embeds is None:
            raise ValueError(f"{WHERE}: give input_ids, prefix_embeds or both")
        embeds, valid = [], []
        if prefix_embeds is not None:
            if not isinstance(prefix_embeds, torch.Tensor) or prefix_embeds.dim() != 3:
                raise ValueError(
                    f"{WHERE}: prefix_embeds must be a [B, P, d_model] tensor, got {_desc(prefix_embeds)}"
                )
            if prefix_embeds.shape[-1] != d or prefix_embeds.shape[1] == 0 or prefix_embeds.shape[0] == 0:
                raise ValueError(
                    f"{WHERE}: prefix_embeds must be [B, P, d_model] = [B, P >= 1, {d}], got "
                    f"{tuple(prefix_embeds.shape)}"
                )
            if prefix_embeds.dtype != self.model.dtype:
                raise TypeError(
                    f"{WHERE}: prefix_embeds has dtype {prefix_embeds.dtype}, the model {self.model.dtype}"
                )
            if prefix_embeds.device.type == "meta":
                raise ValueError(f"{WHERE}: prefix_embeds is on meta (a tensor without data)")
            if not bool(torch.isfinite(prefix_embeds).all()):
                bad = (~torch.isfinite(prefix_embeds)).nonzero()[0].tolist()
                raise ValueError(
                    f"{WHERE}: prefix_embeds holds non-finite values (NaN or inf), e.g. "
                    f"prefix_embeds{bad} = {float(prefix_embeds[tuple(bad)])}"
                )
            embeds.append(prefix_embeds.to(dev))
            valid.append(torch.ones(prefix_embeds.shape[:2], dtype=torch.bool, device=dev))
        if input_ids is not None:
            ids, mask = self._check_ids(input_ids, attention_mask)
            if prefix_embeds is not None and prefix_embeds.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"{WHERE}: prefix_embeds has batch {prefix_embeds.shape[0]}, input_ids {ids.shape[0]}"
                )
            embeds.append(self.model.embed(ids))
            valid.append(mask)
        elif attention_mask is not None:
            raise ValueError(f"{WHERE}: attention_mask is given without input_ids")
        x, valid = torch.cat(embeds, dim=1), torch.cat(valid, dim=1)
        lengths = valid.sum(-1)
        empty = (lengths == 0).nonzero()
        if empty.numel():
            raise ValueError(f"{WHERE}: row {int(empty[0, 0])} has no tokens (attention_mask all 0)")
        S = int(lengths.max())
        if not bool(valid[:, :S].all()):
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :S]
            x = x.gather(1, order[..., None].expand(-1, -1, d))
        return x[:, :S], lengths

    def _check_ids(self, input_ids, attention_mask):
        dev, V = self.model.device, self.config.vocab_size
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"{WHERE}: input_ids must be a non-empty [B, L] tensor, got {_desc(input_ids)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"{WHERE}: input_ids must hold integer token ids, got {input_ids.dtype}")
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise ValueError(f"{WHERE}: {name} is on meta (a tensor without data)")
        ids = input_ids.to(dev, torch.long)
        if bool(((ids < 0) | (ids >= V)).any()):
            raise ValueError(
                f"{WHERE}: input_ids must be in [0, vocab_size = {V}), got {int(ids.min())}..{int(ids.max())}"
            )
        if attention_mask is None:
            return ids, torch.ones_like(ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"{WHERE}: attention_mask must have input_ids' shape {tuple(ids.shape)}, "
                f"got {_desc(attention_mask)}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                f"{WHERE}: attention_mask must be bool or 0/1 integers, got {attention_mask.dtype}"
            )
        mask = attention_mask.to(dev)
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{WHERE}: attention_mask must hold 0/1 (or bool) values")
        return ids, mask != 0

    def _sampling(self, temperature, top_k, top_p, eos_token_id, pad_token_id) -> _Sampling:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"{WHERE}: temperature must be a number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"{WHERE}: temperature must be >= 0 and finite, got {temperature}")
        V = self.config.vocab_size
        if top_k is not None:
            check_int(WHERE, "top_k", top_k, low=1)
            top_k = min(top_k, V)
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"{WHERE}: top_p must be in (0, 1], got {top_p!r}")
        try:
            eos = () if eos_token_id is None else tuple(eos_tensor(eos_token_id, "cpu").tolist())
        except ValueError as exc:
            raise ValueError(f"{WHERE}: {exc}") from None
        if any(e >= V for e in eos):
            raise ValueError(f"{WHERE}: eos_token_id {eos} outside the vocabulary (vocab_size = {V})")
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        check_int(WHERE, "pad_token_id", pad_token_id, low=0, high=V - 1)
        if not temperature:  # greedy: the filters do not change the argmax
            top_k = top_p = None
        return _Sampling(
            float(temperature), top_k, None if top_p is None else float(top_p), eos, pad_token_id
        )

    def _state(self, key, *, rows, prefix_len, max_new_tokens) -> _DecodeState:
        s = self._states.pop(key, None)
        if s is None:
            while len(self._states) >= self.max_cached_states:
                self._states.popitem(last=False)
            cache_len = max_new_tokens if prefix_len else key[3]
            s = _DecodeState(
                self.model,
                rows=rows,
                cache_len=cache_len,
                prefix_len=prefix_len,
                max_new_tokens=max_new_tokens,
                sampling=key[4],
                decode_backend=self.decode_backend,
            )
        self._states[key] = s
        return s


def _desc(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def plan_then_answer(
    generate,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    plan_max_new_tokens: int,
    max_new_tokens: int,
    answer_prefix_ids: list[int] | torch.Tensor | None = None,
    plan_eos_token_id: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    **kwargs,
) -> PlanAnswerOutput:
    """AR->AR with any ``generate(ids, mask, *, max_new_tokens, eos_token_id, seed, **kwargs)``
    returning ``tokens [N, T]`` and ``lengths [N]`` (:meth:`ARExecutor.generate`, or the pipeline's
    naive loop):

    1. ``plan = generate(input_ids, attention_mask, max_new_tokens=plan_max_new_tokens)``, stopping
       at ``plan_eos_token_id`` (default ``eos_token_id``), one plan per prompt row;
    2. each row's answer prompt is its prompt tokens + its plan (the plan's closing EOS dropped) +
       ``answer_prefix_ids`` (e.g. the tokens of "Answer:"), left-padded;
    3. ``answer = generate(answer prompt, max_new_tokens=max_new_tokens)`` stopping at
       ``eos_token_id``. ``kwargs`` apply to both (``num_samples`` to the answer only); the answer
       draws with ``seed + 1``.
    """
    plan_eos = eos_token_id if plan_eos_token_id is None else plan_eos_token_id
    plan_kw = {k: v for k, v in kwargs.items() if k != "num_samples"}
    plan = generate(
        input_ids,
        attention_mask,
        max_new_tokens=plan_max_new_tokens,
        eos_token_id=plan_eos,
        seed=seed,
        **plan_kw,
    )
    stops = set() if plan_eos is None else set(eos_tensor(plan_eos, "cpu").tolist())
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    tail = answer_prefix_ids.tolist() if isinstance(answer_prefix_ids, torch.Tensor) else answer_prefix_ids
    rows = []
    for b, (row, n) in enumerate(zip(plan.tokens.tolist(), plan.lengths.tolist(), strict=True)):
        steps = row[:n]
        if steps and steps[-1] in stops:
            steps = steps[:-1]
        rows.append(input_ids[b][mask[b]].tolist() + steps + list(tail or ()))
    ids, answer_mask = left_pad(rows, pad_id=0, device=input_ids.device)
    answer_seed = None if seed is None else seed + 1
    answer = generate(
        ids, answer_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, seed=answer_seed, **kwargs
    )
    return PlanAnswerOutput(plan, answer, ids, answer_mask)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
