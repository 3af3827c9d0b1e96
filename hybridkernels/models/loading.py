"""Weights in and out of :class:`~hybridkernels.models.transformer.Transformer`.

Two checkpoint naming schemes map onto the model's own (HF Llama names without ``model.``):

* ``"hf"``: HF Llama / Mistral / Qwen2 / Qwen3 (``model.layers.N.self_attn.q_proj.weight``,
  biases, ``q_norm``/``k_norm``, ``model.norm.weight``, ``lm_head.weight``), with or without the
  ``model.`` prefix (a bare ``LlamaModel`` state dict).
* ``"llada"``: LLaDA's OLMo-style names (``model.transformer.wte``,
  ``model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,attn_norm,ff_norm,ff_proj,up_proj,
  ff_out}``, ``model.transformer.ln_f``, ``model.transformer.ff_out``). ``ff_proj`` is the SwiGLU
  gate, ``ff_out`` in a block the down projection, at the top the LM head.

Every load checks names and shapes against the config and raises one ``ValueError`` listing
unknown, missing and mis-shaped tensors: never a silently random weight. The name maps and files
are in :mod:`~hybridkernels.models.checkpoint`; this module adds what needs the model class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .checkpoint import (
    INDEX_FILE,
    NAME_SCHEMES,
    detect_scheme,
    iter_safetensors,
    read_config,
    save_pretrained,
    to_external_name,
    to_internal_name,
)
from .config import TransformerConfig
from .transformer import Transformer, build_model, parameter_shapes


def map_state_dict(
    tensors: Mapping[str, torch.Tensor],
    config: TransformerConfig,
    *,
    names: str = "auto",
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename checkpoint ``tensors`` to our names and check them against a
    :class:`Transformer` of ``config`` (see :func:`hybridkernels.models.checkpoint.map_state_dict`)."""
    return checkpoint.map_state_dict(tensors, config, parameter_shapes(config), names=names, source=source)


def load_pretrained(path: str | Path, **kwargs) -> Transformer:
    """:meth:`Transformer.from_pretrained`."""
    return Transformer.from_pretrained(path, **kwargs)


def load_hf_model(hf_model: nn.Module, **kwargs) -> Transformer:
    """:meth:`Transformer.from_hf`."""
    return Transformer.from_hf(hf_model, **kwargs)


__all__ = [
    "INDEX_FILE",
    "NAME_SCHEMES",
    "build_model",
    "detect_scheme",
    "iter_safetensors",
    "load_hf_model",
    "load_pretrained",
    "map_state_dict",
    "read_config",
    "save_pretrained",
    "to_external_name",
    "to_internal_name",
]
