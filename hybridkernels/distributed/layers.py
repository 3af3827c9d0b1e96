"""The two layers a tensor-parallel rank adds to the stack: a row-parallel linear (partial product,
all-reduce, then the bias once) and a vocabulary-parallel embedding (masked lookup, all-reduce).

Column-parallel projections need no layer of their own: a rank's q / k / v / gate / up are plain
``nn.Linear`` of its local sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import TPGroup


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x @ W_r.T) + b``: ``weight [out, in / N]`` (this rank's input columns),
    ``bias [out]`` replicated and added after the sum. ``x [..., in / N]`` -> ``[..., out]``.

    Parameter names (``weight``, ``bias``) are ``nn.Linear``'s, so the stack's state-dict names
    do not change."""

    def __init__(
        self, in_local: int, out_features: int, *, bias: bool, group: TPGroup, device=None, dtype=None
    ):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce_(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows ``[start, stop)`` of the vocabulary: ids outside them look up zeros, the
    all-reduce adds the one rank that holds each id. ``ids [...]`` int -> ``[..., d]``; equal to the
    full embedding bit for bit (a sum of one value and zeros)."""

    def __init__(self, start: int, stop: int, dim: int, *, group: TPGroup, device=None, dtype=None):
        super().__init__()
        self.group, self.start, self.stop = group, start, stop
        self.weight = nn.Parameter(torch.empty(stop - start, dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        return self.group.all_reduce_(out)
