"""``jaxalign serve --mesh`` as a user runs it: the command in a process of its own on four CPU devices
(``data=2, tensor=2``), asked with the official ``openai`` client, answers as the one-device server does."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jaxalign.serve.command import parse_mesh
from jaxalign.train.config import MeshConfig
from tests.conftest import host_devices_env
from tests.serve.conftest import MAX_MODEL_LEN, MODEL

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240  # loading and first compiles on 2 shared cores; the loop below is bounded by it
MESSAGES = [[{"role": "user", "content": "hello world"}], [{"role": "user", "content": "the cat sat"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "good day"}]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mesh_server(tiny_checkpoint, tmp_path_factory):
    """``(base URL, its stderr so far)`` of ``jaxalign serve --mesh data=2,tensor=2`` on 4 CPU devices."""
    port = free_port()
    log = tmp_path_factory.mktemp("mesh_server") / "stderr.txt"
    env = host_devices_env(4, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", "import sys; from jaxalign.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--port", str(port),
               "--max-model-len", str(MAX_MODEL_LEN), "--max-batch", "8", "--mesh", "data=2,tensor=2", "--no-warmup"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"jaxalign serve --mesh exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"jaxalign serve --mesh did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.mark.parametrize(("text", "config"), [
    ("tensor=4", MeshConfig(1, -1, 4)),  # fsdp takes the devices left over
    ("data=2, tensor=4", MeshConfig(2, -1, 4)),
    ("tensor=-1", MeshConfig(1, 1, -1)),  # -1 on another axis: that axis takes them, fsdp is 1
    ("data=-1,tensor=2", MeshConfig(-1, 1, 2)),
    ("fsdp=2", MeshConfig(1, 2, 1)),
])
def test_mesh_option(text, config):
    assert parse_mesh(text) == config


def test_an_inferred_axis_takes_the_devices_left_over():
    assert parse_mesh("tensor=2").resolve(8) == MeshConfig(1, 4, 2)
    assert parse_mesh("tensor=-1").resolve(8) == MeshConfig(1, 1, 8)


def ask(client, messages, **options):
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, logprobs=True,
                                              **options)
    choice = response.choices[0]
    return choice.message.content, [t.token for t in choice.logprobs.content], [t.logprob for t in
                                                                                 choice.logprobs.content]


def test_the_server_says_it_runs_on_the_mesh(mesh_server):
    _, log = mesh_server
    assert "mesh data 2 x fsdp 1 x tensor 2" in log.read_text()


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_answers_on_a_mesh_equal_the_one_device_answers(mesh_server, client, sampling):
    from openai import OpenAI

    on_mesh = OpenAI(base_url=mesh_server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
    for messages in MESSAGES:
        text, tokens, logprobs = ask(on_mesh, messages, **sampling)
        expected_text, expected_tokens, expected_logprobs = ask(client, messages, **sampling)
        assert tokens and (text, tokens) == (expected_text, expected_tokens), messages
        # Tensor-parallel products sum in another order: float32 rounding only.
        assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) <= 5e-5
