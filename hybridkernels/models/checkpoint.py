"""Checkpoints of the Llama-family stack: name schemes, safetensors files, ``config.json``.

Knows the model through its config and parameter shapes only: ``transformer`` builds on this
module and :mod:`hybridkernels.models.loading` joins the two.

Two checkpoint naming schemes map onto the model's own (HF Llama names without ``model.``):

* ``"hf"``: HF Llama / Mistral / Qwen2 / Qwen3 (``model.layers.N.self_attn.q_proj.weight``,
  biases, ``q_norm``/``k_norm``, ``model.norm.weight``, ``lm_head.weight``), with or without the
  ``model.`` prefix (a bare ``LlamaModel`` state dict).
* ``"llada"``: LLaDA's OLMo-style names (``model.transformer.wte``,
  ``model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,attn_norm,ff_norm,ff_proj,up_proj,
  ff_out}``, ``model.transformer.ln_f``, ``model.transformer.ff_out``). ``ff_proj`` is the SwiGLU
  gate, ``ff_out`` in a block the down projection, at the top the LM head.

Every load checks names and shapes against the config and raises one ``ValueError`` listing
unknown, missing and mis-shaped tensors: never a silently random weight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import torch

from .config import TransformerConfig

NAME_SCHEMES = ("hf", "llada")
INDEX_FILE = "model.safetensors.index.json"

# LLaDA block / top-level module names -> ours.
_LLADA_BLOCK = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_LLADA_TOP = {"wte": "embed_tokens", "ln_f": "norm", "ff_out": "lm_head"}
_LLADA_BLOCK_RE = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)")
_LLADA_TOP_RE = re.compile(r"model\.transformer\.(\w+)\.(weight|bias)")
_OURS_BLOCK_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
# Non-persistent buffers some older checkpoints still carry.
_IGNORED_RE = re.compile(r".*rotary_emb\.inv_freq")

MAX_LISTED = 20


def detect_scheme(names) -> str:
    """``"llada"`` if any name starts with ``model.transformer.``, else ``"hf"``."""
    return "llada" if any(n.startswith("model.transformer.") for n in names) else "hf"


def to_internal_name(name: str, scheme: str) -> str | None:
    """Our parameter name for checkpoint name ``name`` under ``scheme`` (None when unknown)."""
    if scheme == "hf":
        return name[len("model.") :] if name.startswith("model.") else name
    if scheme != "llada":
        raise ValueError(f"names must be one of {NAME_SCHEMES} or 'auto', got {scheme!r}")
    if m := _LLADA_BLOCK_RE.fullmatch(name):
        sub = _LLADA_BLOCK.get(m[2])
        return None if sub is None else f"layers.{m[1]}.{sub}.{m[3]}"
    if m := _LLADA_TOP_RE.fullmatch(name):
        sub = _LLADA_TOP.get(m[1])
        return None if sub is None else f"{sub}.{m[2]}"
    return None


def to_external_name(name: str, scheme: str) -> str:
    """The checkpoint name of our parameter ``name`` under ``scheme`` (inverse of the above)."""
    if scheme == "hf":
        return name if name.startswith("lm_head.") else f"model.{name}"
    if scheme != "llada":
        raise ValueError(f"names must be one of {NAME_SCHEMES}, got {scheme!r}")
    if m := _OURS_BLOCK_RE.fullmatch(name):
        inverse = {v: k for k, v in _LLADA_BLOCK.items()}
        if m[2] in inverse:
            return f"model.transformer.blocks.{m[1]}.{inverse[m[2]]}.{m[3]}"
    else:
        module, _, kind = name.rpartition(".")
        inverse = {v: k for k, v in _LLADA_TOP.items()}
        if module in inverse:
            return f"model.transformer.{inverse[module]}.{kind}"
    raise ValueError(f"parameter {name!r} has no LLaDA checkpoint name (q/k norms?)")


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def map_state_dict(
    tensors: Mapping[str, torch.Tensor],
    config: TransformerConfig,
    expected: Mapping[str, tuple[int, ...]],
    *,
    names: str = "auto",
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename checkpoint ``tensors`` to our names and check them against ``expected`` (our
    parameter name -> shape, for ``config``).

    Raises ``TypeError`` listing the tensors that are not floating point, and ``ValueError``
    listing every unknown name, missing parameter and wrong shape. A tied
    model accepts an ``lm_head.weight`` only if it equals the embedding (HF state dicts list it).
    """
    scheme = detect_scheme(tensors) if names == "auto" else names
    not_float = [
        f"{name}: {t.dtype}"
        for name, t in tensors.items()
        if not _IGNORED_RE.fullmatch(name) and isinstance(t, torch.Tensor) and not t.is_floating_point()
    ]
    if not_float:
        raise TypeError(
            f"{source}: weights must be floating point tensors (float16, bfloat16, float32)"
            + _listing("tensors of another dtype", not_float)
        )
    mapped: dict[str, torch.Tensor] = {}
    unknown, shapes, misshapen = [], [], set()
    for name, tensor in tensors.items():
        if _IGNORED_RE.fullmatch(name):
            continue
        ours = to_internal_name(name, scheme)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            ours = "tied lm_head.weight"
        if ours not in expected and ours != "tied lm_head.weight":
            unknown.append(name)
        elif ours in mapped:
            unknown.append(f"{name} (duplicate of another name for {ours})")
        elif ours != "tied lm_head.weight" and tuple(tensor.shape) != expected[ours]:
            shapes.append(f"{name}: {tuple(tensor.shape)}, expected {expected[ours]}")
            misshapen.add(ours)
        else:
            mapped[ours] = tensor
    missing = [_external_or_ours(n, scheme) for n in expected if n not in mapped and n not in misshapen]
    if unknown or missing or shapes:
        raise ValueError(
            f"{source} (names={scheme!r}) does not match the {config.family} config "
            f"(layers={config.num_layers}, hidden={config.hidden_size}, vocab={config.vocab_size}):"
            + (_listing("unknown names", unknown) if unknown else "")
            + (_listing("missing names", missing) if missing else "")
            + (_listing("wrong shapes", shapes) if shapes else "")
        )
    head = mapped.pop("tied lm_head.weight", None)
    if head is not None and not _same_tensor(head, mapped["embed_tokens.weight"]):
        raise ValueError(
            f"{source}: the config ties the LM head to the embedding, but lm_head.weight differs "
            "from the embedding weight"
        )
    return mapped


def _external_or_ours(name: str, scheme: str) -> str:
    try:
        return to_external_name(name, scheme)
    except ValueError:
        return name


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return torch.equal(a.to(b.device), b)


# --------------------------------------------------------------------------- directories
def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file,
    each a relative path that stays inside the checkpoint directory."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index}: cannot read the index ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = (
            "no weight_map"
            if not isinstance(data, dict) or "weight_map" not in data
            else type(weight_map).__name__
        )
        raise ValueError(
            f"{index}: expected a JSON object with a weight_map {{tensor name: shard file}}, got {got}"
        )
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"{index}: weight_map[{name!r}] must be a shard file name, got {file!r}")
        parts = PurePosixPath(file.replace("\\", "/")).parts
        if PurePosixPath(file).is_absolute() or Path(file).is_absolute() or ".." in parts:
            raise ValueError(
                f"{index}: weight_map[{name!r}] = {file!r} is outside the checkpoint directory "
                "(shard files must be relative paths inside it)"
            )
    return weight_map


def _open_error(file: Path, exc: Exception) -> ValueError:
    return ValueError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(name, tensor)`` of the ``*.safetensors`` in ``path`` (the index's shards when
    ``model.safetensors.index.json`` exists), loaded on the CPU.

    A file that is not a safetensors file (truncated, empty, a pickle, a device, ...) raises a
    ``ValueError`` naming it; so does an index whose entries are malformed or leave ``path``."""
    from safetensors import safe_open

    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_index(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ValueError(f"{index}: shard files are missing: {missing}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    seen: set[str] = set()
    for file in files:
        full = path / file
        if not full.is_file():  # a directory, /dev/zero, a FIFO: never open it
            raise ValueError(f"{full}: not a regular file (a safetensors file was expected)")
        try:
            handle = safe_open(str(full), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError (not a ValueError), OSError, ...
            raise _open_error(full, exc) from None
        with handle as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    raise ValueError(
                        f"{index}: tensor {name!r} is in {file} but the index says {weight_map.get(name)!r}"
                    )
                seen.add(name)
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise ValueError(
                        f"{full}: cannot read tensor {name!r} ({type(exc).__name__}: {exc})"
                    ) from None
                yield name, tensor
    absent = sorted(set(weight_map or ()) - seen)
    if absent:
        raise ValueError(f"{index}: tensors listed but absent from the shards: {absent[:MAX_LISTED]}")


def read_config_json(path: str | Path, where: str = "load_pretrained") -> dict:
    """The JSON object in checkpoint directory ``path``'s ``config.json``; a ValueError naming
    the directory or the file when it is missing, unreadable or not an object."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{where}: {path} has no config.json")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | Path, overrides: Mapping | None = None) -> TransformerConfig:
    """The :class:`TransformerConfig` of checkpoint directory ``path`` (its ``config.json``)."""
    path = Path(path)
    file = path / "config.json"
    data = read_config_json(path)
    try:
        return TransformerConfig.from_dict(data, **(overrides or {}))
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{file}: {exc}") from None


def save_pretrained(
    model, path: str | Path, *, names: str = "hf", max_shard_bytes: int | None = None
) -> None:
    """Write a Transformer's ``config.json`` and safetensors under ``names`` (``"hf"``: HF names
    and the model family's config; ``"llada"``: LLaDA names and config). ``max_shard_bytes`` splits
    the weights into ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    if names not in NAME_SCHEMES:
        raise ValueError(f"save_pretrained: names must be one of {NAME_SCHEMES}, got {names!r}")
    family = "llada" if names == "llada" else ("llama" if model.config.family == "llada" else None)
    config = model.config.to_dict(family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        to_external_name(n, names): t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
