"""``hybridkernels train-toy OUTDIR``: train the toy planner, executor and projector, seeded, on a CPU.

Stages, each resumable (``OUTDIR/_work/<stage>/`` holds the last checkpoint: weights, AdamW
state, step), in order:

1. **planner**: a bidirectional :class:`~hybridkernels.models.Transformer` on LLaDA's SFT objective
   (:func:`~hybridkernels.toy.objectives.planner_loss`) over CD3 and CD4 problems; saved to
   ``OUTDIR/planner`` in LLaDA's checkpoint format with its tokenizer.
2. **executor**: a causal Transformer on next-token CE over the three prompt formats
   (:func:`~hybridkernels.toy.objectives.executor_rows`); saved to ``OUTDIR/executor`` in HF Llama
   format with its tokenizer.
3. **projector**: :func:`hybridkernels.models.training.train_projector` (both models frozen) on CD3
   problems; saved to ``OUTDIR/projector``.
4. **eval**: :func:`~hybridkernels.toy.evaluate.evaluate` on the held-out problems; written to
   ``OUTDIR/accuracy.json`` with the settings, seeds and timings.

Determinism: model init, the batch of every step (a function of seed and step) and the masking
noise are seeded, so a resumed run gives the same weights as an uninterrupted one. Ctrl-C saves a
checkpoint of the running stage and raises :class:`Interrupted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..models.config import TransformerConfig
from ..models.executor import ARExecutor
from ..models.loading import load_pretrained, save_pretrained
from ..models.planner import DiffusionPlanner
from ..models.projector import LatentProjector
from ..models.training import train_projector
from ..models.transformer import Transformer
from .config import (
    ANSWER_MAX_NEW_TOKENS,
    BLOCK_LENGTH,
    HELDOUT_SEED,
    PLAN_MAX_NEW_TOKENS,
    TEMPLATES,
    TRAIN_SEED,
    VALID_SEED,
    ModelShape,
    StageBudget,
    ToyTrainConfig,
    gen_length,
    planner_kwargs,
    quick_config,
)
from .countdown import split_problems
from .evaluate import evaluate
from .objectives import executor_loss, executor_rows, planner_batch, planner_loss, planner_row
from .tokenization import build_executor_tokenizer, build_planner_tokenizer, save_tokenizer

STAGES = ("planner", "executor", "projector", "eval")
STATE_FILE = "train_state.json"
WORK_DIR = "_work"
OUTPUTS = ("planner", "executor", "projector", "accuracy.json", STATE_FILE, WORK_DIR)
VALIDATION_BLOCKS = (16, 8, 4, 2)  # planner block lengths compared on the validation problems
THREADS = 2  # torch intra-op threads (HYBRIDKERNELS_TOY_THREADS overrides; 1 is faster on a busy CPU)


class Interrupted(Exception):
    """Ctrl-C during training: the running stage's checkpoint was saved; ``message`` says how to
    resume."""


# --------------------------------------------------------------------------- models
def _config(shape: ModelShape, tokenizer, **kw) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope_theta=shape.rope_theta,
        eos_token_ids=(tokenizer.eos_token_id,),
        **kw,
    )


def planner_config(shape: ModelShape, tokenizer) -> TransformerConfig:
    """The planner's LLaDA-family config (bidirectional, mask / EOS ids of ``tokenizer``)."""
    return _config(
        shape, tokenizer, max_position_embeddings=64, causal=False, family="llada",
        mask_token_id=tokenizer.mask_token_id,
    )  # fmt: skip


def executor_config(shape: ModelShape, tokenizer) -> TransformerConfig:
    """The executor's HF Llama config (causal, EOS of ``tokenizer``)."""
    return _config(shape, tokenizer, max_position_embeddings=128, causal=True, family="llama")


def _init_model(config: TransformerConfig, seed: int) -> Transformer:
    model = Transformer(config, device="meta")
    model = Transformer(config)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return model


# --------------------------------------------------------------------------- schedule / batches
def lr_at(step: int, budget: StageBudget) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    progress = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    low = budget.min_lr_ratio
    return budget.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(seed: int, stream: int, k: int, n: int, batch_size: int) -> list[int]:
    """Rows of the ``k``-th batch drawn from a stream of ``n`` rows: epoch ``e`` walks a
    permutation seeded by ``(seed, stream, e)``; wraps around (a function of its arguments only)."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(hash_seed(seed, stream, epoch))
    order = torch.randperm(n, generator=g)
    return order[i * batch_size : (i + 1) * batch_size].tolist()


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic across processes, unlike ``hash``)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def planner_difficulty(step: int, cd4_fraction: float) -> int:
    """Which difficulty the planner's step trains on: every ``round(1 / cd4_fraction)``-th step is
    CD4, the others CD3."""
    if cd4_fraction <= 0:
        return 3
    period = max(1, round(1 / cd4_fraction))
    return 4 if step % period == period - 1 else 3


def steps_before(step: int, n: int, cd4_fraction: float) -> int:
    """How many of the steps ``0 .. step-1`` trained on difficulty ``n``."""
    if cd4_fraction <= 0:
        return step if n == 3 else 0
    period = max(1, round(1 / cd4_fraction))
    cd4 = step // period
    return cd4 if n == 4 else step - cd4


# --------------------------------------------------------------------------- progress
class Progress:
    """tqdm bar with loss and lr, or a plain line every ``every`` steps when tqdm is missing."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool = True, every: int = 50):
        self.desc, self.total, self.every, self.enabled = desc, total, every, enabled
        self.bar = None
        self.started = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.started
            print(
                f"{self.desc} step {step}/{self.total} loss {loss:.4f} lr {lr:.1e} ({elapsed:.0f}s)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- one stage loop
def _save_work(path: Path, model: Transformer, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path / "state.json")  # written last: the checkpoint is complete


def _load_work(path: Path, model: Transformer, optimizer) -> dict | None:
    from safetensors.torch import load_file

    if not (path / "state.json").is_file():
        return None
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return state


def run_stage(
    name: str, model: Transformer, budget: StageBudget, loss_fn, work: Path, *, every: int, progress: bool
):
    """Train ``model`` for ``budget.steps`` AdamW steps of ``loss_fn(step) -> loss``, resuming from
    ``work`` and checkpointing there every ``every`` steps and on Ctrl-C. Returns the losses."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": budget.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=budget.lr,
        betas=(0.9, 0.98),
    )
    state = _load_work(work, model, optimizer) or {"step": 0, "losses": []}
    step, losses = state["step"], state["losses"]
    bar = Progress(name, budget.steps, step, progress)
    model.train()
    running = losses[-1] if losses else None
    try:
        while step < budget.steps:
            lr = lr_at(step, budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"train-toy: {name} loss is {value} at step {step + 1}")
            losses.append(value)
            step += 1
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(step, running, lr)
            if step % every == 0 and step < budget.steps:
                _save_work(work, model, optimizer, {"step": step, "losses": losses})
    except KeyboardInterrupt:
        bar.close()
        _save_work(work, model, optimizer, {"step": step, "losses": losses})
        raise Interrupted(
            f"{name} stage interrupted at step {step}/{budget.steps}; checkpoint saved in {work}"
        ) from None
    bar.close()
    model.eval()
    return losses


# --------------------------------------------------------------------------- the run
def _problems(config: ToyTrainConfig):
    """``{n: (train, heldout, valid)}``."""
    data = {}
    for n, count in config.train_problems.items():
        data[n] = split_problems(
            n,
            count,
            config.heldout_problems[n],
            train_seed=TRAIN_SEED + config.seed,
            heldout_seed=HELDOUT_SEED + config.seed,
            valid_count=config.valid_problems[n],
            valid_seed=VALID_SEED + config.seed,
        )
    return data


def _prepare_outdir(outdir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ValueError("train-toy: give --resume or --overwrite, not both")
    if not outdir.exists() or not any(outdir.iterdir()):
        outdir.mkdir(parents=True, exist_ok=True)
        return
    if resume:
        if not (outdir / STATE_FILE).is_file():
            raise ValueError(f"train-toy: {outdir} has no {STATE_FILE}; it is not a train-toy run to resume")
        return
    if not overwrite:
        raise ValueError(
            f"train-toy: {outdir} is not empty; pass --resume to continue the run in it or --overwrite to "
            "replace it"
        )
    foreign = sorted(p.name for p in outdir.iterdir() if p.name not in OUTPUTS)
    if foreign:
        raise ValueError(
            f"train-toy: --overwrite only replaces a train-toy run; {outdir} also holds {foreign}"
        )
    for name in OUTPUTS:
        p = outdir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def train_toy(
    outdir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    quick: bool = False,
    config: ToyTrainConfig | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run every stage into ``outdir`` (see the module docstring) and return the accuracy report.

    ``quick``: :func:`~hybridkernels.toy.config.quick_config` (a few steps of everything).
    ``config`` overrides both. A non-empty ``outdir`` needs ``resume`` or ``overwrite``.
    Raises :class:`Interrupted` on Ctrl-C (after saving a checkpoint)."""
    outdir = Path(outdir)
    config = config or (quick_config(seed) if quick else ToyTrainConfig(seed=seed))
    _prepare_outdir(outdir, resume, overwrite)
    torch.set_num_threads(int(os.environ.get("HYBRIDKERNELS_TOY_THREADS", THREADS)))
    state_path = outdir / STATE_FILE
    settings = config.to_dict()
    settings = json.loads(json.dumps(settings))  # int dict keys -> str, as stored
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["config"] != settings:
            raise ValueError(
                f"train-toy: cannot resume {outdir}: it was started with other settings (seed / --quick); "
                "use --overwrite to start again"
            )
    else:
        state = {"config": settings, "done": [], "seconds": {}}
        state_path.write_text(json.dumps(state, indent=1))

    def finish(stage: str, seconds: float) -> None:
        state["done"].append(stage)
        state["seconds"][stage] = state["seconds"].get(stage, 0.0) + seconds
        state_path.write_text(json.dumps(state, indent=1))

    p_tok, e_tok = build_planner_tokenizer(), build_executor_tokenizer()
    data = _problems(config)
    work = outdir / WORK_DIR
    every = config.checkpoint_every

    # 1. planner
    if "planner" not in state["done"]:
        t0 = time.perf_counter()
        cd4 = config.cd4_fraction if 4 in data else 0.0
        trained = [3, 4] if cd4 > 0 else [3]
        rows = {n: [planner_row(p_tok, p, gen_length(n), TEMPLATES) for p in data[n][0]] for n in trained}
        model = _init_model(planner_config(config.planner_shape, p_tok), hash_seed(config.seed, 1))
        budget = config.planner

        def planner_step(step):
            n = planner_difficulty(step, cd4)
            k = steps_before(step, n, cd4)
            idx = batch_indices(config.seed, 10 + n, k, len(rows[n]), budget.batch_size)
            ids, valid, P = planner_batch([rows[n][i] for i in idx], p_tok.pad_token_id)
            noise = torch.Generator().manual_seed(hash_seed(config.seed, 2, step))
            return planner_loss(model, ids, valid, P, p_tok.mask_token_id, noise)

        try:
            run_stage(
                "planner", model, budget, planner_step, work / "planner", every=every, progress=progress
            )
        except Interrupted:
            state["seconds"]["planner"] = state["seconds"].get("planner", 0.0) + time.perf_counter() - t0
            state_path.write_text(json.dumps(state, indent=1))
            raise
        save_pretrained(model, outdir / "planner", names="llada")
        save_tokenizer(p_tok, outdir / "planner")
        finish("planner", time.perf_counter() - t0)
        log(f"train-toy: planner saved to {outdir / 'planner'}")

    # 2. executor
    if "executor" not in state["done"]:
        t0 = time.perf_counter()
        rows = [r for n in data for p in data[n][0] for r in executor_rows(e_tok, p, TEMPLATES)]
        model = _init_model(executor_config(config.executor_shape, e_tok), hash_seed(config.seed, 3))
        budget = config.executor

        def executor_step(step):
            idx = batch_indices(config.seed, 20, step, len(rows), budget.batch_size)
            return executor_loss(model, [rows[i] for i in idx], e_tok.pad_token_id)

        try:
            run_stage(
                "executor", model, budget, executor_step, work / "executor", every=every, progress=progress
            )
        except Interrupted:
            state["seconds"]["executor"] = state["seconds"].get("executor", 0.0) + time.perf_counter() - t0
            state_path.write_text(json.dumps(state, indent=1))
            raise
        save_pretrained(model, outdir / "executor", names="hf")
        _hf_config_extras(outdir / "executor", e_tok)
        save_tokenizer(e_tok, outdir / "executor")
        finish("executor", time.perf_counter() - t0)
        log(f"train-toy: executor saved to {outdir / 'executor'}")

    planner = DiffusionPlanner(load_pretrained(outdir / "planner", causal=False, backend="reference"))
    executor = ARExecutor(load_pretrained(outdir / "executor", causal=True, backend="reference"))

    # 3. projector
    if "projector" not in state["done"]:
        t0 = time.perf_counter()
        b = config.projector
        examples = [(p.question, p.answer) for p in data[3][0][: config.projector_examples]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(config.seed, 4))
            projector = LatentProjector.for_models(planner, executor)
        try:
            result = train_projector(
                planner,
                executor,
                examples,
                planner_tokenizer=p_tok,
                executor_tokenizer=e_tok,
                projector=projector,
                templates=TEMPLATES,
                planner_kwargs=planner_kwargs(3),
                steps=b.steps,
                batch_size=b.batch_size,
                lr=b.lr,
                weight_decay=b.weight_decay,
                warmup_steps=b.warmup,
                schedule="cosine",
                seed=hash_seed(config.seed, 5) % (1 << 31),
                checkpoint_dir=work / "projector",
                checkpoint_every=every,
                resume=True,
                latent_batch_size=256,
                progress=progress,
            )
        except KeyboardInterrupt:
            state["seconds"]["projector"] = state["seconds"].get("projector", 0.0) + time.perf_counter() - t0
            state_path.write_text(json.dumps(state, indent=1))
            raise Interrupted(f"projector stage interrupted; checkpoints in {work / 'projector'}") from None
        result.projector.save_pretrained(outdir / "projector")
        finish("projector", time.perf_counter() - t0)
        log(f"train-toy: projector saved to {outdir / 'projector'}")

    # 4. eval
    if "eval" not in state["done"]:
        t0 = time.perf_counter()
        projector = LatentProjector.from_pretrained(outdir / "projector")
        report = evaluation_report(
            config, data, planner, executor, projector, p_tok, e_tok, progress=progress
        )
        report["train_seconds"] = dict(state["seconds"])
        report["train_seconds"]["total"] = sum(state["seconds"].values())
        (outdir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
        finish("eval", time.perf_counter() - t0)
        log(f"train-toy: accuracies written to {outdir / 'accuracy.json'}")
        shutil.rmtree(work, ignore_errors=True)
    return json.loads((outdir / "accuracy.json").read_text())


def evaluation_report(config, data, planner, executor, projector, p_tok, e_tok, *, progress=True) -> dict:
    """Every mode's held-out accuracy per difficulty, with the exact settings."""
    results = {}
    for n in sorted(data):
        heldout = data[n][1]
        modes = ("plan", "gold_plan", "no_plan", "ar", "text") + (("latent",) if n == 3 else ())
        r = evaluate(
            heldout,
            planner=planner,
            executor=executor,
            projector=projector,
            planner_tokenizer=p_tok,
            executor_tokenizer=e_tok,
            modes=modes,
            batch_size=config.eval_batch_size,
            plan_max_new_tokens=PLAN_MAX_NEW_TOKENS[n],
            max_new_tokens=ANSWER_MAX_NEW_TOKENS[n],
            backend="reference",
        )
        if progress:
            acc = ", ".join(f"{m} {v:.3f}" for m, v in r["accuracy"].items())
            print(f"train-toy: CD{n} held-out ({r['count']} problems): {acc}", file=sys.stderr)
        results[f"cd{n}"] = r
    validation = {}
    for n in sorted(data):
        valid = data[n][2]
        if not valid:
            continue
        g = gen_length(n)
        sweep = {}
        for block in sorted({b for b in VALIDATION_BLOCKS if g % b == 0} | {BLOCK_LENGTH[n]}, reverse=True):
            opts = {"gen_length": g, "steps": g, "block_length": block}
            r = evaluate(
                valid,
                planner=planner,
                planner_tokenizer=p_tok,
                modes=("plan",),
                batch_size=config.eval_batch_size,
                planner_options=opts,
                backend="reference",
            )
            sweep[str(block)] = r["accuracy"]["plan"]
        validation[f"cd{n}"] = {"count": len(valid), "plan_accuracy_by_block_length": sweep}
    return {
        "task": "countdown",
        "results": results,
        "validation": validation,
        "eval": {
            "heldout_seed": {str(n): HELDOUT_SEED + config.seed for n in data},
            "train_seed": {str(n): TRAIN_SEED + config.seed for n in data},
            "heldout_problems": {str(n): len(data[n][1]) for n in data},
            "valid_seed": {str(n): VALID_SEED + config.seed for n in data},
            "train_problems": {str(n): len(data[n][0]) for n in data},
            "planner_decoding": "hybridkernels.reference.llada_generate, temperature 0, low_confidence "
            "remasking, one token per step (steps = gen_length)",
            "block_length": {str(n): BLOCK_LENGTH[n] for n in data},
            "executor_decoding": "ARExecutor.generate, greedy",
            "gen_length": {str(n): gen_length(n) for n in data},
            "plan_max_new_tokens": {str(n): PLAN_MAX_NEW_TOKENS[n] for n in data},
            "answer_max_new_tokens": {str(n): ANSWER_MAX_NEW_TOKENS[n] for n in data},
            "dtype": "float32",
        },
        "templates": dataclasses.asdict(TEMPLATES),
        "config": config.to_dict(),
        "torch": torch.__version__,
    }


def _hf_config_extras(path: Path, tokenizer) -> None:
    """Add the HF keys ``AutoModelForCausalLM`` users expect (architectures, special ids, dtype)."""
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(
        architectures=["LlamaForCausalLM"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    file.write_text(json.dumps(config, indent=2) + "\n")


def resume_hint(outdir: str | Path, quick: bool, seed: int) -> str:
    """The command that continues an interrupted run."""
    extra = (" --quick" if quick else "") + (f" --seed {seed}" if seed else "")
    return f"hybridkernels train-toy {outdir} --resume{extra}"
