"""A live ``jaxalign serve`` app on loopback (uvicorn in a thread) over a tiny random Llama with the word-level
ChatML tokenizer, and the official ``openai`` client pointed at it."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import pytest

from jaxalign.serve.app import create_app
from jaxalign.serve.command import build_served, persistent_compilation_cache
from tests.models.conftest import make_hf_model
from tests.test_cli import tiny_tokenizer

MODEL = "tiny"
MAX_MODEL_LEN = 48
START_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "tiny_llama"
    make_hf_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


# The servers' bound on a request: a hang's, not a speed test's. Their steps compile on first use (no warm-up), and
# with two cores shared by the other tests a burst of new shapes kept a request past 60 s (a 408).
REQUEST_TIMEOUT_S = 600.0


def serve_args(model, **overrides) -> argparse.Namespace:
    options = dict(model=None if model is None else str(model), served_model_name=MODEL, host="127.0.0.1", port=0,
                   max_batch=32, max_model_len=MAX_MODEL_LEN, max_queue=64, request_timeout=REQUEST_TIMEOUT_S,
                   prefill_tokens=2048, prefill_wait=0,
                   no_prefix_cache=False, no_warmup=True, doctor=None, preference_weights=None, alpha=1.0, beta=0.5,
                   mesh=None, reward_model=None, reward_dimension_weights=None, reward_batch_size=8)
    options.update(overrides)
    return argparse.Namespace(**options)


@contextlib.contextmanager
def running_server(args):
    """Yields ``(base_url, served)`` of a server on an ephemeral loopback port; stops it afterwards."""
    # No persistent compilation cache while a server runs (tests/train/conftest.py turns it on for the session),
    # as in `jaxalign serve` after its warm-up: see persistent_compilation_cache.
    with persistent_compilation_cache(None):
        served = build_served(args)
        with running_app(create_app(served), served) as url:
            yield url, served


@contextlib.contextmanager
def running_app(app, served):
    """Starts ``served``'s scheduler and ``app`` under uvicorn on an ephemeral loopback port; yields the base URL."""
    import uvicorn

    served.scheduler.start()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (server.started and server.servers):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        served.scheduler.stop()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint)) as (url, served):
        yield url, served


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
