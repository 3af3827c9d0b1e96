"""A deliberately broken kernel for the compile-check test: its tiles need far more shared memory
than an sm_80 block may use."""

import triton
import triton.language as tl

from hybridkernels.triton.registry import CompileCase, compile_cases


@triton.jit
def oversized_matmul_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@compile_cases
def _cases():
    sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    yield CompileCase(oversized_matmul_kernel, sig, {"BLOCK": 256}, 4, 3, "oversized_test[fp32,BLOCK=256]")
