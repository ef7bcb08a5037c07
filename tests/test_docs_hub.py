"""docs/hub.md's commands, run as written (bash, the ``jaxalign`` console script, a working directory of their own)
against a Hub cache in huggingface_hub's layout that holds a tiny model under the id the page names, with the Hub
off (``HF_HUB_OFFLINE=1``, ``HF_HOME`` at that cache). Only ``hf download`` (it needs the Hub) does not run, and
the page's ``HF_HOME=/shared/hf-home`` is pointed at the test's cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models.conftest import make_hf_model
from tests.models.hub_cache import add_snapshot
from tests.test_cli import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "hub.md"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAIN, TAGGED = "a" * 40, "b" * 40
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def bash_blocks() -> list[str]:
    return BASH.findall(PAGE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with SFT data, and HF_HOME beside it with ``REPO`` at ``main`` and tag ``v1.0``."""
    root = tmp_path_factory.mktemp("hub_docs")
    for seed, commit, refs in ((0, MAIN, ("main",)), (1, TAGGED, ("v1.0",))):
        checkpoint = root / f"checkpoint{seed}"
        make_hf_model("llama", seed=seed).save_pretrained(checkpoint)
        tiny_tokenizer().save_pretrained(checkpoint)
        add_snapshot(root / "hf-home", REPO, checkpoint, commit, refs)
    work = root / "work"
    work.mkdir()
    rows = [{"prompt": [{"role": "user", "content": "is the sky blue ?"}],
             "completion": [{"role": "assistant", "content": "Hi . sky blue ."}]}] * 16
    (work / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def run_block(block: str, root: Path) -> subprocess.CompletedProcess:
    script = "\n".join(line for line in block.splitlines() if not line.startswith("hf download"))
    script = script.replace("/shared/hf-home", str(root / "hf-home"))
    env = {**os.environ, "HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           # the commands compile the same tiny programs: a private persistent cache loads them after the first
           "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=root / "work", env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    return result


def model_source(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["model_source"]


def test_the_offline_commands_run_from_the_cache(workdir):
    [block] = [b for b in bash_blocks() if "HF_HUB_OFFLINE=1" in b]
    result = run_block(block, workdir)
    assert result.stdout.strip(), "generate printed no response"
    assert model_source(workdir / "work/runs/sft_hub") == {
        "hub_id": REPO, "revision": "main", "commit": MAIN,
        "snapshot": str(workdir / "hf-home/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots" / MAIN)}
    assert (workdir / "work/runs/sft_hub/export/model.safetensors").is_file()


def test_the_revision_command_runs_at_the_tag(workdir):
    [block] = [b for b in bash_blocks() if "@v1.0" in b]
    assert run_block(block, workdir).stdout.strip(), "generate printed no response"
