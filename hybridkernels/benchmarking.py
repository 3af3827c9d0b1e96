"""Timing and roofline probes shared by ``benches/`` and ``hybridkernels bench``.

Every speed figure in this package is a ratio against a baseline timed in the same process, plus,
on a GPU, a fraction of a ceiling measured here: the copy bandwidth (bytes read + written per
second by a large device-to-device copy) and the bf16 matmul peak (a large cuBLAS GEMM).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from .models.config import TransformerConfig

# The 8B shapes every GPU benchmark uses (random weights: no hub).
LLADA_8B = TransformerConfig(
    vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, rope_theta=500000.0, causal=False, family="llada",
    mask_token_id=126336, eos_token_ids=(126081,), eot_token_id=126348,
)  # fmt: skip
LLAMA_8B = TransformerConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0, causal=True, family="llama",
    eos_token_ids=(128001,),
)  # fmt: skip
# A timing whose runs spread more than this (interquartile range / median) is marked untrusted.
MAX_SPREAD = 0.25


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3, reps: int = 10
) -> float:
    """Median wall time of ``fn()`` in milliseconds: CUDA events on a GPU, perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.cache
def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Bytes read plus written per second (GB/s) by ``dst.copy_(src)`` of ``nbytes`` (256 MB at
    most on the CPU). Both buffers are written first: an untouched CPU allocation reads as the
    kernel's shared zero page, which comes from cache (5-10x the real bandwidth)."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=10 if src.is_cuda else 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@functools.cache
def matmul_peak_tflops(device: str = "cuda", n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved TFLOP/s of an ``n x n x n`` matmul (the practical compute ceiling); on the CPU
    a 1024^3 float32 one, at the current torch thread count."""
    if torch.device(device).type != "cuda":
        n, dtype = min(n, 1024), torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def environment(device: torch.device | str = "cuda") -> dict:
    """Device, driver and library versions and the date, to store beside every result."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(
            device=f"CPU: {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        )
    return info


def streamed_weight_bytes(model) -> int:
    """Bytes of weights one forward of a :class:`~hybridkernels.models.Transformer` streams: every
    parameter but an untied embedding table (its rows are gathered, not read whole; a tied table is
    read whole as the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is None:
        return total
    emb = model.embed_tokens.weight
    return total - emb.numel() * emb.element_size()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def roofline(device: torch.device | str, *, flops: float = 0.0, nbytes: float = 0.0, ms: float) -> dict:
    """Achieved TFLOP/s and GB/s of a kernel and their fractions of the measured ceilings."""
    dev = str(torch.device(device))
    out = {"ms": ms}
    if flops:
        tflops = flops / (ms * 1e-3) / 1e12
        out.update(tflops=tflops, mfu=tflops / matmul_peak_tflops(dev))
    if nbytes:
        gbs = nbytes / (ms * 1e-3) / 1e9
        out.update(gbs=gbs, bandwidth_fraction=gbs / copy_bandwidth_gbs(dev))
    return out


# ------------------------------------------------------------------------------------------ floors
def forward_flops(config: TransformerConfig, tokens: int, keys: int) -> float:
    """Matmul flops of one forward of ``tokens`` queries over ``keys`` keys (LM head excluded)."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_layers
    proj = 2 * tokens * d * (config.q_size + 2 * config.kv_size + d) + 2 * tokens * 3 * d * f
    attn = 4 * tokens * keys * config.q_size
    return L * (proj + attn)


def floor_s(device: torch.device | str, weight_bytes: float, flops: float) -> float:
    """A step's floor: max(weight bytes / measured copy bandwidth, flops / measured matmul peak)."""
    dev = str(torch.device(device))
    return max(weight_bytes / (copy_bandwidth_gbs(dev) * 1e9), flops / (matmul_peak_tflops(dev) * 1e12))


def step_floor(
    model, *, rows: int, queries: int, keys: int, head_rows: int, kv_dtype_bytes: int | None = None
) -> dict:
    """Floor of one forward step of a :class:`~hybridkernels.models.Transformer` and what it is
    made of: ``rows`` sequences of ``queries`` new tokens attending ``keys`` keys each (from a
    cache, or their own), and the LM head on ``head_rows`` rows (the executor: one per row; the
    planner: the window's rows). Bytes: the streamed weights (:func:`streamed_weight_bytes`, LM
    head included) + the K/V read; flops: :func:`forward_flops` + ``2 * head_rows * d * V``.

    Returns ``{"floor_s", "bytes", "flops", "bytes_s", "flops_s", "bound"}`` with ``bytes_s`` =
    bytes / the measured copy bandwidth, ``flops_s`` = flops / the measured matmul rate, the
    floor their max and ``bound`` which one it is ("bandwidth" or "compute")."""
    cfg = model.config
    es = kv_dtype_bytes or model.embed_tokens.weight.element_size()
    kv_bytes = rows * keys * cfg.num_layers * 2 * cfg.kv_size * es
    nbytes = streamed_weight_bytes(model) + kv_bytes
    flops = forward_flops(cfg, rows * queries, keys) + 2 * head_rows * cfg.hidden_size * cfg.vocab_size
    dev = str(model.device)
    bytes_s = nbytes / (copy_bandwidth_gbs(dev) * 1e9)
    flops_s = flops / (matmul_peak_tflops(dev) * 1e12)
    return {
        "floor_s": max(bytes_s, flops_s),
        "bytes": nbytes,
        "flops": flops,
        "bytes_s": bytes_s,
        "flops_s": flops_s,
        "bound": "bandwidth" if bytes_s >= flops_s else "compute",
    }


def call_floor_s(model, tokens: int) -> float:
    """Floor of one call of ``model`` on ``tokens`` tokens: its streamed weights, and 2 flops per
    parameter and token."""
    w = streamed_weight_bytes(model)
    return floor_s(model.device, w, 2 * (w / model.embed_tokens.weight.element_size()) * tokens)


# ------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    """Wall times of one function over the rounds of :func:`time_alternating`."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Interquartile range / median (0 with fewer than 4 runs: then max - min over median)."""
        t = sorted(self.seconds)
        if len(t) < 4:
            return (t[-1] - t[0]) / self.median if len(t) > 1 else 0.0
        q1, _, q3 = statistics.quantiles(t, n=4)
        return (q3 - q1) / self.median

    @property
    def trusted(self) -> bool:
        return self.spread <= MAX_SPREAD


def time_alternating(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    *,
    rounds: int = 5,
    warmup: int = 1,
    time_budget_s: float | None = None,
    clock: str = "wall",
) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time several functions round-robin (A B C ... A B C ...) so that a load change on a busy
    machine hits all of them alike: ``warmup`` untimed rounds, then ``rounds`` timed ones (fewer,
    but at least 2, if ``time_budget_s`` runs out). Returns each function's :class:`Timing` and its
    last output.

    ``clock``: ``"wall"`` (``perf_counter``, after a device sync) or ``"cpu"`` (this process's CPU
    time, ``time.process_time``: on a CPU shared with other processes and one torch thread, the
    work done without the time spent waiting for a core; CPU devices only)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"time_alternating: clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise ValueError("time_alternating: clock='cpu' times CPU work only (device is not cpu)")
    now = time.perf_counter if clock == "wall" else time.process_time
    outputs = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            outputs[name] = fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for r in range(rounds):
        if r >= 2 and time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break
        for name, fn in fns.items():
            t0 = now()
            outputs[name] = fn()
            synchronize(device)
            times[name].append(now() - t0)
    return {name: Timing(t) for name, t in times.items()}, outputs


def token_agreement(a, b) -> float:
    """Fraction of equal tokens of two ``[B, T]`` tensors or lists of token rows (rows compared up to
    the shorter one)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return float((a == b).float().mean()) if a.numel() else 1.0
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))
