"""``hybridkernels bench`` on the trained toy models: accuracy beside speed, every mode, one run.

The shipped planner and executor (:mod:`hybridkernels.toy`, Countdown) answer the same held-out
problems, batched, in every decoding mode of the planner and every mode of the pipeline. Each row
reports its answer accuracy (plan accuracy for planner rows, checked exactly), tokens/s, speedup
over the naive loop of its group, tokens committed per step, forward passes and executor tokens.
All methods are timed round-robin (A B C ... A B C ...) so that a busy machine slows them alike;
each figure is the median of the timed rounds, its spread is printed, and a row whose spread is
too wide is marked. Accuracy comes from the untimed warm-up round (decoding is greedy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from . import benchmarking

THRESHOLDS = (0.9, 0.7, 0.5)
NAP_K = (2, 4, 8)
BLOCKS = 4  # the plan is decoded in this many blocks (semi-autoregressive, so the caches matter)


@dataclasses.dataclass
class QualityRow:
    """One method. ``speedup``: over the naive loop of its group (planner: LLaDA's sampler, one
    token a step; pipeline: the same mode on the naive loops). ``executor_tokens``: tokens the
    executor generated per question (plan and answer in AR->AR). ``ms_per_question``: the batch's
    median wall time over its size. ``spread``: interquartile range / median of the timed runs."""

    group: str
    method: str
    answer_accuracy: float
    plan_accuracy: float | None
    tokens_per_s: float
    speedup: float
    tokens_per_step: float | None
    forward_passes: int | None
    executor_tokens: float | None
    ms_per_question: float
    spread: float
    trusted: bool
    params: dict = dataclasses.field(default_factory=dict)


class _Planned:
    """What a planner method produced: generated tokens ``[B, G]``, steps and forward passes."""

    def __init__(self, generated, steps, forward_passes):
        self.generated, self.steps, self.forward_passes = generated, steps, forward_passes


def planner_methods(toy, ids, mask, gen: int, block: int) -> dict[str, tuple[Callable, dict]]:
    """Name -> (call returning :class:`_Planned`, row params) for every planner decoding mode."""
    from .models.planner_options import PlannerOptions
    from .reference.llada import llada_generate

    planner = toy.planner
    ids_kw = {"eos_id": planner.eos_id, "eot_id": planner.eot_id}

    def naive():
        x, stats = llada_generate(
            planner.model,
            ids,
            mask,
            mask_id=planner.mask_id,
            gen_length=gen,
            steps=gen,
            block_length=block,
            return_stats=True,
            **ids_kw,
        )
        return _Planned(x[:, ids.shape[1] :], stats.committed.shape[0], stats.forward_passes)

    def fast(options):
        out = planner.generate(ids, mask, options)
        return _Planned(out.generated, out.stats.steps, out.stats.forward_passes)

    methods = {"naive LLaDA loop, 1 token/step": (naive, {"cache": None, "rule": "1/step", "naive": True})}
    for cache in (None, "prefix", "dual"):
        label = {None: "no cache", "prefix": "prefix cache", "dual": "dual cache"}[cache]
        for threshold in (None, *THRESHOLDS):
            rule = "1 token/step" if threshold is None else f"threshold {threshold}"
            opts = PlannerOptions(
                gen_length=gen, steps=gen, block_length=block, cache=cache, threshold=threshold
            )
            methods[f"{label}, {rule}"] = (partial(fast, opts), {"cache": cache, "rule": rule})
    for k in NAP_K:
        opts = PlannerOptions(gen_length=gen, steps=math.ceil(gen / k), schedule="parallel", parallel_k=k)
        methods[f"parallel-forced (NAP) k={k}"] = (partial(fast, opts), {"cache": None, "rule": f"NAP k={k}"})
    return methods


def run_toy(
    *,
    device: str | None = None,
    problems: int = 256,
    n: int = 3,
    block_length: int | None = None,
    rounds: int = 5,
    time_budget_s: float | None = 120.0,
    json_path: str | None = None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
    command: str = "",
) -> list[QualityRow]:
    """Load the shipped toy models, answer ``problems`` held-out Countdown problems with ``n``
    inputs in every mode, and print / write the accuracy + speed table. Timed rounds stop early
    (after at least 2) once ``time_budget_s`` is spent; the output says how many ran."""
    from .models.prompting import decode, encode_prompts
    from .pipeline import HybridPipeline
    from .reference.ar_loop import ar_generate
    from .toy import config as cfg
    from .toy import countdown, heldout_problems, load_toy

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if dev.type == "cpu":
        # The toy models are a few MB: intra-op threads only add synchronisation, and on a machine
        # also running other work a second thread makes every small op wait for a core (seen here:
        # 50x slower). One thread is the fast and the stable setting.
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    models = load_toy(device=dev)
    gen = cfg.gen_length(n)
    block = gen // BLOCKS if block_length is None else block_length
    plan_max, answer_max = cfg.PLAN_MAX_NEW_TOKENS[n], cfg.ANSWER_MAX_NEW_TOKENS[n]
    held_out = heldout_problems(n, problems)  # the first of the problems accuracy.json was measured on
    questions = [p.question for p in held_out]
    print(
        f"hybridkernels bench --preset toy: the shipped trained planner and executor on {problems} held-out "
        f"Countdown problems with {n} inputs, batched, on {dev}; plan {gen} tokens (blocks of {block}), "
        f"answer <= {answer_max} tokens; every method timed round-robin, {rounds} rounds (median)"
    )
    p_tok, e_tok, templates = models.planner_tokenizer, models.executor_tokenizer, models.templates
    p_ids, p_mask = encode_prompts(
        p_tok,
        [templates.planner.format(question=q) for q in questions],
        device=dev,
        avoid=models.planner.mask_id,
        where="bench",
    )
    planner = planner_methods(models, p_ids, p_mask, gen, block)

    eos = e_tok.eos_token_id
    executor_kw = {"max_new_tokens": answer_max, "plan_max_new_tokens": plan_max, "eos_token_id": eos}
    base_opts = {"gen_length": gen, "steps": gen, "block_length": block}
    fast_opts = base_opts | {"cache": "dual", "threshold": THRESHOLDS[0]}

    def pipe(mode, naive=False, planner_kwargs=base_opts):
        return HybridPipeline(
            models.planner,
            models.executor,
            models.projector,
            mode=mode,
            planner_tokenizer=p_tok,
            executor_tokenizer=e_tok,
            templates=templates,
            planner_kwargs=planner_kwargs,
            executor_kwargs=executor_kw,
            naive=naive,
        )

    alone_ids, alone_mask = encode_prompts(
        e_tok, [templates.latent.format(question=q) for q in questions], device=dev, where="bench"
    )
    alone = {
        "fast": partial(
            models.executor.generate, alone_ids, alone_mask, max_new_tokens=answer_max, eos_token_id=eos
        ),
        "naive": partial(
            ar_generate,
            models.executor.model,
            alone_ids,
            alone_mask,
            max_new_tokens=answer_max,
            eos_token_id=eos,
        ),
    }
    # name -> (fast call, the name of its naive twin, row params)
    pipelines = {
        "executor alone (no plan)": (alone["fast"], "executor alone, naive loop", {"mode": "none"}),
        "AR->AR (executor plans, then answers)": (
            partial(pipe("ar"), questions),
            "AR->AR, naive loops",
            {"mode": "ar"},
        ),
        "text: planner 1 token/step -> executor": (
            partial(pipe("text"), questions),
            "text, naive loops",
            {"mode": "text"},
        ),
        "latent: planner 1 token/step -> projector -> executor": (
            partial(pipe("latent"), questions),
            "latent, naive loops",
            {"mode": "latent"},
        ),
        "text: planner dual cache + threshold 0.9 -> executor": (
            partial(pipe("text", planner_kwargs=fast_opts), questions),
            "text, naive loops",
            {"mode": "text"},
        ),
        "latent: planner dual cache + threshold 0.9 -> executor": (
            partial(pipe("latent", planner_kwargs=fast_opts), questions),
            "latent, naive loops",
            {"mode": "latent"},
        ),
    }
    naive_pipelines = {
        "executor alone, naive loop": alone["naive"],
        "AR->AR, naive loops": partial(pipe("ar", naive=True), questions),
        "text, naive loops": partial(pipe("text", naive=True), questions),
        "latent, naive loops": partial(pipe("latent", naive=True), questions),
    }
    fns = {name: fn for name, (fn, _) in planner.items()}
    fns |= {name: fn for name, (fn, _, _) in pipelines.items()} | naive_pipelines
    print(f"  timing {len(fns)} methods: one warm-up round, then {rounds} timed rounds ...", file=sys.stderr)
    timings, outputs = benchmarking.time_alternating(
        fns, dev, rounds=rounds, warmup=1, time_budget_s=time_budget_s
    )
    rounds_run = len(next(iter(timings.values())).seconds)
    if rounds_run < rounds:
        print(
            f"  time budget of {time_budget_s:.0f} s reached after {rounds_run} timed rounds", file=sys.stderr
        )

    # ------------------------------------------------------------------ accuracy of each method
    def answers_from_plans(plans: list[str]) -> list[str]:
        ids, mask = encode_prompts(
            e_tok,
            [templates.text.format(question=q, plan=p) for q, p in zip(questions, plans, strict=True)],
            device=dev,
            where="bench",
        )
        out = models.executor.generate(ids, mask, max_new_tokens=answer_max, eos_token_id=eos)
        return [decode(e_tok, row[: int(n_)]) for row, n_ in zip(out.tokens, out.lengths, strict=True)]

    def accuracy(check, texts) -> float:
        return sum(check(q, t) for q, t in zip(questions, texts, strict=True)) / len(questions)

    B = len(questions)
    rows: list[QualityRow] = []
    naive_planner = timings[next(iter(planner))].median
    for name, (_, params) in planner.items():
        out, t = outputs[name], timings[name]
        plans = [decode(p_tok, _cut(row.tolist(), models.planner)) for row in out.generated]
        rows.append(
            QualityRow(
                group="planner",
                method=name,
                answer_accuracy=accuracy(countdown.check_answer, answers_from_plans(plans)),
                plan_accuracy=accuracy(countdown.check_plan, plans),
                tokens_per_s=B * gen / t.median,
                speedup=naive_planner / t.median,
                tokens_per_step=gen / out.steps,
                forward_passes=out.forward_passes,
                executor_tokens=None,
                ms_per_question=1e3 * t.median / B,
                spread=t.spread,
                trusted=t.trusted,
                params=params | {"gen_length": gen, "block_length": block},
            )
        )
    for name, (_, naive_name, params) in pipelines.items():
        out, t = outputs[name], timings[name]
        naive_t = timings[naive_name]
        if params["mode"] == "none":
            answers = [decode(e_tok, row[: int(n_)]) for row, n_ in zip(out.tokens, out.lengths, strict=True)]
            executor_tokens, plan_tokens, plan_acc, passes, steps = (
                float(out.lengths.sum()) / B,
                0,
                None,
                None,
                None,
            )
        else:
            answers, s = out.answers, out.stats
            executor_tokens = (s.answer_tokens + (s.plan_tokens if params["mode"] == "ar" else 0)) / B
            plan_tokens = s.plan_tokens
            plan_acc = accuracy(countdown.check_plan, out.plans)
            passes = s.plan_forward_passes
            steps = None if params["mode"] == "ar" else gen / s.plan_steps
        generated = plan_tokens + executor_tokens * B if params["mode"] != "ar" else executor_tokens * B
        rows.append(
            QualityRow(
                group="pipeline",
                method=name,
                answer_accuracy=accuracy(countdown.check_answer, answers),
                plan_accuracy=plan_acc,
                tokens_per_s=generated / t.median,
                speedup=naive_t.median / t.median,
                tokens_per_step=steps,
                forward_passes=passes,
                executor_tokens=executor_tokens,
                ms_per_question=1e3 * t.median / B,
                spread=t.spread,
                trusted=t.trusted,
                params=params
                | {"naive_ms_per_question": 1e3 * naive_t.median / B, "naive_spread": naive_t.spread},
            )
        )

    elapsed = time.perf_counter() - t_start
    print(format_quality_table(rows))
    for line in target_checks(rows):
        print(line)
    print(f"done in {elapsed:.1f} s")
    meta = {
        "preset": "toy",
        "command": command,
        "environment": benchmarking.environment(dev),
        "problems": B,
        "difficulty": n,
        "heldout_seed": cfg.HELDOUT_SEED,
        "rounds": rounds_run,
        "gen_length": gen,
        "block_length": block,
        "max_spread": benchmarking.MAX_SPREAD,
        "seconds": elapsed,
        "note": "trained toy models (hybridkernels.toy); accuracy on held-out Countdown problems; "
        "tokens/s = generated tokens per second; speedup over the group's naive loop",
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**meta, "quality_rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(format_quality_markdown(rows, meta))
    if plot_path:
        write_quality_plot(rows, plot_path)
    return rows


def _cut(row: list[int], planner) -> list[int]:
    """The planner's generated tokens up to its first EOS / EoT."""
    stops = {t for t in (planner.eos_id, planner.eot_id) if t is not None}
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def target_checks(rows: list[QualityRow]) -> list[str]:
    """The issue's targets, each stated with the measured numbers (reported, not enforced)."""
    by = {r.method: r for r in rows}
    naive = by["naive LLaDA loop, 1 token/step"]
    dual = by["dual cache, threshold 0.9"]
    text = by["text: planner 1 token/step -> executor"]
    latent = by["latent: planner 1 token/step -> projector -> executor"]
    ar = by["AR->AR (executor plans, then answers)"]
    pts = 100 * (dual.answer_accuracy - naive.answer_accuracy)
    return [
        f"target: dual cache + threshold 0.9 within 1 point of the naive loop's answer accuracy at >= 3x its "
        f"tokens/s: {pts:+.1f} points at {dual.speedup:.2f}x",
        f"target: latent mode at least as accurate as text mode with no more executor tokens: latent "
        f"{100 * latent.answer_accuracy:.1f}% / {latent.executor_tokens:.1f} tokens, text "
        f"{100 * text.answer_accuracy:.1f}% / {text.executor_tokens:.1f} tokens",
        f"target: hybrid text / latent above AR->AR: text {100 * text.answer_accuracy:.1f}%, latent "
        f"{100 * latent.answer_accuracy:.1f}%, AR->AR {100 * ar.answer_accuracy:.1f}%",
    ]


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _spread(r: QualityRow) -> str:
    return f"{100 * r.spread:.0f}%" + ("" if r.trusted else " (noisy)")


def format_quality_table(rows: list[QualityRow]) -> str:
    head = (
        f"{'group':<9} {'method':<56} {'answer':>7} {'plan':>7} {'tok/s':>9} {'speedup':>8} "
        f"{'tok/step':>8} {'passes':>6} {'exec tok':>8} {'ms/q':>7} {'spread':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.group:<9} {r.method:<56} {_pct(r.answer_accuracy):>7} {_pct(r.plan_accuracy):>7} "
            f"{r.tokens_per_s:9.1f} {r.speedup:7.2f}x {_fmt(r.tokens_per_step, '8.2f'):>8} "
            f"{_fmt(r.forward_passes, '6d'):>6} {_fmt(r.executor_tokens, '8.1f'):>8} "
            f"{r.ms_per_question:7.2f} {_spread(r):>7}"
        )
    return "\n".join(lines)


def format_quality_markdown(rows: list[QualityRow], meta: dict) -> str:
    env = meta["environment"]
    lines = [
        f"**{env.get('device')}**, torch {env['torch']}, {env['date'][:10]}: {meta['problems']} held-out "
        f"Countdown problems with {meta['difficulty']} inputs, plan {meta['gen_length']} tokens in blocks of "
        f"{meta['block_length']}, {meta['rounds']} timed rounds round-robin "
        f"(`{meta['command'] or 'hybridkernels bench'}`)",
        "",
        "| group | method | answer acc. | plan acc. | tokens/s | speedup | tokens/step | forward passes "
        "| executor tokens/q | ms/question | spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.method} | {_pct(r.answer_accuracy)} | {_pct(r.plan_accuracy)} | "
            f"{r.tokens_per_s:.0f} | {r.speedup:.2f}x | {_fmt(r.tokens_per_step, '.2f')} | "
            f"{_fmt(r.forward_passes, 'd')} | "
            f"{_fmt(r.executor_tokens, '.1f')} | {r.ms_per_question:.2f} | {_spread(r)} |"
        )
    return "\n".join(lines) + "\n"


def write_quality_plot(rows: list[QualityRow], path: str) -> None:
    """Answer accuracy against tokens/s, one labelled point per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'hybridkernels[plot]'") from exc
    fig, ax = plt.subplots(figsize=(9, 6))
    for group, marker in (("planner", "o"), ("pipeline", "s")):
        pts = [r for r in rows if r.group == group]
        ax.scatter(
            [r.tokens_per_s for r in pts], [100 * r.answer_accuracy for r in pts], marker=marker, label=group
        )
        for r in pts:
            ax.annotate(r.method, (r.tokens_per_s, 100 * r.answer_accuracy), fontsize=6, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (generated tokens per second, batched)")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_title("trained toy models: accuracy vs speed, one point per method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
