"""Save and load trained reward models: a transformers checkpoint of the trunk plus the head and its scale.

A reward model directory holds

- ``config.json`` + safetensors + tokenizer files: the trunk as a causal LM checkpoint (the LM head is the
  base model's, untouched by reward training), so ``load_hf`` or transformers read it;
- ``reward_head.safetensors``: the head's ``kernel [D, N]`` and ``bias [N]``;
- ``reward_model.json``: ``num_objectives``, ``pooling`` (``last`` or ``mean``), the normalisation ``gain`` and
  ``bias`` (reward = ``gain·head(h) + bias``, fitted so that samples of the reference policy score mean 0 / std 1,
  as OpenAI's lm-human-preferences does), the objective names and free-form metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
                      gain: float = 1.0, bias: float = 0.0, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``reward_model`` to ``out_dir``.

    Args:
        reward_model: the trained model.
        lm: a causal LM of the same architecture (the base the reward model was built from); its trunk
            is overwritten with the reward model's and it is exported with :func:`save_hf`.
        tokenizer: saved beside the weights when given.
        gain, bias: the normalisation of the raw head output.
        metadata: recorded in ``reward_model.json`` (e.g. dimension names, the training run).
    """
    out = Path(out_dir)
    nnx.update(lm.model if hasattr(lm, "model") else lm.transformer, nnx.state(reward_model.backbone))
    save_hf(lm, lm.config, out, tokenizer)
    head = reward_model.reward_head
    save_file({"kernel": np.asarray(head.kernel[...], np.float32), "bias": np.asarray(head.bias[...], np.float32)},
              str(out / HEAD_FILE))
    meta = {"num_objectives": head.num_objectives, "pooling": head.pooling, "gain": float(gain), "bias": float(bias),
            "metadata": dict(metadata or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


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
