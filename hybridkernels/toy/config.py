"""Constants of the toy: prompt templates, generation lengths, seeds, model shapes, training budgets.

Everything the trainer, the evaluator and :func:`hybridkernels.toy.load_toy` must agree on lives
here, so a shipped checkpoint, its ``accuracy.json`` and a re-run of ``hybridkernels train-toy``
describe the same thing.
"""

from __future__ import annotations

import dataclasses

from ..models.prompting import PromptTemplates

# The executor's prompts (the pipeline formats exactly these; the trainer trains on them).
# The executor's tokenizer drops whitespace, so "\n" and spaces only make the text readable.
TEMPLATES = PromptTemplates(
    planner="{question}",
    latent="Question: {question}\nAnswer:",
    text="Question: {question}\nPlan: {plan}\nAnswer:",
    ar_plan="Question: {question}\nPlan:",
    ar_answer="\nAnswer:",
)

# The planner's fixed generation length per difficulty (plan + EOS padding, in planner tokens:
# whole numbers and symbols). CD3 plans are 11 tokens ("a op b = r , r op c = t"), CD4 plans 17.
GEN_LENGTH = {3: 16, 4: 24}
# Executor token budgets (whole-number tokens): plans and answers.
PLAN_MAX_NEW_TOKENS = {3: 16, 4: 24}
ANSWER_MAX_NEW_TOKENS = {3: 16, 4: 24}

# The planner's block length per difficulty (LLaDA's semi-autoregressive blocks; one block = the
# whole generation).
BLOCK_LENGTH = {3: 16, 4: 24}

# Problem seeds: training, held-out evaluation, validation (for choosing decoding settings). The
# three sets are disjoint by Problem.key (no permutation of a held-out or validation question is
# trained on).
TRAIN_SEED = 1
HELDOUT_SEED = 1000
VALID_SEED = 2000


def gen_length(n: int) -> int:
    """The planner's generation length for Countdown with ``n`` inputs."""
    if n not in GEN_LENGTH:
        raise ValueError(f"toy: no generation length for n={n}; the toy covers n in {sorted(GEN_LENGTH)}")
    return GEN_LENGTH[n]


def planner_kwargs(n: int) -> dict:
    """The naive decoding the accuracies are measured with: one token per step (steps =
    gen_length), blocks of ``BLOCK_LENGTH[n]``."""
    g = gen_length(n)
    return {"gen_length": g, "steps": g, "block_length": BLOCK_LENGTH[n]}


@dataclasses.dataclass
class ModelShape:
    """Shape of one toy transformer (Llama-family, SwiGLU, RoPE)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass
class StageBudget:
    """One training stage: optimizer ``steps``, ``batch_size``, peak ``lr`` (AdamW, linear warmup
    over ``warmup`` steps then cosine decay to ``min_lr_ratio * lr``), ``weight_decay``."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05


@dataclasses.dataclass
class ToyTrainConfig:
    """Everything ``hybridkernels train-toy`` does, as data (recorded in ``accuracy.json``)."""

    seed: int = 0
    # Training problems per difficulty (distinct questions, none held out).
    train_problems: dict = dataclasses.field(default_factory=lambda: {3: 9000, 4: 10000})
    # Held-out problems per difficulty for the final evaluation.
    heldout_problems: dict = dataclasses.field(default_factory=lambda: {3: 500, 4: 500})
    # Validation problems per difficulty (decoding-setting sweeps in the report).
    valid_problems: dict = dataclasses.field(default_factory=lambda: {3: 200, 4: 200})
    planner_shape: ModelShape = dataclasses.field(
        default_factory=lambda: ModelShape(
            hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384
        )
    )
    # head_dim 64: the executor decodes with _C's compiled kernels (head dims 64 and 128).
    executor_shape: ModelShape = dataclasses.field(
        default_factory=lambda: ModelShape(
            hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=384
        )
    )
    planner: StageBudget = dataclasses.field(
        default_factory=lambda: StageBudget(steps=6000, batch_size=128, lr=2e-3, warmup=100)
    )
    executor: StageBudget = dataclasses.field(
        default_factory=lambda: StageBudget(steps=800, batch_size=96, lr=2e-3, warmup=50)
    )
    projector: StageBudget = dataclasses.field(
        default_factory=lambda: StageBudget(steps=150, batch_size=64, lr=1e-3, warmup=15, weight_decay=0.0)
    )
    projector_examples: int = 2048
    # Fraction of the planner's steps on CD4 (the rest CD3). 0: the CPU budget goes to CD3, the
    # target task; the executor always trains on both.
    cd4_fraction: float = 0.0
    checkpoint_every: int = 100
    eval_batch_size: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick_config(seed: int = 0) -> ToyTrainConfig:
    """A few steps of every stage on tiny models (CI smoke runs, seconds)."""
    tiny = ModelShape(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64)
    return ToyTrainConfig(
        seed=seed,
        train_problems={3: 256, 4: 128},
        heldout_problems={3: 16, 4: 16},
        valid_problems={3: 8, 4: 8},
        planner_shape=tiny,
        executor_shape=tiny,
        planner=StageBudget(steps=3, batch_size=8, lr=1e-3, warmup=1),
        executor=StageBudget(steps=3, batch_size=8, lr=1e-3, warmup=1),
        projector=StageBudget(steps=2, batch_size=4, lr=1e-3, warmup=0, weight_decay=0.0),
        projector_examples=8,
        checkpoint_every=2,
        eval_batch_size=16,
        cd4_fraction=0.5,
    )
