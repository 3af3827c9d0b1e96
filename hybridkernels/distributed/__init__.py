"""Tensor parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

* :class:`TensorParallelTransformer`: one rank's Megatron-style shard (heads, MLP, vocabulary),
  loaded with ``get_slice`` (each rank reads only its slices); it is a ``Transformer``, so
  ``DiffusionPlanner(model)`` and ``ARExecutor(model)`` run it, each rank its heads.
* :func:`vocab_parallel_unmask_step`: the planner's fused LM head + commit with the vocabulary
  split across ranks (partials, one small all-gather, the merge).
* :func:`init_from_env` / :func:`check_same`: torchrun launch with timeouts, and the check that
  every rank got the same arguments.
* :mod:`hybridkernels.distributed.comm`: per-step communication volume of a model shape.

Usage, under ``torchrun --nproc-per-node N``::

    from hybridkernels.distributed import init_from_env, from_pretrained
    tp = init_from_env()
    planner = DiffusionPlanner(from_pretrained("LLaDA-8B", tp_group=tp, causal=False, device=...))
"""

from .comm import step_communication
from .group import CommStats, TPGroup, check_same, init_from_env
from .loading import LoadStats, load_shard
from .model import TensorParallelTransformer
from .sharding import check_divisible, local_config, parameter_slice, vocab_range
from .unmask import vocab_parallel_unmask_step


def from_pretrained(path, *, tp_group=None, **kwargs) -> TensorParallelTransformer:
    """:meth:`TensorParallelTransformer.from_pretrained`: this rank's shard of a checkpoint
    directory (``tp_group`` None: the default process group, else one process)."""
    return TensorParallelTransformer.from_pretrained(path, tp_group=tp_group, **kwargs)


__all__ = [
    "CommStats",
    "LoadStats",
    "TPGroup",
    "TensorParallelTransformer",
    "check_divisible",
    "check_same",
    "from_pretrained",
    "init_from_env",
    "load_shard",
    "local_config",
    "parameter_slice",
    "step_communication",
    "vocab_parallel_unmask_step",
    "vocab_range",
]
