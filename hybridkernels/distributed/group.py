"""The tensor-parallel group: who this rank is, the collectives the sharded model uses, the launch.

A :class:`TPGroup` wraps a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs) and
counts what it sends: every collective of the sharded layers goes through it, so a benchmark can
read the bytes per step (:attr:`TPGroup.stats`). ``TPGroup.single()`` is the world of one process
(no process group, every collective the identity): the sharded code paths run unchanged.

Launch: :func:`init_from_env` reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and calls
``init_process_group`` with a timeout, so a rank that never arrives is an error, not a hang.
:func:`check_same` all-gathers a hash of a value (the arguments, the checkpoint) and raises the same
``ValueError`` on every rank when the ranks disagree.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclasses.dataclass
class CommStats:
    """Collectives issued through a :class:`TPGroup` since the last :meth:`reset`: calls and bytes
    this rank contributed (an all-reduce of ``n`` bytes counts ``n``, an all-gather ``n`` per rank),
    and with :attr:`TPGroup.timed` the seconds spent in them (CUDA synchronised around each).
    Collectives replayed from a CUDA graph are not counted (they were issued once, at capture)."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_gather_calls: int = 0
    all_gather_bytes: int = 0
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return self.all_reduce_bytes + self.all_gather_bytes

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)


class TPGroup:
    """A tensor-parallel group: ``rank`` in ``[0, world_size)`` over ``group`` (None = the default
    process group, which must be initialised). Collectives act in place or return new tensors;
    with ``world_size == 1`` they are the identity."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, _single: bool = False):
        self.is_single = _single  # no process group behind it
        if _single:
            self.group, self.rank, self.world_size = None, 0, 1
        else:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "TPGroup: torch.distributed is not initialised; call "
                    "hybridkernels.distributed.init_from_env() (under torchrun) or "
                    "torch.distributed.init_process_group first, or use TPGroup.single()"
                )
            self.group = group
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        self.timed = False  # measure the seconds of each collective (benchmarks; syncs CUDA)

    @classmethod
    def single(cls) -> TPGroup:
        """The world of one process: no process group, no communication."""
        return cls(_single=True)

    @classmethod
    def of(cls, tp_group) -> TPGroup:
        """``tp_group`` as a :class:`TPGroup`: one already, a ``ProcessGroup``, or None (the
        default group when initialised, else :meth:`single`)."""
        if isinstance(tp_group, TPGroup):
            return tp_group
        if tp_group is None:
            return cls() if dist.is_available() and dist.is_initialized() else cls.single()
        if isinstance(tp_group, dist.ProcessGroup):
            return cls(tp_group)
        raise TypeError(
            f"tp_group must be a TPGroup, a torch.distributed ProcessGroup or None, got "
            f"{type(tp_group).__name__}"
        )

    def default_device(self) -> torch.device:
        """Where this rank's tensors go by default: the current CUDA device under NCCL, else the CPU."""
        if not self.is_single and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (every rank gets the same bits). Returns ``t``."""
        if self.world_size > 1:
            started = self._start(t)
            dist.all_reduce(t, group=self.group)
            self._stop(t, started)
            self.stats.all_reduce_calls += 1
            self.stats.all_reduce_bytes += t.numel() * t.element_size()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world_size, *t.shape]``: every rank's ``t`` (same shape and dtype on every rank)."""
        if self.world_size == 1:
            return t[None]
        flat = t.contiguous().view(-1)
        started = self._start(t)
        if flat.is_cuda:  # NCCL gathers into one buffer (CUDA-graph capturable)
            out = t.new_empty(self.world_size * flat.numel())
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
            gather(out, flat, group=self.group)
        else:  # gloo: separate buffers (its worker thread must not write views of one tensor)
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(parts, flat, group=self.group)
            out = torch.cat(parts)
        self._stop(t, started)
        self.stats.all_gather_calls += 1
        self.stats.all_gather_bytes += t.numel() * t.element_size()
        return out.view(self.world_size, *t.shape)

    def _start(self, t: torch.Tensor) -> float | None:
        if not self.timed or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        return time.perf_counter()

    def _stop(self, t: torch.Tensor, started: float | None) -> None:
        if started is not None:
            if t.is_cuda:
                torch.cuda.synchronize(t.device)
            self.stats.seconds += time.perf_counter() - started

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def init_from_env(
    *, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None
) -> TPGroup:
    """Initialise ``torch.distributed`` from torchrun's environment and return the world's group.

    ``backend`` default: ``nccl`` when ``device`` (default: CUDA if available) is CUDA, else
    ``gloo``. On CUDA the rank's device is ``cuda:LOCAL_RANK``. ``timeout_s`` bounds every
    collective (and the rendezvous), so a missing or stuck rank fails instead of hanging.
    Without torchrun's variables (``WORLD_SIZE`` unset) it returns :meth:`TPGroup.single`.
    Torch's default random generator is seeded with rank 0's seed on every rank (the ranks must
    draw the same numbers); generators you pass to the planner must be seeded alike too.
    """
    if "WORLD_SIZE" not in os.environ:
        return TPGroup.single()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"init_from_env: RANK / WORLD_SIZE / LOCAL_RANK must be set to ints ({exc})"
        ) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend is None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kw = {}
        if backend == "nccl":
            kw["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kw
        )
    group = TPGroup()
    # Every rank must draw the same random numbers (Gumbel noise, remasking draws, samples):
    # torch's default generators start from rank 0's seed.
    torch.manual_seed(group.all_gather_object(torch.initial_seed())[0])
    return group


def fingerprint(value) -> str:
    """A stable SHA-256 of ``value`` (JSON with sorted keys; other objects by ``repr``)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same(group: TPGroup, value, what: str) -> None:
    """Raise the same ``ValueError`` on every rank unless every rank passed an equal ``value``
    (compared by :func:`fingerprint`); ``what`` names it in the message."""
    mine = fingerprint(value)
    hashes = group.all_gather_object(mine)
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise ValueError(
            f"tensor parallel: the ranks disagree on {what} (ranks {differ} differ from rank 0); "
            "every rank must get the same arguments and checkpoint"
        )


def checkpoint_fingerprint(path) -> dict:
    """What identifies a checkpoint directory cheaply: its files' names and sizes, and
    ``config.json``'s text (for :func:`check_same`)."""
    from pathlib import Path

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    config = path / "config.json"
    return {
        "files": [(p.name, p.stat().st_size) for p in files if p.suffix in (".safetensors", ".json")],
        "config": config.read_text() if config.is_file() else None,
    }
