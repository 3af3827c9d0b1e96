"""The public op contracts. Each op checks its inputs and dispatches to a backend
(``triton``, ``cuda``, ``reference``): ``backend=``, then ``HYBRIDKERNELS_BACKEND``, then the
fastest available for the tensors' device.

Besides the ops: :func:`skip_value_checks` (a block in which the ops skip the checks that sync
with the device), ``HEAD_DIMS`` (the head dims the Triton attention kernels cover; every op
takes any head_dim and falls back to the reference on others), ``OP_BACKENDS`` (op name -> its
:class:`OpBackends`), :func:`backend_table` and :func:`kernel_head_dims` (what
``hybridkernels info`` prints).
"""

from __future__ import annotations

from ._attention import DISPATCH as _ATTENTION
from ._attention import attention, bidirectional_attention, sdpa_attention
from ._checks import HEAD_DIMS, skip_value_checks, value_checks_enabled
from ._decode import CUDA_HEAD_DIMS as _DECODE_HEAD_DIMS
from ._decode import DISPATCH as _DECODE
from ._decode import decode_attention
from ._dispatch import BACKENDS, OpBackends
from ._kv_append import DISPATCH as _KV_APPEND
from ._kv_append import kv_append
from ._unmask import DISPATCH as _UNMASK
from ._unmask import unmask_step

OP_BACKENDS: dict[str, OpBackends] = {d.op: d for d in (_ATTENTION, _UNMASK, _DECODE, _KV_APPEND)}


def backend_table(device_types=("cpu", "cuda")) -> dict[str, dict[str, str]]:
    """Op name -> device type -> the backend the automatic choice picks there (or
    ``"error: ..."`` when ``HYBRIDKERNELS_BACKEND`` names one that cannot run there)."""
    import torch

    table = {}
    for op, dispatch in OP_BACKENDS.items():
        row = {}
        for dev in device_types:
            try:
                row[dev] = dispatch.choose(None, torch.device(dev))
            except ValueError as exc:
                row[dev] = f"error: {exc}"
        table[op] = row
    return table


def kernel_head_dims() -> dict[str, dict[str, tuple[int, ...]]]:
    """Op name -> kernel backend -> the head dims it covers (what ``hybridkernels info`` prints);
    the ops run the reference on other head dims (the attention op torch SDPA on a GPU)."""
    return {_ATTENTION.op: {"triton": HEAD_DIMS}, _DECODE.op: {"cuda": _DECODE_HEAD_DIMS}}


__all__ = [
    "BACKENDS",
    "HEAD_DIMS",
    "OP_BACKENDS",
    "OpBackends",
    "attention",
    "backend_table",
    "bidirectional_attention",
    "decode_attention",
    "kernel_head_dims",
    "kv_append",
    "sdpa_attention",
    "skip_value_checks",
    "unmask_step",
    "value_checks_enabled",
]
