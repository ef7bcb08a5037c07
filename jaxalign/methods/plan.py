"""``jaxalign plan``: what a run needs per device, from abstract shapes, before anything is loaded.

::

    jaxalign plan --config sentiment --method dpo model.lora="{rank: 16, alpha: 32}" model.quantize.type=nf4 \\
        --model-config llama-3-8b/config.json --device h100-80gb --mesh fsdp=8

The method's real training step (the :class:`~jaxalign.train.TrainStep` a run builds: its objective, its frozen
reference, its optimizer, micro-batches and mesh) is lowered and compiled by XLA for the run's model, batch and
sequence length from shapes alone: the model is built under ``nnx.eval_shape`` from its Hugging Face
``config.json`` (a checkpoint directory's, ``--model-config``'s, or the embedded default's GGUF metadata), no weight
is read and no parameter allocated. The compiled program's memory analysis gives the activations and temporaries
of one device; the state's and the weights' shards give the rest. The mesh is emulated on CPU devices (``--mesh
fsdp=8`` compiles the 8-device program here), so a plan for a GPU or TPU slice runs on a laptop.

PPO and GRPO (:mod:`jaxalign.methods.plan_online`) run an iteration of three programs, each compiled the same way:
the rollout engine's sampling loop with its KV cache, the no-grad scoring pass and the update step on a minibatch
of the iteration's rows; the plan reports each phase with what stays resident through all of them (the critic,
the reference, a reward model, the sampler's copy of the weights), and its total is the largest phase::

    jaxalign plan --config sentiment_ppo reward="{function: vader}" loss.critic=separate \\
        --model-config llama-3-8b/config.json --device h100-80gb --mesh fsdp=8 model.param_dtype=bfloat16

Figures are bytes per device. ``fits`` compares the total with the device's memory less a reserve
(:data:`RESERVE`) for the runtime, the compiled code and fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

from jaxalign.methods.plan_parts import (  # noqa: F401 (abstract_model, model_config: part of this module's API)
    Plan,
    _shard_bytes,
    _tree_bytes,
    _weights_bytes,
    abstract_model,
    model_config,
)

# Memory per device, bytes (as sold: GB = 1e9); --device-memory takes any other.
DEVICES = {"h100-80gb": 80e9, "h200": 141e9, "a100-40gb": 40e9, "a100-80gb": 80e9, "v5e": 16e9, "v5p": 95e9}
RESERVE = 0.10  # of the device's memory: the runtime, the program, fragmentation
PLANNED_METHODS = ("sft", "dpo", "ppo", "grpo")
GiB = 2**30


# --- the step ----------------------------------------------------------------------------------------------------


def _synthetic(kind: str, rows: int, length: int):
    """``rows`` examples of ``kind`` whose every sequence is ``length`` tokens (half prompt): the longest batch."""
    import numpy as np

    from jaxalign.data.tokenize import TokenizedDataset, TokenizedExample
    from jaxalign.data.truncation import TokenSequence

    prompt = length // 2
    sequence = TokenSequence(np.ones(length, np.int32), prompt)
    other = TokenSequence(np.concatenate([np.ones(prompt, np.int32), np.full(length - prompt, 2, np.int32)]), prompt)
    sides = (sequence,) if kind == "sft" else (sequence, other)
    return TokenizedDataset(kind=kind, layout=() if kind == "sft" else (2,),
                            examples=[TokenizedExample(sequences=sides) for _ in range(rows)], pad_token_id=0)


def _step_parts(config, model_config):
    """``(model, objective, references, dataset, trainable)`` of the run's step, all abstract."""
    import numpy as np
    from flax import nnx

    from jaxalign.methods import dpo, sft
    from jaxalign.methods.common import pair_layout

    lora = config.model.lora is not None
    model = abstract_model(model_config, config, lora=lora)
    trainable = nnx.LoRAParam if lora else nnx.Param
    rows = config.data.batch_size
    if config.method == "sft":
        # The abstract model already holds its quantised base and adapters: sft.build must not add them again.
        no_lora = dataclasses.replace(config, model=dataclasses.replace(config.model, lora=None, quantize=None))
        model, objective, references, dataset, _ = sft.build(no_lora, model, None, _synthetic("sft", rows,
                                                                                           config.data.max_length))
        return model, objective, references, dataset, trainable
    options = config.loss.objective_options()
    loss_type = options.pop("loss_type")
    objective = dpo.dpo_objective(loss_type=loss_type, reference=config.reference,
                                  contrastive=config.loss.contrastive, **options)
    dataset = pair_layout(_synthetic("preference", rows, config.data.max_length), model,
                          shared_prompt=config.loss.shared_prompt)
    references = None
    if config.reference == "model":
        references = {"ref": abstract_model(model_config, config, lora=False)}
    elif config.reference == "precomputed":
        dataset = dataset.with_values("ref_logps", np.zeros((rows, 2), np.float32))
    return model, objective, references, dataset, trainable


def plan_run(config, model_config, *, model_name: str = "model") -> Plan:
    """Lower and compile ``config``'s training step for ``model_config`` from shapes alone; bytes per device.

    The process must hold the mesh's devices (``config.train.mesh``; emulated CPU devices do).
    """
    import time

    import jax
    import numpy as np
    from flax import nnx

    from jaxalign.methods.common import training_batches
    from jaxalign.models.quantized import QuantizedWeight
    from jaxalign.train.mesh import batch_shard_count, make_mesh
    from jaxalign.train.optimizer import make_optimizer
    from jaxalign.train.step import TrainStep

    if config.method not in PLANNED_METHODS:
        raise ValueError(f"method {config.method}: jaxalign plan covers the methods {', '.join(PLANNED_METHODS)}; "
                         f"{config.method} is not planned yet")
    if config.method in ("ppo", "grpo"):
        from jaxalign.methods.plan_online import plan_online

        return plan_online(config, model_config, model_name=model_name)
    mesh = make_mesh(config.train.mesh)
    _check_batch_splits(config, batch_shard_count(mesh))
    model, objective, references, dataset, trainable = _step_parts(config, model_config)
    batch = next(iter(training_batches(config.data, dataset, shuffle=False)))
    batch = {key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype) for key, value in dict(batch).items()}
    step = TrainStep(objective, model, make_optimizer(config.train.optimizer, config.train.total_steps), mesh=mesh,
                     trainable=trainable, micro_batches=config.train.micro_batches, references=references)
    start = time.perf_counter()
    compiled = step.lower(batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state = step.abstract_state()
    batch_shards = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch_bytes = sum(_shard_bytes(value, batch_shards) for value in batch.values())
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    frozen_float = nnx.All(nnx.Param, nnx.Not(trainable))
    return Plan(method=config.method, model=model_name, mesh=dict(mesh.shape),
                batch={key: list(value.shape) for key, value in batch.items()},
                quantized_base=_weights_bytes(model, mesh, QuantizedWeight),
                frozen_weights=_weights_bytes(model, mesh, frozen_float),
                trained_weights=_tree_bytes(state.params), optimizer_state=_tree_bytes(state.opt_state),
                reference=_tree_bytes(step.references), batch_bytes=batch_bytes,
                temporaries=int(memory.temp_size_in_bytes), total=int(total), compile_seconds=round(seconds, 1))


def _check_batch_splits(config, batch_shards: int) -> None:
    """The step's check (:class:`~jaxalign.train.TrainStep` refuses such a batch at its first step) made before the
    compile, which would otherwise fail on the batch's sharding without naming a setting."""
    splits = config.train.micro_batches * batch_shards
    if config.data.batch_size % splits:
        raise ValueError(f"data.batch_size {config.data.batch_size} does not split over train.micro_batches "
                         f"({config.train.micro_batches}) x the mesh's batch shards (data x fsdp = {batch_shards}): "
                         f"make it a multiple of {splits}")


# --- advice ------------------------------------------------------------------------------------------------------


def advice(plan: Plan, config, memory: float) -> list[str]:
    """Changes that would bring ``plan`` under ``memory`` bytes, each with its estimated total (the sharded parts
    divide by the mesh, the activations by the micro-batches; estimates, not compiled)."""
    if plan.phases:
        from jaxalign.methods.plan_online import advice as online_advice

        return online_advice(plan, config, memory * (1 - RESERVE))
    usable = memory * (1 - RESERVE)
    sharded = plan.quantized_base + plan.frozen_weights + plan.trained_weights + plan.optimizer_state + plan.reference
    ideas = []
    fsdp = plan.mesh.get("fsdp", 1) * plan.mesh.get("data", 1) * plan.mesh.get("tensor", 1)
    for factor in (2, 4, 8):
        estimate = plan.total - sharded + sharded / factor
        if estimate <= usable:
            ideas.append(f"--mesh fsdp={fsdp * factor} (weights and optimizer state over {fsdp * factor} devices): "
                         f"about {estimate / GiB:.1f} GiB")
            break
    spec = config.model
    if spec.quantize is None:
        base = plan.frozen_weights + plan.reference
        bits = 4.127 / (8 * {"float32": 4, "bfloat16": 2, "float16": 2}[spec.param_dtype])
        estimate = plan.total - base * (1 - bits) if spec.lora is not None else None
        if spec.lora is None:
            ideas.append("model.lora={rank: 16, alpha: 32} with model.quantize.type=nf4 (QLoRA: only adapters "
                         "and their optimizer state train; the base in 4.1 bits a weight)")
        elif estimate is not None:
            ideas.append(f"model.quantize.type=nf4 (the frozen base in 4.1 bits a weight): about "
                         f"{estimate / GiB:.1f} GiB")
    if plan.temporaries > 0.2 * plan.total:
        micro = config.train.micro_batches
        rows = config.data.batch_size // micro
        if rows > 1:
            estimate = plan.total - plan.temporaries / 2
            ideas.append(f"train.micro_batches={2 * micro} (half the rows per forward pass): about "
                         f"{estimate / GiB:.1f} GiB")
        if spec.remat != "full":
            ideas.append("model.remat=full (each layer's activations recomputed in the backward pass)")
    return ideas


def report(plan: Plan, config, memory: float | None, device: str | None) -> str:
    mesh = ",".join(f"{axis}={size}" for axis, size in plan.mesh.items() if size > 1) or "one device"
    micro = f", {config.train.micro_batches} micro-batches" if config.train.micro_batches > 1 else ""
    if plan.phases:
        shapes = plan.rollout
        what = (f"{config.data.batch_size} prompts x {shapes['samples']} samples, {shapes['prompt_length']} + "
                f"{shapes['new_tokens']} tokens, minibatches of {shapes['minibatch']} rows{micro}"
                + (f" (each prompt once for its {shapes['group']} responses)" if shapes.get("group") else ""))
    else:
        what = f"batch {config.data.batch_size} x {config.data.max_length} tokens{micro}"
    lines = [f"jaxalign plan: {plan.method} on {plan.model}, mesh {mesh}, {what}"
             f" (compiled in {plan.compile_seconds:.0f} s); per device:"]
    for name, value in plan.rows():
        lines.append(f"  {name:38} {value / GiB:9.2f} GiB")
    if plan.phases:
        labels = {"sampling": "sampling (prefill + decode loop)", "scoring": "scoring (no-grad pass)",
                  "update": "update (train step on a minibatch)"}
        lines.append("  phases, each with all of the above that is resident (temporaries of its program):")
        for name, value in plan.phases.items():
            lines.append(f"    {labels[name]:36} {value / GiB:9.2f} GiB "
                         f"({plan.phase_temporaries.get(name, 0) / GiB:.2f})")
        peak = max(plan.phases, key=plan.phases.get)
        lines.append(f"  {f'total (the {peak} phase)':38} {plan.total / GiB:9.2f} GiB")
    else:
        lines.append(f"  {'total (compiled program)':38} {plan.total / GiB:9.2f} GiB")
    if memory is not None:
        usable = memory * (1 - RESERVE)
        name = f"{device} ({memory / GiB:.1f} GiB)" if device else f"{memory / GiB:.1f} GiB"
        if plan.total <= usable:
            lines.append(f"fits: {plan.total / GiB:.1f} GiB of {name}, {100 * plan.total / memory:.0f} % "
                         f"({RESERVE:.0%} kept for the runtime)")
        else:
            ideas = advice(plan, config, memory)
            lines.append(f"does not fit: {plan.total / GiB:.1f} GiB needed, {usable / GiB:.1f} GiB usable on {name}"
                         + ("; what would: " + "; ".join(ideas) if ideas else ""))
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------------------


def parse_memory(text: str) -> float:
    """``24GiB``, ``80GB``, ``16e9`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"--device-memory {text!r}: expected a size such as 24GiB, 80GB or 16e9 (bytes)")
    units = {None: 1, "gib": GiB, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40, "tb": 1e12}
    value = float(match.group(1)) * units[(match.group(2) or "").lower() or None]
    if value <= 0:
        raise ValueError(f"--device-memory {text!r}: must be positive")
    return value


def parse_mesh(text: str | None) -> dict[str, int]:
    """``--mesh fsdp=8`` / ``data=2,fsdp=4``: every axis explicit (the plan emulates exactly these devices)."""
    from jaxalign.models.sharding import MESH_AXES

    sizes = {axis: 1 for axis in MESH_AXES}
    if text is None:
        return sizes
    given = set()
    for item in text.split(","):
        name, equals, value = (part.strip() for part in item.partition("="))
        if not equals or name not in MESH_AXES or name in given:
            raise ValueError(f"--mesh: {item.strip()!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}, "
                             "each once (e.g. --mesh fsdp=8)")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: the size of {name} must be a positive int, got {value!r}")
        sizes[name] = int(value)
        given.add(name)
    return sizes


def planned_mesh(text: str | None, configured):
    """The :class:`~jaxalign.train.config.MeshConfig` to plan for: ``--mesh``, else the config's ``train.mesh``
    (a ``-1`` axis on one device). A ``train.mesh`` set beside ``--mesh`` must agree with it: a plan for other
    devices than the run's would mislead."""
    from jaxalign.train.config import MeshConfig

    if text is None:
        if -1 not in configured.shape:
            return configured
        try:
            return configured.resolve(1)
        except ValueError:
            raise ValueError(f"train.mesh ({_describe_mesh(configured)}) infers an axis from the device count, which "
                             "a plan does not know: give the devices with --mesh (e.g. --mesh data=2,fsdp=4)") from None
    mesh = MeshConfig(**parse_mesh(text))
    if configured != MeshConfig() and not _agrees(configured, mesh):
        raise ValueError(f"--mesh {text} and train.mesh ({_describe_mesh(configured)}) disagree: give the mesh once "
                         "(--mesh alone, or train.mesh alone)")
    return mesh


def _agrees(configured, mesh) -> bool:
    """Whether ``configured`` (maybe with a ``-1`` axis) is ``mesh`` on ``mesh``'s devices."""
    try:
        return configured.resolve(math.prod(mesh.shape)) == mesh
    except ValueError:
        return False


def _describe_mesh(mesh) -> str:
    from jaxalign.models.sharding import MESH_AXES

    return ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, mesh.shape, strict=True))


def add_plan_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "plan", help="memory per device of a training run, compiled from shapes (no weights loaded)",
        description="Lower and compile a run's training step (PPO, GRPO: its sampling loop, scoring pass and update) "
                    "from abstract shapes and print what each device holds (weights quantised and not, adapters, "
                    "optimizer state, reference, critic, reward model, KV cache, activations), and whether it fits "
                    "a device (docs/models.md).")
    parser.add_argument("--config", required=True, help="a preset name or a YAML file (as jaxalign train)")
    parser.add_argument("--method", choices=PLANNED_METHODS, help="the method (default: the config's)")
    parser.add_argument("--model-config", metavar="CONFIG_JSON",
                        help="a Hugging Face config.json (or a directory holding one) giving the model's shapes; "
                             "default: model.path's")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--device", choices=sorted(DEVICES), help="the device to fit")
    device.add_argument("--device-memory", metavar="SIZE", help="the device memory to fit, e.g. 24GiB")
    parser.add_argument("--mesh", metavar="AXIS=SIZE,...", help="the devices, e.g. fsdp=8 or data=2,fsdp=4 "
                                                                "(emulated here; default: train.mesh, one device "
                                                                "for its -1 axis)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(run=run_plan)


CHILD_VARIABLE = "JAXALIGN_PLAN_DEVICES"  # set in the child that emulates the mesh's devices


def emulated_environment(count: int) -> dict[str, str]:
    """The environment of a process whose JAX starts with ``count`` CPU devices (and their collectives' threads)."""
    from jaxalign.cpu_devices import DEVICE_COUNT_FLAG, collective_environment

    environ = {key: value for key, value in os.environ.items() if key not in ("PJRT_NPROC", "NPROC")}
    flags = DEVICE_COUNT_FLAG.sub("", environ.get("XLA_FLAGS", "")).strip()
    environ.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={count}".strip(),
                   JAX_NUM_CPU_DEVICES=str(count), JAX_PLATFORMS="cpu", **{CHILD_VARIABLE: str(count)})
    environ.update(collective_environment(environ))
    return environ


def _argv(args) -> list[str]:
    """``jaxalign plan``'s arguments as given (for the child that emulates the devices)."""
    argv = ["--config", args.config]
    for option in ("method", "model_config", "device", "device_memory", "mesh"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv + (["--json"] if args.json else []) + list(args.overrides)


def _in_child(args, count: int) -> int:
    """Run this plan in a child process whose JAX has ``count`` CPU devices (this one's backend started with
    fewer); it gets SIGTERM if this process dies."""
    import subprocess

    command = [sys.executable, "-m", "jaxalign.methods.plan", str(os.getpid()), *_argv(args)]
    return subprocess.run(command, env=emulated_environment(count)).returncode


def _tie_to_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util
        import signal

        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PDEATHSIG
        if os.getppid() != parent:
            raise SystemExit(75)


def run_plan(args) -> int:
    import jax

    from jaxalign.methods import recipe

    memory = DEVICES[args.device] if args.device else (parse_memory(args.device_memory) if args.device_memory else None)
    config = recipe.load_run_config(args.config, args.overrides, method=args.method)  # bad settings named here
    mesh = planned_mesh(args.mesh, config.train.mesh)
    count = math.prod(mesh.shape)
    if len(jax.devices()) != count or jax.default_backend() != "cpu":
        if os.environ.get(CHILD_VARIABLE) == str(count):
            raise ValueError(f"--mesh needs {count} CPU devices; JAX started with {len(jax.devices())} "
                             f"{jax.default_backend()} device(s)")
        return _in_child(args, count)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, mesh=mesh))
    spec = config.model
    architecture = model_config(spec, args.model_config)
    name = args.model_config or spec.path or "SmolLM2-135M-Instruct (embedded)"
    result = plan_run(config, architecture, model_name=str(name))
    if args.json:
        print(json.dumps({**result.to_dict(), "device_memory": memory,
                          "fits": None if memory is None else result.total <= memory * (1 - RESERVE)}, indent=2))
    else:
        print(report(result, config, memory, args.device))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # the child of _in_child: python -m jaxalign.methods.plan PARENT_PID ARGS...
    import argparse

    _tie_to_parent(int(sys.argv[1]))
    commands = argparse.ArgumentParser(prog="jaxalign").add_subparsers()
    add_plan_command(commands)
    child_args = commands.choices["plan"].parse_args(sys.argv[2:])
    try:
        sys.exit(run_plan(child_args))
    except (OSError, ValueError) as error:  # as the jaxalign command reports them: one line
        print(f"jaxalign plan: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
