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
from typing import NamedTuple

import torch

from . import benchmarking

THRESHOLDS = (0.9, 0.7, 0.5)
NAP_K = (2, 4, 8)
BLOCKS = 2  # the plan is decoded in this many blocks (semi-autoregressive, so the caches matter)


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


class _Planned(NamedTuple):
    """What a planner method produced: generated tokens ``[B, G]``, steps and forward passes."""

    generated: torch.Tensor
    steps: int
    forward_passes: int


class _Method(NamedTuple):
    """One timed method: its call, the name of the method its speedup is over, row params."""

    call: Callable[[], object]
    baseline: str
    params: dict


class ToyBench:
    """The toy preset's methods on one batch of held-out problems, and the rows from their outputs."""

    def __init__(self, models, questions: list[str], device: torch.device, *, n: int, block: int | None):
        from .toy import config as cfg

        self.models, self.questions, self.device = models, questions, device
        self.gen = cfg.gen_length(n)
        self.block = self.gen // BLOCKS if block is None else block
        self.plan_max, self.answer_max = cfg.PLAN_MAX_NEW_TOKENS[n], cfg.ANSWER_MAX_NEW_TOKENS[n]
        self.eos = models.executor_tokenizer.eos_token_id
        t = models.templates
        self.p_ids, self.p_mask = self._encode(
            models.planner_tokenizer, [t.planner.format(question=q) for q in questions]
        )
        self.e_ids, self.e_mask = self._encode(
            models.executor_tokenizer, [t.latent.format(question=q) for q in questions]
        )

    def _encode(self, tokenizer, texts):
        from .models.prompting import encode_prompts

        avoid = self.models.planner.mask_id if tokenizer is self.models.planner_tokenizer else None
        return encode_prompts(tokenizer, texts, device=self.device, avoid=avoid, where="bench")

    # ------------------------------------------------------------------ methods
    def planner_methods(self) -> dict[str, _Method]:
        """Every planner decoding mode; the first is the naive loop the others are compared with."""
        from .models.planner_options import PlannerOptions
        from .reference.llada import llada_generate

        planner, gen, block, ids, mask = self.models.planner, self.gen, self.block, self.p_ids, self.p_mask
        naive_name = "naive LLaDA loop, 1 token/step"

        def naive():
            x, stats = llada_generate(
                planner.model, ids, mask, mask_id=planner.mask_id, eos_id=planner.eos_id,
                eot_id=planner.eot_id, gen_length=gen, steps=gen, block_length=block, return_stats=True,
            )  # fmt: skip
            return _Planned(x[:, ids.shape[1] :], stats.committed.shape[0], stats.forward_passes)

        def fast(options):
            out = planner.generate(ids, mask, options)
            return _Planned(out.generated, out.stats.steps, out.stats.forward_passes)

        methods = {naive_name: _Method(naive, naive_name, {"cache": None, "rule": "1 token/step"})}
        for cache, label in ((None, "no cache"), ("prefix", "prefix cache"), ("dual", "dual cache")):
            for threshold in (None, *THRESHOLDS):
                rule = "1 token/step" if threshold is None else f"threshold {threshold}"
                opts = PlannerOptions(
                    gen_length=gen, steps=gen, block_length=block, cache=cache, threshold=threshold
                )
                params = {"cache": cache, "rule": rule}
                methods[f"{label}, {rule}"] = _Method(partial(fast, opts), naive_name, params)
        for k in NAP_K:
            opts = PlannerOptions(gen_length=gen, steps=math.ceil(gen / k), schedule="parallel", parallel_k=k)
            params = {"cache": None, "rule": f"NAP k={k}"}
            methods[f"parallel-forced (NAP) k={k}"] = _Method(partial(fast, opts), naive_name, params)
        return methods

    def pipeline_methods(self) -> dict[str, _Method]:
        """The naive twins first (baselines), then the executor alone, AR->AR, text and latent."""
        from .pipeline import HybridPipeline
        from .reference.ar_loop import ar_generate

        m, gen = self.models, self.gen
        executor_kw = {"max_new_tokens": self.answer_max, "plan_max_new_tokens": self.plan_max}
        executor_kw["eos_token_id"] = self.eos
        exact = {"gen_length": gen, "steps": gen, "block_length": self.block}
        fast = exact | {"cache": "dual", "threshold": THRESHOLDS[0]}

        def pipe(mode, planner_kwargs=exact, naive=False):
            pipeline = HybridPipeline(
                m.planner, m.executor, m.projector, mode=mode, planner_tokenizer=m.planner_tokenizer,
                executor_tokenizer=m.executor_tokenizer, templates=m.templates,
                planner_kwargs=planner_kwargs, executor_kwargs=executor_kw, naive=naive,
            )  # fmt: skip
            return partial(pipeline, self.questions)

        alone = {"max_new_tokens": self.answer_max, "eos_token_id": self.eos}
        naive = {
            "executor alone, naive loop": partial(
                ar_generate, m.executor.model, self.e_ids, self.e_mask, **alone),
            "AR->AR, naive loops": pipe("ar", naive=True),
            "text, naive loops": pipe("text", naive=True),
            "latent, naive loops": pipe("latent", naive=True),
        }  # fmt: skip
        methods = {name: _Method(call, name, {"naive": True}) for name, call in naive.items()}
        ours = {
            "executor alone (no plan)": (
                partial(m.executor.generate, self.e_ids, self.e_mask, **alone), "executor alone, naive loop"),
            "AR->AR (executor plans, then answers)": (pipe("ar"), "AR->AR, naive loops"),
            "text: planner 1 token/step -> executor": (pipe("text"), "text, naive loops"),
            "latent: planner 1 token/step -> projector -> executor": (pipe("latent"), "latent, naive loops"),
            "text: planner dual cache + threshold 0.9 -> executor": (pipe("text", fast), "text, naive loops"),
            "latent: planner dual cache + threshold 0.9 -> executor": (
                pipe("latent", fast), "latent, naive loops"),
        }  # fmt: skip
        for name, (call, baseline) in ours.items():
            methods[name] = _Method(call, baseline, {"ar": name.startswith("AR->AR")})
        return methods

    # ------------------------------------------------------------------ rows
    def accuracy(self, check, texts) -> float:
        return sum(check(q, t) for q, t in zip(self.questions, texts, strict=True)) / len(self.questions)

    def answers_from_plans(self, plans: list[str]) -> list[str]:
        """The executor's greedy answers from ``plans`` (text mode's prompt)."""
        t = self.models.templates
        ids, mask = self._encode(
            self.models.executor_tokenizer,
            [t.text.format(question=q, plan=p) for q, p in zip(self.questions, plans, strict=True)],
        )
        out = self.models.executor.generate(ids, mask, max_new_tokens=self.answer_max, eos_token_id=self.eos)
        return self._decode_rows(out)

    def _decode_rows(self, out) -> list[str]:
        from .models.prompting import decode

        tok = self.models.executor_tokenizer
        return [decode(tok, row[: int(n)]) for row, n in zip(out.tokens, out.lengths, strict=True)]

    def row(self, group: str, name: str, method: _Method, out, timings) -> QualityRow:
        """The row of one method from its output (the warm-up round's) and the timings."""
        from .models.prompting import decode
        from .pipeline import PipelineOutput
        from .toy import countdown

        t, base, B, gen = timings[name], timings[method.baseline], len(self.questions), self.gen
        plan_acc = tokens_per_step = passes = executor_tokens = None
        if isinstance(out, _Planned):
            p = self.models.planner
            plans = [decode(self.models.planner_tokenizer, _cut(r.tolist(), p)) for r in out.generated]
            answers, plan_acc = self.answers_from_plans(plans), self.accuracy(countdown.check_plan, plans)
            generated, tokens_per_step, passes = B * gen, gen / out.steps, out.forward_passes
        elif isinstance(out, PipelineOutput):
            s = out.stats
            answers, plan_acc = out.answers, self.accuracy(countdown.check_plan, out.plans)
            executor_tokens = (s.answer_tokens + (s.plan_tokens if method.params["ar"] else 0)) / B
            generated, passes = s.plan_tokens + s.answer_tokens, s.plan_forward_passes
            tokens_per_step = None if method.params["ar"] else gen / s.plan_steps
        else:  # the executor alone
            answers, generated = self._decode_rows(out), float(out.lengths.sum())
            executor_tokens = generated / B
        return QualityRow(
            group=group, method=name, answer_accuracy=self.accuracy(countdown.check_answer, answers),
            plan_accuracy=plan_acc, tokens_per_s=generated / t.median, speedup=base.median / t.median,
            tokens_per_step=tokens_per_step, forward_passes=passes, executor_tokens=executor_tokens,
            ms_per_question=1e3 * t.median / B, spread=t.spread, trusted=t.trusted,
            params=method.params | {
                "gen_length": gen, "block_length": self.block, "baseline": method.baseline,
                "baseline_ms_per_question": 1e3 * base.median / B},
        )  # fmt: skip


def run_toy(
    *,
    checkpoints: str | None = None,
    device: str | None = None,
    problems: int = 128,
    n: int = 3,
    block_length: int | None = None,
    rounds: int = 5,
    time_budget_s: float | None = 110.0,
    json_path: str | None = None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
    command: str = "",
) -> list[QualityRow]:
    """Load the toy models (shipped, or a ``train-toy`` output directory ``checkpoints``), answer
    ``problems`` held-out Countdown problems with ``n`` inputs in every mode, and print / write
    the accuracy + speed table. Timed rounds stop early (after at least 2) once ``time_budget_s``
    is spent; the output says how many ran."""
    from .toy import heldout_problems, load_toy

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if dev.type == "cpu":
        # The toy models are a few MB: intra-op threads only add synchronisation, and on a machine
        # also running other work a second thread makes every small op wait for a core (seen here:
        # 50x slower). One thread is the fast and the stable setting.
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    questions = [p.question for p in heldout_problems(n, problems)]  # accuracy.json's first ones
    bench = ToyBench(load_toy(checkpoints, device=dev), questions, dev, n=n, block=block_length)
    print(
        f"hybridkernels bench --preset toy: the shipped trained planner and executor on {len(questions)} "
        f"held-out Countdown problems with {n} inputs, batched, on {dev}; plan {bench.gen} tokens (blocks "
        f"of {bench.block}), answer <= {bench.answer_max} tokens; every method timed round-robin"
    )
    groups = {"planner": bench.planner_methods(), "pipeline": bench.pipeline_methods()}
    fns = {name: m.call for methods in groups.values() for name, m in methods.items()}
    print(f"  timing {len(fns)} methods: one warm-up round, then {rounds} timed rounds ...", file=sys.stderr)
    timings, outputs = benchmarking.time_alternating(
        fns, dev, rounds=rounds, warmup=1, time_budget_s=time_budget_s
    )
    rounds_run = len(next(iter(timings.values())).seconds)
    if rounds_run < rounds:
        print(f"  time budget of {time_budget_s:.0f} s reached after {rounds_run} rounds", file=sys.stderr)
    rows = [
        bench.row(group, name, m, outputs[name], timings)
        for group, methods in groups.items()
        for name, m in methods.items()
        if not m.params.get("naive") or group == "planner"
    ]
    elapsed = time.perf_counter() - t_start
    print(format_quality_table(rows))
    for line in target_checks(rows):
        print(line)
    print(f"done in {elapsed:.1f} s")
    meta = {
        "preset": "toy",
        "checkpoints": checkpoints or "shipped",
        "command": command,
        "environment": benchmarking.environment(dev),
        "problems": len(questions),
        "difficulty": n,
        "rounds": rounds_run,
        "gen_length": bench.gen,
        "block_length": bench.block,
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
        f"(`{meta['command'] or 'hybridkernels bench'}`"
        + (f", `{meta['source']}`)" if meta.get("source") else ")"),
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
