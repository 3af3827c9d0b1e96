"""Drop-in use from HF ``transformers``: our attention op inside an unmodified Llama / Qwen2 / Qwen3.

Two ways in, as with flash-attn and Liger-Kernel::

    import hybridkernels.integrations.hf as hk_hf

    hk_hf.register()  # once; then any model can ask for it by name
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hybridkernels")

    hk_hf.apply_hybridkernels_to_llama()  # or: every Llama built afterwards, sdpa/eager -> ours
    hk_hf.apply_hybridkernels_to_llama(model=model)  # or: this model instance

:func:`attention_forward` runs :func:`hybridkernels.ops.attention` under transformers'
attention interface (mask handling in its docstring).
:func:`generate_with_prefix` exposes the executor's static-cache, latent-prefix decoding for an
in-memory HF causal LM, without our model classes in the caller's code.
"""

from __future__ import annotations

import importlib
import warnings
import weakref

import torch

from .. import ops

NAME = "hybridkernels"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
WHERE = "hybridkernels attention"


# --------------------------------------------------------------------------- the attention function
def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function running :func:`ops.attention`.

    transformers' contract: ``query [B, Hq, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]`` (the
    cache's keys when decoding), returns ``(out [B, Lq, Hq, D], None)``. The op runs Triton on a
    GPU, the reference on the CPU, SDPA when autograd records (so training works), with ``causal``
    aligned to the end of the keys and a ``[B, Lk]`` key padding mask. Under the name
    ``"hybridkernels"`` transformers (>= 4.53) hands over the 2-D padding mask through the mask
    function registered beside this one; 4-D masks (older transformers, the module patch, custom
    masks) are decomposed into causal + padding when they are exactly that (checked once per mask
    tensor) and otherwise run through torch SDPA with the mask as given, never silently ignored.

    ``attention_mask``: None, a bool / 0-1 ``[B, Lm]`` padding mask (``Lm <= Lk``: a static cache's
    unused tail slots are dropped, as transformers' flash-attention path does), or a 4-D bool /
    additive ``[B, 1, Lq, Lk]`` mask. Raises ``ValueError`` for what the op cannot express
    (dropout, sliding windows, softcapping, attention sinks, position biases).
    """
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{WHERE}: {name} is not supported; use attn_implementation='sdpa' for this model"
            )
    if dropout:
        raise ValueError(f"{WHERE}: attention dropout ({dropout}) is not supported; set attention_dropout=0")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    Lq, Lk = q.shape[1], k.shape[1]
    causal = bool(is_causal) and Lq > 1
    padding = None
    if attention_mask is not None and attention_mask.dim() == 4:
        padding = _as_padding_mask(attention_mask, Lq, Lk, causal)
        if padding is _NOT_CAUSAL_PADDING:
            return _sdpa_4d(q, k, v, attention_mask, scaling), None
    elif attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != q.shape[0] or attention_mask.shape[1] > Lk:
            raise ValueError(
                f"{WHERE}: attention_mask must be [B, Lk] = [{q.shape[0]}, <= {Lk}] or 4-D, "
                f"got {tuple(attention_mask.shape)}"
            )
        padding = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        if padding.shape[1] < Lk:  # static cache: slots past the mask are unused
            k, v = k[:, : padding.shape[1]], v[:, : padding.shape[1]]
    if padding is not None:
        padding = padding.to(q.device)
    if q.shape[-1] not in ops.HEAD_DIMS:
        _warn_once(f"head_dim {q.shape[-1]} is not one of {ops.HEAD_DIMS}: running torch SDPA instead")
        out = ops.sdpa_attention(q, k, v, key_padding_mask=padding, causal=causal, scale=scaling)
    else:
        out = ops.attention(q, k, v, key_padding_mask=padding, causal=causal, scale=scaling)
    return out, None


def padding_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask-interface function: the 2-D bool padding mask (last ``kv_length`` columns)
    or None when nothing is padded, like transformers' flash-attention mask."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask


_NOT_CAUSAL_PADDING = object()
_decomposed: tuple | None = None  # (weakref to the last 4-D mask, its version, key, result)


def _as_padding_mask(mask: torch.Tensor, Lq: int, Lk: int, causal: bool):
    """A ``[B, 1 | H, Lq, Lk]`` mask -> the ``[B, Lk]`` key padding mask ``p`` when the mask is
    ``p`` and-ed with the causal (or no) mask, else ``_NOT_CAUSAL_PADDING``. Rows where no key is
    visible (left-padding queries) are ignored: their outputs never reach a real token. The answer
    is cached for the mask tensor, which transformers passes unchanged to every layer."""
    global _decomposed
    key = (mask.shape, mask.data_ptr(), mask._version, Lq, Lk, causal)
    if _decomposed is not None and _decomposed[0]() is mask and _decomposed[1] == key:
        return _decomposed[2]
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[-2:] != (Lq, Lk):
        raise ValueError(
            f"{WHERE}: 4-D attention_mask must end in (Lq, Lk) = ({Lq}, {Lk}), got {tuple(mask.shape)}"
        )
    padding = allowed[:, 0, -1, :]
    expected = padding[:, None, None, :].expand_as(allowed)
    if causal:
        qi = torch.arange(Lq, device=mask.device)[:, None] + (Lk - Lq)
        expected = expected & (torch.arange(Lk, device=mask.device)[None, :] <= qi)
    seen = expected.any(-1, keepdim=True)
    result = padding if bool(((allowed == expected) | ~seen).all()) else _NOT_CAUSAL_PADDING
    _decomposed = (weakref.ref(mask), key, result)
    return result


def _sdpa_4d(q, k, v, mask, scale):
    """torch SDPA with an arbitrary 4-D mask (layouts ``[B, L, H, D]`` in and out)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hq != Hkv:
        k, v = k.repeat_interleave(Hq // Hkv, dim=2), v.repeat_interleave(Hq // Hkv, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.to(q.device), scale=scale
    )
    return out.transpose(1, 2)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"{WHERE}: {message}", stacklevel=3)


# --------------------------------------------------------------------------- registration
def register(name: str = NAME) -> str:
    """Register :func:`attention_forward` (and its 2-D mask function) with transformers under
    ``name``, so ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` work. Idempotent; returns ``name``."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.50: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    else:
        AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds 4-D masks itself; attention_forward takes them
        pass
    else:
        AttentionMaskInterface.register(name, padding_mask_function)
    return name


def use_hybridkernels(model: torch.nn.Module, name: str = NAME) -> torch.nn.Module:
    """Switch an HF model instance (and its sub-models) to our attention; returns the model."""
    register(name)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers 4.4x
        model.config._attn_implementation = name
    return model


_patched: dict[str, object] = {}


def apply_hybridkernels(model_type: str, model: torch.nn.Module | None = None) -> None:
    """Liger-Kernel-style one-call patch for ``model_type`` in ``("llama", "qwen2", "qwen3")``.

    With ``model``: switch that instance to our attention (:func:`use_hybridkernels`). Without:
    patch ``transformers.models.<model_type>.modeling_<model_type>`` so that every model of that
    type running ``sdpa`` or ``eager`` attention, built before or after the call, runs ours (its
    masks stay 4-D; see :func:`attention_forward`). Undo with :func:`revert_hybridkernels`.
    """
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"apply_hybridkernels: model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
        )
    if model is not None:
        found = getattr(getattr(model, "config", None), "model_type", None)
        if found != model_type:
            raise ValueError(f"apply_hybridkernels: model is a {found!r} model, not {model_type!r}")
        use_hybridkernels(model)
        return
    register()
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    if model_type in _patched:
        return
    original = module.ALL_ATTENTION_FUNCTIONS
    if hasattr(original, "get_interface"):
        patched = type(original)()  # a local mapping overrides the global one for this module only
    else:  # transformers < 4.50: a dict
        patched = dict(original)
    patched["sdpa"] = attention_forward
    patched["eager"] = attention_forward
    _patched[model_type] = original
    module.ALL_ATTENTION_FUNCTIONS = patched


def revert_hybridkernels(model_type: str) -> None:
    """Undo :func:`apply_hybridkernels` for ``model_type`` (no-op when it was not patched)."""
    original = _patched.pop(model_type, None)
    if original is not None:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        module.ALL_ATTENTION_FUNCTIONS = original


def apply_hybridkernels_to_llama(model: torch.nn.Module | None = None) -> None:
    """:func:`apply_hybridkernels` for Llama (and Llama-architecture checkpoints)."""
    apply_hybridkernels("llama", model)


def apply_hybridkernels_to_qwen2(model: torch.nn.Module | None = None) -> None:
    """:func:`apply_hybridkernels` for Qwen2 / Qwen2.5."""
    apply_hybridkernels("qwen2", model)


def apply_hybridkernels_to_qwen3(model: torch.nn.Module | None = None) -> None:
    """:func:`apply_hybridkernels` for Qwen3 (dense)."""
    apply_hybridkernels("qwen3", model)


# --------------------------------------------------------------------------- executor decoding
def executor_for(hf_model: torch.nn.Module, **kwargs):
    """The :class:`~hybridkernels.models.ARExecutor` over an HF causal LM's weights (shared, not
    copied), built once per model and kept on it. ``kwargs`` go to ``ARExecutor.from_hf`` on the
    first call."""
    from ..models.executor import ARExecutor

    executor = getattr(hf_model, "_hybridkernels_executor", None)
    if executor is None:
        executor = ARExecutor.from_hf(hf_model, **kwargs)
        object.__setattr__(hf_model, "_hybridkernels_executor", executor)
    return executor


def generate_with_prefix(
    hf_model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_embeds: torch.Tensor | None = None,
    **generate_kwargs,
):
    """Greedy / sampled decoding of an HF causal LM on our static cache and kernels, with an
    optional latent prefix ``[B, P, hidden_size]`` before the left-padded prompt. Same result as
    ``hf_model.generate(inputs_embeds=cat(prefix_embeds, embed(input_ids)), ...)`` at temperature 0.
    ``generate_kwargs`` (``max_new_tokens``, ``eos_token_id``, ``temperature``, ...) go to
    :meth:`ARExecutor.generate`; returns its ``GenerationOutput``. The weights are shared with
    ``hf_model``: if they change, delete ``hf_model._hybridkernels_executor``."""
    return executor_for(hf_model).generate(input_ids, attention_mask, prefix_embeds, **generate_kwargs)
