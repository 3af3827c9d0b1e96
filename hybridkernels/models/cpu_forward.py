"""A float32 CPU forward of a stock :class:`Transformer` over a K/V cache hook, in a few calls a
layer: the executor's decode step and the planner's cached steps.

On the CPU nothing replays a CUDA graph, and a small model's cached step is dominated by
dispatch: about 250 torch ops (RMSNorm alone is 6, each ~5 us for 256 floats) around 17 matmuls.
:class:`CPUForward` keeps the matmuls in torch (into static buffers, bitwise ``F.linear``'s
products: see :class:`_Linear`) and the attention in the hook (``attend(layer, q, k, v)``, as
:meth:`Transformer.forward` calls it), and does everything else in ``_C`` on pointers converted
once: RMSNorm fused with the residual add (and Qwen3's per-head q/k norms), RoPE on q and k from
position-indexed tables, SiLU * up. Per layer: 4 matmuls, 4 ``_C`` calls and the hook.

RoPE, the residual adds, the embedding and the products are bitwise the generic forward's;
RMSNorm and SiLU round a few ulp differently (another summation order, another ``exp``), so hidden
states agree to ~1e-6 relative and tokens agree except at exact near-ties (tests: tokens equal
the generic forward's, the no-cache loops' and HF ``generate``'s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _cuda
from .transformer import MLP, Attention, Block, RMSNorm, Transformer, rope_cos_sin, signed_sin


def unsupported_reason(model: Transformer) -> str | None:
    """Why :class:`CPUForward` cannot run ``model`` (then the generic forward does), or None."""
    if type(model) is not Transformer:
        return f"{type(model).__name__} is not a plain Transformer"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"{model.dtype} on {model.device}: the step is float32 CPU"
    if not _cuda.available():
        return "hybridkernels._C is not built"
    cfg = model.config
    if cfg.head_dim % 2:
        return "odd head_dim"
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return "gradients are being recorded"
    module = torch.nn.modules.module
    if getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None):
        return "global module hooks are registered"
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a forward hook is registered on a {type(m).__name__}"
    for block in model.layers:
        if type(block) is not Block or type(block.mlp) is not MLP or type(block.self_attn) is not Attention:
            return "a layer is not the stock Block / Attention / MLP"
        norms = [block.input_layernorm, block.post_attention_layernorm]
        if cfg.qk_norm:
            norms += [block.self_attn.q_norm, block.self_attn.k_norm]
        if any(type(n) is not RMSNorm for n in norms):
            return "a norm is not the stock RMSNorm"
        if block.self_attn._qkv_fused() is None or block.mlp._gate_up_fused() is None:
            return "the projections are not fused (Transformer.fuse_projections)"
    if type(model.norm) is not RMSNorm:
        return "the final norm is not the stock RMSNorm"
    return None


def _weights(model: Transformer) -> tuple[torch.Tensor | None, ...]:
    """The tensors a step reads, in order: embedding, per layer (norm, fused q/k/v weight and
    bias, o_proj weight and bias, norm, fused gate/up weight and bias, down_proj weight and bias),
    final norm (None for a missing bias or fusion)."""
    out = [model.embed_tokens.weight]
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        out += [
            block.input_layernorm.weight,
            *(attn._qkv or (None, None)),
            *((attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else ()),
            attn.o_proj.weight,
            attn.o_proj.bias,
        ]
        out += [block.post_attention_layernorm.weight, *(mlp._gate_up or (None, None))]
        out += [mlp.down_proj.weight, mlp.down_proj.bias]
    return (*out, model.norm.weight)


class CPUForward:
    """``model(ids, position_ids=positions, kv_cache=hook, compute_logits=False).hidden`` for
    ``ids`` / ``positions`` int64 ``[batch, length]`` on static buffers: returns the final-normed
    hidden states ``[batch, length, d]``, a buffer valid until the next call. ``table_rows``: the
    RoPE tables' size (every position must be below it: ``_C`` raises otherwise). Build it only
    when :func:`unsupported_reason` is None, and rebuild it when :meth:`reads` turns False."""

    def __init__(self, model: Transformer, *, batch: int, length: int, table_rows: int):
        cfg = model.config
        d, Hq, Hkv, D, inter = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        rows = batch * length
        self.weights = _weights(model)
        self.shape, self.rows, self.d, self.inter = (batch, length), rows, d, inter
        self.h = torch.empty(rows, d)  # the residual stream
        self.x = torch.empty(rows, d)  # a norm's output
        self.qkv = torch.empty(rows, (Hq + 2 * Hkv) * D)
        heads = self.qkv.view(batch, length, Hq + 2 * Hkv, D)
        self.q, self.k, self.v = heads[:, :, :Hq], heads[:, :, Hq : Hq + Hkv], heads[:, :, Hq + Hkv :]
        self.branch = torch.empty(rows, d)  # o_proj / down_proj output, added to the stream
        self.gate_up = torch.empty(rows, 2 * inter)
        self.act = torch.empty(rows, inter)
        cos, sin = rope_cos_sin(
            model.inv_freq(torch.device("cpu")), torch.arange(table_rows)[None], torch.float32
        )
        self.cos, self.sin = cos[0, :, 0].contiguous(), signed_sin(sin)[0, :, 0].contiguous()
        self.table_rows = table_rows

        ptr = torch.Tensor.data_ptr
        self.h_ptr, self.x_ptr, self.branch_ptr = ptr(self.h), ptr(self.x), ptr(self.branch)
        self.gate_up_ptr, self.act_ptr, self.qkv_ptr = ptr(self.gate_up), ptr(self.act), ptr(self.qkv)
        # _C.rotary's arguments after (x, rows) and before positions: the q and k heads of a qkv row
        self.qkv_stride, self.head_dim = self.qkv.stride(0), D
        self.rope_heads = (Hq + Hkv, D, self.qkv_stride, D)
        self.rope_tables = (ptr(self.cos), ptr(self.sin), table_rows, D)
        pack = sum(p.numel() * p.element_size() for p in model.layers.parameters()) <= _PACK_BYTES
        self.layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            norm1, norm2 = block.input_layernorm, block.post_attention_layernorm
            (qkv_w, qkv_b), (gate_up_w, gate_up_b) = attn._qkv_fused(), mlp._gate_up_fused()
            o, down = attn.o_proj, mlp.down_proj
            # Qwen3's q/k norms: each head of a qkv row normalised in place, before RoPE
            qk = None if attn.q_norm is None else (
                (self.qkv_ptr, ptr(attn.q_norm.weight), attn.q_norm.eps, Hq),
                (self.qkv_ptr + 4 * Hq * D, ptr(attn.k_norm.weight), attn.k_norm.eps, Hkv),
            )  # fmt: skip
            self.layers.append((
                (ptr(norm1.weight), norm1.eps), _Linear(qkv_w, qkv_b, rows, pack), qk,
                _Linear(o.weight, o.bias, rows, pack), (ptr(norm2.weight), norm2.eps),
                _Linear(gate_up_w, gate_up_b, rows, pack), _Linear(down.weight, down.bias, rows, pack),
            ))  # fmt: skip
        self.final_norm = (ptr(model.norm.weight), model.norm.eps)

    def reads(self, model: Transformer) -> bool:
        """Whether ``model``'s weights are still the tensors this forward was built on."""
        now = _weights(model)
        return len(now) == len(self.weights) and all(a is b for a, b in zip(now, self.weights, strict=True))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, hook) -> torch.Tensor:
        if tuple(ids.shape) != self.shape or tuple(positions.shape) != self.shape:
            raise ValueError(f"CPUForward: ids and positions must be {list(self.shape)}, got "
                             f"{list(ids.shape)} and {list(positions.shape)}")  # fmt: skip
        positions = positions if positions.is_contiguous() else positions.contiguous()
        C, rows, d, inter = _cuda._C, self.rows, self.d, self.inter
        torch.index_select(self.weights[0], 0, ids.reshape(-1), out=self.h)
        pos = positions.data_ptr()
        residual = 0  # what the next norm adds to the stream first: the previous layer's MLP output
        stride, D = self.qkv_stride, self.head_dim
        for layer, (norm1, qkv, qk, o, norm2, gate_up, down) in enumerate(self.layers):
            C.rms_norm(self.h_ptr, d, residual, d, norm1[0], self.x_ptr, d, rows, d, norm1[1])
            qkv(self.x, self.qkv)
            for heads_ptr, weight, eps, heads in qk or ():
                C.rms_norm(heads_ptr, stride, 0, 0, weight, heads_ptr, stride, rows, D, eps, heads, D, D)
            C.rotary(self.qkv_ptr, rows, *self.rope_heads, pos, *self.rope_tables)
            out = hook.attend(layer, self.q, self.k, self.v)
            o(out.reshape(rows, -1), self.branch)
            C.rms_norm(self.h_ptr, d, self.branch_ptr, d, norm2[0], self.x_ptr, d, rows, d, norm2[1])
            gate_up(self.x, self.gate_up)
            C.silu_mul(
                self.gate_up_ptr, self.gate_up_ptr + 4 * inter, 2 * inter, self.act_ptr, inter, rows, inter
            )
            down(self.act, self.branch)
            residual = self.branch_ptr
        C.rms_norm(self.h_ptr, d, residual, d, self.final_norm[0], self.x_ptr, d, rows, d, self.final_norm[1])
        return self.x.view(*self.shape, d)


# Layer weights up to this size get an MKL-prepacked copy per CPUForward (beyond it, the memory).
_PACK_BYTES = 256 << 20


class _Linear:
    """``out = F.linear(x, weight, bias)`` for ``[rows, in]`` inputs, into a static ``out``. MKL's
    prepacked product (``torch.ops.mkl._mkl_linear``: 10-40% faster at 16-128 rows here) where
    torch has it and it gives ``F.linear``'s product bitwise at this row count, checked on a random
    input when built (at 16+ rows it sums in the same order; below, MKL picks other kernels and
    the check fails); else ``mm`` / ``addmm`` on ``weight.t()``: the very call ``F.linear`` makes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, pack: bool):
        self.weight, self.weight_t, self.bias, self.rows = weight, weight.t(), bias, rows
        self.packed = _pack(weight, bias, rows) if pack else None

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.packed is not None:
            out.copy_(torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows))
        elif self.bias is None:
            torch.mm(x, self.weight_t, out=out)
        else:
            torch.addmm(self.bias, x, self.weight_t, out=out)


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """MKL's packed ``weight`` for ``rows``-row products when that product is ``F.linear``'s."""
    if not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear"):
        return None
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
        same = torch.equal(
            torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows), F.linear(x, weight, bias)
        )
    except RuntimeError:  # a build whose MKL ops refuse these arguments
        return None
    return packed if same else None
