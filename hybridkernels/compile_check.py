"""GPU-free compile check: every registered Triton kernel case compiled for sm_80 and sm_90, and
the CUDA kernels' ptxas resource report from the ``_C`` build.

A kernel that passes its interpreter tests can still fail at its first launch on a GPU (an op the
backend rejects, tiles that need more shared memory than the target has). This check closes that
hole on the CPU: ``triton.compile`` runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX
-> cubin) for a target without a device. It fails on any compile error, on shared memory past the
target's per-block limit, and on register spills in ``_C``'s CUDA kernels.

Run it as ``python -m hybridkernels.compile_check`` (``--json PATH``, ``--module FILE`` to add
kernels from a file). It must run without ``TRITON_INTERPRET`` (the interpreter replaces
``triton.jit`` functions), which is why tests and ``hybridkernels info --kernels`` start it in a
subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

# Per-block shared memory a kernel may use (opt-in maximum), by SM version.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
# How a feature shows in the PTX of an sm_90 build.
HOPPER_MARKERS = {"wgmma": "wgmma.mma_async", "tma": "cp.async.bulk.tensor"}


@dataclasses.dataclass
class TritonResult:
    case: str
    kernel: str
    target: str
    ok: bool
    error: str | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    hopper_features: list[str] = dataclasses.field(default_factory=list)
    missing_features: list[str] = dataclasses.field(default_factory=list)

    def problem(self) -> str | None:
        where = f"kernel {self.kernel}, config {self.case}, target {self.target}"
        if not self.ok:
            return f"{where}: compile error: {self.error}"
        if self.shared_bytes > self.shared_limit:
            return (
                f"{where}: needs {self.shared_bytes} bytes of shared memory per block, "
                f"the target allows {self.shared_limit}"
            )
        return None


def _aligned_attrs(case) -> dict:
    """Divisibility-by-16 hints on every pointer and stride argument: what the JIT specializes for
    aligned tensors at run time, and what enables pipelined (async-copy) loads, i.e. the build
    that needs the most shared memory."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(case.signature.items())
        if ty.startswith("*") or ("stride" in name and ty in ("i32", "i64"))
    }


def _compile(args: tuple[int, int]) -> TritonResult:
    """Compile case ``index`` of the registry for ``sm``. Runs in a worker process."""
    index, sm = args
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton.registry import all_compile_cases

    case = all_compile_cases()[index]
    kernel = getattr(case.kernel, "__name__", None) or getattr(case.kernel.fn, "__name__", "?")
    result = TritonResult(
        case=case.name, kernel=kernel, target=f"sm_{sm}", ok=False, shared_limit=SHARED_LIMITS[sm]
    )
    try:
        source = triton.compiler.ASTSource(
            fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=_aligned_attrs(case)
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", sm, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    except Exception as exc:  # every compiler failure is a finding, reported with its case
        result.error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        )
        return result
    result.ok = True
    result.shared_bytes = int(compiled.metadata.shared)
    result.num_warps = int(compiled.metadata.num_warps)
    result.num_stages = int(compiled.metadata.num_stages)
    ptx = compiled.asm.get("ptx", "")
    if sm >= 90:
        result.hopper_features = [f for f, marker in HOPPER_MARKERS.items() if marker in ptx]
        result.missing_features = [f for f in case.hopper_features if f not in result.hopper_features]
    return result


def _load_modules(paths: list[str]) -> None:
    for path in paths:
        name = f"_hk_extra_kernels_{abs(hash(path))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def check_triton(
    targets=(80, 90), modules: list[str] = (), jobs: int | None = None, only: str | None = None
) -> list[TritonResult]:
    """Compile every registered case (whose name contains ``only``) for every target, in parallel."""
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise RuntimeError(
            "the compile check must run without TRITON_INTERPRET (the interpreter replaces triton.jit)"
        )
    _load_modules(list(modules))
    from .triton.registry import all_compile_cases

    cases = all_compile_cases()
    work = [(i, sm) for i, case in enumerate(cases) if only is None or only in case.name for sm in targets]
    import multiprocessing

    # fork: workers inherit the registry, including kernels loaded from --module files.
    with ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, work))


def cuda_kernel_report() -> list[dict]:
    """ptxas's registers / spills / shared memory per ``_C`` CUDA kernel and arch (empty without CUDA)."""
    from . import _cuda

    return json.loads(_cuda.build_info().get("kernel_report") or "[]")


def cuda_problems(report: list[dict]) -> list[str]:
    return [
        f"CUDA kernel {e['kernel']} ({e['arch']}): spills {e['spill_stores']} bytes stored / "
        f"{e['spill_loads']} loaded"
        for e in report
        if e["spill_stores"] or e["spill_loads"]
    ]


def format_tables(triton_results: list[TritonResult], cuda_report: list[dict]) -> str:
    lines = [f"Triton kernels ({len(triton_results)} compilations):"]
    lines.append(
        f"  {'kernel':<28} {'config':<44} {'target':<6} {'status':<6} {'smem KB':>8} warps stages hopper"
    )
    for r in triton_results:
        status = "ok" if r.problem() is None else "FAIL"
        smem = f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes is not None else "-"
        hopper = ",".join(r.hopper_features) + (
            f" (missing {','.join(r.missing_features)})" if r.missing_features else ""
        )
        lines.append(
            f"  {r.kernel:<28} {r.case:<44} {r.target:<6} {status:<6} {smem:>8} {r.num_warps or '-':>5} "
            f"{r.num_stages or '-':>6} {hopper}"
        )
    lines.append(f"CUDA kernels in _C ({len(cuda_report)} kernel x arch):")
    for e in cuda_report:
        lines.append(
            f"  {e['arch']:<6} regs {e['registers']!s:>4}  smem {e['shared_bytes']:>6} B  "
            f"spills {e['spill_stores']}/{e['spill_loads']} B  {e['kernel']}"
        )
    return "\n".join(lines)


def run_in_subprocess(extra_args: list[str] = ()) -> subprocess.CompletedProcess:
    """Run this check in a fresh interpreter without TRITON_INTERPRET (for tests and the CLI)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "hybridkernels.compile_check", *extra_args],
        env=env,
        capture_output=True,
        text=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybridkernels.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--targets", default="80,90", help="SM versions, comma-separated (default 80,90)")
    parser.add_argument("--module", action="append", default=[], help="also check kernels registered by FILE")
    parser.add_argument("--only", help="check only the cases whose name contains this text")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    unknown = [t for t in targets if t not in SHARED_LIMITS]
    if unknown:
        parser.error(
            f"--targets: no shared-memory limit known for {unknown} (known: {sorted(SHARED_LIMITS)})"
        )
    results = check_triton(targets, args.module, args.jobs, args.only)
    report = cuda_kernel_report()
    print(format_tables(results, report))
    problems = [p for r in results if (p := r.problem())] + cuda_problems(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"triton": [dataclasses.asdict(r) for r in results], "cuda": report, "problems": problems},
                f,
                indent=1,
            )
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(
        f"compile check: {len(results)} Triton compilations, {len(report)} CUDA kernels, "
        f"{len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
