"""Load one rank's shard of a checkpoint directory: ``safe_open(...).get_slice`` per tensor, so a
rank reads its slices only, never the whole model.

Names and full shapes are checked exactly as a single-device load checks them
(:func:`hybridkernels.models.checkpoint.map_state_dict`, run on meta tensors of the files' shapes
and dtypes): the same ``ValueError`` listing unknown, missing and mis-shaped tensors, before any
weight is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..models import checkpoint
from ..models.config import TransformerConfig
from ..models.transformer import parameter_shapes
from .sharding import parameter_slice

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass
class LoadStats:
    """What a rank read: ``bytes_read`` (bytes of the tensors its slices returned), ``tensors``
    (slices read), ``checkpoint_bytes`` (the weights' total size in the files)."""

    bytes_read: int = 0
    tensors: int = 0
    checkpoint_bytes: int = 0


def _files(path: Path) -> list[Path]:
    index = path / checkpoint.INDEX_FILE
    if index.exists():
        names = sorted(set(checkpoint._read_index(index).values()))
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise ValueError(f"{path}: no *.safetensors files")
    files = [path / n for n in names]
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: not a regular file (a safetensors file was expected)")
    return files


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise ValueError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def load_shard(
    path: str | Path,
    config: TransformerConfig,
    rank: int,
    world_size: int,
    *,
    names: str = "auto",
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """Rank ``rank``'s parameters (our names, shard shapes, the files' dtypes, on the CPU) of the
    checkpoint at ``path`` for the full-model ``config``, and what was read.

    Each tensor is read through ``get_slice`` with this rank's rows or columns
    (:func:`~hybridkernels.distributed.sharding.parameter_slice`); replicated tensors (norms,
    row-parallel biases) whole."""
    path = Path(path)
    files = _files(path)
    where: dict[str, Path] = {}
    meta: dict[str, torch.Tensor] = {}
    stats = LoadStats()
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise TypeError(
                        f"{file}: tensor {name!r} has dtype {sl.get_dtype()} (not a weight dtype)"
                    )
                shape = tuple(sl.get_shape())
                meta[name] = torch.empty(shape, dtype=dtype, device="meta")
                where[name] = file
                n = 1
                for s in shape:
                    n *= s
                stats.checkpoint_bytes += n * meta[name].element_size()
    scheme = checkpoint.detect_scheme(meta) if names == "auto" else names
    tied_head = None
    if config.tie_word_embeddings:
        for name in list(meta):
            if checkpoint.to_internal_name(name, scheme) == "lm_head.weight":
                tied_head = name  # compared with the embedding shard below
    mapped = checkpoint.map_state_dict(
        {n: t for n, t in meta.items() if n != tied_head},
        config,
        parameter_shapes(config),
        names=scheme,
        source=str(path),
    )
    ours_to_file = {checkpoint.to_internal_name(n, scheme): n for n in meta if n != tied_head}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for ours in mapped:
        by_file.setdefault(where[ours_to_file[ours]], []).append(ours)
    for file, ours_names in by_file.items():
        with _open(file) as f:
            for ours in ours_names:
                state[ours] = _read(
                    f, ours_to_file[ours], parameter_slice(ours, config, rank, world_size), stats
                )
            if tied_head is not None and where[tied_head] == file:
                state["tied lm_head.weight"] = _read(
                    f, tied_head, parameter_slice("lm_head.weight", config, rank, world_size), stats
                )
    head = state.pop("tied lm_head.weight", None)
    if head is not None and not torch.equal(head, state["embed_tokens.weight"]):
        raise ValueError(
            f"{path}: the config ties the LM head to the embedding, but lm_head.weight differs "
            "from the embedding weight"
        )
    return state, stats


def _read(f, name: str, sl, stats: LoadStats) -> torch.Tensor:
    view = f.get_slice(name)
    try:
        if sl is None:
            t = view[:]
        elif sl.dim == 0:
            t = view[sl.start : sl.stop]
        else:
            t = view[:, sl.start : sl.stop]
    except Exception as exc:
        raise ValueError(f"cannot read tensor {name!r} ({type(exc).__name__}: {exc})") from None
    stats.bytes_read += t.numel() * t.element_size()
    stats.tensors += 1
    return t
