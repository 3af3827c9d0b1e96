"""The ``_C`` CUDA kernels on the host: csrc/*.cu compiled with g++ against the emulator of
tests/cuda_host/ (threads as fibers, real barriers and warp shuffles) under ASan + UBSan.

The driver (tests/cuda_host/driver.cpp) calls the CUDA launchers the way csrc/bindings.cpp does
and compares every output with a plain C++ reference (double-precision attention; the append
with RoPE element by element), checks guard bands and stride padding of every output, and
fails on any sanitizer report or emulator error (a divergent barrier, a warp shuffle with a
missing lane). No GPU and no CUDA toolkit needed: only g++.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HOST = Path(__file__).parent / "cuda_host"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="the host emulation of the CUDA kernels needs g++"
)

DTYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}
SANITIZER_REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|hkemu: error")
EMULATOR_ERROR = 86  # hkemu's exit status on a synchronisation error


def _build_module():
    spec = importlib.util.spec_from_file_location("hkemu_build", HOST / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hkemu_build = _build_module()


def _env(seed: int) -> dict[str, str]:
    env = dict(os.environ)
    env["HKEMU_SEED"] = str(seed)
    # No LeakSanitizer: it needs ptrace, which some CI sandboxes refuse (the kernels allocate nothing).
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
    return env


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    """The emulation binary of csrc/*.cu + driver.cpp, built once per session (~20 s on 2 cores)."""
    return hkemu_build.build(tmp_path_factory.mktemp("hkemu"), jobs=2)


def run_cases(binary: Path, cases: list[str], seed: int = 1) -> dict[str, str]:
    """Runs the driver on `cases`; asserts every case passed with no sanitizer report and returns
    {case id: info} plus {"launches": the emulator's per-kernel launch statistics}."""
    r = subprocess.run(
        [str(binary)],
        input="\n".join(cases) + "\n",
        capture_output=True,
        text=True,
        env=_env(seed),
        timeout=600,
    )
    report = f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr[-6000:]}"
    assert not SANITIZER_REPORT.search(r.stderr), report
    assert r.returncode == 0, report
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("ok "):
            _, case, info = line.split(" ", 2)
            results[case] = info
    assert len(results) == len(cases), report
    results["launches"] = r.stdout
    return results


def ran_kernels(stdout: str) -> set[str]:
    return set(re.findall(r"^launches [1-9]\d* .* kernel (.+)$", stdout, re.M))


# ------------------------------------------------------------------------------------------------
# decode_attention


def decode_cases(dtype: str, D: int) -> list[tuple[str, int]]:
    """(case line, expected split count) covering GQA groups 1 / 2 / 3 / 4 / 6 / 8 (every
    heads-per-block G), the shared prefix, one pass, the planner's split, forced splits (more
    than the row has tiles, too), odd lengths, batch > 1, empty rows and strided layouts."""
    base = f"decode dtype={dtype} D={D}"
    cases = [
        ("id=g1 Hq=2 Hkv=2 B=2 Lmax=37 lens=37,5 splits=1 seed=1", 1),
        ("id=g2-prefix Hq=4 Hkv=2 B=3 Lmax=50 prefix=21 lens=50,0,13 splits=1 seed=2", 1),
        # 33 + 230 keys: the planner cuts the row in 2 (an H100's 528 block slots, one work item).
        ("id=g4-auto Hq=4 Hkv=1 B=1 Lmax=230 prefix=33 lens=229 splits=0 seed=3", 2),
        ("id=g8-split3 Hq=8 Hkv=1 B=2 Lmax=61 prefix=7 lens=61,18 splits=3 layout=strided seed=4", 3),
        ("id=g3-split16 Hq=6 Hkv=2 B=2 Lmax=40 lens=40,9 splits=16 scale_milli=250 seed=5", 16),
        ("id=g6-split5 Hq=6 Hkv=1 B=1 Lmax=45 prefix=11 lens=31 splits=5 layout=strided seed=6", 5),
        # The planner on small emulated GPUs (csrc caches the properties per device index): a
        # full GPU (work 4 >= 80% of 2 slots) gets one pass; 2 items on 3 slots get 3 splits.
        ("id=auto-full Hq=4 Hkv=2 B=2 Lmax=300 lens=300,77 splits=0 device=1 sms=2 per_sm=1 seed=9", 1),
        ("id=auto3 Hq=1 Hkv=1 B=2 Lmax=390 prefix=10 lens=1,390 splits=0 device=2 sms=3 per_sm=1 seed=10", 3),
        # cache_lens outside [0, Lmax] (possible with value checks skipped): clamped, never read.
        ("id=bad-lens Hq=2 Hkv=1 B=3 Lmax=40 prefix=5 lens=500,-3,2147483647 splits=3 seed=11", 3),
        # Rows with no key at all (the op forbids them; the kernels return 0 and lse = -inf).
        ("id=empty Hq=2 Hkv=1 B=2 Lmax=20 lens=0,3 splits=2 seed=7", 2),
    ]
    if (dtype, D) == ("f16", 128):
        cases.append(("id=long-auto Hq=2 Hkv=1 B=1 Lmax=520 lens=517 splits=0 seed=8", 4))
    return [(f"{base} {c}", s) for c, s in cases]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_attention_kernels(driver, dtype, D):
    cases = decode_cases(dtype, D)
    seed = 1 + list(DTYPES).index(dtype) + (D == 128)  # different fiber schedules per run
    results = run_cases(driver, [c for c, _ in cases], seed=seed)
    for line, splits in cases:
        case = re.search(r"id=(\S+)", line).group(1)
        assert results[case].startswith(f"splits={splits} "), (case, results[case])
    T = DTYPES[dtype]
    want = {f"hk::{{anonymous}}::decode_split_kernel<{T}, {D}, {G}>" for G in (1, 2, 4)}
    want.add(f"hk::{{anonymous}}::decode_merge_kernel<{T}>")
    assert want <= ran_kernels(results["launches"]), results["launches"]


# ------------------------------------------------------------------------------------------------
# kv_append


def append_cases(dtype: str) -> list[str]:
    """Every vector width of the copy (16 / 8 / 4 / 2 bytes, element-strided) and of the RoPE
    kernel, RoPE at cache slots / [B] starts / [B, T] positions, int32 and int64 positions, and
    out-of-range positions."""
    two_byte = dtype != "f32"
    base = f"append dtype={dtype}"
    cases = [
        "id=vec16 B=2 T=3 Lmax=11 H=2 D=64 pos=0,8",
        "id=vec8 B=3 T=1 Lmax=5 H=3 D=4 pos=4,0,2 pos_dtype=i32"
        if two_byte
        else "id=vec8 B=3 T=1 Lmax=5 H=3 D=2 pos=4,0,2 pos_dtype=i32",
        "id=vec4 B=2 T=2 Lmax=6 H=2 D=6 pos=1,4" if two_byte else "id=vec4 B=2 T=2 Lmax=6 H=2 D=3 pos=1,4",
        "id=padded B=2 T=2 Lmax=7 H=2 D=64 pos=5,0 layout=padded",
        "id=offset B=2 T=3 Lmax=8 H=1 D=16 pos=2,5 layout=offset",
        "id=elemstride B=1 T=2 Lmax=4 H=3 D=6 pos=2 layout=elemstride pos_dtype=i32",
        "id=rope-slots B=2 T=3 Lmax=9 H=2 D=64 pos=0,6 rope=slots",
        "id=rope-start B=2 T=2 Lmax=6 H=2 D=32 pos=4,1 rope=start rope_rows=40 rope_extra=4",
        "id=rope-tokens B=2 T=3 Lmax=8 H=1 D=16 pos=5,0 rope=tokens rope_rows=50 rope_cols=16 rope_extra=2",
        "id=rope-v1 B=1 T=2 Lmax=5 H=2 D=8 pos=3 rope=slots rope_extra=1",
        "id=rope-offset B=2 T=1 Lmax=3 H=1 D=8 pos=2,0 rope=start rope_rows=9 layout=offset",
        # Slots or rotary positions out of range (possible with value checks skipped): those
        # tokens are skipped, nothing is written out of bounds (int64 overflow included).
        "id=bad-pos B=4 T=2 Lmax=6 H=1 D=8 pos=-1,5,9223372036854775807,4",
        "id=rope-bad B=2 T=3 Lmax=8 H=1 D=16 pos=0,5 rope=tokens rope_rows=10 rpos=0,10,-1,9,3,"
        + str(2**63 - 1),
        "id=rope-start-bad B=2 T=3 Lmax=8 H=1 D=16 pos=1,2 rope=start rope_rows=6 rpos=4,-2",
    ]
    return [f"{base} {c} seed={i}" for i, c in enumerate(cases)]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kv_append_kernels(driver, dtype):
    results = run_cases(driver, append_cases(dtype), seed=7)
    T = DTYPES[dtype]
    ran = ran_kernels(results["launches"])
    copies = {"uint4, true", "uint2, true", "unsigned int, true"}
    copies |= (
        {"short unsigned int, true", "short unsigned int, false"} if T != "float" else {"unsigned int, false"}
    )
    want = {f"hk::{{anonymous}}::kv_append_kernel<{v}>" for v in copies}
    widths = (8, 4, 2, 1) if T != "float" else (4, 2, 1)
    want |= {f"hk::{{anonymous}}::kv_append_rope_kernel<{T}, {w}>" for w in widths}
    assert want <= ran, sorted(ran)


# ------------------------------------------------------------------------------------------------
# The harness itself: deliberately broken kernels must be reported, a correct one must pass.

BROKEN_KERNELS = r"""
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // threads 16..31 skip the barrier and exit
  out[threadIdx.x] = 1.f;
}

__global__ void mismatched_barriers(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();  // a different barrier
  }
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_missing_lane(float* out) {
  if (threadIdx.x == 5) return;  // lane 5 never joins the full-warp shuffle
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void shuffle_partial_warp(float* out) {
  // 48 threads: the second warp has 16 lanes, the mask names 32.
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void shared_out_of_bounds(float* out, int shift) {
  __shared__ float tile[32];
  tile[threadIdx.x + shift] = 1.f;  // shift 1: thread 31 writes tile[32]
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void global_out_of_bounds(float* out, int shift) {
  out[threadIdx.x + shift] = 1.f;  // shift 1: one past the 32 floats
}

__global__ void local_out_of_bounds(float* out, int i) {
  float local[4] = {1.f, 2.f, 3.f, 4.f};  // on the thread's fiber stack
  const float* p = local;
  out[threadIdx.x] = p[i + threadIdx.x % 2];  // i = 3: odd threads read local[4]
}

__global__ void missing_barrier(float* out) {
  __shared__ float buf[64];
  buf[threadIdx.x] = float(threadIdx.x);
  // A __syncthreads() belongs here: the neighbour may not have written yet.
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 64];
}

// A block sum with warp shuffles, shared memory and a barrier: correct.
__global__ void block_sum(float* out) {
  __shared__ float partial[2];
  float v = float(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = partial[0] + partial[1];
}

// Atomics across blocks and threads (an int literal into an unsigned counter, as CUDA allows).
__global__ void atomics(unsigned* count, float* sum, long long* top) {
  atomicAdd(count, 1);
  atomicAdd(sum, 0.5f);
  atomicMax(top, (long long)(blockIdx.x * blockDim.x + threadIdx.x));
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  float* out = new float[32];
  float* wide = new float[128];
  bool checked = false, ok = true;
  if (!strcmp(mode, "divergent_barrier")) divergent_barrier<<<1, 32>>>(out);
  if (!strcmp(mode, "mismatched_barriers")) mismatched_barriers<<<1, 32>>>(out);
  if (!strcmp(mode, "shuffle_missing_lane")) shuffle_missing_lane<<<1, 32>>>(out);
  if (!strcmp(mode, "shuffle_partial_warp")) shuffle_partial_warp<<<1, 48>>>(wide);
  if (!strcmp(mode, "shared_out_of_bounds")) shared_out_of_bounds<<<1, 32>>>(out, 1);
  if (!strcmp(mode, "global_out_of_bounds")) global_out_of_bounds<<<1, 32>>>(out, 1);
  if (!strcmp(mode, "local_out_of_bounds")) local_out_of_bounds<<<1, 32>>>(out, 3);
  if (!strcmp(mode, "missing_barrier")) {
    missing_barrier<<<1, 64>>>(wide);
    for (int i = 0; i < 64; ++i) ok = ok && wide[i] == float((i + 1) % 64);
    checked = true;
  }
  if (!strcmp(mode, "block_sum")) {
    block_sum<<<2, 64>>>(wide);
    for (int i = 0; i < 128; ++i) ok = ok && wide[i] == 2016.f;
    checked = true;
  }
  if (!strcmp(mode, "atomics")) {
    unsigned* count = new unsigned(0);
    long long* top = new long long(-1);
    wide[0] = 0.f;
    atomics<<<3, 40>>>(count, wide, top);
    ok = *count == 120 && wide[0] == 60.f && *top == 119;
    delete count;
    delete top;
    checked = true;
  }
  if (!strcmp(mode, "bad_launch")) {
    block_sum<<<1, 2048>>>(wide);  // more threads than a block may have
    const cudaError_t err = cudaGetLastError();
    std::printf("launch error: %s\n", cudaGetErrorString(err));
    ok = err == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess;
    checked = true;
  }
  std::printf(checked ? (ok ? "result ok\n" : "wrong result\n") : "finished\n");
  delete[] out;
  delete[] wide;
  return ok ? 0 : 1;
}
"""


@pytest.fixture(scope="session")
def broken(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hkemu_broken")
    src = out / "broken_kernels.cu"
    src.write_text(BROKEN_KERNELS)
    return hkemu_build.build(out, cu_files=[src], cpp_files=[], output="broken", jobs=2)


# What each broken kernel must produce (stdout + stderr).
BROKEN_REPORTS = {
    "divergent_barrier": r"hkemu: error .*__syncthreads reached by 16 of the block's 32 threads",
    "mismatched_barriers": r"hkemu: error .*different __syncthreads .*broken_kernels\.cu:\d+",
    "shuffle_missing_lane": r"hkemu: error .*missing or mismatched lane.* thread \(5,0,0\).* has exited",
    "shuffle_partial_warp": r"hkemu: error .*__shfl_down_sync names lane 16 of warp 1, which does not exist",
    "shared_out_of_bounds": r"broken_kernels\.cu:\d+:\d+: runtime error: index 32 out of bounds",
    "global_out_of_bounds": r"ERROR: AddressSanitizer: heap-buffer-overflow",
    # UBSan's object-size check fires before ASan's stack-buffer-overflow: either will do.
    "local_out_of_bounds": r"insufficient space for an object of type 'const float'|stack-buffer-overflow",
    "missing_barrier": r"wrong result",
}


@pytest.mark.parametrize("mode", list(BROKEN_REPORTS))
@pytest.mark.parametrize("seed", [0, 3])
def test_harness_reports_broken_kernels(broken, mode, seed):
    expected = BROKEN_REPORTS[mode]
    r = subprocess.run([str(broken), mode], capture_output=True, text=True, env=_env(seed), timeout=60)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert re.search(expected, r.stdout + r.stderr), (r.returncode, r.stdout, r.stderr[-4000:])
    if mode.startswith(("divergent", "mismatched", "shuffle")):
        assert r.returncode == EMULATOR_ERROR, r.stderr  # reported, not hung or crashed


@pytest.mark.parametrize("mode", ["block_sum", "atomics", "bad_launch"])
def test_harness_passes_correct_kernels(broken, mode):
    r = subprocess.run([str(broken), mode], capture_output=True, text=True, env=_env(5), timeout=60)
    assert r.returncode == 0 and "result ok" in r.stdout, (r.stdout, r.stderr)
    assert not SANITIZER_REPORT.search(r.stderr), r.stderr


# ------------------------------------------------------------------------------------------------
# build.py's rewrite of the two non-C++ constructs (no compiler needed).


def test_rewrite_launches_and_shared_keeps_lines():
    src = (
        "template <typename T, int N>\n"
        "__global__ void k(T* p) {\n"
        "  __shared__ __align__(32) float a[N][4], b[2];\n"
        "  __shared__ hk::Vec<T, 4> v[N];\n"
        "  __shared__ int flag;\n"
        "}\n"
        "void go(float* p, cudaStream_t s) {\n"
        "  k<float, (8 > 4 ? 2 : 1)><<<dim3(2, 3),\n"
        "      128, 0, s>>>(p);\n"
        "  ns::plain<<<1, 32>>>(p);\n"
        "}\n"
    )
    out = hkemu_build.rewrite_cuda(src, "/x/k.cu")
    lines = out.splitlines()
    assert lines[0] == '#line 1 "/x/k.cu"' and len(lines) == src.count("\n") + 1
    assert "using hkemu_shared_t0_a = float[N][4]; HKEMU_SHARED(32, hkemu_shared_t0_a, a);" in lines[3]
    assert "using hkemu_shared_t1_b = float[2]; HKEMU_SHARED(32, hkemu_shared_t1_b, b);" in lines[3]
    assert "using hkemu_shared_t2_v = hk::Vec<T, 4>[N]; HKEMU_SHARED(16, hkemu_shared_t2_v, v);" in lines[4]
    assert "using hkemu_shared_t3_flag = int; HKEMU_SHARED(16, hkemu_shared_t3_flag, flag);" in lines[5]
    assert lines[8] == "  ::hkemu::launch<k<float, (8 > 4 ? 2 : 1)>>(dim3(2, 3),"
    assert lines[9] == "      128, 0, s)(p);"
    assert lines[10] == "  ::hkemu::launch<ns::plain>(1, 32)(p);"
    assert "__shared__" not in out and "<<<" not in out


@pytest.mark.parametrize(
    "src, message",
    [
        ("extern __shared__ float dyn[];\n", "extern .*__shared__ is not emulated"),
        ("void f() { k<<<1, 2(x); }\n", "'<<<' without '>>>'"),
        ("__shared__ float;\n", "cannot parse the __shared__ declaration"),
    ],
)
def test_rewrite_rejects_what_it_cannot_emulate(src, message):
    with pytest.raises(hkemu_build.RewriteError, match=message):
        hkemu_build.rewrite_cuda(src, "k.cu")


def test_every_csrc_kernel_has_emulation_cases():
    """A kernel added to csrc/ must get cases here (and a launcher call in driver.cpp)."""
    kernels = set()
    for src in sorted(hkemu_build.CSRC.glob("*.cu")):
        kernels |= set(
            re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", src.read_text())
        )
    covered = {"decode_split_kernel", "decode_merge_kernel", "kv_append_kernel", "kv_append_rope_kernel"}
    assert kernels == covered, f"kernels without host-emulation cases: {sorted(kernels - covered)}"
