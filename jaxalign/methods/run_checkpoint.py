"""A run's model at one of its Orbax checkpoints, rebuilt for export: what ``jaxalign export`` reads from a run that
has no ``export/`` yet (stopped, still training, or run with ``export: false``).

The model is built as the run built it, from the resolved config in ``run.json``: the base weights of
``model.path`` (or the embedded default), LoRA adapters when the run trained them, and then the trained parameters
of the checkpoint (the ``params`` of its train state: float32 masters, LoRA adapters only for a LoRA run) put in
place. The optimizer state is never read. The writers then merge the adapters as the run's own export does.

Runs whose trained model is a causal LM are restored: ``sft``, ``distill``, ``dpo``, ``kto``, ``grpo`` and
``ppo`` (its policy; the critic is not exported). A reward model's normalisation and a TFPO doctor's card are
written when their run finishes, so those runs export from their ``export/`` only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.methods.common import RUN_FILE, load_pretrained, with_lora
from jaxalign.methods.recipe import RunConfig

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"  # jaxalign.train.checkpoint's item holding the TrainState
# Method -> where its causal LM sits in the trained module (PPO trains an ActorCritic: policy + value head).
RESTORABLE = {"sft": (), "distill": (), "dpo": (), "kto": (), "grpo": (), "ppo": ("policy",)}


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """A run directory's checkpoint to export (``newest``: the step was not asked for)."""

    run_dir: Path
    config: RunConfig
    step: int
    newest: bool

    @property
    def base(self) -> str | None:
        """The base model the run started from (``model.path``; None: the embedded default)."""
        return self.config.model.path

    def describe(self) -> str:
        newest = " (its newest)" if self.newest else ""
        return f"{self.config.method} run {self.run_dir} at checkpoint step {self.step}{newest}"


def checkpoint_steps(directory: Path) -> list[int]:
    """The finished checkpoint steps in ``directory``, oldest first (Orbax renames a step's directory to its number
    only once every file is written; unfinished ones carry a temporary suffix, damaged ones ``.damaged``)."""
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit() and path.is_dir())


def run_checkpoint(run_dir: Path, *, step: int | None = None, given: str | None = None) -> RunCheckpoint:
    """The checkpoint of ``run_dir`` to export, checked without loading any weights.

    Raises:
        ValueError: no checkpoint (or not ``step``), a ``run.json`` that is not a run's, or a method whose model
            is finished only by its run (reward models, TFPO doctors), each with what to do.
    """
    given = given or str(run_dir)
    run_file = run_dir / RUN_FILE
    try:
        config = RunConfig.from_dict(json.loads(run_file.read_text())["config"], where=str(run_file))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{run_file}: not a run's record ({type(error).__name__}: {error}), so the model its "
                         "checkpoints hold cannot be rebuilt") from None
    if config.method not in RESTORABLE:
        finished_by = {"reward": "its reward normalisation (gain, bias)", "tfpo": "its doctor card"}
        raise ValueError(f"{given} is a {config.method} run without an export/ directory: "
                         f"{finished_by.get(config.method, 'its export')} is written when the run finishes, so "
                         "it exports from export/ only; finish it with `jaxalign train ... --resume`")
    steps = checkpoint_steps(run_dir / CHECKPOINTS_DIR)
    if not steps:
        raise ValueError(f"{given} is a run with neither an export/ directory nor a finished checkpoint in "
                         f"{run_dir / CHECKPOINTS_DIR}: nothing trained to export yet")
    if step is not None and step not in steps:
        raise ValueError(f"{given}: no finished checkpoint at step {step} (the run has steps "
                         f"{', '.join(map(str, steps))})")
    return RunCheckpoint(run_dir, config, steps[-1] if step is None else step, newest=step is None)


def _restored_params(directory: Path, prefix: tuple[str, ...]) -> dict[tuple[str, ...], np.ndarray]:
    """The trained parameters under ``prefix`` of checkpoint ``directory`` (``<run>/checkpoints/<step>``), as
    ``{path: float32 array}`` (paths without the Variable's ``value`` leaf); nothing else is read."""
    import jax
    import orbax.checkpoint as ocp

    # Absolute: Orbax refuses a relative checkpoint path, and its metadata() turns that refusal into a warning and
    # no metadata, so `jaxalign export runs/x/checkpoints/3` would fail with no reason given.
    item = directory.absolute() / STATE_ITEM
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item).item_metadata
    if metadata is None:
        raise ValueError(f"{directory / STATE_ITEM}: no train state that Orbax can read (a damaged checkpoint?)")
    tree = metadata.tree
    params = tree.get("params") if isinstance(tree, dict) else None
    for key in prefix:
        params = params.get(key) if isinstance(params, dict) else None
    if not params:
        raise ValueError(f"{item}: the train state has no parameters under {'/'.join(('params', *prefix))}")
    target = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params)}
    for key in reversed(prefix):
        target = {"params": {key: target["params"]}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                      partial_restore=True))["params"]
    for key in prefix:
        restored = restored[key]
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[keys[:-1] if keys[-1] == "value" else keys] = np.asarray(value)
    return flat


def load_run_checkpoint(checkpoint: RunCheckpoint) -> tuple[Any, Any]:
    """``(causal LM, tokenizer)``: the run's model (float32, LoRA adapters unmerged) with the parameters of the
    checkpoint at ``checkpoint.step``.

    Raises:
        ValueError: the checkpoint's parameters do not fit the model rebuilt from ``run.json`` (a changed base
            model), named with the parameter; the step was removed meanwhile (a run still training keeps its
            last ``keep_last``).
    """
    config = checkpoint.config
    run_file = checkpoint.run_dir / RUN_FILE
    directory = checkpoint.run_dir / CHECKPOINTS_DIR / str(checkpoint.step)
    # Exported in float32 whatever the run computed in: the checkpoint's masters are float32.
    # As the run loaded it: its revision, and its base quantised as it trained (the adapters sit on that base).
    float32 = dataclasses.replace(config.model, param_dtype="float32", compute_dtype="float32")
    lm, tokenizer = load_pretrained(float32, source=f"{run_file}: model.path")
    lm = with_lora(lm, config)
    if not directory.is_dir():
        raise ValueError(f"{directory} was removed after the export started (the run is still training and keeps "
                         "only its newest checkpoints): export again")
    restored = _restored_params(directory, RESTORABLE[config.method])
    trained = nnx.LoRAParam if config.model.lora is not None else nnx.Param
    variables = {tuple(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    expected = {tuple(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(lm, trained))}
    missing = sorted(expected - restored.keys())
    if missing:
        raise ValueError(f"{directory}: no trained value of {'.'.join(missing[0])} ({len(missing)} parameters "
                         f"missing): the checkpoint does not hold the model {run_file} describes")
    for path, value in restored.items():
        var = variables.get(path)
        if var is None or tuple(var.shape) != value.shape:
            found = "no such parameter" if var is None else f"shape {tuple(var.shape)}"
            raise ValueError(f"{directory}: parameter {'.'.join(path)} {value.shape} does not fit the model rebuilt "
                             f"from {run_file} ({found}): was model.path changed after the run?")
        var.set_value(jnp.asarray(value, var.dtype))
    return lm, tokenizer
