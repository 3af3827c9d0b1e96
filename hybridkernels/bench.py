"""``hybridkernels bench``: tokens/s of the naive loops against our fast paths, in one run.

Every row is one comparison on the same random-weight model and inputs: a baseline (the naive
loop, HF ``generate``, torch SDPA) and ours, each timed after a warm-up, their outputs checked
against each other before timing (a fast wrong answer is a failure, not a speedup), the ratio,
and on a GPU the fraction of the step's floor (``max(weight bytes / copy bandwidth, flops /
matmul peak)``, both ceilings measured first by :mod:`hybridkernels.benchmarking`).

Weights are random (no model hub here), so a planner never becomes confident: planner rows use
fixed schedules of 1, 2 or 4 committed tokens per step. Tokens counted are tokens generated: the
planner's ``gen_length`` per sequence whatever its step count, the executor's new tokens per row.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from . import benchmarking
from .models.config import TransformerConfig
from .models.transformer import Transformer


@dataclasses.dataclass
class Preset:
    """Model shapes and the cases to run. ``planner``/``executor``: None = stage not in the preset."""

    name: str
    description: str
    planner: TransformerConfig | None
    executor: TransformerConfig | None
    dtype: torch.dtype
    prompt_len: int
    gen_lengths: tuple[int, ...]
    batches: tuple[int, ...]
    block_length: int
    tokens_per_step: tuple[int, ...]
    answer_tokens: int
    init_std: float = 0.02
    gpu_only: bool = False
    clock: str = "wall"  # benchmarking.time_alternating's clock ("cpu" on a shared CPU, see run())


def _tiny(causal: bool) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=64, causal=causal, family="llama" if causal else "llada",
        mask_token_id=None if causal else 8191, eos_token_ids=(1,), eot_token_id=None if causal else 2,
    )  # fmt: skip


PRESETS = {
    "tiny": Preset(
        "tiny", "4-layer width-256 random-weight planner and executor, vocabulary 8192 (CPU: ~5 minutes)",
        _tiny(False), _tiny(True), torch.float32, prompt_len=64, gen_lengths=(64,), batches=(1, 4),
        block_length=16, tokens_per_step=(1, 2), answer_tokens=16, init_std=0.1,
    ),
    "llada-8b": Preset(
        "llada-8b", "LLaDA-8B-shaped planner, bf16", benchmarking.LLADA_8B, None, torch.bfloat16,
        prompt_len=512, gen_lengths=(256, 512), batches=(1, 16), block_length=32,
        tokens_per_step=(1, 2, 4), answer_tokens=0, gpu_only=True,
    ),
    "llama-8b": Preset(
        "llama-8b", "Llama-3-8B-shaped executor, bf16", None, benchmarking.LLAMA_8B, torch.bfloat16,
        prompt_len=512, gen_lengths=(256,), batches=(1, 16), block_length=32, tokens_per_step=(1,),
        answer_tokens=256, gpu_only=True,
    ),
    "paper": Preset(
        "paper", "LLaDA-8B planner + Llama-8B executor at the paper's budgets (64 plan + 16 answer, 256/256)",
        benchmarking.LLADA_8B, benchmarking.LLAMA_8B, torch.bfloat16, prompt_len=128, gen_lengths=(64, 256),
        batches=(1,),
        block_length=32, tokens_per_step=(1, 4), answer_tokens=16, gpu_only=True,
    ),
}  # fmt: skip


@dataclasses.dataclass
class Row:
    """One comparison. Values are tokens/s (``unit="tok/s"``) or milliseconds (``unit="ms"``)."""

    stage: str
    case: str
    baseline: str
    baseline_value: float
    ours: str
    ours_value: float
    unit: str
    agreement: str
    floor_fraction: float | None = None
    floor_note: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    step_ms: float | None = None  # ours: mean wall time of one step (decode step / denoising step)
    floor_ms: float | None = None  # that step's floor (benchmarking.step_floor), mean over the steps

    @property
    def speedup(self) -> float:
        if self.unit == "ms":
            return self.baseline_value / self.ours_value
        return self.ours_value / self.baseline_value


class BenchFailure(RuntimeError):
    """The fast path disagreed with its baseline: reported, never timed as a speedup."""


def _timed(
    device: torch.device, rounds: int, fns: dict[str, Callable[[], object]], clock: str = "wall"
) -> tuple[dict, dict]:
    """Median seconds and last output of each of ``fns``, timed round-robin after one warm-up round
    (:func:`hybridkernels.benchmarking.time_alternating`, with ``clock``)."""
    timings, outputs = benchmarking.time_alternating(fns, device, rounds=rounds, clock=clock)
    return {name: t.median for name, t in timings.items()}, outputs


def _model(config: TransformerConfig, preset: Preset, device: torch.device, seed: int) -> Transformer:
    model = Transformer(config, dtype=preset.dtype, device=device)
    model.reset_parameters(std=preset.init_std, generator=torch.Generator(device).manual_seed(seed))
    return model.eval()


def _agreement(ours: torch.Tensor, baseline: torch.Tensor, preset: Preset, where: str) -> str:
    """In float32 the fast path must give the baseline's tokens exactly (else BenchFailure). In
    bf16 the two round differently (fused fp32-accumulated LM head vs bf16 logits, split-KV vs
    one-pass attention), random weights make near-ties common and one flipped tie changes the rest
    of the sequence, so the fraction of equal tokens is reported instead; exactness is what the
    fp32 tests establish."""
    if preset.dtype == torch.float32:
        if not torch.equal(ours, baseline):
            raise BenchFailure(f"{where}: the fast path's tokens differ from the baseline's")
        return "tokens equal"
    return f"{100 * (ours == baseline).float().mean().item():.1f}% tokens equal (bf16)"


# ---------------------------------------------------------------------------------------- stages
def stage_planner(preset: Preset, device: torch.device, reps: int, progress) -> list[Row]:
    """The naive LLaDA loop (full forward and full-vocabulary softmax every step) against
    DiffusionPlanner without a cache (must give the same tokens) and with the dual cache."""
    from .models.planner import DiffusionPlanner
    from .reference.llada import llada_generate

    cfg = preset.planner
    model = _model(cfg, preset, device, seed=0)
    planner = DiffusionPlanner(model)
    rows = []
    for batch in preset.batches:
        g = torch.Generator(device).manual_seed(batch)
        prompt = torch.randint(3, cfg.mask_token_id, (batch, preset.prompt_len), generator=g, device=device)
        for gen in preset.gen_lengths:
            for k in preset.tokens_per_step:
                progress(f"planner batch={batch} gen={gen} k={k}")
                kw = dict(gen_length=gen, steps=gen // k, block_length=preset.block_length)
                secs, outs = _timed(device, reps, {
                    "naive": partial(llada_generate, model, prompt, mask_id=planner.mask_id, **kw),
                    "fast": partial(planner.generate, prompt, **kw),
                    "dual": partial(planner.generate, prompt, cache="dual", **kw),
                }, preset.clock)  # fmt: skip
                (naive, naive_s), (fast, fast_s), (dual, dual_s) = (
                    (outs[k], secs[k]) for k in ("naive", "fast", "dual")
                )
                agreement = _agreement(
                    fast.generated, naive[:, preset.prompt_len :], preset, f"planner {batch=} {gen=} {k=}"
                )
                agree = (dual.generated == fast.generated).float().mean().item()
                tokens = batch * gen
                L, block = preset.prompt_len + gen, preset.block_length
                # The fast path applies the LM head to the window's rows only, every step.
                full_floor = benchmarking.step_floor(
                    model, rows=batch, queries=L, keys=L, head_rows=batch * block
                )["floor_s"]
                cached_floor = benchmarking.step_floor(
                    model, rows=batch, queries=block, keys=L, head_rows=batch * block
                )["floor_s"]
                fast_steps = fast.stats.steps
                dual_steps, refreshes = dual.stats.steps, dual.stats.refreshes
                dual_floor = refreshes * full_floor + (dual_steps - refreshes) * cached_floor
                base = dict(
                    stage="planner",
                    baseline="naive LLaDA loop",
                    baseline_value=tokens / naive_s,
                    unit="tok/s",
                    case=f"batch={batch} gen={gen} k={k} block={preset.block_length}",
                )
                rows.append(
                    Row(
                        **base,
                        ours="planner, no cache",
                        ours_value=tokens / fast_s,
                        agreement=agreement,
                        floor_fraction=full_floor * fast_steps / fast_s,
                        floor_note="steps x full-forward floor / time",
                        params={"batch": batch, "gen_length": gen, "k": k, "variant": "no cache"},
                        step_ms=1e3 * fast_s / fast_steps,
                        floor_ms=1e3 * full_floor,
                    )
                )
                rows.append(Row(
                    **base, ours="planner, dual cache", ours_value=tokens / dual_s,
                    agreement=f"{100 * agree:.1f}% tokens = no cache",
                    floor_fraction=dual_floor / dual_s,
                    floor_note="refreshes x full-forward floor + cached steps x block floor / time",
                    params={"batch": batch, "gen_length": gen, "k": k, "variant": "dual cache"},
                    step_ms=1e3 * dual_s / dual_steps, floor_ms=1e3 * dual_floor / dual_steps,
                ))  # fmt: skip
    return rows


def stage_executor(preset: Preset, device: torch.device, reps: int, progress) -> list[Row]:
    """No-cache loop and HF ``generate`` (default dynamic cache) against ARExecutor, greedy."""
    from .models.executor import ARExecutor
    from .reference.ar_loop import ar_generate

    cfg = preset.executor
    model = _model(cfg, preset, device, seed=1)
    executor = ARExecutor(model)
    hf = _hf_twin(model)
    rows = []
    for batch in preset.batches:
        progress(f"executor batch={batch}")
        g = torch.Generator(device).manual_seed(batch)
        prompt = torch.randint(3, cfg.vocab_size, (batch, preset.prompt_len), generator=g, device=device)
        new = preset.answer_tokens
        fns = {
            "ours": partial(executor.generate, prompt, max_new_tokens=new),
            # the prefill and first token alone: (ours - this) / (new - 1) is the decode step
            "ours_first": partial(executor.generate, prompt, max_new_tokens=1),
            "naive": partial(ar_generate, model, prompt, max_new_tokens=new),
        }
        if hf is not None:
            fns["hf"] = partial(hf.generate, prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        secs, outs = _timed(device, reps, fns, preset.clock)
        ours_out, ours_s, naive_out, naive_s = outs["ours"], secs["ours"], outs["naive"], secs["naive"]
        agreement = _agreement(ours_out.tokens, naive_out.tokens, preset, f"executor {batch=}")
        tokens = batch * new
        # A decode step: every row's new token over its cache (mean length) and the LM head.
        floor = benchmarking.step_floor(
            model, rows=batch, queries=1, keys=preset.prompt_len + new // 2, head_rows=batch
        )["floor_s"]
        step_s = max(secs["ours"] - secs["ours_first"], 0.0) / max(1, new - 1)
        common = dict(
            stage="executor",
            case=f"batch={batch} prompt={preset.prompt_len} new={new}",
            unit="tok/s",
            ours="ARExecutor",
            ours_value=tokens / ours_s,
            floor_fraction=floor / step_s,
            floor_note="decode step vs max((weights + K/V) / copy BW, flops / matmul rate)",
            params={"batch": batch, "gen_length": new},
            step_ms=1e3 * step_s,
            floor_ms=1e3 * floor,
        )
        rows.append(
            Row(baseline="no-cache loop", baseline_value=tokens / naive_s, agreement=agreement, **common)
        )
        if hf is not None:
            hf_out, hf_s = outs["hf"], secs["hf"]
            same = torch.equal(hf_out[:, preset.prompt_len :], ours_out.tokens)
            agreement = "tokens equal" if same else "tokens differ (HF kernels round differently)"
            rows.append(
                Row(baseline="HF generate", baseline_value=tokens / hf_s, agreement=agreement, **common)
            )
    return rows


def stage_pipeline(preset: Preset, device: torch.device, reps: int, progress) -> list[Row]:
    """HybridPipeline in ``ar``, ``text`` and ``latent`` modes: the naive loops (``naive=True``:
    LLaDA's sampler and the no-cache AR loop) against the fast paths, same models and questions.
    Tokens are plan + answer tokens; the projector is random (its speed does not depend on it)."""
    from .models.executor import ARExecutor
    from .models.planner import DiffusionPlanner
    from .models.projector import LatentProjector
    from .models.prompting import vocabulary_tokenizer
    from .pipeline import HybridPipeline

    planner = DiffusionPlanner(_model(preset.planner, preset, device, seed=0))
    executor = ARExecutor(_model(preset.executor, preset, device, seed=1))
    torch.manual_seed(2)
    projector = LatentProjector.for_models(planner, executor).to(device)
    tokenizers = dict(
        planner_tokenizer=vocabulary_tokenizer(preset.planner),
        executor_tokenizer=vocabulary_tokenizer(preset.executor),
    )
    g = torch.Generator().manual_seed(0)
    top = min(preset.planner.vocab_size, preset.executor.vocab_size) - 8
    rows = []
    for batch in preset.batches:
        words = [torch.randint(8, top, (preset.prompt_len,), generator=g).tolist() for _ in range(batch)]
        questions = [" ".join(f"t{t}" for t in ids) for ids in words]
        for plan in preset.gen_lengths:
            block = min(preset.block_length, plan)
            kw = dict(
                planner_kwargs={"gen_length": plan, "steps": plan, "block_length": block},
                executor_kwargs={"max_new_tokens": preset.answer_tokens, "eos_token_id": None,
                                 "plan_max_new_tokens": plan},
                **tokenizers,
            )  # fmt: skip
            for mode in ("ar", "text", "latent"):
                progress(f"pipeline {mode} batch={batch} plan={plan}")
                naive = HybridPipeline(planner, executor, projector, mode=mode, naive=True, **kw)
                fast = HybridPipeline(planner, executor, projector, mode=mode, **kw)
                secs, outs = _timed(
                    device,
                    reps,
                    {"naive": partial(naive, questions), "fast": partial(fast, questions)},
                    preset.clock,
                )
                want, naive_s, got, fast_s = outs["naive"], secs["naive"], outs["fast"], secs["fast"]
                tokens = got.stats.plan_tokens + got.stats.answer_tokens
                agreement = _agreement(
                    torch.tensor(got.answer_ids), torch.tensor(want.answer_ids), preset, f"pipeline {mode}"
                )
                rows.append(
                    Row(
                        stage="pipeline",
                        case=f"{mode} batch={batch} plan={plan} answer={preset.answer_tokens}",
                        baseline="naive loops",
                        baseline_value=tokens / naive_s,
                        ours=f"{mode}, fast paths",
                        ours_value=tokens / fast_s,
                        unit="tok/s",
                        agreement=f"answers: {agreement}",
                        params={"batch": batch, "gen_length": plan, "variant": mode},
                    )
                )
    return rows


def _hf_twin(model: Transformer):
    """An HF ``LlamaForCausalLM`` sharing ``model``'s weights, or None when that is not possible."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    except ImportError:
        return None
    from .models.loading import to_external_name

    hf_cfg = LlamaConfig(**model.config.to_dict("llama"))
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    # assign=True: the HF model uses our parameter tensors, no copy of the weights.
    hf.load_state_dict({to_external_name(n, "hf"): t for n, t in model.state_dict().items()}, assign=True)
    with model.device:  # the rotary table is a buffer, not a weight: build it for real
        hf.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg)
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.eval()


STAGES: dict[str, Callable] = {
    "planner": stage_planner,
    "executor": stage_executor,
    "pipeline": stage_pipeline,
}


# ---------------------------------------------------------------------------------------- output
def _step_cells(r: Row) -> tuple[str, str, str]:
    """``step ms``, ``floor ms`` and ``step / floor`` of a row, or dashes."""
    if r.step_ms is None or r.floor_ms is None:
        return "-", "-", "-"
    return f"{r.step_ms:.3f}", f"{r.floor_ms:.3f}", f"{r.step_ms / r.floor_ms:.1f}x"


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'stage':<10} {'case':<40} {'baseline':<16} {'base':>10} {'ours':<22} {'ours':>10} {'unit':<6} "
        f"{'speedup':>8} {'step ms':>9} {'floor ms':>9} {'/floor':>7}  agreement"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        step, floor, over = _step_cells(r)
        lines.append(
            f"{r.stage:<10} {r.case:<40} {r.baseline:<16} {r.baseline_value:>10.1f} {r.ours:<22} "
            f"{r.ours_value:>10.1f} {r.unit:<6} {r.speedup:>7.2f}x {step:>9} {floor:>9} {over:>7}  "
            f"{r.agreement}"
        )
    return "\n".join(lines)


def _ceilings(p: dict) -> str:
    matmul = p["matmul_tflops"]
    rate = f"{matmul:.0f} TFLOP/s" if matmul >= 10 else f"{1e3 * matmul:.0f} GFLOP/s"
    return (
        f"copy {p['copy_bandwidth_gbs']:.1f} GB/s (read + write), {p.get('matmul_dtype', 'bf16')} "
        f"matmul {rate}"
    )


def format_markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        f"# hybridkernels bench --preset {meta['preset']}",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['environment'].get('device')}, torch {meta['environment']['torch']}, "
        f"triton {meta['environment']['triton']}, date {meta['environment']['date']}",
    ]
    if meta.get("probes"):
        lines.append(f"- measured ceilings: {_ceilings(meta['probes'])}")
    lines += [
        f"- {meta['note']}",
        "",
        "| stage | case | baseline | baseline | ours | ours | unit | speedup | step ms | floor ms "
        "| step / floor |",
        "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        step, floor, over = _step_cells(r)
        lines.append(
            f"| {r.stage} | {r.case} | {r.baseline} | {r.baseline_value:.1f} | {r.ours} | "
            f"{r.ours_value:.1f} | {r.unit} | {r.speedup:.2f}x | {step} | {floor} | {over} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(rows: list[Row], path: str) -> None:
    """Tokens/s against batch size and against generation length (where the run has more than one
    of them), baseline vs ours, one line per variant, per stage."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'hybridkernels[plot]'") from exc
    rows = [r for r in rows if r.unit == "tok/s"]
    panels = []
    for stage in dict.fromkeys(r.stage for r in rows):
        for key in ("batch", "gen_length"):
            values = {r.params.get(key) for r in rows if r.stage == stage} - {None}
            if len(values) > 1:
                panels.append((stage, key))
    if not panels:
        raise SystemExit("--plot: every stage ran one batch size and one generation length: nothing to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.4 * len(panels)), squeeze=False)
    for ax, (stage, key) in zip(axes[:, 0], panels, strict=True):
        series: dict[str, dict[float, float]] = {}
        for r in rows:
            if r.stage != stage:
                continue
            k = f", k={r.params['k']}" if "k" in r.params else ""
            mode = f" ({r.params['variant']})" if stage == "pipeline" else ""
            series.setdefault(f"{r.baseline}{mode}{k}", {})[r.params[key]] = r.baseline_value
            series.setdefault(f"{r.ours}{k}", {})[r.params[key]] = r.ours_value
        for label, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{stage}: tokens/s vs {key.replace('_', ' ')}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------- driver
def run(
    preset_name: str = "tiny",
    *,
    device: str | None = None,
    batch: list[int] | None = None,
    gen_length: list[int] | None = None,
    stages: list[str] | None = None,
    reps: int = 3,
    json_path: str | None = None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
    command: str = "",
    threads: int | None = 1,
    clock: str | None = None,
) -> list[Row]:
    """Run a preset's stages and print (and write) the table. ``threads``: torch's intra-op
    threads on the CPU for every method alike (default 1: these models are too small to split,
    and on a shared machine a second thread makes each small op wait for a core; None keeps
    torch's default). ``clock``: ``"wall"`` or ``"cpu"`` (process CPU time, see
    :func:`hybridkernels.benchmarking.time_alternating`); default ``"cpu"`` on a CPU with one
    thread, else ``"wall"``."""
    if preset_name not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if preset.gpu_only and dev.type != "cuda":
        raise SystemExit(
            f"--preset {preset_name} builds 8B-shaped models: it needs a GPU (use --preset tiny)"
        )
    if clock is None:  # one torch thread on a CPU: count the work, not the waits for a core
        clock = "cpu" if dev.type == "cpu" and threads == 1 else "wall"
    preset = dataclasses.replace(
        preset,
        batches=tuple(batch) if batch else preset.batches,
        gen_lengths=tuple(gen_length) if gen_length else preset.gen_lengths,
        clock=clock,
    )
    unknown = set(stages or ()) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stage: unknown {sorted(unknown)} (known: {list(STAGES)})")
    needs = {"planner": ("planner",), "executor": ("executor",), "pipeline": ("planner", "executor")}
    available = [s for s in STAGES if all(getattr(preset, m) is not None for m in needs[s])]
    chosen = [s for s in available if stages is None or s in stages]
    if not chosen:
        raise SystemExit(f"--preset {preset.name} has the stages {available}, not {stages}")
    print(f"hybridkernels bench --preset {preset.name}: {preset.description}, on {dev}")
    print("weights are random (no model hub): planners never get confident, so planner rows use fixed")
    print("schedules of k tokens per step; tokens/s counts generated tokens per sequence.")
    if dev.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    probes = {
        "copy_bandwidth_gbs": benchmarking.copy_bandwidth_gbs(str(dev)),
        "matmul_tflops": benchmarking.matmul_peak_tflops(str(dev)),
        "matmul_dtype": "bfloat16" if dev.type == "cuda" else "float32",
        "torch_threads": torch.get_num_threads(),
    }
    print(f"ceilings (the floors' denominators): {_ceilings(probes)}; timed by {clock} clock")
    rows: list[Row] = []
    cases_per_stage = {
        "planner": len(preset.batches) * len(preset.gen_lengths) * len(preset.tokens_per_step),
        "executor": len(preset.batches),
        "pipeline": len(preset.batches) * len(preset.gen_lengths) * 3,
    }
    total = sum(cases_per_stage[name] for name in chosen)
    count = [0]

    def progress(label: str) -> None:
        count[0] += 1
        elapsed = time.perf_counter() - t0
        print(f"  [{count[0]}/{total}, {elapsed:5.1f} s] {label} ...", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    for name in chosen:
        rows += STAGES[name](preset, dev, reps, progress)
    print(format_table(rows))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    meta = {
        "preset": preset.name,
        "command": command,
        "environment": benchmarking.environment(dev),
        "probes": probes,
        "clock": clock,
        "note": "random weights; tokens/s = generated tokens per second; speedup = ours / baseline",
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {**meta, "rows": [dataclasses.asdict(r) | {"speedup": r.speedup} for r in rows]}, f, indent=1
            )
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(format_markdown(rows, meta))
    if plot_path:
        write_plot(rows, plot_path)
    return rows
