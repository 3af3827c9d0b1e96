"""Build the host emulation of the ``_C`` CUDA kernels (see README.md).

The ``.cu`` sources are compiled as C++ with g++ against the stand-in CUDA headers of
``include/``. Two constructs of CUDA are not C++ and are rewritten textually first, keeping every
line where it was (``#line`` points diagnostics and sanitizer reports at the original file):

* ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::hkemu::launch<kernel>(grid, block, smem, stream)(args)``;
* ``__shared__ [__align__(N)] T a[X][Y], b;`` becomes one ``HKEMU_SHARED`` per declarator
  (a reference into the emulator's per-block shared arena).

Usage: ``python tests/cuda_host/build.py OUT_DIR`` builds ``OUT_DIR/hkemu_driver`` from
``csrc/*.cu`` and ``driver.cpp`` (``--no-sanitize`` for a faster, unchecked build).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
CXXFLAGS = [
    "-std=c++17",
    "-O1",
    "-g",
    "-fno-var-tracking-assignments",  # halves the compile time; line numbers stay exact
    "-fno-omit-frame-pointer",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-DHK_WITH_CUDA",  # common.h declares the CUDA entry points
    "-I",
    str(HERE / "include"),
    "-I",
    str(CSRC),
]

_IDENT = r"[A-Za-z_]\w*"
_SHARED = re.compile(r"\b__shared__\b")
_DECLARATOR = re.compile(rf"\s*({_IDENT})\s*((?:\[[^\]]*\]\s*)*)\s*$")


class RewriteError(ValueError):
    """A CUDA construct the rewrite does not handle (file and line in the message)."""


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _kernel_name_start(text: str, end: int) -> int:
    """Start of the kernel expression (``ns::name<T, (N > 4)>``) that ends just before ``end``."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        angles = parens = 0
        while i > 0:
            i -= 1
            c = text[i]
            parens += {")": 1, "(": -1}.get(c, 0)
            if parens == 0:
                angles += {">": 1, "<": -1}.get(c, 0)
                if angles == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _rewrite_launches(text: str, name: str) -> str:
    out, pos = [], 0
    while (lt := text.find("<<<", pos)) >= 0:
        gt = text.find(">>>", lt)
        if gt < 0:
            raise RewriteError(f"{name}:{_line_of(text, lt)}: '<<<' without '>>>'")
        start = _kernel_name_start(text, lt)
        kernel = text[start:lt].strip()
        if not re.match(r"(::)?[A-Za-z_]", kernel):
            raise RewriteError(f"{name}:{_line_of(text, lt)}: cannot find the launched kernel's name")
        out.append(text[pos:start])
        out.append(f"::hkemu::launch<{kernel}>({text[lt + 3 : gt]})")
        pos = gt + 3
    out.append(text[pos:])
    return "".join(out)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        depth += {"[": 1, "(": 1, "<": 1, "]": -1, ")": -1, ">": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _rewrite_shared(text: str, name: str) -> str:
    out, pos, n = [], 0, 0
    for m in _SHARED.finditer(text):
        if m.start() < pos:
            continue
        line = _line_of(text, m.start())
        before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        if re.search(r"\bextern\b", before):
            raise RewriteError(f"{name}:{line}: extern (dynamic) __shared__ is not emulated")
        semi = text.find(";", m.end())
        decl = text[m.end() : semi]
        align = 16
        am = re.match(r"\s*__align__\s*\(\s*(\d+)\s*\)", decl)
        if am:
            align = max(align, int(am.group(1)))
            decl = decl[am.end() :]
        decl = decl.strip()
        # The type is the shortest prefix after which the rest parses as declarators.
        for split in (k.start() for k in re.finditer(r"\s+", decl)):
            type_, rest = decl[:split].strip(), decl[split:]
            parts = _split_top_level(rest)
            decls = [_DECLARATOR.fullmatch(p) for p in parts]
            if type_ and all(decls):
                break
        else:
            raise RewriteError(f"{name}:{line}: cannot parse the __shared__ declaration {decl!r}")
        pieces = []
        for d in decls:
            var, dims = d.group(1), d.group(2).replace(" ", "").replace("\n", "")
            alias = f"hkemu_shared_t{n}_{var}"
            n += 1
            pieces.append(f"using {alias} = {type_}{dims}; HKEMU_SHARED({align}, {alias}, {var});")
        out.append(text[pos : m.start()])
        out.append(" ".join(pieces) + "\n" * text.count("\n", m.start(), semi + 1))
        pos = semi + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite_cuda(text: str, name: str) -> str:
    """``text`` of the CUDA file ``name`` with launches and __shared__ rewritten for hkemu."""
    body = _rewrite_shared(_rewrite_launches(text, name), name)
    if body.count("\n") != text.count("\n"):
        raise RewriteError(f"{name}: internal error: the rewrite moved lines")
    return f'#line 1 "{name}"\n' + body


def compile_commands(
    out_dir: Path, cu_files: list[Path], cpp_files: list[Path], output: str, sanitize: bool = True
) -> tuple[list[list[str]], list[str]]:
    """(compile commands, link command) of one emulation binary; writes the rewritten sources."""
    cxx = shutil.which("g++") or "g++"
    flags = CXXFLAGS + (SANITIZE if sanitize else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    compiles, objects = [], []
    for src in cu_files:
        rewritten = out_dir / (src.name + ".cpp")
        rewritten.write_text(rewrite_cuda(src.read_text(), str(src)))
        obj = out_dir / (src.name + ".o")
        compiles.append(
            [cxx, *flags, "-include", str(HERE / "hkemu.h"), "-c", str(rewritten), "-o", str(obj)]
        )
        objects.append(str(obj))
    for src in [HERE / "hkemu.cpp", *cpp_files]:
        obj = out_dir / (src.name + ".o")
        compiles.append([cxx, *flags, "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    link = [cxx, *flags, *objects, "-o", str(out_dir / output)]
    return compiles, link


def build(
    out_dir: Path,
    cu_files: list[Path] | None = None,
    cpp_files: list[Path] | None = None,
    output: str = "hkemu_driver",
    sanitize: bool = True,
    jobs: int = 2,
) -> Path:
    """Compile ``cu_files`` (default: every ``csrc/*.cu``) and ``cpp_files`` (default: the
    driver) with the emulator into ``out_dir/output``; raises RuntimeError with g++'s output."""
    cu_files = sorted(CSRC.glob("*.cu")) if cu_files is None else cu_files
    cpp_files = [HERE / "driver.cpp"] if cpp_files is None else cpp_files
    compiles, link = compile_commands(Path(out_dir), cu_files, cpp_files, output, sanitize)

    def run(cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(run, compiles))
    run(link)
    return Path(out_dir) / output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--no-sanitize", action="store_true", help="build without ASan / UBSan")
    p.add_argument("-j", "--jobs", type=int, default=2)
    args = p.parse_args(argv)
    print(build(args.out_dir, sanitize=not args.no_sanitize, jobs=args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
