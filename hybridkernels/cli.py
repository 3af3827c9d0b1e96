"""``hybridkernels`` command line.

``info``: what was built and which backend each op will use; ``bench``: the naive loops against
the fast paths (:mod:`hybridkernels.bench`); ``generate``: answer questions with a hybrid pipeline;
``train-projector``: fit the latent projector on question/answer pairs.
"""

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


def collect_info() -> dict:
    """Everything ``hybridkernels info`` prints, as a dict."""
    import torch

    from . import __version__, _cuda, ops

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
        "op_backends": ops.backend_table(("cpu", "cuda")),
        "kernel_head_dims": ops.kernel_head_dims(),
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
    print("  head_dim      the kernels cover (other head dims run the reference, SDPA for attention")
    print("                on a GPU, with a one-time warning; the reference takes any head_dim):")
    for op, row in info["kernel_head_dims"].items():
        print(f"    {op:<24} " + "  ".join(f"{b}: {tuple(dims)}" for b, dims in row.items()))


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

    if args.tp is not None:
        return _bench_tp(args, ints)
    if args.preset == "toy":
        from .bench_toy import run_toy

        unused = [f"--{n.replace('_', '-')}" for n in ("batch", "gen_length", "stage") if getattr(args, n)]
        if unused:
            raise SystemExit(f"{', '.join(unused)}: not options of --preset toy (see --problems)")
        run_toy(
            checkpoints=args.checkpoints,
            device=args.device,
            rounds=args.reps,
            json_path=args.json,
            markdown_path=args.markdown,
            plot_path=args.plot,
            command="hybridkernels " + " ".join(sys.argv[1:]),
            **({} if args.problems is None else {"problems": args.problems}),
        )
        return 0
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


# ----------------------------------------------------------------------------- generate / train-projector
def _torch_setup(args):
    """(device, dtype) from ``--device`` / ``--dtype`` (defaults: cuda + bf16 when available, else
    cpu + fp32)."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _toy_parts(questions, device, dtype):
    """The shipped toy Countdown models (:mod:`hybridkernels.toy`), after checking that both
    tokenizers encode every question; returns the parts, templates and defaults for the CLI."""
    from .toy import config as toy_config
    from .toy import load_toy
    from .toy.tokenization import check_encodable

    toy = load_toy(device=device, dtype=dtype)
    for q in questions:
        check_encodable(toy.planner_tokenizer, q, where="hybridkernels generate", name="planner")
        check_encodable(toy.executor_tokenizer, q, where="hybridkernels generate", name="executor")
    sizes = [k for k in map(_countdown_size, questions) if k in toy_config.GEN_LENGTH]
    n = max(sizes, default=min(toy_config.GEN_LENGTH))
    defaults = {
        "gen_length": toy_config.gen_length(n),
        "max_new_tokens": toy_config.ANSWER_MAX_NEW_TOKENS[n],
        "plan_max_new_tokens": toy_config.PLAN_MAX_NEW_TOKENS[n],
    }
    parts = (toy.planner, toy.executor, toy.projector, toy.planner_tokenizer, toy.executor_tokenizer)
    return parts, toy.templates, defaults


def _tp_setup(args, device):
    """``--tp N``: join torchrun's process group (timeouts set) and check that every rank got the
    same command line; returns ``(TPGroup, this rank's device)``, or ``(None, device)`` without
    ``--tp``. ``ValueError`` (on every rank) when ``N`` is not the launched world size."""
    if args.tp is None:
        return None, device
    import torch

    from .distributed import check_same, init_from_env

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise ValueError(
            f"--tp {args.tp} needs {args.tp} processes, launched as "
            f"torchrun --nproc-per-node {args.tp} hybridkernels {args.command} ... --tp {args.tp} "
            f"(WORLD_SIZE is {world})"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    tp = init_from_env(device=device.type)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    check_same(tp, options, "the command line")
    if getattr(args, "seed", 0) is None:  # sampling without --seed: rank 0's fresh seed everywhere
        args.seed = tp.all_gather_object(int(torch.randint(0, 2**31 - 1, ()).item()))[0]
    return tp, device


def _tp_parts(args, device, dtype, tp):
    """The pipeline's parts with the planner and the executor sharded over ``tp`` (each rank reads
    its slices of the checkpoints; the projector is small and loaded whole)."""
    from .distributed import TensorParallelTransformer
    from .models import ARExecutor, LatentProjector
    from .models.planner import DiffusionPlanner

    if args.planner is None and args.executor is None:
        parts, templates, defaults = _toy_parts(args.question, device, dtype)
        planner, executor, projector, p_tok, e_tok = parts
        p_model = TensorParallelTransformer.from_full_model(planner.model, tp_group=tp)
        planner = DiffusionPlanner(
            p_model, mask_id=planner.mask_id, eos_id=planner.eos_id, eot_id=planner.eot_id
        )
        executor = ARExecutor(TensorParallelTransformer.from_full_model(executor.model, tp_group=tp))
        return (planner, executor, projector, p_tok, e_tok), templates, defaults
    if args.executor is None or (args.mode != "ar" and args.planner is None):
        raise ValueError(
            "--tp with model directories needs --executor DIR (and --planner DIR unless --mode ar)"
        )
    kw = dict(tp_group=tp, dtype=dtype, device=device)
    planner = None
    if args.mode != "ar":
        planner = DiffusionPlanner(
            TensorParallelTransformer.from_pretrained(args.planner, causal=False, **kw)
        )
    executor = ARExecutor(TensorParallelTransformer.from_pretrained(args.executor, causal=True, **kw))
    projector = LatentProjector.from_pretrained(args.projector, device=device) if args.projector else None
    p_tok = (args.planner_tokenizer or args.planner) if planner is not None else None
    parts = (planner, executor, projector, p_tok, args.executor_tokenizer or args.executor)
    return parts, None, {"gen_length": 64, "max_new_tokens": 64}


def _bench_tp(args, ints) -> int:
    """``bench --tp N``: per-step time, collectives and tokens/s of the preset's shapes on N ranks."""
    import torch

    from .bench import PRESETS
    from .distributed.bench import StepShape, format_rows, measure_steps

    if args.preset == "toy":
        raise SystemExit("--tp: pick a random-weight preset (--preset tiny, llada-8b or llama-8b)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tp, device = _tp_setup(args, device)
    except ValueError as exc:
        print(f"hybridkernels bench: error: {exc}", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    batch, gen = ints(args.batch), ints(args.gen_length)
    shape = StepShape(
        batch=batch[0] if batch else preset.batches[0],
        prompt=preset.prompt_len,
        gen=gen[0] if gen else preset.gen_lengths[0],
        block=preset.block_length,
        new=max(preset.answer_tokens, 16),
    )
    rows = measure_steps(
        tp, planner=preset.planner, executor=preset.executor, dtype=preset.dtype, device=device, shape=shape
    )
    gathered = tp.all_gather_object(rows)
    if tp.rank == 0:
        print(f"preset {args.preset}, {shape}, {tp.world_size} ranks (rank 0 shown):")
        print(format_rows(tp.world_size, rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "shape": vars(shape), "ranks": gathered}, f, indent=2)
    _tp_finish(tp)
    return 0


def _tp_finish(tp) -> None:
    import torch.distributed as dist

    if tp is not None and dist.is_initialized():
        dist.destroy_process_group()


def _load_pipeline_parts(args, device, dtype):
    from .models import ARExecutor, LatentProjector
    from .models.planner import DiffusionPlanner

    need_planner = args.mode != "ar" or getattr(args, "command", None) == "train-projector"
    if need_planner and args.planner is None:
        raise ValueError(f"--mode {args.mode} needs --planner DIR (or neither --planner nor --executor)")
    if args.executor is None:
        raise ValueError("--executor DIR is required when --planner is given")
    planner = (
        DiffusionPlanner.from_pretrained(args.planner, dtype=dtype, device=device) if need_planner else None
    )
    executor = ARExecutor.from_pretrained(args.executor, dtype=dtype, device=device)
    projector = None
    if getattr(args, "projector", None):
        projector = LatentProjector.from_pretrained(args.projector, device=device)
    p_tok = (args.planner_tokenizer or args.planner) if need_planner else None
    return planner, executor, projector, p_tok, args.executor_tokenizer or args.executor


def _planner_kwargs(args) -> dict:
    gen_length = 64 if args.gen_length is None else args.gen_length
    kw = {"gen_length": gen_length, "steps": gen_length if args.planner_steps is None else args.planner_steps}
    if args.block_length is not None:
        kw["block_length"] = args.block_length
    for name in ("cache", "threshold"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses

    from .pipeline import HybridPipeline

    tp = None
    try:
        device, dtype = _torch_setup(args)
        tp, device = _tp_setup(args, device)
        toy = args.planner is None and args.executor is None
        templates, defaults = None, {"gen_length": 64, "max_new_tokens": 64}
        if tp is not None:
            parts, templates, tp_defaults = _tp_parts(args, device, dtype, tp)
            defaults = tp_defaults if toy else defaults
        elif toy:
            print(
                "hybridkernels generate: no --planner/--executor given: the shipped toy Countdown models "
                "(hybridkernels.toy; a question is 'a,b,c,target')",
                file=sys.stderr,
            )
            parts, templates, defaults = _toy_parts(args.question, device, dtype)
        else:
            parts = _load_pipeline_parts(args, device, dtype)
        planner, executor, projector, p_tok, e_tok = parts
        for name in ("gen_length", "max_new_tokens"):
            if getattr(args, name) is None:
                setattr(args, name, defaults[name])
        executor_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        if "plan_max_new_tokens" in defaults:
            executor_kwargs["plan_max_new_tokens"] = defaults["plan_max_new_tokens"]
        if args.seed is not None:
            executor_kwargs["seed"] = args.seed
        pipe = HybridPipeline(
            planner,
            executor,
            projector,
            mode=args.mode,
            planner_tokenizer=p_tok,
            executor_tokenizer=e_tok,
            templates=templates,
            planner_kwargs=_planner_kwargs(args),
            executor_kwargs=executor_kwargs,
            naive=args.naive,
        )
        out = pipe(args.question)
    except (ValueError, TypeError, OSError) as exc:
        rank = "" if tp is None else f" (rank {tp.rank})"
        print(f"hybridkernels generate: error{rank}: {exc}", file=sys.stderr)
        _tp_finish(tp)
        return 2
    _tp_finish(tp)
    if tp is not None and tp.rank != 0:
        return 0  # every rank computed the same answers; rank 0 prints them
    stats = dataclasses.asdict(out.stats) | {
        "tokens_per_s": out.stats.tokens_per_s,
        "seconds_per_question": out.stats.seconds_per_question,
    }
    if args.json:
        print(json.dumps({"answers": out.answers, "plans": out.plans, "stats": stats}, indent=2))
        return 0
    for i, (q, plan, answer) in enumerate(zip(args.question, out.plans, out.answers, strict=True)):
        print(f"[{i}] question: {q}")
        latent = f" (read as {out.stats.latent_vectors} latent vectors)" if args.mode == "latent" else ""
        print(f"    plan: {plan}{latent}{_verdict(toy, q, plan, 'plan')}")
        print(f"    answer: {answer}{_verdict(toy, q, answer, 'answer')}")
    s = out.stats
    prefill = "-" if s.executor_prefill_s is None else f"{s.executor_prefill_s:.3f}s"
    decode = "-" if s.executor_decode_s is None else f"{s.executor_decode_s:.3f}s"
    print(
        f"mode {s.mode}{' (naive loops)' if s.naive else ''}: plan {s.plan_tokens} tokens in {s.plan_steps} "
        f"steps, {s.plan_s:.3f}s; projector {s.projector_s:.3f}s; executor {s.executor_s:.3f}s (prefill "
        f"{prefill}, decode {decode}), {s.answer_tokens} answer tokens; total {s.total_s:.3f}s, "
        f"{s.tokens_per_s:.1f} tokens/s"
    )
    return 0


def _countdown_size(question: str) -> int | None:
    """The number of inputs of a Countdown question, None when it is not one."""
    from .toy import countdown

    try:
        return len(countdown.parse_question(question)[0])
    except ValueError:
        return None


def _verdict(toy: bool, question: str, text: str, what: str) -> str:
    """With the toy models: whether a Countdown plan / answer checks (exact arithmetic)."""
    if not toy:
        return ""
    from .toy import countdown

    if _countdown_size(question) is None:
        return ""
    ok = (countdown.check_plan if what == "plan" else countdown.check_answer)(question, text)
    return "   [checks]" if ok else "   [does not check]"


def _check_writable_dir(option: str, path: str) -> None:
    """``path`` is, or can be made, a directory this process can write into (``OSError`` naming
    ``option`` otherwise)."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise OSError(f"{option} {path} is not a writable directory: {exc.strerror or exc}") from None


def cmd_train_projector(args: argparse.Namespace) -> int:
    from .models import LatentProjector
    from .models.training import read_examples, train_projector

    try:
        examples = read_examples(args.data)  # malformed input fails before any model loads
        _check_writable_dir("--output", args.output)  # before training, not after it
        device, dtype = _torch_setup(args)
        planner, executor, projector, p_tok, e_tok = _load_pipeline_parts(args, device, dtype)
        if projector is None:
            import torch

            torch.manual_seed(args.seed)
            projector = LatentProjector.for_models(
                planner,
                executor,
                hidden_dim=args.hidden_dim,
                num_layers=args.num_layers,
                pool=args.pool,
                pool_stride=args.pool_stride,
            )
        result = train_projector(
            planner,
            executor,
            examples,
            projector=projector,
            planner_tokenizer=p_tok,
            executor_tokenizer=e_tok,
            planner_kwargs=_planner_kwargs(args),
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=not args.no_progress,
        )
        result.projector.save_pretrained(args.output)
    except KeyboardInterrupt:
        if args.checkpoint_dir:
            hint = f"checkpoints are in {args.checkpoint_dir}: rerun the same command with --resume"
        else:
            hint = "no checkpoint was kept (pass --checkpoint-dir DIR to make a run resumable)"
        print(f"\nhybridkernels train-projector: interrupted; {hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        print(f"hybridkernels train-projector: error: {exc}", file=sys.stderr)
        return 2
    losses = result.losses
    head = sum(losses[:10]) / max(1, len(losses[:10]))
    tail = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(
        f"trained {result.step} steps on {len(examples)} examples: loss {head:.4f} (first 10 steps) -> "
        f"{tail:.4f} (last 10); projector saved to {args.output}"
    )
    return 0


def cmd_train_toy(args: argparse.Namespace) -> int:
    from .toy.train import Interrupted, resume_hint, train_toy

    try:
        report = train_toy(
            args.outdir, resume=args.resume, overwrite=args.overwrite, seed=args.seed, quick=args.quick,
            progress=not args.no_progress,
        )  # fmt: skip
    except Interrupted as exc:
        print(f"\nhybridkernels train-toy: {exc}", file=sys.stderr)
        print(f"resume with: {resume_hint(args.outdir, args.quick, args.seed)}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        print(f"hybridkernels train-toy: error: {exc}", file=sys.stderr)
        return 2
    for name, result in report["results"].items():
        acc = ", ".join(f"{mode} {value:.3f}" for mode, value in result["accuracy"].items())
        print(f"{name} ({result['count']} held-out problems): {acc}")
    print(f"trained in {report['train_seconds']['total']:.0f}s; models and accuracy.json in {args.outdir}")
    return 0


def _add_train_toy_parser(sub) -> None:
    tt = sub.add_parser(
        "train-toy",
        help="train the toy Countdown planner, executor and projector on the CPU (~15 minutes)",
        description="Seeded; Ctrl-C leaves a resumable checkpoint. See hybridkernels.toy.train.",
    )
    tt.add_argument("outdir", help="output directory (must be empty unless --resume / --overwrite)")
    tt.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTDIR")
    tt.add_argument("--overwrite", action="store_true", help="replace a previous run in OUTDIR")
    tt.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped models)")
    tt.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test)")
    tt.add_argument("--no-progress", action="store_true", help="no progress bars")
    tt.set_defaults(func=cmd_train_toy)


def _add_model_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--planner", required=required, help="planner checkpoint directory (LLaDA-style)")
    p.add_argument("--executor", required=required, help="executor checkpoint directory (Llama/Qwen)")
    p.add_argument("--planner-tokenizer", help="planner tokenizer directory (default: --planner)")
    p.add_argument("--executor-tokenizer", help="executor tokenizer directory (default: --executor)")
    p.add_argument("--gen-length", type=int, help="planning tokens (default 64; the toy models: theirs)")
    p.add_argument("--planner-steps", type=int, help="planner denoising steps (default: --gen-length)")
    p.add_argument("--block-length", type=int, help="planner block length (default: --gen-length)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")


def _add_pipeline_parsers(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="answer questions with the planner -> executor pipeline (latent, text or ar mode)",
        description="Without --planner/--executor, the toy Countdown models shipped with the package "
        "answer (questions like '6,3,9,27'), and each plan and answer is checked.",
    )
    gen.add_argument("question", nargs="+", help="one or more questions (one batch)")
    gen.add_argument("--mode", choices=("latent", "text", "ar"), default="latent")
    _add_model_arguments(gen, required=False)
    gen.add_argument("--projector", help="LatentProjector directory (latent mode)")
    gen.add_argument("--cache", choices=("prefix", "dual"), help="planner K/V cache")
    gen.add_argument("--threshold", type=float, help="planner confidence threshold (Fast-dLLM)")
    gen.add_argument("--max-new-tokens", type=int, help="answer tokens at most (default 64; toy: theirs)")
    gen.add_argument("--temperature", type=float, default=0.0, help="executor sampling temperature")
    gen.add_argument("--seed", type=int, help="executor sampling seed")
    gen.add_argument("--naive", action="store_true", help="run the naive reference loops (baseline)")
    gen.add_argument("--json", action="store_true", help="print answers, plans and stats as JSON")
    gen.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel ranks: launch as torchrun --nproc-per-node N hybridkernels generate ... --tp N",
    )
    gen.set_defaults(func=cmd_generate)

    tp = sub.add_parser(
        "train-projector",
        help="train a LatentProjector on a JSONL file of {'question', 'answer'} (models frozen)",
    )
    tp.add_argument("--data", required=True, help="JSONL file, one {'question': str, 'answer': str} a line")
    tp.add_argument("--output", required=True, help="directory for the trained projector")
    _add_model_arguments(tp, required=True)
    tp.add_argument("--projector", help="start from this projector directory instead of a fresh one")
    tp.add_argument("--hidden-dim", type=int, help="projector MLP width (default: the larger model width)")
    tp.add_argument("--num-layers", type=int, default=2, help="projector linear layers (default 2)")
    tp.add_argument("--pool", choices=("none", "mean", "stride"), default="none")
    tp.add_argument("--pool-stride", type=int, default=1)
    tp.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    tp.add_argument("--epochs", type=int, default=1)
    tp.add_argument("--batch-size", type=int, default=16)
    tp.add_argument("--lr", type=float, default=1e-3)
    tp.add_argument("--weight-decay", type=float, default=0.0)
    tp.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    tp.add_argument("--warmup-steps", type=int, default=0)
    tp.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--checkpoint-dir", help="periodic checkpoints and the planner-latents cache")
    tp.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    tp.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_train_projector, mode="latent")


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
        help="accuracy and tokens/s of every mode vs the naive loops, in one run (the main job)",
        description="The default preset 'toy' answers held-out Countdown problems with the shipped "
        "trained planner and executor in every decoding and pipeline mode: accuracy beside tokens/s. "
        "The other presets time every stage against its baseline on random-weight models of the "
        "given shapes, after checking that both produce the same tokens.",
    )
    bench.add_argument(
        "--preset",
        default="toy",
        choices=["toy", *sorted(PRESETS)],
        help="toy: the shipped trained models (default); others: random-weight model shapes",
    )
    bench.add_argument("--problems", type=int, default=None, help="toy: held-out problems in the batch")
    bench.add_argument(
        "--checkpoints", help="toy: a train-toy output directory (default: the shipped models)"
    )
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--batch", help="comma-separated batch sizes (default: the preset's)")
    bench.add_argument("--gen-length", help="comma-separated generation lengths (default: the preset's)")
    bench.add_argument("--stage", help="comma-separated stages to run (default: all)")
    bench.add_argument(
        "--reps", type=int, default=5, help="timed rounds, baseline and ours alternating (median)"
    )
    bench.add_argument("--json", help="write rows, environment and probes to this JSON file")
    bench.add_argument("--markdown", help="write a markdown table to this file")
    bench.add_argument("--plot", help="write tokens/s plots to this PNG (needs matplotlib)")
    bench.add_argument(
        "--tp",
        type=int,
        help="tensor-parallel ranks (torchrun --nproc-per-node N hybridkernels bench --preset P --tp N): "
        "per-step time, collectives and tokens/s of the preset's shapes",
    )
    bench.set_defaults(func=cmd_bench)

    _add_pipeline_parsers(sub)  # generate, train-projector
    _add_train_toy_parser(sub)
    return parser


def _device_error(device: str | None) -> str | None:
    """Why ``--device`` cannot run here (not cpu / cuda, or cuda without that GPU), or None."""
    if not device:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r} is not a device; use cpu, cuda or cuda:N"
    if dev.type not in ("cpu", "cuda"):
        return f"--device {device!r}: hybridkernels runs on cpu or cuda"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"--device {device}: no CUDA GPU is available (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda or 'not built in'}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    why = _device_error(getattr(args, "device", None))
    if why is not None:
        print(f"hybridkernels {args.command}: error: {why}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
