"""unmask_step (Triton) against plain torch, timed in the same run.

GPU (bf16, LLaDA-8B shapes: V = 126,464, d = 4096, a 32-row block, B = 1 / 8 / 64), issue 6:
  * logits path: our one-pass kernel vs the plain-torch LLaDA sequence (softmax in fp32, argmax,
    gather, topk, scatter) on the same bf16 logits; GB/s of the logits read against the measured
    copy bandwidth;
  * fused path: ``unmask_step(hidden, lm_head)`` vs cuBLAS ``hidden @ lm_head.T`` + our logits
    path, with every row masked and with half of them (we compute only masked rows); TFLOP/s of the
    masked rows' matmul, and the peak memory of one call (``torch.cuda.max_memory_allocated``)
    against the size of the ``[B, Lr, V]`` logits it never allocates.
Both sides are captured in CUDA graphs and timed by replay (GPU time, not Python launch overhead);
``x`` is restored from a copy inside each timed call since the step commits in place. Every
benchmark first checks that both sides commit the same tokens. On the CPU: tiny fp32 shapes
through the Triton interpreter (a smoke run), and the ``_C`` rows (``test_cpu_*``, issue 19): the
fused CPU ``unmask_step`` against the reference on Fast-dLLM's shapes, and ``_C.unmask_scores``
on the packed LM head against the row-major one.

    pytest benches/bench_unmask.py --benchmark-json=out.json
"""

from __future__ import annotations

import os

import pytest
import torch
from _common import DEVICE, ON_GPU, compare, cuda_graphed

if not ON_GPU:  # before hybridkernels.triton.unmask is imported (it is imported on first use)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridkernels.ops import unmask_step  # noqa: E402
from hybridkernels.ops._dispatch import triton_interpreting  # noqa: E402

if ON_GPU:
    V, D, LR, L, START, DTYPE = 126_464, 4096, 32, 256, 128, torch.bfloat16
    BATCHES = (1, 8, 64)
else:
    V, D, LR, L, START, DTYPE = 96, 32, 8, 16, 4, torch.float32
    BATCHES = (2,)
MASK_ID = V - 1
K = LR // 4  # tokens committed per sequence (LLaDA: 256 gen / 64 steps / ... -> a few per step)


def _setup():
    if not ON_GPU and not triton_interpreting():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 on the CPU")


def _tokens(B: int, p_mask: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, L), generator=g)
    window = x[:, START : START + LR]
    window[torch.rand(B, LR, generator=g) < p_mask] = MASK_ID
    window[:, :K] = MASK_ID  # at least K masks per sequence
    return x.to(DEVICE)


def torch_llada_step(x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """The plain-torch LLaDA commit (low-confidence remasking, temperature 0, k per sequence)."""
    window = x[:, START : START + LR]
    committable = window == MASK_ID
    candidate = logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    confidence = probs.gather(-1, candidate[..., None])[..., 0]
    confidence = torch.where(committable, confidence, float("-inf"))
    chosen = torch.zeros_like(committable)
    chosen.scatter_(1, torch.topk(confidence, k, dim=1).indices, True)
    # torch.where, not window[chosen] = ...: boolean indexing syncs (nonzero), which a CUDA graph
    # capture forbids.
    window.copy_(torch.where(chosen, candidate, window))
    return x


def _restoring(fn, x: torch.Tensor, x0: torch.Tensor):
    def run():
        x.copy_(x0)
        return fn()

    return run


@pytest.mark.parametrize("B", BATCHES)
def test_logits_path(benchmark, B):
    _setup()
    x0 = _tokens(B, 1.0)
    g = torch.Generator(DEVICE).manual_seed(B)
    logits = (3 * torch.randn(B, LR, V, device=DEVICE, generator=g)).to(DTYPE)
    num_transfer = torch.full((B,), K, dtype=torch.int64, device=DEVICE)

    x_ours, x_base = x0.clone(), x0.clone()
    ours = _restoring(
        lambda: unmask_step(x_ours, logits=logits, mask_id=MASK_ID, start=START, num_transfer=num_transfer),
        x_ours,
        x0,
    )
    baseline = _restoring(lambda: torch_llada_step(x_base, logits, K), x_base, x0)
    ours(), baseline()
    assert torch.equal(x_ours, x_base), "Triton and torch commit different tokens"
    nbytes = logits.numel() * logits.element_size()  # every row masked: each logit read once
    compare(
        benchmark,
        cuda_graphed(ours),
        cuda_graphed(baseline),
        nbytes=nbytes,
        shape=f"B={B} Lr={LR} V={V} {str(DTYPE).replace('torch.', '')}",
        baseline_name="torch softmax+argmax+gather+topk+scatter",
    )


@pytest.mark.parametrize("p_mask", [1.0, 0.5])
@pytest.mark.parametrize("B", BATCHES)
def test_fused_lm_head(benchmark, B, p_mask):
    _setup()
    x0 = _tokens(B, p_mask)
    g = torch.Generator(DEVICE).manual_seed(B)
    hidden = torch.randn(B, LR, D, device=DEVICE, generator=g).to(DTYPE)
    lm_head = (torch.randn(V, D, device=DEVICE, generator=g) / D**0.5).to(DTYPE)
    num_transfer = torch.full((B,), K, dtype=torch.int64, device=DEVICE)
    step = dict(mask_id=MASK_ID, start=START, num_transfer=num_transfer)

    # Correctness against fp32 logits: the fused kernel accumulates in fp32 in another order, so a
    # near-tie may flip; demand agreement on all but a handful of the masked rows' candidates.
    exact = unmask_step(x0.clone(), logits=hidden.float() @ lm_head.float().T, **step)
    fused = unmask_step(x0.clone(), hidden=hidden, lm_head=lm_head, **step)
    masked = x0[:, START : START + LR] == MASK_ID
    agree = (fused.tokens == exact.tokens)[masked].float().mean().item()
    assert agree > 0.999, f"fused candidates differ from the fp32-logits path on {1 - agree:.3%} of rows"
    assert (fused.committed == exact.committed).float().mean().item() > 0.999
    del exact

    x_ours, x_base = x0.clone(), x0.clone()
    ours = _restoring(lambda: unmask_step(x_ours, hidden=hidden, lm_head=lm_head, **step), x_ours, x0)
    baseline = _restoring(lambda: unmask_step(x_base, logits=hidden @ lm_head.T, **step), x_base, x0)
    ours(), baseline()

    logits_bytes = B * LR * V * torch.tensor([], dtype=DTYPE).element_size()
    extra = {}
    if ON_GPU:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        x_ours.copy_(x0)
        unmask_step(x_ours, hidden=hidden, lm_head=lm_head, **step)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert peak < logits_bytes / 4, (
            f"fused step allocated {peak} B; [B, Lr, V] logits are {logits_bytes} B"
        )
        extra = {"peak_extra_bytes": peak, "logits_bytes_avoided": logits_bytes}
    n_masked = int((x0[:, START : START + LR] == MASK_ID).sum())
    compare(
        benchmark,
        cuda_graphed(ours),
        cuda_graphed(baseline),
        flops=2.0 * n_masked * V * D,
        nbytes=(V * D + B * LR * D) * hidden.element_size(),
        shape=f"B={B} Lr={LR} V={V} d={D} masked={n_masked} {str(DTYPE).replace('torch.', '')}",
        baseline_name="cuBLAS hidden @ lm_head.T + Triton logits path",
        **extra,
    )


@pytest.mark.parametrize("masked_rows", [16, 8])
def test_cpu_fused_lm_head(benchmark, masked_rows):
    """The CPU fused path (``_C.unmask_scores``: the LM head streamed once, no logits) against the
    reference (``hidden @ lm_head.T``, softmax, argmax, commit) on Fast-dLLM's CPU configuration:
    a 16-row window, V = 126,464, d = 256, fp32, batch 1. Issue 19."""
    from hybridkernels import _cuda

    if not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    V_cpu, d, rows = 126_464, 256, 16
    g = torch.Generator().manual_seed(masked_rows)
    hidden = torch.randn(1, rows, d, generator=g)
    lm_head = torch.randn(V_cpu, d, generator=g) / d**0.5
    x0 = torch.randint(0, V_cpu - 1, (1, rows), generator=g)
    x0[0, :masked_rows] = V_cpu - 1
    step = dict(hidden=hidden, lm_head=lm_head, mask_id=V_cpu - 1, num_transfer=torch.tensor([2]))
    ours_x, base_x = x0.clone(), x0.clone()
    ours = _restoring(lambda: unmask_step(ours_x, backend="cuda", **step), ours_x, x0)
    baseline = _restoring(lambda: unmask_step(base_x, backend="reference", **step), base_x, x0)
    ours(), ours(), baseline()  # the second call packs the LM head (ops/_unmask_cpu.py)
    assert torch.equal(ours_x, base_x), "the fused CPU path commits other tokens than the reference"
    compare(
        benchmark,
        ours,
        baseline,
        device=torch.device("cpu"),
        flops=2.0 * masked_rows * V_cpu * d,
        nbytes=V_cpu * d * 4,
        shape=f"B=1 Lr={rows} masked={masked_rows} V={V_cpu} d={d} float32",
        baseline_name="reference: hidden @ lm_head.T + softmax + argmax + commit",
    )


@pytest.mark.parametrize("rows", [8, 16, 64])
@pytest.mark.parametrize("V_cpu", [8192, 126_464])
def test_cpu_unmask_scores_packed(benchmark, V_cpu, rows):
    """``_C.unmask_scores`` alone on the packed LM head (the GEMM microkernel, vocabulary along
    the lanes) against the same kernel on the row-major LM head (16-lane dot products reduced
    across lanes), fp32, d = 256: V = 8192 is the tiny preset's vocabulary (L3-resident here),
    126,464 Fast-dLLM's (streamed from DRAM). At 8-16 rows both are bandwidth-bound. Issue 19."""
    from hybridkernels import _cuda
    from hybridkernels.ops import _unmask_cpu

    if not _cuda.available():
        pytest.skip(f"_C not importable: {_cuda.IMPORT_ERROR}")
    if not _cuda._C.unmask_panel:
        pytest.skip("no packed path on this CPU (no AVX2)")
    d = 256
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, d, generator=g)
    lm_head = torch.randn(V_cpu, d, generator=g) / d**0.5
    _unmask_cpu.packed_lm_head(lm_head)
    packed = _unmask_cpu.packed_lm_head(lm_head)
    chunk = _unmask_cpu.k_chunk(d)
    banned = (V_cpu - 1,)

    def ours():
        return _cuda.unmask_scores(hidden, lm_head, banned, packed, chunk)

    def baseline():
        return _cuda.unmask_scores(hidden, lm_head, banned)

    a, b = ours(), baseline()
    assert torch.equal(a[0], b[0]), "the packed and row-major kernels pick other tokens"
    compare(
        benchmark,
        ours,
        baseline,
        device=torch.device("cpu"),
        flops=2.0 * rows * V_cpu * d,
        nbytes=V_cpu * d * 4,
        shape=f"R={rows} V={V_cpu} d={d} float32",
        baseline_name="_C.unmask_scores on the row-major LM head",
    )
