"""Loading a Hugging Face tokenizer (with its chat template) from a GGUF file, a checkpoint directory or the hub."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(source: str | Path, *, chat_template: str | None = None):
    """A ``transformers`` tokenizer: from a ``.gguf`` file, a checkpoint directory or a hub name.

    A GGUF file gives a ``PreTrainedTokenizerFast`` with the file's vocabulary, merges, special tokens and
    chat template, built without torch (:func:`jaxalign.models.gguf_io.load_gguf_tokenizer`); the embedded
    default is ``load_tokenizer(jaxalign.models.default_model_path())``. Anything else goes to
    ``transformers.AutoTokenizer.from_pretrained``.

    Args:
        source: the file, directory or hub name.
        chat_template: a Jinja chat template replacing the tokenizer's own.
    """
    path = Path(source)
    if path.suffix == ".gguf":
        # Imported here: the weight-IO module pulls in jax, which the data pipeline otherwise never needs.
        from jaxalign.models.gguf_io import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
