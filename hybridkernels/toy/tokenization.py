"""The toy's two tokenizers, built with the ``tokenizers`` library.

Their vocabularies differ on purpose, so text mode really decodes the planner's plan and
re-tokenizes it for the executor:

* **planner** (whole numbers up to ``PLANNER_MAX_NUMBER``): ``<|pad|>`` 0, ``<|endoftext|>`` 1
  (EOS, also the response padding, as LLaDA pads answers with EOS), ``<|mdm_mask|>`` 2 (the mask
  token), ``<|unk|>`` 3, the symbols ``+-*/=,()``, then one token per number ``0 .. 99``. One token
  per number makes each equation a 5-token fact, which a tiny model learns in minutes on a CPU
  (character-level digits would need carries across positions).
* **executor** (whole numbers): ``<unk>`` 0, ``<s>`` 1 (unused BOS), ``</s>`` 2 (EOS), ``<pad>`` 3,
  the template words ``Question Plan Answer :``, the symbols ``+-*/=,()``, then one token per
  whole number ``0 .. MAX_NUMBER``.

Both drop whitespace (the pre-tokenizer splits on it) and decode by concatenation, so
``decode(encode(" 9*(6-3)")) == "9*(6-3)"``. A character either tokenizer cannot encode becomes
its UNK token; :func:`check_encodable` turns that into a ``ValueError`` naming the text.
Both save as ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, which
``transformers.AutoTokenizer.from_pretrained(dir)`` loads with pad / EOS (and the planner's mask)
set.
"""

from __future__ import annotations

import json
from pathlib import Path

PLANNER_SPECIALS = {
    "pad_token": "<|pad|>",
    "eos_token": "<|endoftext|>",
    "mask_token": "<|mdm_mask|>",
    "unk_token": "<|unk|>",
}
PLANNER_SYMBOLS = "+-*/=,()"
PLANNER_MAX_NUMBER = 99
EXECUTOR_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
EXECUTOR_WORDS = ("Question", "Plan", "Answer", ":")
EXECUTOR_SYMBOLS = "+-*/=,()"
MAX_NUMBER = 999
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _fast_tokenizer(vocab: list[str], split_regex: str, specials: dict[str, str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise AssertionError("duplicate tokens in a toy vocabulary")
    tok = Tokenizer(models.WordLevel(ids, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(split_regex), behavior="isolated")]
    )
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials.values()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials)


def build_planner_tokenizer():
    """The planner's whole-number ``PreTrainedTokenizerFast`` (vocabulary of 112)."""
    vocab = list(PLANNER_SPECIALS.values()) + list(PLANNER_SYMBOLS)
    vocab += [str(i) for i in range(PLANNER_MAX_NUMBER + 1)]
    return _fast_tokenizer(vocab, r"[0-9]+|.", PLANNER_SPECIALS)


def build_executor_tokenizer():
    """The executor's whole-number ``PreTrainedTokenizerFast`` (vocabulary of 1,016)."""
    vocab = list(EXECUTOR_SPECIALS.values()) + list(EXECUTOR_WORDS) + list(EXECUTOR_SYMBOLS)
    vocab += [str(i) for i in range(MAX_NUMBER + 1)]
    return _fast_tokenizer(vocab, r"[0-9]+|[A-Za-z]+|.", EXECUTOR_SPECIALS)


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, which
    transformers 4.x and 5.x both load) and ``special_tokens_map.json``."""
    path = Path(path)
    tokenizer.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specials = {k: getattr(tokenizer, k) for k in SPECIAL_KEYS if getattr(tokenizer, k, None) is not None}
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")


def load_tokenizer_dir(path: str | Path, *, where: str = "load_tokenizer_dir"):
    """The ``PreTrainedTokenizerFast`` saved in ``path`` (local files only; what
    ``AutoTokenizer.from_pretrained(path)`` also loads, without it reading the model's
    ``config.json``), with a ``ValueError`` naming the missing file when ``path`` lacks
    ``tokenizer.json`` or ``tokenizer_config.json``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{where}: {path} is not a directory")
    for name in TOKENIZER_FILES[:2]:
        if not (path / name).is_file():
            raise ValueError(f"{where}: {path} has no {name} (the tokenizer is missing)")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def unencodable(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` maps to its UNK token (empty when it encodes)."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.unk_token_id
    return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i == unk]


def check_encodable(tokenizer, text: str, *, where: str, what: str = "question", name: str = "") -> list[int]:
    """Token ids of ``text`` (no special tokens); ``ValueError`` naming ``what`` and ``text`` when it
    is empty or holds characters the tokenizer cannot encode (no silent UNK)."""
    if not isinstance(text, str):
        raise TypeError(f"{where}: {what} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: empty {what} {text!r}")
    bad = unencodable(tokenizer, text)
    if bad:
        label = f"the {name} tokenizer" if name else "the tokenizer"
        raise ValueError(f"{where}: {what} {text!r} has characters {label} cannot encode: {bad}")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = [
    "PLANNER_SPECIALS",
    "EXECUTOR_SPECIALS",
    "MAX_NUMBER",
    "build_executor_tokenizer",
    "build_planner_tokenizer",
    "check_encodable",
    "load_tokenizer_dir",
    "save_tokenizer",
    "unencodable",
]
