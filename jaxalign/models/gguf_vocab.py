"""A transformers tokenizer as GGUF tokenizer metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

Two kinds of vocabulary have a GGUF spelling, read from the tokenizer's own ``tokenizer.json``:

- **byte-level BPE** (GPT-2, Llama 3, Qwen2, SmolLM): ``tokenizer.ggml.model = "gpt2"``, the tokens in id
  order, the merges, and ``tokenizer.ggml.pre``, the name llama.cpp gives the text split that precedes BPE
  (:func:`pre_tokenizer_name`: GPT-2's regex, Llama 3's, Qwen2's, or SmolLM's digits-then-GPT-2);
- **sentencepiece-style BPE with byte fallback** (Llama 2, Mistral): ``"llama"``, the tokens, scores from the
  merge order (llama.cpp's sentencepiece tokenizer merges the best-scoring pair first) and the merges.

Token types: added tokens marked special are CONTROL (llama.cpp matches them whole and hides them when
decoding), other added tokens USER_DEFINED, ``<0xNN>`` byte tokens BYTE, the unknown token UNKNOWN; ids the
model has beyond the tokenizer (a vocabulary padded to a round size) are written as ``[PAD<id>]`` UNUSED.
Whether BOS/EOS are added is read by encoding a word with and without special tokens, so it is what the
tokenizer really does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclasses.dataclass
class GGUFVocab:
    """What :meth:`add_to` writes into a ``gguf.GGUFWriter``."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _split_regex(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if step.get("type") == "Split" else None


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level tokenizer's ``pre_tokenizer`` (tokenizer.json).

    Raises:
        ValueError: a split llama.cpp has no name for (it would tokenise the text differently).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    steps = [] if pre_tokenizer is None else (pre_tokenizer.get("pretokenizers")
                                              if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _split_regex(steps[0])
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no llama.cpp "
                     "name this exporter knows (GPT-2's, Llama 3's, Qwen2's or SmolLM's split), so llama.cpp would "
                     "split text differently")


def _merge_strings(merges: list) -> list[str]:
    # A space inside a merge part is written as U+0120 + 256 as llama.cpp's converter does (its merges are
    # space-separated pairs).
    def part(text: str) -> str:
        return "".join(chr(ord(c) + 256) if c == " " else c for c in text)

    return [merge if isinstance(merge, str) else f"{part(merge[0])} {part(merge[1])}" for merge in merges]


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS (compared with and without special tokens)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(with_special) - len(plain)
    add_bos = extra > 0 and bos is not None and with_special[0] == bos and with_special[1:1 + len(plain)] == plain
    add_eos = extra > 0 and eos is not None and with_special[-1] == eos and not (add_bos and extra == 1)
    return bool(add_bos), bool(add_eos)


def tokenizer_metadata(tokenizer, *, vocab_size: int, config=None) -> GGUFVocab:
    """The GGUF tokenizer metadata of ``tokenizer`` for a model of ``vocab_size`` ids.

    Raises:
        ValueError: a tokenizer kind GGUF has no spelling for (word-level, unigram, WordPiece), a
            pre-tokenizer llama.cpp does not know, or more tokens than the model has ids.
    """
    backend = _backend_json(tokenizer)
    model = backend.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export: a {model.get('type')} tokenizer has no GGUF spelling this exporter writes "
                         "(byte-level BPE or sentencepiece BPE with byte fallback)")
    byte_fallback = bool(model.get("byte_fallback"))
    tokens: list[str | None] = [None] * vocab_size
    types = [1] * vocab_size  # NORMAL
    for token, token_id in model["vocab"].items():
        if token_id >= vocab_size:
            raise ValueError(f"GGUF export: token {token!r} has id {token_id}, but the model has {vocab_size} ids")
        tokens[token_id] = token
        if byte_fallback and _BYTE_TOKEN.fullmatch(token):
            types[token_id] = 6  # BYTE
    for added in backend.get("added_tokens") or []:
        token_id = added["id"]
        if token_id >= vocab_size:
            raise ValueError(f"GGUF export: added token {added['content']!r} has id {token_id}, but the model has "
                             f"{vocab_size} ids")
        tokens[token_id] = added["content"]
        types[token_id] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    for token_id, token in enumerate(tokens):
        if token is None:  # ids the model has and the tokenizer never produces
            tokens[token_id], types[token_id] = f"[PAD{token_id}]", 5  # UNUSED
    merges = _merge_strings(model.get("merges") or [])

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id < vocab_size:
            special_ids[kind] = int(token_id)
    if "eos" not in special_ids and config is not None and getattr(config, "eos_token_ids", ()):
        special_ids["eos"] = int(config.eos_token_ids[0])
    add_bos, add_eos = _adds(tokenizer)
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None

    if byte_fallback:
        unk = special_ids.get("unk")
        if unk is not None and types[unk] == 1:
            types[unk] = 2  # UNKNOWN
        rank = {merge.replace(" ", ""): index for index, merge in enumerate(merges)}
        scores = [0.0 if types[i] != 1 else -float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
        return GGUFVocab("llama", "default", tokens, types, merges, scores, special_ids, add_bos, add_eos,
                         _adds_space_prefix(backend), template)
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    return GGUFVocab("gpt2", pre, tokens, types, merges, None, special_ids, add_bos, add_eos, None, template)


def _adds_space_prefix(backend: dict[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer puts ``▁`` before the text (a Prepend normalizer or a Metaspace
    pre-tokenizer that prepends)."""
    def steps(node):
        if not node:
            return []
        return node.get("normalizers") or node.get("pretokenizers") or [node]

    for step in steps(backend.get("normalizer")):
        if step.get("type") == "Prepend":
            return True
    for step in steps(backend.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    return False
