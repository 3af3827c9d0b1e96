"""The toy planning task, its tokenizers, trainer and shipped checkpoints.

* :mod:`.countdown`: the Countdown task (generator, exact plan / answer checkers).
* :mod:`.tokenization`: the planner's and the executor's tokenizers (different vocabularies).
* :mod:`.train`: ``hybridkernels train-toy OUTDIR`` (planner, executor, projector, evaluation).
* :mod:`.evaluate`: batched accuracies of every pipeline mode.
* ``checkpoints/``: the trained models as package data: ``planner/`` (LLaDA format),
  ``executor/`` (HF Llama format), ``projector/`` (LatentProjector format), each with its
  tokenizer, and ``accuracy.json`` (the measured accuracies and the exact eval settings).

``load_toy()`` returns everything the pipeline needs::

    planner, executor, projector, p_tok, e_tok, templates = load_toy()
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .config import GEN_LENGTH, TEMPLATES, gen_length, planner_kwargs
from .countdown import Problem, check_answer, check_plan, generate_problems, plan_to_answer, split_problems

CHECKPOINT_PARTS = ("planner", "executor", "projector")


def toy_dir() -> Path:
    """The directory of the shipped checkpoints (``planner/``, ``executor/``, ``projector/``,
    ``accuracy.json``)."""
    return Path(__file__).resolve().parent / "checkpoints"


class ToyModels(NamedTuple):
    """What :func:`load_toy` returns (unpacks as a 6-tuple)."""

    planner: object
    executor: object
    projector: object
    planner_tokenizer: object
    executor_tokenizer: object
    templates: object


def check_checkpoint_dir(path: str | Path, *, where: str = "load_toy") -> Path:
    """``path`` as a Path; ``ValueError`` naming the first missing file of a toy checkpoint
    directory (weights, configs, tokenizer files)."""
    path = Path(path)
    need = {
        "planner": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        "executor": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        "projector": ("config.json", "model.safetensors"),
    }
    if not path.is_dir():
        raise ValueError(f"{where}: {path} is not a directory")
    for part, files in need.items():
        for name in files:
            if not (path / part / name).is_file():
                what = "tokenizer" if name.startswith("tokenizer") else "checkpoint"
                raise ValueError(f"{where}: {path / part / name} is missing (the {part}'s {what} file)")
    return path


def load_toy(
    path: str | Path | None = None, *, device=None, dtype=None, backend: str | None = None
) -> ToyModels:
    """Load the toy models: ``(planner, executor, projector, planner_tokenizer, executor_tokenizer,
    templates)``.

    Args:
        path: a ``train-toy`` output directory (default: the shipped :func:`toy_dir`).
        device, dtype: where and in which dtype to put the models (default CPU, as saved: fp32).
        backend: attention backend of both models (None: auto).

    The planner is a ``DiffusionPlanner`` (mask / EOS ids from its config), the executor an
    ``ARExecutor``, the projector a ``LatentProjector``; templates are
    :data:`~hybridkernels.toy.config.TEMPLATES`. ``ValueError`` naming a missing file.
    """
    from ..models.executor import ARExecutor
    from ..models.planner import DiffusionPlanner
    from ..models.projector import LatentProjector
    from ..models.transformer import Transformer
    from .tokenization import load_tokenizer_dir

    root = check_checkpoint_dir(toy_dir() if path is None else path)
    kw = dict(device=device, dtype=dtype, backend=backend)
    p_tok = load_tokenizer_dir(root / "planner", where="load_toy")
    e_tok = load_tokenizer_dir(root / "executor", where="load_toy")
    p_model = Transformer.from_pretrained(root / "planner", causal=False, **kw)
    planner = DiffusionPlanner(
        p_model, mask_id=p_tok.mask_token_id, eos_id=p_tok.eos_token_id, backend=backend
    )
    executor = ARExecutor(Transformer.from_pretrained(root / "executor", causal=True, **kw))
    projector = LatentProjector.from_pretrained(root / "projector", device=device, dtype=dtype)
    return ToyModels(planner, executor, projector, p_tok, e_tok, TEMPLATES)


def heldout_problems(n: int = 3, count: int | None = None, *, seed: int = 0) -> list[Problem]:
    """The held-out problems ``accuracy.json`` was measured on (first ``count`` of them; default
    all of the recorded count) for training seed ``seed``."""
    from .config import HELDOUT_SEED, ToyTrainConfig

    total = ToyTrainConfig().heldout_problems[n]
    problems = generate_problems(n, total, HELDOUT_SEED + seed, distinct="key")
    return problems if count is None else problems[:count]


__all__ = [
    "GEN_LENGTH",
    "TEMPLATES",
    "Problem",
    "ToyModels",
    "check_answer",
    "check_checkpoint_dir",
    "check_plan",
    "gen_length",
    "generate_problems",
    "heldout_problems",
    "load_toy",
    "plan_to_answer",
    "planner_kwargs",
    "split_problems",
    "toy_dir",
]
