"""Save and load LLMDoctor doctors: a transformers causal-LM checkpoint plus the TFPO value head and its card.

A doctor directory holds

- ``config.json`` + safetensors + tokenizer files: the doctor's causal LM, which ``load_pretrained``,
  ``jaxalign generate --model`` and transformers read like any other checkpoint;
- ``value_head.safetensors``: the TFPO value head's ``kernel [D, 1]`` and ``bias [1]`` (``log V(s_t)``);
- ``doctor.json``: the preference ``dimension`` the doctor was trained for (what ``--preference-weights``
  names), the behavioural faces and token-reward settings that made its training signal, and free-form
  metadata (the patient, the run).

A doctor guides a patient through log-probabilities added token by token, so the two must share a tokenizer:
:func:`check_same_tokenizer` says where they differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxalign.models.heads import CausalLMWithValueHead
from jaxalign.models.hf_io import save_hf
from jaxalign.models.pretrained import load_pretrained

VALUE_HEAD_FILE = "value_head.safetensors"
DOCTOR_FILE = "doctor.json"


def save_doctor(out_dir: str | Path, doctor: CausalLMWithValueHead, tokenizer=None, *, dimension: str,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``doctor`` (a causal LM with its TFPO value head) to ``out_dir`` for ``dimension``.

    Raises:
        TypeError: ``doctor`` has no value head (it is a plain causal LM).
        ValueError: ``dimension`` is empty.
    """
    if not isinstance(doctor, CausalLMWithValueHead):
        raise TypeError(f"save_doctor needs a CausalLMWithValueHead (the LM and its TFPO value head), got "
                        f"{type(doctor).__name__}")
    if not isinstance(dimension, str) or not dimension:
        raise ValueError(f"save_doctor: dimension must be a non-empty name, got {dimension!r}")
    out = Path(out_dir)
    save_hf(doctor.lm, doctor.lm.config, out, tokenizer)
    head = doctor.value_head
    save_file({"kernel": np.asarray(head.kernel[...], np.float32), "bias": np.asarray(head.bias[...], np.float32)},
              str(out / VALUE_HEAD_FILE))
    card = {"dimension": dimension, "metadata": dict(metadata or {})}
    (out / DOCTOR_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
    return out


def read_doctor_card(directory: str | Path, *, source: str = "doctor") -> dict[str, Any]:
    """``doctor.json`` of a doctor directory, checked: a clear error for anything that is not a doctor.

    Raises:
        FileNotFoundError: ``directory`` is missing, or lacks ``doctor.json`` / ``value_head.safetensors`` (a
            plain policy export has no value head: it was not trained with TFPO).
        ValueError: ``doctor.json`` is not a JSON object with a non-empty ``dimension``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{source} {directory}: no such directory")
    for name in (DOCTOR_FILE, VALUE_HEAD_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{source} {directory} is not a doctor: it has no {name} (a doctor is the "
                                    "export of `jaxalign train tfpo`, a causal LM with its TFPO value head)")
    try:
        card = json.loads((directory / DOCTOR_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} {directory / DOCTOR_FILE}: not valid JSON ({error})") from None
    if not isinstance(card, dict) or not isinstance(card.get("dimension"), str) or not card["dimension"]:
        raise ValueError(f"{source} {directory / DOCTOR_FILE}: needs a non-empty string field 'dimension'")
    return card


def load_doctor(directory: str | Path, *, source: str = "doctor", **policy) -> tuple[CausalLMWithValueHead, Any,
                                                                                       dict[str, Any]]:
    """``(doctor, tokenizer, card)`` from a directory written by :func:`save_doctor`.

    ``policy``: ``param_dtype``, ``compute_dtype``, ``remat``, ``attention`` as :func:`load_pretrained`.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_doctor_card`; a value head whose shapes do not fit the LM.
    """
    card = read_doctor_card(directory, source=source)
    directory = Path(directory)
    lm, tokenizer = load_pretrained(directory, source=source, **policy)
    doctor = CausalLMWithValueHead(lm, rngs=nnx.Rngs(0))
    tensors = load_file(str(directory / VALUE_HEAD_FILE))
    for name in ("kernel", "bias"):
        expected = getattr(doctor.value_head, name)[...].shape
        if name not in tensors or tensors[name].shape != expected:
            found = tensors[name].shape if name in tensors else "missing"
            raise ValueError(f"{source} {directory / VALUE_HEAD_FILE}: tensor {name!r} is {found}, the doctor's "
                             f"LM needs {expected}")
        getattr(doctor.value_head, name)[...] = tensors[name]
    return doctor, tokenizer, card


def check_same_tokenizer(patient_tokenizer, doctor_tokenizer, *, patient: str = "the patient",
                         doctor: str = "the doctor") -> None:
    """Raise unless the two tokenizers map every token to the same id (guidance adds log-probs id by id).

    Raises:
        ValueError: naming the vocabulary sizes, or the first tokens whose ids differ.
    """
    vocab_p, vocab_d = patient_tokenizer.get_vocab(), doctor_tokenizer.get_vocab()
    if vocab_p == vocab_d:
        return
    if len(vocab_p) != len(vocab_d):
        detail = f"{len(vocab_p)} tokens vs {len(vocab_d)}"
    else:
        differing = sorted(token for token in vocab_p if vocab_d.get(token) != vocab_p[token])[:3]
        detail = ", ".join(f"{token!r} is {vocab_p[token]} vs {vocab_d.get(token)}" for token in differing)
    raise ValueError(f"{patient} and {doctor} do not share a tokenizer ({detail}): guided decoding adds their "
                     "log-probabilities token id by token id, so the doctor must be trained on the patient's "
                     "tokenizer (for example a smaller model of the same family)")
