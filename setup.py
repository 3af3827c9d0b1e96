"""Build of ``hybridkernels._C``: a pybind11 module with CUDA kernels and a C++ CPU fallback.

No torch at build time. The CUDA sources (``csrc/*.cu``) are compiled with nvcc when one is
found (``CUDA_HOME``, then ``PATH``) and linked against the static CUDA runtime; otherwise the
module holds the CPU implementation only. Knobs (environment variables):

    HYBRIDKERNELS_CUDA_ARCHS     "80;90" (default): SM versions to generate SASS for
    HYBRIDKERNELS_NO_CUDA=1      build the CPU implementation only
    HYBRIDKERNELS_REQUIRE_CUDA=1 fail instead of falling back when nvcc is missing
    MAX_JOBS                     parallel compile jobs (default: CPU count)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _max_jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return os.cpu_count() or 1


def _cuda_archs() -> list[str]:
    raw = os.environ.get("HYBRIDKERNELS_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}a?", arch):
            sys.exit(f"HYBRIDKERNELS_CUDA_ARCHS: {arch!r} is not an SM version like 80 or 90a")
    return archs


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_root(nvcc: str) -> Path:
    """The toolkit directory holding include/ and lib64/ (nvcc may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("")
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
            capture_output=True,
            text=True,
        )
    match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
    candidates += [match.group(1) if match else None, str(Path(nvcc).resolve().parent.parent)]
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c).resolve()
    sys.exit(f"found nvcc at {nvcc} but no CUDA toolkit headers (cuda_runtime.h); set CUDA_HOME")


def _cuda_lib_dir(root: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (root / sub / "libcudart_static.a").is_file():
            return root / sub
    sys.exit(f"no libcudart_static.a under {root}; set CUDA_HOME to a full CUDA toolkit")


def _parse_ptxas(log: str) -> list[dict]:
    """Registers, spills, stack and shared memory per (kernel, arch) from ``ptxas -v`` output."""
    entries, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            current = {
                "kernel": m.group(1),
                "arch": m.group(2),
                "registers": None,
                "spill_stores": 0,
                "spill_loads": 0,
                "stack_bytes": 0,
                "shared_bytes": 0,
            }
            entries.append(current)
        elif current and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                r"(\d+) bytes spill loads",
                line,
            )
        ):
            current.update(
                stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["shared_bytes"] = int(s.group(1))
    if entries and shutil.which("c++filt"):
        names = subprocess.run(
            ["c++filt"], input="\n".join(e["kernel"] for e in entries), capture_output=True, text=True
        ).stdout.splitlines()
        if len(names) == len(entries):
            for e, name in zip(entries, names, strict=True):
                e["kernel"] = name
    return entries


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (in parallel) and links the objects into _C."""

    def build_extensions(self):
        if shutil.which(self.compiler.compiler_so[0]) is None:
            sys.exit(
                f"hybridkernels needs a C++17 compiler to build _C; '{self.compiler.compiler_so[0]}'"
                " was not found (install g++ or set CXX)"
            )
        self.parallel = _max_jobs()
        ext = self.extensions[0]
        nvcc = None if _flag("HYBRIDKERNELS_NO_CUDA") else _find_nvcc()
        if nvcc is None:
            if _flag("HYBRIDKERNELS_REQUIRE_CUDA"):
                sys.exit(
                    "HYBRIDKERNELS_REQUIRE_CUDA=1 but "
                    + (
                        "HYBRIDKERNELS_NO_CUDA=1 is set"
                        if _flag("HYBRIDKERNELS_NO_CUDA")
                        else "nvcc was found neither under CUDA_HOME nor on PATH"
                    )
                )
            print("hybridkernels: building _C without CUDA (CPU implementation only)")
        else:
            self._add_cuda(ext, nvcc)
        super().build_extensions()

    def _add_cuda(self, ext, nvcc: str) -> None:
        root = _cuda_root(nvcc)
        archs = _cuda_archs()
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # PTX of the newest arch too, so newer GPUs can JIT the kernels.
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        print(f"hybridkernels: building _C with CUDA ({nvcc}, toolkit {root}, sm_{', sm_'.join(archs)})")
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        macros = ["-DHK_WITH_CUDA", f'-DHK_CUDA_ARCHS="{";".join(archs)}"']
        sources = sorted(CSRC.glob("*.cu"))

        def compile_one(src: Path) -> Path:
            obj = build_dir / (src.stem + ".o")
            cmd = [
                nvcc,
                "-c",
                str(src),
                "-o",
                str(obj),
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-Xcompiler",
                "-fPIC",
                "-Xptxas",
                "-v",
                f"-I{CSRC}",
                *macros,
                *gencode,
            ]
            print(" ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            (build_dir / (src.stem + ".ptxas.log")).write_text(log)
            if proc.returncode != 0:
                sys.stderr.write(log)
                sys.exit(f"nvcc failed on {src.name} (exit {proc.returncode}); output above")
            return obj, _parse_ptxas(log)

        with ThreadPoolExecutor(_max_jobs()) as pool:
            built = list(pool.map(compile_one, sources))
        ext.extra_objects += [str(obj) for obj, _ in built]
        # ptxas's resource report is compiled into _C (build_info()["kernel_report"]), so it always
        # describes the binary that is loaded: `hybridkernels info --kernels` and the compile check read it.
        generated = Path(self.build_temp) / "generated"
        generated.mkdir(parents=True, exist_ok=True)
        report = json.dumps([e for _, entries in built for e in entries])
        (generated / "hk_kernel_report.h").write_text(f'#define HK_KERNEL_REPORT R"HKJSON({report})HKJSON"\n')
        ext.include_dirs.append(str(generated))
        ext.define_macros.append(("HK_HAS_KERNEL_REPORT", None))
        ext.include_dirs.append(str(root / "include"))
        ext.define_macros += [("HK_WITH_CUDA", None), ("HK_CUDA_ARCHS", f'"{";".join(archs)}"')]
        ext.library_dirs.append(str(_cuda_lib_dir(root)))
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]


setup(
    ext_modules=[
        Pybind11Extension(
            "hybridkernels._C",
            sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")),
            include_dirs=[str(CSRC)],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
