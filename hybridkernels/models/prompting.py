"""Text in and out of the pipeline: local tokenizers, prompt templates, left-padded batches.

Tokenizers are HF tokenizers (anything with ``__call__``/``encode``/``decode`` and the special
token ids), given as objects or as local directories written by ``save_pretrained``: nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class PromptTemplates:
    """``str.format`` templates of every prompt the pipeline writes.

    planner: the planner's prompt (``{question}``). latent: the executor's prompt after the latent
    prefix (``{question}``). text: the executor's prompt with the decoded plan (``{question}``,
    ``{plan}``). ar_plan: the executor's prompt to write its own plan (``{question}``); ar_answer:
    text appended after that plan before the answer (the AR->AR baseline).
    """

    planner: str = "{question}"
    latent: str = "Question: {question}\nAnswer:"
    text: str = "Question: {question}\nPlan: {plan}\nAnswer:"
    ar_plan: str = "Question: {question}\nPlan:"
    ar_answer: str = "\nAnswer:"

    def __post_init__(self):
        need = {"planner": ("question",), "latent": ("question",), "text": ("question", "plan")}
        need |= {"ar_plan": ("question",), "ar_answer": ()}
        for name, fields in need.items():
            template = getattr(self, name)
            if not isinstance(template, str):
                raise TypeError(f"PromptTemplates: {name} must be a str, got {type(template).__name__}")
            for field in fields:
                if "{" + field + "}" not in template:
                    raise ValueError(f"PromptTemplates: the {name} template must contain {{{field}}}")
            try:
                template.format(question="", plan="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"PromptTemplates: bad {name} template {template!r}: {exc}") from None


def load_tokenizer(tokenizer, *, where: str, name: str):
    """A tokenizer object, or one loaded from the local directory ``tokenizer`` (str / Path)."""
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise ValueError(
            f"{where}: {name} must be a tokenizer or a local directory, {path} is not a directory"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: cannot load {name} from {path}: {exc}") from None


def encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """Token ids of ``text`` (``special``: with the tokenizer's BOS / special tokens)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def decode(tokenizer, ids) -> str:
    """Text of ``ids`` without special tokens, stripped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def left_pad(rows: list[list[int]], *, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> int64 ``ids [B, L]`` left-padded with ``pad_id`` and bool ``mask [B, L]``."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            ids[b, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, L - len(r) :] = True
    return ids.to(device), mask.to(device)


def safe_pad_id(tokenizer, avoid: int | None) -> int:
    """A padding id (the tokenizer's pad, else EOS, else 0) that is not ``avoid`` (the planner's
    mask id may not appear in its prompts, padding included)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0, 1):
        if candidate is not None and candidate != avoid:
            return int(candidate)
    raise AssertionError("unreachable: 0 and 1 cannot both be avoided")


def encode_prompts(tokenizer, texts: list[str], *, device, avoid: int | None = None, where: str):
    """Left-padded ``(ids, mask)`` of ``texts`` (with special tokens); ``ValueError`` when a text
    encodes to nothing or to ``avoid``."""
    rows = [encode(tokenizer, t, special=True) for t in texts]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"{where}: prompt {i} ({texts[i]!r}) encodes to no tokens")
        if avoid is not None and avoid in r:
            raise ValueError(f"{where}: prompt {i} ({texts[i]!r}) contains the planner's mask token {avoid}")
    return left_pad(rows, pad_id=safe_pad_id(tokenizer, avoid), device=device)


def check_questions(where: str, questions) -> list[str]:
    """A non-empty list of strings (a single string is one question)."""
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(questions, (list, tuple)):
        raise TypeError(f"{where}: questions must be a list of strings, got {type(questions).__name__}")
    if not questions:
        raise ValueError(f"{where}: questions is empty; give at least one question")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"{where}: questions[{i}] must be a str, got {type(q).__name__}")
    return list(questions)


def vocabulary_tokenizer(config, template_words=("Question", ":", "Answer", "Plan")):
    """A word-level tokenizer over a model's whole vocabulary, for random-weight benchmarks.

    Id ``i`` is the word ``t<i>``, except pad (0), unk (1), the template words (ids 4, 5, ...),
    the config's first EOS id and its mask id. A decoded plan re-encodes to as many tokens as it
    had, so text mode costs what it would with a real tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"pad": "[PAD]", "unk": "[UNK]", "eos": "[EOS]"}
    names = [f"t{i}" for i in range(config.vocab_size)]
    names[0], names[1] = special["pad"], special["unk"]
    names[4 : 4 + len(template_words)] = list(template_words)
    names[config.eos_token_ids[0]] = special["eos"]
    if config.mask_token_id is not None:
        special["mask"] = "[MASK]"
        names[config.mask_token_id] = special["mask"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token=special["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in special.items()})
