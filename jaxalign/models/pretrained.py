"""One entry point for "a model and its tokenizer from a path or a Hub id": what ``jaxalign train``'s
``model.path`` (and ``teacher``, ``doctor.patient``), ``jaxalign generate --model``, ``jaxalign serve --model`` and
``jaxalign eval --policy/--reference`` all accept. A local path always wins over a Hub id of the same spelling
(:mod:`jaxalign.models.hub`)."""

from __future__ import annotations

from pathlib import Path

from jaxalign.models.gguf_io import default_model_path, load_gguf
from jaxalign.models.hf_io import load_hf
from jaxalign.models.hub import is_hub_id, resolve

#: A checkpoint directory needs at least one of these beside its weights for AutoTokenizer to load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_pretrained(path: str | Path | None, *, source: str = "path", revision: str | None = None, **policy):
    """``(causal LM, tokenizer)`` from a Hugging Face checkpoint directory (weights and tokenizer files), a
    ``.gguf`` file, a Hugging Face Hub id (``org/name``, resolved in the Hub's cache: :func:`jaxalign.models.hub.
    resolve`), or the embedded default SmolLM2-135M-Instruct when ``path`` is None.

    Args:
        path: the directory, file or Hub id (``org/name@revision`` pins a revision too); None for
            :func:`default_model_path`. An existing local path wins over a Hub id of the same spelling.
        source: where the path came from (a config field, a command-line option), named in the errors.
        revision: a Hub id's branch, tag or commit (None: ``main``); refused with a local path.
        **policy: ``param_dtype``, ``compute_dtype``, ``remat``, ``attention`` (see
            :class:`~jaxalign.models.ModelConfig`).

    Raises:
        FileNotFoundError: no such path or Hub model (or offline and not cached), or a directory without
            tokenizer files.
        PermissionError: a gated or private Hub model without a token that may read it.
        ValueError: a path that is neither a directory nor a ``.gguf`` file.
    """
    if revision is not None and (path is None or Path(path).exists()):
        raise ValueError(f"{source}: a revision ({revision!r}) applies to a Hugging Face Hub id, not to "
                         f"{'the embedded default' if path is None else 'the local path ' + str(path)}")
    if path is None:
        return load_gguf(default_model_path(), **policy)
    if is_hub_id(path):
        snapshot = resolve(str(path), revision=revision, source=source)
        source, path = f"{source} {snapshot.repo_id}: the Hub snapshot", snapshot.path
    elif revision is not None:
        raise ValueError(f"{source}: a revision applies to a Hugging Face Hub id; {path} is spelled as a local path")
    location = Path(path)
    if location.is_file() and location.suffix == ".gguf":
        return load_gguf(location, **policy)
    if location.is_dir():
        if not any((location / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"{source} {location} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                    "save them beside the weights with tokenizer.save_pretrained")
        from transformers import AutoTokenizer  # the import is slow; only a directory needs it

        return load_hf(location, **policy), AutoTokenizer.from_pretrained(str(location))
    if not location.exists():
        raise FileNotFoundError(f"{source} {path}: no such file or directory")
    raise ValueError(f"{source} {path}: expected a checkpoint directory or a .gguf file")
