"""``StepGraphs``: capture a model step in a CUDA graph per key and replay it (planner and executor).

A step is a function that reads and writes only static tensors. The first call of a key runs it
eagerly on a side stream (the warm-up: Triton compiles and autotunes, cuBLAS picks its kernels,
none of which may happen during a capture), the second captures it and replays the capture, later
calls replay. All graphs of one ``StepGraphs`` share a memory pool (nothing a step allocates
outlives it). Capture happens on the owner's device with a capture stream of that device:
``torch.cuda.graph``'s default capture stream is created once, on whichever device was current at
the process's first capture.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """CUDA graphs of one owner's steps, keyed by everything a capture bakes in."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._warm: set[Hashable] = set()
        self._pool = None
        self.capture_s = 0.0  # seconds spent capturing, in total

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self, key: Hashable, step: Callable[[], None], *, generator: torch.Generator | None = None
    ) -> bool:
        """Run ``step`` for ``key``: eagerly (first call), or captured then replayed. ``generator``:
        a non-default generator the step draws from (registered with the graph so that every
        replay advances it). Returns whether the call replayed a graph."""
        graph = self._graphs.get(key)
        if graph is None:
            on_gpu = self.device.type == "cuda"  # else only the control flow runs (tests)
            with torch.cuda.device(self.device) if on_gpu else contextlib.nullcontext():
                if key not in self._warm:
                    self._warm.add(key)
                    warm_up(step)
                    return False
                t0 = time.perf_counter()
                if self._pool is None and on_gpu:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self._graphs[key] = capture(step, pool=self._pool, generator=generator)
                self.capture_s += time.perf_counter() - t0
        graph.replay()
        return True


def warm_up(step: Callable[[], object]) -> None:
    """Run ``step`` on a side stream of the current device (PyTorch's recipe before a capture)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        step()
    current.wait_stream(side)


def capture(step: Callable[[], object], *, pool=None, generator: torch.Generator | None = None):
    """``step`` recorded into a ``torch.cuda.CUDAGraph`` on the current device (it does not run
    now: replay it)."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream()):
        step()
    return graph
