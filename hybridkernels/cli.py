"""``hybridkernels`` command line: ``info`` (what was built and what will run)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or broken: report it as missing
        return None


def _op_backends(device_types: list[str]) -> dict[str, dict[str, str]]:
    import torch

    from .ops._dispatch import choose_backend

    table = {}
    for name in ("attention", "unmask", "decode", "kv_append"):
        # import_module: `hybridkernels.ops.kv_append` the attribute is the function, not the module
        module = importlib.import_module(f"hybridkernels.ops.{name}")
        row = {}
        for dev in device_types:
            try:
                row[dev] = choose_backend(
                    module.OP, None, torch.device(dev), tuple(module.IMPLEMENTATIONS), module.AUTO_ORDER
                )
            except ValueError as exc:  # HYBRIDKERNELS_BACKEND names a backend that cannot run here
                row[dev] = f"error: {exc}"
        table[module.OP] = row
    return table


def collect_info() -> dict:
    """Everything ``hybridkernels info`` prints, as a dict."""
    import torch

    from . import __version__, _cuda

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "sms": p.multi_processor_count,
                }
            )
    build = _cuda.build_info()
    return {
        "hybridkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "extension": {
            "importable": _cuda.available(),
            "import_error": _cuda.IMPORT_ERROR,
            "cuda_kernels": build["cuda"],
            "cuda_archs": build["cuda_archs"].split(";") if build["cuda_archs"] else [],
            "cuda_runtime_version": build["cuda_runtime_version"],
            "compiler": build["cxx"],
        },
        "gpus": gpus,
        "backend_env": os.environ.get("HYBRIDKERNELS_BACKEND", "auto"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "op_backends": _op_backends(["cpu", "cuda"]),
    }


def _print_info(info: dict) -> None:
    ext = info["extension"]
    print(f"hybridkernels {info['hybridkernels']}  (python {info['python']})")
    print(f"  torch         {info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    print(f"  triton        {info['triton'] or 'not installed'}")
    print(f"  transformers  {info['transformers'] or 'not installed'}")
    if not ext["importable"]:
        print(f"  _C extension  NOT importable: {ext['import_error']}")
    elif ext["cuda_kernels"]:
        archs = ", ".join(f"sm_{a}" for a in ext["cuda_archs"])
        rt = ext["cuda_runtime_version"]
        print(f"  _C extension  CUDA kernels for {archs} (CUDA runtime {rt // 1000}.{rt % 1000 // 10}) + CPU")
    else:
        print("  _C extension  CPU implementation only (built without nvcc)")
    if info["gpus"]:
        for g in info["gpus"]:
            sm = g["capability"].replace(".", "")
            covered = sm in ext["cuda_archs"] or any(a.rstrip("a") == sm for a in ext["cuda_archs"])
            note = "" if covered or not ext["cuda_kernels"] else "  (no SASS for this arch in _C)"
            print(f"  GPU {g['index']:<10}{g['name']}, sm_{sm}, {g['memory_gib']} GiB, {g['sms']} SMs{note}")
    else:
        print("  GPU           none visible to torch")
    print(f"  backend       HYBRIDKERNELS_BACKEND={info['backend_env']}", end="")
    print(f", TRITON_INTERPRET={info['triton_interpret']}" if info["triton_interpret"] else "")
    print("  op backends (auto choice for cpu / cuda tensors; 'cuda' on cpu = _C's C++ path):")
    for op, row in info["op_backends"].items():
        print(f"    {op:<24} " + "  ".join(f"{dev}: {name:<10}" for dev, name in row.items()))


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    if args.kernels:
        from .compile_check import run_in_subprocess

        print(
            "\nkernels (ahead-of-time compile for sm_80 / sm_90, no GPU needed; takes minutes):", flush=True
        )
        proc = run_in_subprocess()
        print(proc.stdout, end="")
        print(proc.stderr, end="", file=sys.stderr)
        return proc.returncode
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    def ints(text):
        return [int(v) for v in text.split(",")] if text else None

    bench.run(
        args.preset,
        device=args.device,
        batch=ints(args.batch),
        gen_length=ints(args.gen_length),
        stages=args.stage.split(",") if args.stage else None,
        reps=args.reps,
        json_path=args.json,
        markdown_path=args.markdown,
        plot_path=args.plot,
        command="hybridkernels " + " ".join(sys.argv[1:]),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridkernels",
        description="GPU kernels for diffusion-planner / autoregressive-executor hybrid pipelines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, what _C was built with, the GPU, and each op's backend")
    info.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    info.add_argument(
        "--kernels",
        action="store_true",
        help="also compile every kernel for sm_80/sm_90 and print its resources (for bug reports)",
    )
    info.set_defaults(func=cmd_info)

    from .bench import PRESETS

    bench = sub.add_parser(
        "bench",
        help="tokens/s of the naive loops vs the fast paths, in one run (the main job)",
        description="Times every stage against its baseline on the same random-weight models and "
        "inputs, after checking that both produce the same tokens.",
    )
    bench.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="model shapes (default: tiny)"
    )
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--batch", help="comma-separated batch sizes (default: the preset's)")
    bench.add_argument("--gen-length", help="comma-separated generation lengths (default: the preset's)")
    bench.add_argument("--stage", help="comma-separated stages to run (default: all)")
    bench.add_argument("--reps", type=int, default=3, help="timed repetitions of the fast path (median)")
    bench.add_argument("--json", help="write rows, environment and probes to this JSON file")
    bench.add_argument("--markdown", help="write a markdown table to this file")
    bench.add_argument("--plot", help="write tokens/s plots to this PNG (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
