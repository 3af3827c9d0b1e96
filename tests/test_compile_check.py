"""GPU-free compile check: every registered Triton case compiles for sm_80 and sm_90 within the
shared-memory limit, and _C's CUDA kernels do not spill. The check runs in a subprocess without
TRITON_INTERPRET (the interpreter replaces triton.jit functions)."""

import json
from pathlib import Path

import pytest

from hybridkernels import _cuda, compile_check

pytestmark = pytest.mark.compile


def test_every_registered_kernel_compiles(tmp_path):
    out = tmp_path / "compile.json"
    proc = compile_check.run_in_subprocess(["--json", str(out)])
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["triton"], "no Triton kernel is registered"
    assert {r["target"] for r in result["triton"]} == {"sm_80", "sm_90"}
    assert proc.returncode == 0 and not result["problems"], (
        "\n".join(result["problems"]) or proc.stderr[-3000:]
    )


def test_an_oversized_config_fails_naming_kernel_config_and_target(tmp_path):
    module = Path(__file__).parent / "data" / "oversized_kernel.py"
    proc = compile_check.run_in_subprocess(
        ["--module", str(module), "--only", "oversized_test", "--targets", "80"]
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        "kernel oversized_matmul_kernel, config oversized_test[fp32,BLOCK=256], target sm_80: needs"
        in proc.stderr
    )
    assert "the target allows 166912" in proc.stderr


@pytest.mark.skipif(not _cuda.has_cuda(), reason="_C was built without CUDA")
def test_cuda_kernels_have_a_resource_report_and_no_spills():
    report = compile_check.cuda_kernel_report()
    assert {e["arch"] for e in report} >= {"sm_80", "sm_90"}
    assert all(e["registers"] is not None for e in report)
    assert compile_check.cuda_problems(report) == []


def test_spills_are_reported():
    entry = {"kernel": "k", "arch": "sm_90", "spill_stores": 8, "spill_loads": 4}
    assert compile_check.cuda_problems([entry]) == ["CUDA kernel k (sm_90): spills 8 bytes stored / 4 loaded"]
