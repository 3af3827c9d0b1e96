"""Tiny tokenizers, models and a synthetic task for the projector / pipeline / CLI tests.

Tokenizers are word-level, built with the ``tokenizers`` library from a small vocabulary and
written with ``PreTrainedTokenizerFast.save_pretrained`` (the HF layout), then loaded back from
that directory. The color task: "what is the color of <sym> <word> ?" -> the color of ``<sym>``.
The executor's tokenizer knows neither the symbols nor the distractor words (they read as
[UNK]), and the planner's plan text is the same for every question ("Plan Plan ..."), so the
answer reaches the executor only through the planner's hidden states.
"""

from __future__ import annotations

import contextlib

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hybridkernels.models import ARExecutor, Transformer, TransformerConfig
from hybridkernels.models.planner import DiffusionPlanner

SPECIAL = ["[PAD]", "[UNK]", "[EOS]", "[MASK]"]
TEMPLATE_WORDS = "Question : what is the color of ? Answer Plan".split()
SYMBOLS = [f"s{i}" for i in range(6)]
COLORS = ["red", "blue", "green", "gold", "pink", "gray"]
DISTRACTORS = [f"w{i}" for i in range(16)]
PLANNER_KWARGS = {"gen_length": 4, "steps": 4}


@contextlib.contextmanager
def one_torch_thread():
    """Tiny matmuls run far faster on one CPU thread than on several contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def word_tokenizer(words, directory):
    """A word-level tokenizer over ``SPECIAL + words``, saved to ``directory`` HF-style and loaded
    back from there."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", mask_token="[MASK]"
    )
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def tiny_model(tok, *, causal: bool, seed: int, std: float = 0.02, d: int = 64) -> Transformer:
    """A 2-layer random Transformer sized for ``tok``: the executor with GQA and head_dim 64 (a head
    dim of the compiled decode kernels), the planner with 2 heads of 32."""
    config = TransformerConfig(
        vocab_size=len(tok),
        hidden_size=d,
        intermediate_size=2 * d,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1 if causal else 2,
        head_dim=64 if causal else 32,
        causal=causal,
        family="llama" if causal else "llada",
        mask_token_id=None if causal else tok.mask_token_id,
        eos_token_ids=(tok.eos_token_id,),
        initializer_range=std,
        tie_word_embeddings=False,
    )
    model = Transformer(config)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return model.eval()


def force_plan_token(planner: DiffusionPlanner, token: int, scale: float = 10.0) -> None:
    """Make ``token`` the planner's prediction at every masked position, whatever the prompt: its LM
    head row points along the final hidden state of a lone mask token, which masked positions of a
    small-weight model stay close to."""
    model = planner.model
    with torch.no_grad():
        h = model(torch.full((1, 1), planner.mask_id), compute_logits=False).hidden[0, 0]
        model.lm_head.weight[token] = scale * h / h.norm()


class ColorTask:
    """Tokenizers, planner, executor and the train / held-out split of the color task."""

    def __init__(self, tmp_path, seed: int = 0, held_out: int = 10):
        self.planner_tokenizer = word_tokenizer(
            TEMPLATE_WORDS + SYMBOLS + COLORS + DISTRACTORS, tmp_path / "planner_tok"
        )
        self.executor_tokenizer = word_tokenizer(TEMPLATE_WORDS + COLORS, tmp_path / "executor_tok")
        self.planner = DiffusionPlanner(tiny_model(self.planner_tokenizer, causal=False, seed=seed + 1))
        force_plan_token(self.planner, self.planner_tokenizer.convert_tokens_to_ids("Plan"))
        self.executor = ARExecutor(tiny_model(self.executor_tokenizer, causal=True, seed=seed + 2, std=0.2))
        pairs = [(a, b) for a in range(len(SYMBOLS)) for b in range(len(DISTRACTORS))]
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        examples = [self.example(*pairs[i]) for i in order]
        self.train, self.held_out = examples[:-held_out], examples[-held_out:]

    @staticmethod
    def example(a: int, b: int) -> dict:
        return {"question": f"what is the color of {SYMBOLS[a]} {DISTRACTORS[b]} ?", "answer": COLORS[a]}

    def tokenizers(self) -> dict:
        return {"planner_tokenizer": self.planner_tokenizer, "executor_tokenizer": self.executor_tokenizer}
