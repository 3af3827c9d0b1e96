"""``train_projector``: teach a :class:`LatentProjector` to hand the planner's thoughts to the executor.

Both models are frozen; only the projector learns. For an example ``(question, answer)``:

1. the planner generates a plan for ``templates.planner.format(question=...)`` and its final
   hidden states over the generated positions are the latents ``[P, d_planner]``, computed once
   for every example before training (and cached in ``checkpoint_dir/plan_latents.safetensors``,
   so a resumed run does not recompute them);
2. the executor reads ``[projector(latents); prompt; answer]`` with ``prompt =
   templates.latent.format(question=...)`` (exactly what the pipeline's latent mode feeds it),
   and the loss is its next-token cross-entropy on the answer tokens (the answer, then EOS).

Rows are right-padded and attention is causal, so padding needs no mask and positions are
``0 .. n-1`` as in the executor's packed prefill. Gradients reach the projector through the
executor's attention via SDPA (:func:`hybridkernels.ops.bidirectional_attention` falls back to it
when its inputs require grad). AdamW, gradient clipping, linear warmup then constant or cosine
learning rate, bf16 autocast on CUDA, a progress bar with the running loss (tqdm if installed),
checkpoints every ``checkpoint_every`` steps (projector + optimizer + step), resumable with
identical results: the batch order is a function of ``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..validation import check_choice, check_int_at_least
from .projector import LatentProjector, check_projector_fits, model_of
from .prompting import PromptTemplates, encode, encode_prompts, load_tokenizer

WHERE = "train_projector"
LATENTS_FILE = "plan_latents.safetensors"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULES = ("constant", "cosine")
# Planner options when none are given; HybridPipeline uses the same, so that a projector trained
# with the defaults sees the plans it was trained on.
DEFAULT_PLANNER_KWARGS = {"gen_length": 64, "steps": 64}


# --------------------------------------------------------------------------- examples
def check_examples(where: str, examples) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` from dicts with ``"question"``/``"answer"`` or pairs."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Iterable):
        raise TypeError(f"{where}: examples must be a list of {{'question', 'answer'}} dicts")
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict):
            q, a = ex.get("question"), ex.get("answer")
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            q, a = ex
        else:
            raise TypeError(f"{where}: examples[{i}] must be a {{'question', 'answer'}} dict, got {ex!r}")
        if not isinstance(q, str) or not isinstance(a, str):
            raise TypeError(f"{where}: examples[{i}] needs str 'question' and 'answer', got {ex!r}")
        out.append((q, a))
    if not out:
        raise ValueError(f"{where}: examples is empty")
    return out


def read_examples(path: str | Path) -> list[dict]:
    """Read a JSONL file of ``{"question": str, "answer": str}`` objects (blank lines skipped).
    ``ValueError`` naming the file and line number for a malformed line."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            bad = [k for k in ("question", "answer") if not isinstance(obj.get(k), str)]
            if bad:
                raise ValueError(
                    f"{path}:{n}: needs string fields 'question' and 'answer' "
                    f"({bad[0]!r} is missing or not a string)"
                )
            examples.append({"question": obj["question"], "answer": obj["answer"]})
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


# --------------------------------------------------------------------------- planner latents
def plan_latents(
    planner,
    questions: Sequence[str],
    *,
    tokenizer,
    templates: PromptTemplates | None = None,
    batch_size: int = 16,
    **planner_kwargs,
) -> torch.Tensor:
    """The planner's final hidden states over its generated positions, ``[N, gen_length, d]`` on
    the CPU in the planner's dtype: ``planner.generate(..., return_hidden=True)`` on
    ``templates.planner`` prompts, ``batch_size`` questions at a time."""
    templates = templates or PromptTemplates()
    model = model_of(planner)
    chunks = []
    for start in range(0, len(questions), batch_size):
        texts = [templates.planner.format(question=q) for q in questions[start : start + batch_size]]
        ids, mask = encode_prompts(tokenizer, texts, device=model.device, avoid=planner.mask_id, where=WHERE)
        out = planner.generate(ids, mask, return_hidden=True, **planner_kwargs)
        chunks.append(out.hidden.detach().cpu())
    return torch.cat(chunks)


def _fingerprint(planner, questions, templates, planner_kwargs) -> str:
    """Identifies the latents: questions, template, generation options, the planner's config and a
    probe of its weights."""
    model = model_of(planner)
    weights = (model.embed_tokens.weight[:64], model.norm.weight, model.layers[0].self_attn.q_proj.weight)
    probe = [float(w.detach().double().sum()) for w in weights]
    blob = json.dumps(
        {
            "questions": list(questions),
            "template": templates.planner,
            "kwargs": {k: repr(v) for k, v in sorted(planner_kwargs.items())},
            "config": repr(model.config),
            "mask_id": planner.mask_id,
            "probe": probe,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached_latents(path: Path | None, fingerprint: str, compute) -> torch.Tensor:
    from safetensors import safe_open
    from safetensors.torch import save_file

    if path is not None and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    return f.get_tensor("latents")
        except Exception as exc:  # a cache that does not load is recomputed, whatever broke it
            print(f"{WHERE}: {path} does not load ({exc}); recomputing the latents", file=sys.stderr)
    latents = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: an interrupted write never leaves a half file under the name.
        tmp = path.with_name(path.name + ".tmp")
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    return latents


# --------------------------------------------------------------------------- the loss
def answer_loss(
    projector: LatentProjector,
    executor,
    latents: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 scalar) of the executor on the ``answers`` tokens
    given ``[projector(latents); prompt]``. ``latents [B, P, d_planner]``; ``prompts``/``answers``:
    ``B`` token-id rows (each answer non-empty)."""
    model = model_of(executor)
    dev = model.device
    prefix = projector(latents.to(dev), dtype=model.dtype)
    B, P = prefix.shape[:2]
    lengths = [P + len(p) + len(a) for p, a in zip(prompts, answers, strict=True)]
    tokens = torch.zeros(B, max(lengths) - P, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        tokens[b, : len(p) + len(a)] = torch.tensor([*p, *a], dtype=torch.long)
        start = P + len(p)
        rows += [b] * len(a)
        cols += range(start - 1, start - 1 + len(a))
        targets += a
    x = torch.cat([prefix, model.embed(tokens.to(dev))], dim=1)
    hidden = model(inputs_embeds=x, causal=True, compute_logits=False).hidden
    rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
    logits = model.logits(hidden[rows_t, cols_t]).float()
    return F.cross_entropy(logits, torch.tensor(targets, device=dev))


# --------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    """projector: the trained projector. step: optimizer steps done. losses: the loss of every
    step (resumed runs include the earlier ones). checkpoint: the last checkpoint directory."""

    projector: LatentProjector
    step: int
    losses: list[float]
    checkpoint: Path | None


class _Progress:
    """tqdm bar with the running loss, or a line every ``every`` steps when tqdm is missing."""

    def __init__(self, enabled: bool, total: int, initial: int, every: int):
        self.bar, self.enabled, self.every, self.total = None, enabled, every, total
        self.started = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, desc="train-projector", unit="step")

    def update(self, step: int, running: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            rate = step / max(time.perf_counter() - self.started, 1e-9)
            print(
                f"train-projector step {step}/{self.total} loss {running:.4f} lr {lr:.2e} ({rate:.1f} it/s)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Examples of optimizer step ``step``: epoch ``e`` walks a permutation seeded by ``seed + e``."""
    per_epoch = -(-n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * batch_size : (i + 1) * batch_size]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` directory with the highest step (complete ones only), or None."""
    done = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(root: Path, step: int, projector, optimizer, state: dict, keep: int) -> Path:
    path = root / f"checkpoint-{step:07d}"
    projector.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / OPTIMIZER_FILE)
    (path / STATE_FILE).write_text(json.dumps(state | {"step": step}, indent=1))  # written last: complete
    old = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
    for p in old:
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    return path


def check_lengths_fit(planner, e_model, questions, prompts, answers, p_tok, templates, planner_kwargs):
    """Refuse an example whose sequence would not fit a model's ``max_position_embeddings``
    before any latent is computed: the planner's prompt + ``gen_length``, and the executor's
    prompt + latents + answer (``prompts``/``answers``: the executor's token ids)."""
    gen_length = int(planner_kwargs["gen_length"])
    p_max = model_of(planner).config.max_position_embeddings
    e_max = e_model.config.max_position_embeddings
    for i, q in enumerate(questions):
        planned = len(encode(p_tok, templates.planner.format(question=q), special=True)) + gen_length
        if planned > p_max:
            raise ValueError(
                f"{WHERE}: examples[{i}]: the planner's prompt + gen_length is {planned} tokens, more "
                f"than its max_position_embeddings {p_max}"
            )
        answered = len(prompts[i]) + gen_length + len(answers[i])
        if answered > e_max:
            raise ValueError(
                f"{WHERE}: examples[{i}]: the executor's prompt + {gen_length} latents + answer is "
                f"{answered} tokens, more than its max_position_embeddings {e_max}"
            )


def train_projector(
    planner,
    executor,
    examples,
    *,
    planner_tokenizer,
    executor_tokenizer,
    projector: LatentProjector | None = None,
    templates: PromptTemplates | None = None,
    planner_kwargs: dict | None = None,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    seed: int = 0,
    autocast: bool | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool | str | Path = False,
    latent_batch_size: int = 16,
    progress: bool = True,
    log_every: int = 10,
) -> TrainResult:
    """Train ``projector`` (default: a fresh :meth:`LatentProjector.for_models`, seeded by ``seed``)
    so that the frozen ``executor`` answers from the frozen ``planner``'s latents.

    Args:
        planner: a ``DiffusionPlanner``; ``executor``: an ``ARExecutor`` (or their Transformers
            where only the model is needed: the planner must generate).
        examples: ``{"question", "answer"}`` dicts (see :func:`read_examples`) or pairs.
        planner_tokenizer, executor_tokenizer: tokenizers or local directories.
        templates: the prompts (the pipeline's latent mode must use the same ones).
        planner_kwargs: ``planner.generate`` options (``gen_length``, ``steps``, ...; default
            ``DEFAULT_PLANNER_KWARGS``, as in the pipeline).
        steps: optimizer steps (default ``epochs`` passes over the examples).
        lr, weight_decay, betas: AdamW; ``max_grad_norm``: clipping (None: off);
            ``warmup_steps`` linear warmup, then ``schedule`` ``"constant"`` or ``"cosine"``.
        autocast: bf16 autocast (default: on CUDA).
        checkpoint_dir: checkpoints ``checkpoint-<step>/`` (projector, optimizer, state) every
            ``checkpoint_every`` steps and at the end; the latents cache.
        resume: True (the latest checkpoint in ``checkpoint_dir``) or a checkpoint directory.
        progress: a progress bar (or log lines every ``log_every`` steps without tqdm).

    Returns a :class:`TrainResult`.
    """
    pairs = check_examples(WHERE, examples)
    p_tok = load_tokenizer(planner_tokenizer, where=WHERE, name="planner_tokenizer")
    e_tok = load_tokenizer(executor_tokenizer, where=WHERE, name="executor_tokenizer")
    if p_tok is None or e_tok is None:
        raise ValueError(f"{WHERE}: planner_tokenizer and executor_tokenizer are required")
    templates = templates or PromptTemplates()
    planner_kwargs = DEFAULT_PLANNER_KWARGS | dict(planner_kwargs or {})
    planner_kwargs.pop("return_hidden", None)
    e_model = model_of(executor)
    for name, value, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("keep_checkpoints", keep_checkpoints, 1),
    ):
        check_int_at_least(WHERE, name, value, low)
    for name, value in (("steps", steps), ("checkpoint_every", checkpoint_every)):
        if value is not None:
            check_int_at_least(WHERE, name, value, 1)
    check_int_at_least(WHERE, "warmup_steps", warmup_steps, 0)
    check_choice(WHERE, "schedule", schedule, SCHEDULES)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"{WHERE}: lr must be > 0, got {lr!r}")
    if resume and checkpoint_dir is None and not isinstance(resume, (str, Path)):
        raise ValueError(f"{WHERE}: resume=True needs checkpoint_dir")
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    total = steps if steps is not None else epochs * -(-len(pairs) // batch_size)

    if projector is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projector = LatentProjector.for_models(planner, executor)
    check_projector_fits(WHERE, projector, planner, executor)

    questions = [q for q, _ in pairs]
    prompts = [encode(e_tok, templates.latent.format(question=q), special=True) for q in questions]
    eos = [] if e_tok.eos_token_id is None else [int(e_tok.eos_token_id)]
    answers = [encode(e_tok, " " + a.strip(), special=False) + eos for _, a in pairs]
    for i, a in enumerate(answers):
        if not a:
            raise ValueError(f"{WHERE}: examples[{i}] has an empty answer and the tokenizer has no EOS")
    check_lengths_fit(planner, e_model, questions, prompts, answers, p_tok, templates, planner_kwargs)
    fingerprint = _fingerprint(planner, questions, templates, planner_kwargs)
    latents = _cached_latents(
        root / LATENTS_FILE if root is not None else None,
        fingerprint,
        lambda: plan_latents(
            planner,
            questions,
            tokenizer=p_tok,
            templates=templates,
            batch_size=latent_batch_size,
            **planner_kwargs,
        ),
    )

    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    state = {"seed": seed, "batch_size": batch_size, "num_examples": len(pairs), "latents": fingerprint}
    losses: list[float] = []
    start = 0
    if resume:
        ckpt = Path(resume) if isinstance(resume, (str, Path)) else latest_checkpoint(root)
        if ckpt is not None:
            start, losses = _load_checkpoint(ckpt, projector, optimizer, state)

    use_autocast = e_model.device.type == "cuda" if autocast is None else bool(autocast)
    bar = _Progress(progress, total, start, log_every)
    saved = None
    frozen = [(p, p.requires_grad) for m in (model_of(planner), e_model) for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    projector.train()
    running = losses[-1] if losses else None
    try:
        for step in range(start, total):
            idx = _batch_indices(step, len(pairs), batch_size, seed).tolist()
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, total, warmup_steps, schedule)
            with torch.autocast(e_model.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = answer_loss(
                    projector, e_model, latents[idx], [prompts[i] for i in idx], [answers[i] for i in idx]
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(projector.parameters(), max_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{WHERE}: the loss is {value} at step {step + 1}")
            losses.append(value)
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.update(step + 1, running, optimizer.param_groups[0]["lr"])
            done = step + 1
            if root is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == total):
                saved = _save_checkpoint(
                    root, done, projector, optimizer, state | {"losses": losses}, keep_checkpoints
                )
    finally:
        bar.close()
        for p, flag in frozen:
            p.requires_grad_(flag)
        projector.eval()
    if root is not None and saved is None:
        saved = latest_checkpoint(root)
    return TrainResult(projector, max(start, total), losses, saved)


def _load_checkpoint(path: Path, projector, optimizer, state: dict) -> tuple[int, list[float]]:
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{WHERE}: {path} is not a complete checkpoint (no {STATE_FILE})")
    saved = json.loads((path / STATE_FILE).read_text())
    for key in ("seed", "batch_size", "num_examples"):
        if saved.get(key) != state[key]:
            raise ValueError(
                f"{WHERE}: cannot resume from {path}: {key} = {state[key]!r}, the checkpoint's is "
                f"{saved.get(key)!r}"
            )
    if saved.get("latents") != state["latents"]:
        raise ValueError(
            f"{WHERE}: cannot resume from {path}: the questions, the planner or its options differ from the "
            "checkpoint's (other planner latents)"
        )
    loaded = LatentProjector.from_pretrained(path, device=projector.device, dtype=projector.dtype)
    if loaded.config != projector.config:
        raise ValueError(f"{WHERE}: the checkpoint's projector config {loaded.config} != {projector.config}")
    projector.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(
        torch.load(path / OPTIMIZER_FILE, map_location=projector.device, weights_only=True)
    )
    return int(saved["step"]), list(saved.get("losses", []))


__all__ = [
    "TrainResult",
    "answer_loss",
    "check_examples",
    "latest_checkpoint",
    "plan_latents",
    "read_examples",
    "train_projector",
]
