"""``TransformerConfig``: one description of a Llama-family stack, read from HF or LLaDA configs.

Covers HF ``LlamaConfig`` / ``MistralConfig`` (no sliding window) / ``Qwen2Config`` /
``Qwen3Config`` dicts (``config.json`` or ``config.to_dict()``, transformers 4.x ``rope_theta`` +
``rope_scaling`` or 5.x ``rope_parameters``) and LLaDA's OLMo-style keys (``d_model``,
``n_heads``, ...). Anything the stack cannot represent raises a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..common import LLADA_EOS_ID, LLADA_EOT_ID, LLADA_MASK_ID
from ..validation import check_choice, check_positive_int

WHERE = "TransformerConfig"
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)
# Upper bounds far above every published model (Llama 3.1 405B: 126 layers, 16384 hidden, 53248
# intermediate, 128 heads, head_dim 128; the largest vocabularies ~10^6; 10M-token contexts): a
# config beyond them is hostile or corrupt, and building it would hang or exhaust memory.
MAX_SIZES = {
    "vocab_size": 2**24,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_layers": 2**12,
    "num_heads": 2**12,
    "num_kv_heads": 2**12,
    "head_dim": 2**12,
}
MAX_POSITIONS = 2**26
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "llada", "dream")
# Dream-v0-*-7B (HKUNLP): a Qwen2 stack, config ``model_type: "Dream"``; its <|mask|> token.
DREAM_MASK_ID = 151666
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass
class TransformerConfig:
    """Shape and options of a Llama-family transformer.

    ``rope_scaling``: None, ``{"rope_type": "linear", "factor": f}`` or ``{"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``
    (HF semantics). ``qkv_bias``: biases on q/k/v (Qwen2, Llama ``attention_bias``);
    ``o_bias``/``mlp_bias``: on the output and MLP projections; ``qk_norm``: RMSNorm over the
    head dim of q and k before RoPE (Qwen3). ``causal``: the default attention mode (False for
    LLaDA). Token ids are informational (the planner reads ``mask_token_id`` and the EOS ids).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    causal: bool = True
    family: str = "llama"
    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    eot_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in _SIZES:
            check_positive_int(WHERE, name, getattr(self, name))
            if getattr(self, name) > MAX_SIZES[name]:
                raise ValueError(
                    f"TransformerConfig: {name} = {getattr(self, name)} exceeds {MAX_SIZES[name]} "
                    "(no real model is that large: a corrupt or hostile config?)"
                )
        check_positive_int(WHERE, "max_position_embeddings", self.max_position_embeddings)
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ValueError(
                f"TransformerConfig: max_position_embeddings = {self.max_position_embeddings} "
                f"exceeds {MAX_POSITIONS}"
            )
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
            raise ValueError(f"TransformerConfig: rms_norm_eps must be a finite number >= 0, got {eps!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig: head_dim must be even for RoPE, got {self.head_dim}")
        check_choice(WHERE, "family", self.family, FAMILIES)
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"TransformerConfig: rope_theta must be > 0, got {self.rope_theta}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        ids = self.eos_token_ids
        ids = tuple(ids) if isinstance(ids, (list, tuple)) else ids
        if not isinstance(ids, tuple) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids
        ):
            raise ValueError(
                f"TransformerConfig: eos_token_id must be a non-negative int or a list of them, got {ids!r}"
            )
        self.eos_token_ids = ids

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> TransformerConfig:
        """Parse an HF (Llama / Mistral / Qwen2 / Qwen3), Dream or LLaDA config dict.

        ``overrides`` replace parsed fields (e.g. ``causal=False`` to run Llama bidirectionally).
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"TransformerConfig.from_dict: expected a dict, got {type(d).__name__}")
        model_type = str(d.get("model_type", "")).lower()
        if model_type == "dream" and "d_model" in d:
            raise ValueError(
                "TransformerConfig.from_dict: the config mixes families: model_type 'Dream' (a Qwen2 "
                "stack) with LLaDA's key 'd_model'"
            )
        if model_type == "dream":
            kwargs = _from_hf(d, "qwen2") | _dream_extras(d)
        elif model_type == "llada" or "d_model" in d:
            kwargs = _from_llada(d)
        elif model_type in ("llama", "mistral", "qwen2", "qwen3"):
            kwargs = _from_hf(d, model_type)
        elif model_type in ("sdar", "fast_dllm_qwen"):  # block-causal: neither causal nor bidirectional
            held = "an SDAR" if model_type == "sdar" else "a Fast-dLLM v2"
            raise ValueError(
                f"TransformerConfig.from_dict: this is {held} checkpoint (model_type "
                f"{d.get('model_type')!r}, block diffusion): load it with "
                "hybridkernels.models.block_diffusion.BlockDiffusionPlanner.from_pretrained"
            )
        else:
            raise ValueError(
                f"TransformerConfig.from_dict: unsupported model_type {d.get('model_type')!r} "
                f"(supported: {FAMILIES}; LLaDA configs are recognised by 'd_model')"
            )
        kwargs.update(overrides)
        return cls(**kwargs)

    # ----------------------------------------------------------------------------- writing
    def to_dict(self, family: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict in ``family``'s key convention (default: ``self.family``)."""
        family = family or self.family
        if family == "llada":
            return self._to_llada_dict()
        if family not in FAMILIES:
            raise ValueError(f"to_dict: family must be one of {FAMILIES}, got {family!r}")
        if family == "dream":
            return self._to_dream_dict()
        d: dict[str, Any] = {
            "model_type": family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }
        if family in ("llama", "mistral", "qwen3"):
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"to_dict: {family} has one attention_bias for q/k/v and o")
            d["attention_bias"] = self.qkv_bias
        elif not self.qkv_bias or self.o_bias:
            raise ValueError("to_dict: qwen2 always has q/k/v biases and no o_proj bias")
        if family == "llama":
            d["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ValueError(f"to_dict: {family} has no MLP biases")
        if self.qk_norm != (family == "qwen3"):
            raise ValueError(f"to_dict: q/k norms are exactly Qwen3's (qk_norm={self.qk_norm})")
        if self.eos_token_ids:
            eos = self.eos_token_ids
            d["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
        return d

    def _to_dream_dict(self) -> dict[str, Any]:
        """Dream's ``config.json``: Qwen2's keys, ``model_type: "Dream"`` and its special tokens."""
        d = self.to_dict("qwen2")
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        d.update(
            model_type="Dream",
            architectures=["DreamModel"],
            mask_token_id=self.mask_token_id if self.mask_token_id is not None else DREAM_MASK_ID,
            pad_token_id=eos,
            bos_token_id=eos,
        )
        return d

    def _to_llada_dict(self) -> dict[str, Any]:
        if self.o_bias or self.mlp_bias or self.qk_norm or self.rope_scaling:
            raise ValueError("to_dict: LLaDA configs have no o/MLP biases, q/k norms or RoPE scaling")
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError("to_dict: LLaDA requires head_dim * num_heads == hidden_size")
        return {
            "model_type": "llada",
            "architectures": ["LLaDAModelLM"],
            "d_model": self.hidden_size,
            "n_heads": self.num_heads,
            "n_kv_heads": self.num_kv_heads,
            "n_layers": self.num_layers,
            "mlp_hidden_size": self.intermediate_size,
            "mlp_ratio": self.intermediate_size / self.hidden_size,
            "vocab_size": self.vocab_size,
            "embedding_size": self.vocab_size,
            "rope": True,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_sequence_length": self.max_position_embeddings,
            "weight_tying": self.tie_word_embeddings,
            "include_bias": False,
            "include_qkv_bias": self.qkv_bias,
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "alibi": False,
            "attention_layer_norm": False,
            "input_emb_norm": False,
            "scale_logits": False,
            "mask_token_id": self.mask_token_id if self.mask_token_id is not None else LLADA_MASK_ID,
            "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else LLADA_EOS_ID,
            "init_std": self.initializer_range,
        }


def _normalize_rope_scaling(scaling, max_positions: int) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"TransformerConfig: rope_scaling must be a dict or None, got {scaling!r}")
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | {
        "rope_type": scaling.get("rope_type", scaling.get("type", "default"))
    }
    kind = scaling["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"TransformerConfig: rope_scaling type {kind!r} is not supported (supported: {ROPE_TYPES})"
        )
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("TransformerConfig: partial_rotary_factor != 1 is not supported")
    scaling.pop("partial_rotary_factor", None)
    if kind == "default":
        return None
    need = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in need if k not in scaling]
    if missing:
        raise ValueError(f"TransformerConfig: rope_scaling of type {kind!r} lacks {missing}")
    for key in need:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise ValueError(
                f"TransformerConfig: rope_scaling {key} must be a finite number > 0, got {value!r}"
            )
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
        check_positive_int(
            WHERE,
            "rope_scaling original_max_position_embeddings",
            scaling["original_max_position_embeddings"],
        )
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ValueError(
                "TransformerConfig: llama3 rope_scaling needs high_freq_factor > low_freq_factor"
            )
    if not scaling["factor"] > 0:
        raise ValueError(f"TransformerConfig: rope_scaling factor must be > 0, got {scaling['factor']}")
    return scaling


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    # Checked (ints >= 0) by TransformerConfig: no int() here, which would turn 2.5 into 2.
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _from_hf(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    def need(key):
        if key not in d:
            raise ValueError(f"TransformerConfig.from_dict: {model_type} config lacks {key!r}")
        return d[key]

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"TransformerConfig.from_dict: hidden_act {act!r} is not supported (only silu)")
    if d.get("use_sliding_window") or (model_type == "mistral" and d.get("sliding_window")):
        raise ValueError("TransformerConfig.from_dict: sliding-window attention is not supported")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("TransformerConfig.from_dict: pretraining_tp != 1 is not supported")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    # transformers 5 stores theta and scaling together in rope_parameters; 4.x has rope_theta +
    # rope_scaling.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or None
    theta = d.get("rope_theta")
    if theta is None and isinstance(rope, Mapping):
        theta = rope.get("rope_theta")
    if isinstance(rope, Mapping) and "partial_rotary_factor" in d:
        rope = dict(rope) | {"partial_rotary_factor": d["partial_rotary_factor"]}
    attention_bias = bool(d.get("attention_bias", False))
    return dict(
        family=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=rope,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        causal=True,
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )


def _dream_extras(d: Mapping[str, Any]) -> dict[str, Any]:
    """Dream's keys over Qwen2's: the family, its mask token (151666 when absent, Dream's default),
    bidirectional attention."""
    mask = d.get("mask_token_id", DREAM_MASK_ID)
    if isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
        raise ValueError(
            f"TransformerConfig.from_dict: Dream mask_token_id must be an int >= 0, got {mask!r}"
        )
    return {"family": "dream", "mask_token_id": mask, "causal": False}


# LLaDA (OLMo-style) options the Llama-family stack cannot represent: key -> accepted values.
_LLADA_FIXED = {
    "block_type": ("llama",),
    "layer_norm_type": ("rms", "rms_norm", "rmsnorm"),
    "rope": (True,),
    "alibi": (False,),
    "include_bias": (False,),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "multi_query_attention": (None, False),
    "clip_qkv": (None,),
}


def _from_llada(d: Mapping[str, Any]) -> dict[str, Any]:
    def need(key):
        if key not in d:
            raise ValueError(f"TransformerConfig.from_dict: LLaDA config lacks {key!r}")
        return d[key]

    for key, accepted in _LLADA_FIXED.items():
        if key in d and d[key] not in accepted:
            raise ValueError(
                f"TransformerConfig.from_dict: LLaDA config has {key}={d[key]!r}; supported: {accepted}"
            )
    act = d.get("activation_type", "silu")
    if act not in ("silu", "swiglu"):
        raise ValueError(f"TransformerConfig.from_dict: LLaDA activation_type {act!r} is not supported")
    d_model = need("d_model")
    heads = need("n_heads")
    if d_model % heads:
        raise ValueError(f"TransformerConfig.from_dict: d_model ({d_model}) % n_heads ({heads}) != 0")
    mlp = d.get("mlp_hidden_size") or int(d.get("mlp_ratio", 4) * d_model)
    vocab = d.get("embedding_size") or need("vocab_size")
    return dict(
        family="llada",
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=mlp,
        num_layers=need("n_layers"),
        num_heads=heads,
        num_kv_heads=d.get("n_kv_heads") or heads,
        head_dim=d_model // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(d.get("max_sequence_length", 4096)),
        tie_word_embeddings=bool(d.get("weight_tying", False)),
        qkv_bias=bool(d.get("include_qkv_bias", False)),
        causal=False,
        mask_token_id=int(d.get("mask_token_id", LLADA_MASK_ID)),
        eos_token_ids=_eos_ids(d.get("eos_token_id", LLADA_EOS_ID)),
        eot_token_id=int(d.get("eot_token_id", LLADA_EOT_ID)),
        initializer_range=float(d.get("init_std", 0.02)),
    )
