"""The public op contracts. Each op checks its inputs and dispatches to a backend
(``triton``, ``cuda``, ``reference``); see ``hybridkernels.ops._dispatch``."""

from ._dispatch import BACKENDS
from .attention import bidirectional_attention
from .decode import decode_attention
from .kv_append import kv_append
from .unmask import unmask_step

__all__ = ["BACKENDS", "bidirectional_attention", "decode_attention", "kv_append", "unmask_step"]
