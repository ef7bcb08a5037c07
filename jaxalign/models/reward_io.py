"""Save and load trained reward models: a transformers checkpoint of the trunk plus the head and its scale.

A reward model directory holds

- ``config.json`` + safetensors + tokenizer files: the trunk as a causal LM checkpoint (the LM head is the
  base model's, untouched by reward training), so ``load_hf`` or transformers read it;
- ``reward_head.safetensors``: the head's ``kernel [D, N]`` and ``bias [N]`` (``kernel [H, N]`` after a hidden
  layer, whose ``up_proj.kernel [D, H]`` and ``up_proj.bias [H]`` are there too; ``N`` counts a log-variance
  output);
- ``reward_model.json``: ``num_objectives``, ``pooling`` (``last`` or ``mean``), ``head`` (``hidden``,
  ``dropout``, ``activation``, ``log_variance``: what builds the head again), the normalisation ``gain`` and
  ``bias`` (reward = ``gain·head(h) + bias``: fitted so that samples of the reference policy score mean 0 / std 1,
  as OpenAI's lm-human-preferences does, or for a model regressed on scores their std and mean, so that rewards
  come back on the scores' scale; one number, or one per objective), for a multi-objective head the
  default ``dimension_weights`` that combine its normalised objectives into one reward, and free-form metadata
  (a regression model's ``scores``: the training scores' mean, std and count).
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
    meta = {"num_objectives": objectives, "pooling": head.pooling, "head": head.settings(),
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
    save_file({name: np.asarray(value, np.float32) for name, value in _head_tensors(head).items()},
              str(out / HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _head_tensors(head) -> dict:
    """The head's weights by file name: ``kernel``, ``bias`` and, after a hidden layer, ``up_proj.*``."""
    tensors = {"kernel": head.kernel, "bias": head.bias}
    if head.up_proj is not None:
        tensors.update({"up_proj.kernel": head.up_proj.kernel, "up_proj.bias": head.up_proj.bias})
    return {name: variable[...] for name, variable in tensors.items()}


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

    ``info`` is ``reward_model.json``: ``gain``, ``bias``, ``num_objectives``, ``pooling``, ``head``, ``metadata``.
    Files written before ``pooling`` existed read the last token, and those without ``head`` have a linear head,
    as they were trained.

    Raises:
        FileNotFoundError: the directory lacks ``reward_model.json`` or ``reward_head.safetensors`` (it is not
            a reward model, e.g. a plain policy export).
        ValueError: the head's shapes do not fit the trunk, or its file lacks a tensor the head needs.
    """
    directory = Path(checkpoint_dir)
    for name in (META_FILE, HEAD_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; {directory} is not a reward model saved by "
                                    "jaxalign (train one with `jaxalign train reward`)")
    info = json.loads((directory / META_FILE).read_text())
    lm = load_hf(directory, **policy)
    info.setdefault("pooling", "last")
    settings = info.setdefault("head", {})
    unknown = sorted(set(settings) - {"hidden", "dropout", "activation", "log_variance"})
    if unknown:
        raise ValueError(f"{directory / META_FILE}: field 'head' has unknown key(s) {unknown}: written by a newer "
                         "jaxalign?")
    try:
        model = RewardModel(lm, num_objectives=info["num_objectives"], pooling=info["pooling"], rngs=nnx.Rngs(0),
                            **settings)
    except ValueError as error:
        raise ValueError(f"{directory / META_FILE}: field 'head': {error}") from None
    tensors = load_file(str(directory / HEAD_FILE))
    head = model.reward_head
    variables = {"kernel": head.kernel, "bias": head.bias}
    if head.up_proj is not None:
        variables.update({"up_proj.kernel": head.up_proj.kernel, "up_proj.bias": head.up_proj.bias})
    missing = [name for name in variables if name not in tensors]
    if missing:
        raise ValueError(f"{directory / HEAD_FILE}: no tensor {missing[0]!r}, which the head {settings} needs")
    for name, variable in variables.items():
        expected = variable[...].shape
        if tensors[name].shape != expected:
            raise ValueError(f"{directory / HEAD_FILE}: tensor {name!r} has shape {tensors[name].shape}, the model "
                             f"needs {expected}")
        variable[...] = tensors[name]
    return model, info
