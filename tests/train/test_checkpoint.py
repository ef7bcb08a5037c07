"""Orbax checkpoints: exact restore of every part of the state (also after asynchronous saves whose
arrays the next step donates), data positions, save policies, retention and recorded metadata."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxalign.train import CheckpointConfig, Checkpointer, TrainConfig, TrainStep, make_optimizer, run_metadata
from jaxalign.train.checkpoint import CONFIG_FILE
from tests.train.tiny import BATCH, SGD, TINY, TinyBatches, sft_objective, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()  # alive for the module, so that the shared step can init() again


@pytest.fixture(scope="module")
def step(model):
    return TrainStep(sft_objective, model, make_optimizer(SGD, total_steps=8))


def checkpointer(directory, step, **options) -> Checkpointer:
    config = TrainConfig(total_steps=8, seed=11, checkpoint=CheckpointConfig(directory=str(directory), **options))
    return Checkpointer(config.checkpoint, run_metadata(config, step.mesh, model_config=TINY,
                                                         extra={"experiment": "unit"}))


def test_async_saves_restore_exactly_although_the_next_step_donates_the_state(tmp_path, step):
    manager = checkpointer(tmp_path, step, save_every_steps=2, async_save=True)
    data, state, saved = TinyBatches(BATCH, seed=5), step.init(0), {}
    for index in range(1, 6):
        state, _ = step(state, next(data))
        if manager.should_save(index):
            saved[index] = (jax.device_get(state), data.state_dict())
            manager.save(index, state, data)  # returns before the files are written; the next step donates `state`
    manager.wait()
    assert manager.all_steps() == [2, 4] == sorted(saved)
    for index, (expected, position) in saved.items():
        restored = manager.restore(step.abstract_state(), step=index)
        assert restored.step == index and restored.data_position == position
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), expected)
        assert jax.tree.map(lambda x: x.sharding, restored.state) == step.state_shardings
    # The restored state trains on: restore, then the same batch, gives the same next state.
    restored = manager.restore(step.abstract_state())
    assert restored.step == 4
    replay = TinyBatches(BATCH, seed=5)
    replay.load_state_dict(restored.data_position)
    resumed, _ = step(restored.state, next(replay))
    np.testing.assert_array_equal(jax.device_get(resumed.rng), jax.device_get(state.rng))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(state.params))


def test_keeps_the_last_k(tmp_path, step):
    manager = checkpointer(tmp_path, step, save_every_steps=1, keep_last=2, async_save=False)
    state = step.init(0)
    for index in range(1, 5):
        assert manager.should_save(index)
        manager.save(index, state)
    manager.wait()
    assert manager.all_steps() == [3, 4]
    assert not manager.save(4, state)  # an existing step is never overwritten


def test_step_and_time_policies(tmp_path, step):
    every_three = checkpointer(tmp_path / "steps", step, save_every_steps=3)
    assert [every_three.should_save(index) for index in range(1, 7)] == [False, False, True, False, False, True]
    no_policy = checkpointer(tmp_path / "none", step, save_every_steps=None)
    assert not any(no_policy.should_save(index) for index in range(1, 7))
    hourly = checkpointer(tmp_path / "hourly", step, save_every_steps=None, save_every_seconds=3600, async_save=False)
    assert hourly.should_save(1)  # nothing saved yet
    hourly.save(1, step.init(0))
    assert not hourly.should_save(2)
    always = checkpointer(tmp_path / "always", step, save_every_steps=None, save_every_seconds=0, async_save=False)
    always.save(1, step.init(0))
    assert always.should_save(2)


def test_metadata_records_config_seed_versions_and_devices(tmp_path, step):
    manager = checkpointer(tmp_path, step, async_save=False)
    manager.save(3, step.init(0), TinyBatches(2))
    manager.wait()
    beside = json.loads((tmp_path / CONFIG_FILE).read_text())
    restored = manager.restore(step.abstract_state())
    for metadata in (beside, restored.metadata):
        assert TrainConfig.from_dict(metadata["config"]).checkpoint.directory == str(tmp_path)
        assert metadata["seed"] == 11
        assert metadata["model_config"]["vocab_size"] == TINY.vocab_size
        assert metadata["extra"] == {"experiment": "unit"}
        assert metadata["versions"]["jax"] == jax.__version__ and "jaxalign" in metadata["versions"]
        # the backend the tests run on (cpu here, gpu on a GPU machine): the metadata names what trained
        assert metadata["devices"] | {"kind": None} == {
            "platform": jax.default_backend(), "kind": None, "count": 1, "process_count": 1,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}
    assert restored.metadata["step"] == 3 and "saved_at" in restored.metadata
    assert restored.data_position == {"position": 0, "shard_index": 0}


def test_restore_errors(tmp_path, step):
    manager = checkpointer(tmp_path, step, async_save=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        manager.restore(step.abstract_state())
    manager.save(1, step.init(0), TinyBatches(2))
    data_file = tmp_path / "1" / "data" / "metadata"
    # Per-process positions (TinyBatches keeps its shard index) cannot be shared out to another process count.
    data_file.write_text(json.dumps({"process_count": 2, "positions": [{"position": 1, "shard_index": 0},
                                                                      {"position": 1, "shard_index": 1}]}))
    with pytest.raises(ValueError, match="data positions of 2 process.*differ.*same process count"):
        manager.restore(step.abstract_state())
    # A global position, the same on every process (as BatchIterator's), resumes under any process count.
    data_file.write_text(json.dumps({"process_count": 2, "positions": [{"position": 1}, {"position": 1}]}))
    assert manager.restore(step.abstract_state()).data_position == {"position": 1}
    with pytest.raises(ValueError, match="checkpointing is disabled"):
        Checkpointer(CheckpointConfig(directory=None), {})
