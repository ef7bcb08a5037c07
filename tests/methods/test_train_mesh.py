"""A ``train.mesh`` this job's devices cannot hold is refused as that setting, before the model loads."""

from __future__ import annotations

import json

import jax
import pytest

from jaxalign.cli import main
from jaxalign.models import hf_io


def test_a_mesh_needing_more_devices_is_named_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hf_io, "model_from_tensors", lambda *_, **__: pytest.fail("the model was loaded"))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"path": str(checkpoint)},
                                  "data": {"source": str(tmp_path / "pairs.jsonl")}, "train": {"total_steps": 1}}))
    needed = 2 * jax.device_count()
    assert main(["train", "sft", "--config", str(config), f"train.mesh.fsdp={needed}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"jaxalign train: error: train.mesh: MeshConfig(1, {needed}, 1) needs {needed} devices but "
                     f"{jax.device_count()} are available; set one axis to -1 to infer it"]
    assert not (tmp_path / "out").exists()
