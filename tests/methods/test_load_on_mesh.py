"""A run's model loads onto its training mesh (an 8-device CPU mesh, in a subprocess): each weight is placed with
its sharding as it is read and quantised there, so no device holds the whole float base, and the run's first loss
is the one-device run's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from jaxalign.cli import main
from tests.conftest import host_devices_env
from tests.methods.test_pipeline import PAIRS
from tests.methods.test_quantized_runs import LORA, NF4

ROOT = Path(__file__).resolve().parents[2]

# Records every quantised weight's placement as the run's loading made it, then trains one step.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from flax import nnx
    from jaxalign import models
    from jaxalign.cli import main

    placed, quantize = [], models.quantize_model

    def recording(model, config):
        quantize(model, config)
        for weight in jax.tree.leaves(nnx.state(model, models.QuantizedWeight)):
            placed.append({"devices": len(weight.sharding.device_set), "shape": list(weight.shape),
                           "shard": list(weight.addressable_shards[0].data.shape)})
        return model

    models.quantize_model = recording
    status = main(sys.argv[1:])
    print("PLACED " + json.dumps({"status": status, "devices": jax.device_count(), "placed": placed}))
""")


def run_config(tmp_path: Path, checkpoint: Path, out: str) -> list[str]:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for p, c, r in PAIRS))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"path": str(checkpoint)}, "export": False,
                                  "data": {"source": str(pairs), "batch_size": 2, "max_length": 32, "shuffle": False},
                                  "train": {"total_steps": 1, "log": {"progress_bar": False, "tensorboard": False}}}))
    return ["train", "dpo", "--config", str(config), f"output_dir={tmp_path / out}", NF4, LORA]


def test_a_quantised_base_loads_onto_the_mesh_in_blocks(checkpoint, tmp_path):
    argv = run_config(tmp_path, checkpoint, "mesh")
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *argv, "train.mesh.fsdp=2", "train.mesh.tensor=4"],
                            cwd=ROOT, env=host_devices_env(8, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("PLACED ", 1)[1])
    assert report["status"] == 0 and report["devices"] == 8
    assert report["placed"] and all(weight["devices"] == 8 for weight in report["placed"])
    assert any(weight["shard"] != weight["shape"] for weight in report["placed"]), "each device holds a block"

    assert main(run_config(tmp_path, checkpoint, "one")) == 0
    first = [json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for out in ("mesh", "one")]
    assert abs(first[0] - first[1]) < 1e-5, first
