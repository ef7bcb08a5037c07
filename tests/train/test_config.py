"""Configs validate themselves, resolve the mesh and round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxalign.train import CheckpointConfig, LogConfig, MeshConfig, OptimizerConfig, TrainConfig


@pytest.mark.parametrize(("config", "devices", "shape"), [
    (MeshConfig(), 8, (1, 8, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=-1, fsdp=2, tensor=4), 8, (1, 2, 4)),
    (MeshConfig(data=2, fsdp=4, tensor=1), 8, (2, 4, 1)),
    (MeshConfig(), 1, (1, 1, 1)),
])
def test_mesh_sizes_are_inferred(config, devices, shape):
    assert config.resolve(devices).shape == shape


@pytest.mark.parametrize(("config", "devices", "message"), [
    (MeshConfig(data=3, fsdp=-1), 8, "does not divide"),
    (MeshConfig(data=2, fsdp=2, tensor=1), 8, "needs 4 devices but 8"),
])
def test_mesh_that_cannot_cover_the_devices_raises(config, devices, message):
    with pytest.raises(ValueError, match=message):
        config.resolve(devices)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: MeshConfig(data=-1, fsdp=-1), "at most one axis"),
    (lambda: MeshConfig(tensor=0), "MeshConfig.tensor"),
    (lambda: OptimizerConfig(schedule="exponential"), "OptimizerConfig.schedule"),
    (lambda: OptimizerConfig(learning_rate=1e-3, final_learning_rate=1e-2), "final_learning_rate"),
    (lambda: OptimizerConfig(warmup_steps=-1), "warmup_steps"),
    (lambda: OptimizerConfig(max_grad_norm=0.0), "max_grad_norm"),
    (lambda: CheckpointConfig(save_every_steps=0), "save_every_steps"),
    (lambda: CheckpointConfig(directory=""), "directory"),
    (lambda: LogConfig(every_steps=0), "every_steps"),
    (lambda: TrainConfig(total_steps=0), "total_steps"),
    (lambda: TrainConfig(total_steps=5, micro_batches=True), "micro_batches"),
    (lambda: TrainConfig(total_steps=5, on_nonfinite="ignore"), "on_nonfinite"),
    (lambda: TrainConfig(total_steps=5, mesh={"data": 1}), "TrainConfig.mesh"),
])
def test_invalid_values_raise_naming_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(("options", "message"), [
    ({"schedule": "cosine", "restarts": 2}, r"OptimizerConfig\.restarts=2 is used only by schedule "
                                            r"cosine_with_restarts; schedule 'cosine' has no cycles"),
    ({"schedule": "linear", "restarts": 3}, r"restarts=3 is used only by schedule cosine_with_restarts"),
    ({"schedule": "constant", "restarts": 2}, r"restarts=2 is used only by schedule cosine_with_restarts"),
    ({"schedule": "constant", "final_learning_rate": 1e-6}, r"OptimizerConfig\.final_learning_rate=1e-06 is used "
                                                            r"only by the decaying schedules \(linear, cosine, "
                                                            r"cosine_with_restarts\); schedule 'constant' stays"),
    ({"schedule": "constant", "decay_steps": 10}, r"OptimizerConfig\.decay_steps=10 is used only by the decaying"),
    ({"momentum": 0.9}, r"OptimizerConfig\.momentum=0\.9 is used only by optimizer sgd; adamw's first moment is b1"),
    ({"name": "sgd", "b1": 0.8}, r"OptimizerConfig\.b1=0\.8 is used only by optimizer adamw; sgd takes momentum"),
    ({"name": "sgd", "eps": 1e-6}, r"OptimizerConfig\.eps=1e-06 is used only by optimizer adamw"),
])
def test_a_setting_the_schedule_or_optimizer_ignores_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(learning_rate=1e-5, **options)


@pytest.mark.parametrize("options", [
    {"schedule": "cosine_with_restarts", "restarts": 2, "final_learning_rate": 1e-6, "decay_steps": 10},
    {"schedule": "linear", "final_learning_rate": 1e-6, "decay_steps": 10},
    {"schedule": "cosine", "restarts": 1},
    {"schedule": "constant", "warmup_steps": 5},
    {"name": "sgd", "momentum": 0.9},
])
def test_settings_the_schedule_uses_are_accepted(options):
    OptimizerConfig(learning_rate=1e-5, **options)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig(total_steps=5).seed = 1


def test_json_round_trip():
    config = TrainConfig(total_steps=100, seed=7, micro_batches=4, on_nonfinite="skip",
                         optimizer=OptimizerConfig(learning_rate=3e-4, schedule="cosine_with_restarts", restarts=3),
                         mesh=MeshConfig(data=2, fsdp=2, tensor=2),
                         checkpoint=CheckpointConfig(directory="/tmp/run", save_every_seconds=600),
                         log=LogConfig(directory="/tmp/logs", wandb_project="alignment"))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"TrainConfig.optimizer: unknown key\(s\) \['lr'\]"):
        TrainConfig.from_dict({"total_steps": 5, "optimizer": {"lr": 0.1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['steps'\]"):
        TrainConfig.from_dict({"steps": 5})
