"""Run a function on ``world`` local processes, each a rank of one process group (tests and
benchmarks of the tensor-parallel code without ``torchrun``)."""

from __future__ import annotations

import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous of a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, backend, timeout_s, args, results) -> None:
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        results.put(("ok", rank, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable,
    world: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 90.0,
    wait_s: float | None = None,
) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each call in its own process inside
    a ``world``-rank process group (``backend``; ``"nccl"`` puts rank ``r`` on GPU ``r``) whose
    collectives time out after ``timeout_s``. ``fn`` and ``args`` must be picklable when the
    processes are spawned (CUDA); on the CPU they are forked, with torch already imported.

    Raises ``RuntimeError`` with a rank's traceback when one fails, or when a rank has not
    answered within ``wait_s`` (default ``timeout_s + 60``) s; every process is joined or killed."""
    wait_s = timeout_s + 60 if wait_s is None else wait_s
    ctx = mp.get_context("spawn" if backend == "nccl" or torch.cuda.is_initialized() else "fork")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, backend, timeout_s, args, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            status, rank, value = results.get(timeout=wait_s)
            if status != "ok":
                raise RuntimeError(f"rank {rank}:\n{value}")
            got[rank] = value
    except queue.Empty:
        raise RuntimeError(f"the {world} ranks did not finish within {wait_s} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]
