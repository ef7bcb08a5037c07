"""Save and load trained reward models: a transformers checkpoint of the trunk plus the head and its scale.

A reward model directory holds

- ``config.json`` + safetensors + tokenizer files: the trunk as a causal LM checkpoint (the LM head is the
  base model's, untouched by reward training), so ``load_hf`` or transformers read it;
- ``reward_head.safetensors``: the head's ``kernel [D, N]`` and ``bias [N]``;
- ``reward_model.json``: ``num_objectives``, ``pooling`` (``last`` or ``mean``), the normalisation ``gain`` and
  ``bias`` (reward = ``gain·head(h) + bias``, fitted so that samples of the reference policy score mean 0 / std 1,
  as OpenAI's lm-human-preferences does; one number, or one per objective), for a multi-objective head the
  default ``dimension_weights`` that combine its normalised objectives into one reward, and free-form metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxalign.models.heads import RewardModel
from jaxalign.models.hf_io import load_hf, save_hf

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


def save_reward_model(out_dir: str | Path, reward_model: RewardModel, lm, tokenizer=None, *,
                      gain: float | Sequence[float] = 1.0, bias: float | Sequence[float] = 0.0,
                      dimension_weights: Sequence[float] | None = None,
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``reward_model`` to ``out_dir``.

    Args:
        reward_model: the trained model.
        lm: a causal LM of the same architecture (the base the reward model was built from); its trunk
            is overwritten with the reward model's and it is exported with :func:`save_hf`.
        tokenizer: saved beside the weights when given.
        gain, bias: the normalisation of the raw head output: a number, or one per objective of a
            multi-objective head.
        dimension_weights: a multi-objective head's default weights combining its normalised objectives into
            one reward (what ``jaxalign eval`` and PPO use unless told otherwise); None for a scalar head.
        metadata: recorded in ``reward_model.json`` (e.g. dimension names, the training run).

    Raises:
        ValueError: ``gain``, ``bias`` or ``dimension_weights`` do not fit the head, or are not finite; nothing
            is written.
    """
    head = reward_model.reward_head
    objectives = head.num_objectives
    meta = {"num_objectives": objectives, "pooling": head.pooling,
            "gain": _per_objective(gain, "gain", objectives), "bias": _per_objective(bias, "bias", objectives),
            "metadata": dict(metadata or {})}
    if dimension_weights is not None:
        if objectives is None:
            raise ValueError("save_reward_model: dimension_weights are for a multi-objective head; this one is scalar")
        meta["dimension_weights"] = _per_objective(list(dimension_weights), "dimension_weights", objectives,
                                                   scalar=False)
    out = Path(out_dir)
    nnx.update(lm.model if hasattr(lm, "model") else lm.transformer, nnx.state(reward_model.backbone))
    save_hf(lm, lm.config, out, tokenizer)
    save_file({"kernel": np.asarray(head.kernel[...], np.float32), "bias": np.asarray(head.bias[...], np.float32)},
              str(out / HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _per_objective(value, name: str, objectives: int | None, *, scalar: bool = True) -> float | list[float]:
    """``value`` as JSON: a finite float, or a list of one finite float per objective."""
    array = np.asarray(value, np.float64)
    shapes = ([()] if scalar else []) + ([(objectives,)] if objectives is not None else [])
    if array.shape not in shapes or not np.isfinite(array).all():
        expected = " or ".join("a number" if shape == () else f"{shape[0]} numbers" for shape in shapes)
        raise ValueError(f"save_reward_model: {name} must be {expected} (finite), got {value!r}")
    return float(array) if array.ndim == 0 else array.tolist()


def load_reward_model(checkpoint_dir: str | Path, **policy) -> tuple[RewardModel, dict[str, Any]]:
    """``(reward_model, info)`` from a directory written by :func:`save_reward_model`.

    ``info`` is ``reward_model.json``: ``gain``, ``bias``, ``num_objectives``, ``pooling``, ``metadata``. Files
    written before ``pooling`` existed read the last token, as they were trained.

    Raises:
        FileNotFoundError: the directory lacks ``reward_model.json`` or ``reward_head.safetensors`` (it is not
            a reward model, e.g. a plain policy export).
        ValueError: the head's shapes do not fit the trunk.
    """
    directory = Path(checkpoint_dir)
    for name in (META_FILE, HEAD_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; {directory} is not a reward model saved by "
                                    "jaxalign (train one with `jaxalign train reward`)")
    info = json.loads((directory / META_FILE).read_text())
    lm = load_hf(directory, **policy)
    info.setdefault("pooling", "last")
    model = RewardModel(lm, num_objectives=info["num_objectives"], pooling=info["pooling"], rngs=nnx.Rngs(0))
    tensors = load_file(str(directory / HEAD_FILE))
    head = model.reward_head
    for name in ("kernel", "bias"):
        expected = getattr(head, name)[...].shape
        if tensors[name].shape != expected:
            raise ValueError(f"{directory / HEAD_FILE}: tensor {name!r} has shape {tensors[name].shape}, the model "
                             f"needs {expected}")
        getattr(head, name)[...] = tensors[name]
    return model, info
