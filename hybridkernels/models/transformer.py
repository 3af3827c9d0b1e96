"""One Llama-family transformer stack for the planner (bidirectional) and the executor (causal).

RMSNorm, RoPE (HF rotate-half convention, ``default`` / ``linear`` / ``llama3`` frequencies), GQA,
SwiGLU MLP, optional Qwen2 q/k/v biases and Qwen3 q/k norms, tied or untied LM head. Attention
goes through :func:`hybridkernels.ops.attention` (flash layout ``[B, L, H, D]``); the model holds
no kernels of its own. ``attention_backend`` picks that op's backend (``backend=`` is its former
name, still accepted).

Parameter names follow HF Llama without the ``model.`` prefix (``embed_tokens.weight``,
``layers.N.self_attn.q_proj.weight``, ..., ``norm.weight``, ``lm_head.weight``); the name maps
for HF and LLaDA checkpoints live in :mod:`hybridkernels.models.checkpoint`.

With ``kv_cache=`` a :class:`KVCacheHook` takes over attention (the planner's and the executor's
caches); its docstring has the contract.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..validation import check_attention_mask, check_token_ids, renamed
from . import checkpoint
from .config import TransformerConfig

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@runtime_checkable
class KVCacheHook(Protocol):
    """Per-layer attention over cached keys (the planner's prefix / dual cache, the executor's
    static cache).

    * ``forward(..., return_kv=True)`` returns every layer's ``(k, v)``, ``[B, L, Hkv, D]`` after
      RoPE (and after Qwen3's k norm), for the positions of this call.
    * ``forward(..., kv_cache=hook)`` hands attention to ``hook.attend(layer, q, k, v)`` in every
      layer: ``q [B, T, Hq, D]`` and ``k``/``v [B, T, Hkv, D]`` (post-RoPE) are this call's tokens; the
      hook stores ``k``/``v`` where it wants (``ops.kv_append``, or overwriting the block's slots of a
      full buffer), attends over whatever keys it holds (``ops.attention`` /
      ``ops.decode_attention``) and returns ``[B, T, Hq, D]``. With a hook, ``position_ids`` must be
      given, and ``attention_mask``/``causal`` are the hook's business.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class TransformerOutput(NamedTuple):
    """``logits [B, L, V]`` (None with ``compute_logits=False``), ``hidden [B, L, d]`` after the
    final norm, ``kv``: per layer ``(k, v)`` ``[B, L, Hkv, D]`` post-RoPE, or None."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (as HF Llama and LLaDA)."""

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same ops, minus two no-op casts and an allocation
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)))
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: TransformerConfig) -> torch.Tensor:
    """Float32 ``[head_dim / 2]`` RoPE inverse frequencies, with HF's ``linear``/``llama3`` scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """``cos``/``sin`` ``[B, L, 1, D]`` in ``dtype`` for int ``position_ids [B, L]`` (fp32 math)."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` by the rotate-half convention (HF Llama, LLaDA)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin [..., D]`` (HF's ``cat(s, s)``) -> ``cat(-s, s)``, the table of :func:`apply_rotary`."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with the sign of rotate-half moved into the table (``signed_sin``):
    ``x * cos + roll(x, D/2) * cat(-s, s)``, bitwise the same values (``(-a) * b == a * (-b)``)
    in 4 ops instead of 6 (chunk, neg, cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, device=None, dtype=None):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        kw = dict(device=device, dtype=dtype)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, config.q_size, bias=config.qkv_bias, **kw)
        self.k_proj = nn.Linear(d, config.kv_size, bias=config.qkv_bias, **kw)
        self.v_proj = nn.Linear(d, config.kv_size, bias=config.qkv_bias, **kw)
        self.o_proj = nn.Linear(config.q_size, d, bias=config.o_bias, **kw)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """Make ``q_proj``/``k_proj``/``v_proj``'s weights (and biases) views of one
        ``[q_size + 2 kv_size, d]`` tensor, so inference runs one matmul instead of three (the
        parameters keep their names, objects and values; see :meth:`Transformer.fuse_projections`)."""
        self._qkv = _fuse_linears((self.q_proj, self.k_proj, self.v_proj))

    def _qkv_fused(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused weight and bias while the three projections are still views of them, and
        gradients are not wanted (the fused product would not reach the parameters); else None."""
        fused = self._qkv
        if fused is None or not _still_fused(fused, (self.q_proj, self.k_proj, self.v_proj)):
            return None
        return fused

    def forward(self, x, cos, sin, *, key_padding_mask, causal, kv_cache, attention_backend):
        B, L, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        fused = self._qkv_fused()
        if fused is not None:
            qkv = F.linear(x, *fused).view(B, L, Hq + 2 * Hkv, D)
            v = qkv[:, :, Hq + Hkv :]
            if self.q_norm is None:  # RoPE on q and k in one pass over their heads
                qk = apply_rotary(qkv[:, :, : Hq + Hkv], cos, sin)
                q, k = qk[:, :, :Hq], qk[:, :, Hq:]
            else:
                q, k = self.q_norm(qkv[:, :, :Hq]), self.k_norm(qkv[:, :, Hq : Hq + Hkv])
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            q = self.q_proj(x).view(B, L, Hq, D)
            k = self.k_proj(x).view(B, L, Hkv, D)
            v = self.v_proj(x).view(B, L, Hkv, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer, q, k, v)
        else:
            out = ops.attention(
                q, k, v, key_padding_mask=key_padding_mask, causal=causal, backend=attention_backend
            )
        return self.o_proj(out.reshape(B, L, -1)), (k, v)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: TransformerConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=config.mlp_bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)
        self._gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        """``gate_proj``/``up_proj`` as views of one ``[2 intermediate, d]`` tensor (one matmul)."""
        self._gate_up = _fuse_linears((self.gate_proj, self.up_proj))

    def _gate_up_fused(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused gate/up weight and bias while still in use (see ``Attention._qkv_fused``)."""
        fused = self._gate_up
        if fused is None or not _still_fused(fused, (self.gate_proj, self.up_proj)):
            return None
        return fused

    def forward(self, x):
        fused = self._gate_up_fused()
        if fused is not None:
            gate, up = F.linear(x, *fused).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Concatenate the weights (and biases) of plain ``nn.Linear`` s sharing an input into one
    tensor and make each parameter's ``.data`` a view of it (same Parameter objects, values and
    ``state_dict``). None, changing nothing, when they are not all plain ``nn.Linear`` s of one
    dtype and device, on the meta device, or mixed with and without bias."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    first = weights[0]
    if first.device.type == "meta" or any(
        w.dtype != first.dtype or w.device != first.device for w in weights
    ):
        return None
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    with torch.no_grad():
        fused_w = torch.cat([w.detach() for w in weights])
        fused_b = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = fused_w[start : start + n]
            if fused_b is not None:
                m.bias.data = fused_b[start : start + n]
            start += n
    return fused_w, fused_b


def _still_fused(fused, linears) -> bool:
    """The linears' parameters are still the views :func:`_fuse_linears` made (not replaced by a
    ``load_state_dict(assign=True)``, a ``.to()``, or a user), and no gradient is being recorded
    for them (the fused product would bypass the parameters)."""
    if torch.compiler.is_compiling():  # data pointers do not trace: the separate products
        return False
    w, b = fused
    ptr, size = w.data_ptr(), w.element_size() * w.shape[1]
    row = 0
    for m in linears:
        weight = m.weight
        if weight.data_ptr() != ptr + row * size:
            return False
        if b is not None and m.bias.data_ptr() != b.data_ptr() + row * b.element_size():
            return False
        row += weight.shape[0]
    return not (torch.is_grad_enabled() and linears[0].weight.requires_grad)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, layer, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, **kw)

    def forward(self, x, cos, sin, **attn_kw):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, **attn_kw)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, device):
    """Positions ``[B, L]`` counting only valid tokens (left padding: ``cumsum(mask) - 1``, 0 on
    pads), or ``0 .. L-1`` without a mask. Since RoPE is relative and pads are masked out, this
    only moves rounding; it makes a padded row match the same prompt unpadded."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class Transformer(nn.Module):
    """Llama-family decoder stack (causal or bidirectional) with embedding and LM head.

    Build with random weights (``Transformer(config)``, then :meth:`reset_parameters`), from a
    checkpoint directory (:meth:`from_pretrained`) or from an in-memory HF model (:meth:`from_hf`).

    ``attention_backend`` is the default backend of :func:`hybridkernels.ops.attention`
    (``"triton"``, ``"reference"``, None = auto; ``backend`` is its deprecated alias); ``causal``
    defaults to ``config.causal``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        causal: bool | None = None,
        attention_backend: str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"Transformer: config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.causal = config.causal if causal is None else bool(causal)
        self.attention_backend = renamed(
            "Transformer", "attention_backend", attention_backend, "backend", backend
        )
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        )
        self._inv_freq = rope_inv_freq(config)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}
        self._fused = False
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()
            self.fuse_projections()

    def fuse_projections(self) -> Transformer:
        """Store each layer's ``q/k/v_proj`` weights as views of one ``[q + 2 kv, d]`` tensor and
        ``gate/up_proj`` as views of one ``[2 f, d]`` tensor, so that inference runs 2 matmuls per
        layer instead of 5 (and RoPE one pass over q and k): the same products, the same values.

        Parameter names, objects, values and ``state_dict`` are unchanged (each parameter's
        ``.data`` becomes a view); done at construction and by :meth:`from_pretrained`, not by
        :meth:`from_hf` (its weights stay shared with the HF model; call this to fuse them into
        a copy). Redone after ``.to()`` / ``.half()``; a forward whose projections are no
        longer views (``load_state_dict(assign=True)``, a parameter replaced) or that records
        gradients for them runs the separate matmuls. Plain ``nn.Linear`` projections only."""
        with torch.no_grad():
            for block in self.layers:
                block.self_attn.fuse()
                block.mlp.fuse()
        self._fused = True
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give each parameter new data: fuse the new tensors again.
        out = super()._apply(fn, recurse)
        if getattr(self, "_fused", False):
            self.fuse_projections()
        return out

    # ------------------------------------------------------------------ construction helpers
    @property
    def backend(self) -> str | None:
        """Deprecated alias of :attr:`attention_backend`."""
        return self.attention_backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.attention_backend = value

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device=None,
        causal: bool | None = None,
        attention_backend: str | None = None,
        names: str = "auto",
        config_overrides: Mapping | None = None,
        backend: str | None = None,
    ) -> Transformer:
        """Load a local checkpoint directory: ``config.json`` + ``*.safetensors`` (sharded or not).

        ``dtype`` default: the embedding's dtype in the checkpoint; ``device`` default CPU;
        ``causal`` default: the config's (False for LLaDA); ``names``: ``"auto"`` (from the tensor
        names), ``"hf"`` or ``"llada"``; ``config_overrides``: config fields to replace;
        ``backend``: deprecated alias of ``attention_backend``.
        """
        attention_backend = renamed(
            "Transformer.from_pretrained", "attention_backend", attention_backend, "backend", backend
        )
        config = checkpoint.read_config(path, config_overrides)
        tensors = dict(checkpoint.iter_safetensors(path))
        state = checkpoint.map_state_dict(
            tensors, config, parameter_shapes(config), names=names, source=str(path)
        )
        if dtype is None:
            dtype = state["embed_tokens.weight"].dtype
        return build_model(
            config,
            state,
            dtype=dtype,
            device=device or "cpu",
            causal=causal,
            attention_backend=attention_backend,
        )

    @classmethod
    def from_hf(
        cls,
        hf_model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        device=None,
        causal: bool | None = None,
        attention_backend: str | None = None,
        backend: str | None = None,
    ) -> Transformer:
        """A :class:`Transformer` with the weights of an in-memory HF model (``LlamaForCausalLM``,
        ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, a LLaDA remote-code model, ...). ``dtype`` and
        ``device`` default to the HF model's; weights already there are shared, not copied.
        ``backend``: deprecated alias of ``attention_backend``."""
        attention_backend = renamed(
            "Transformer.from_hf", "attention_backend", attention_backend, "backend", backend
        )
        config = TransformerConfig.from_dict(hf_model.config.to_dict())
        state = hf_model.state_dict()
        first = next(iter(state.values()))
        mapped = checkpoint.map_state_dict(
            state, config, parameter_shapes(config), source=type(hf_model).__name__
        )
        return build_model(
            config,
            mapped,
            dtype=dtype or first.dtype,
            device=device or first.device,
            causal=causal,
            attention_backend=attention_backend,
            fuse=False,  # keep sharing the HF model's tensors
        )

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None, generator: torch.Generator | None = None):
        """Random init: linear and embedding weights ``N(0, std)`` (default
        ``config.initializer_range``), biases 0, norm weights 1."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    # ------------------------------------------------------------------ pieces for the fast paths
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``[V, d]``: the LM head (the embedding when tied), for the fused unmask op."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int token ids -> ``[B, L, d]`` embeddings."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: ``hidden [..., d]`` (after the final norm) -> ``[..., V]`` in the model dtype."""
        return F.linear(hidden, self.lm_head_weight)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Float32 RoPE frequencies on ``device`` (cached, so a CUDA graph capture copies nothing)."""
        device = torch.device(device)
        cached = self._inv_freq_by_device.get(device)
        if cached is None:
            cached = self._inv_freq_by_device[device] = self._inv_freq.to(device)
        return cached

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        causal: bool | None = None,
        kv_cache: KVCacheHook | None = None,
        return_kv: bool = False,
        compute_logits: bool = True,
        attention_backend: str | None = None,
        backend: str | None = None,
    ) -> TransformerOutput:
        """Run the stack.

        Args:
            input_ids: int ``[B, L]``, or give ``inputs_embeds [B, L, d]`` (model dtype) instead.
            attention_mask: ``[B, L]`` bool or 0/1 ints, True/1 = real token (left padding);
                used as the key padding mask and, without ``position_ids``, for positions.
            position_ids: int ``[B, L]`` (or ``[L]``); default :func:`default_position_ids`.
                Required with ``kv_cache``.
            causal: override the model's mode (queries aligned to the end of the keys).
            kv_cache: a :class:`KVCacheHook` that does attention against cached keys.
            return_kv: also return every layer's post-RoPE ``(k, v)`` of these positions.
            compute_logits: apply the LM head to every position (else ``logits`` is None; use
                :meth:`logits` on the rows you need).
            attention_backend: attention backend for this call (default: the model's);
                ``backend`` is its deprecated alias.

        Returns a :class:`TransformerOutput` (``.logits``, ``.hidden``, ``.kv``).
        """
        attention_backend = renamed(
            "Transformer.forward", "attention_backend", attention_backend, "backend", backend
        )
        x = self._input_embeddings(input_ids, inputs_embeds)
        B, L, _ = x.shape
        if kv_cache is not None and not callable(getattr(kv_cache, "attend", None)):
            raise TypeError("Transformer.forward: kv_cache must have an attend(layer, q, k, v) method")
        if kv_cache is not None and (position_ids is None or attention_mask is not None):
            raise ValueError(
                "Transformer.forward: with kv_cache, give position_ids and no attention_mask "
                "(the hook owns the keys and their masking)"
            )
        mask = self._key_padding_mask(attention_mask, B, L, x.device)
        if position_ids is None:
            position_ids = default_position_ids(mask, B, L, x.device)
        position_ids = self._check_positions(position_ids, B, L, x.device)

        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, x.dtype)
        sin = signed_sin(sin)  # the blocks rotate with apply_rotary
        attn_kw = dict(
            key_padding_mask=mask,
            causal=self.causal if causal is None else bool(causal),
            kv_cache=kv_cache,
            attention_backend=self.attention_backend if attention_backend is None else attention_backend,
        )
        kvs = [] if return_kv else None
        for block in self.layers:
            x, kv = block(x, cos, sin, **attn_kw)
            if kvs is not None:
                kvs.append(kv)
        hidden = self.norm(x)
        logits = self.logits(hidden) if compute_logits else None
        return TransformerOutput(logits, hidden, kvs)

    def _input_embeddings(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Transformer.forward: give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_token_ids("Transformer.forward", "input_ids", input_ids)
            return self.embed(input_ids)
        d = self.config.hidden_size
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("Transformer.forward: inputs_embeds must be a [B, L, d] tensor")
        if inputs_embeds.shape[-1] != d or inputs_embeds.numel() == 0:
            raise ValueError(
                f"Transformer.forward: inputs_embeds must be [B, L, {d}], got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != self.dtype:
            raise TypeError(
                f"Transformer.forward: inputs_embeds has dtype {inputs_embeds.dtype}, the model {self.dtype}"
            )
        return inputs_embeds

    @staticmethod
    def _key_padding_mask(mask, B, L, device):
        return None if mask is None else check_attention_mask("Transformer.forward", mask, (B, L), device)

    @staticmethod
    def _check_positions(position_ids, B, L, device):
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
            raise TypeError("Transformer.forward: position_ids must be an integer tensor")
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(B, -1)
        if tuple(position_ids.shape) != (B, L):
            raise ValueError(
                f"Transformer.forward: position_ids must be [B, L] = [{B}, {L}] or [L], got "
                f"{tuple(position_ids.shape)}"
            )
        if position_ids.device != device:
            raise ValueError(
                f"Transformer.forward: position_ids is on {position_ids.device}, inputs on {device}"
            )
        return position_ids


def parameter_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape for a model of ``config`` (built on the meta device)."""
    model = Transformer(config, device="meta")
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def build_model(
    config: TransformerConfig,
    state: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    device,
    causal: bool | None = None,
    attention_backend: str | None = None,
    fuse: bool = True,
) -> Transformer:
    """A :class:`Transformer` holding ``state`` (our names, already checked), cast to
    ``dtype``/``device``. Tensors already in that dtype and device are used without a copy,
    unless ``fuse`` (:meth:`Transformer.fuse_projections`) copies the projections into one
    tensor per layer.

    The model's dtype (``dtype``, else the embedding's) must be one the ops take: float16,
    bfloat16 or float32 (a float64 checkpoint loads with an explicit ``dtype``)."""
    model_dtype = dtype if dtype is not None else state["embed_tokens.weight"].dtype
    if not isinstance(model_dtype, torch.dtype) or model_dtype not in MODEL_DTYPES:
        given = "the checkpoint's" if dtype is None else "dtype ="
        raise TypeError(
            f"Transformer: {given} {model_dtype} is not a model dtype the ops take (float16, bfloat16, "
            "float32); pass dtype=torch.float32 (or torch.bfloat16 / torch.float16)"
        )
    model = Transformer(config, device="meta", causal=causal, attention_backend=attention_backend)
    state = {n: t.detach().to(device=device, dtype=dtype) for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if fuse:
        model.fuse_projections()
    return model.eval()
