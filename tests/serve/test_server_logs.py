"""What ``jaxalign serve`` says while it runs: the warm-up as a progress bar on stderr, and an access log line per
request (method, path, status, seconds, tokens) unless ``--no-access-log``."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from jaxalign.serve.children import spawn, stop
from tests.serve.conftest import MAX_MODEL_LEN, MODEL, running_server, serve_args
from tests.serve.test_server import CHAT, HTTP_TIMEOUT, chat_body, metric, post, sse_events, wait_until

ACCESS = "jaxalign.serve.access"
# client "METHOD target HTTP/x" status seconds[, tokens: P prompt, C completion]
LINE = re.compile(r'^127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.1" (?P<status>\d{3}) '
                  r'(?P<seconds>\d+\.\d{3}) s(?:, tokens: (?P<prompt>\d+) prompt, (?P<completion>\d+) completion)?$')
START_TIMEOUT_S = 600  # a fresh process compiling the warm-up's shapes on a busy 2-core machine


def access_lines(records) -> list[dict]:
    lines = []
    for record in records:
        if record.name == ACCESS:
            match = LINE.match(record.getMessage())
            assert match, record.getMessage()
            lines.append(match.groupdict())
    return lines


def wait_for_lines(caplog, count: int) -> list[dict]:
    """The access lines so far, once there are ``count`` (a line is written just after its response's last byte)."""
    wait_until(lambda: len(access_lines(caplog.records)) >= count, f"{count} access log lines")
    return access_lines(caplog.records)


@pytest.fixture
def access_caplog(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS)
    return caplog


def test_every_request_gets_an_access_log_line(server, access_caplog):
    url, _ = server
    whole = post(url, CHAT, chat_body(max_tokens=5, temperature=0)).json()
    with httpx.stream("POST", url + CHAT, json=chat_body(max_tokens=4, n=2, stream=True, temperature=0),
                      timeout=HTTP_TIMEOUT) as response:
        streamed = [e for e in sse_events(response) if e != "[DONE]" and e.get("usage")][-1]["usage"]
    refused = post(url, CHAT, chat_body(n=0))
    assert refused.status_code == 400
    assert httpx.get(url + "/v1/nope?x=1%0Aforged", timeout=HTTP_TIMEOUT).status_code == 404
    assert httpx.get(url + "/health", timeout=HTTP_TIMEOUT).status_code == 200
    lines = wait_for_lines(access_caplog, 5)
    assert [(line["method"], line["target"], line["status"]) for line in lines] == [
        ("POST", CHAT, "200"), ("POST", CHAT, "200"), ("POST", CHAT, "400"), ("GET", "/v1/nope?x=1%0Aforged", "404"),
        ("GET", "/health", "200")]
    counts = [(line["prompt"], line["completion"]) for line in lines]
    usage = whole["usage"]
    assert counts[:2] == [(str(usage["prompt_tokens"]), str(usage["completion_tokens"])),
                          (str(streamed["prompt_tokens"]), str(streamed["completion_tokens"]))]
    assert counts[2:] == [(None, None)] * 3, "no tokens where nothing was generated"
    assert all(0 <= float(line["seconds"]) < HTTP_TIMEOUT for line in lines)


def test_no_access_log_turns_it_off(tiny_checkpoint, access_caplog):
    with running_server(serve_args(tiny_checkpoint, no_access_log=True)) as (url, served):
        assert post(url, CHAT, chat_body(max_tokens=2)).status_code == 200
        assert httpx.get(url + "/health", timeout=HTTP_TIMEOUT).status_code == 200
        # Counted for /metrics just before the log would be written, with nothing in between: once /health is
        # counted, its line was not written. Then the same server with the log on logs the next request.
        wait_until(lambda: metric(url, "jaxalign_requests_total", endpoint="/health") == 1, "/health to be counted")
        served.access_log = True
        assert httpx.get(url + "/v1/models", timeout=HTTP_TIMEOUT).status_code == 200
        lines = wait_for_lines(access_caplog, 1)
    assert [line["target"] for line in lines] == ["/v1/models"]


# --- the command, as a user runs it ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(checkpoint: Path, tmp_path: Path, *options: str):
    """``jaxalign serve --model <dir> ...`` started from the checkpoint's parent directory (a relative path), its
    compilation cache under ``tmp_path``; ``(process, base URL, stderr file)`` once it answers ``/health``."""
    port = free_port()
    log = tmp_path / "stderr.txt"
    command = [str(Path(sys.executable).parent / "jaxalign"), "serve", "--model", checkpoint.name,
               "--served-model-name", MODEL, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), *options]
    with open(log, "w") as stderr:
        process = spawn(command, cwd=checkpoint.parent, env={**os.environ, "HOME": str(tmp_path)},
                        stdout=stderr, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            stop(process)
            pytest.fail(f"jaxalign serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"jaxalign serve did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def test_the_command_shows_the_warm_up_and_logs_each_request(tiny_checkpoint, tmp_path):
    process, url, log = serve(tiny_checkpoint, tmp_path, "--max-batch", "2")
    try:
        started = log.read_text()
        bar = [part for part in re.split(r"[\r\n]", started) if part.startswith("compiling serving shapes:")]
        assert bar, started[-2000:]
        total = re.search(r"\| \d+/(\d+) \[", bar[-1])[1]
        assert "100%" in bar[-1] and f"| {total}/{total} [" in bar[-1], bar[-1]
        assert started.index("compiling serving shapes") < started.index(f"serving {MODEL} on http://")
        usage = post(url, CHAT, chat_body(max_tokens=3)).json()["usage"]
        line = (f'"POST {CHAT} HTTP/1.1" 200 \\d+\\.\\d{{3}} s, tokens: {usage["prompt_tokens"]} prompt, '
                f'{usage["completion_tokens"]} completion')
        wait_until(lambda: re.search(f"{ACCESS} INFO 127\\.0\\.0\\.1:\\d+ {line}", log.read_text()),
                   "the request's access log line")
    finally:
        stop(process)


def test_the_command_without_access_log(tiny_checkpoint, tmp_path):
    process, url, log = serve(tiny_checkpoint, tmp_path, "--no-warmup", "--no-access-log")
    try:
        assert post(url, CHAT, chat_body(max_tokens=3)).status_code == 200
        assert httpx.get(url + "/v1/nope", timeout=HTTP_TIMEOUT).status_code == 404
    finally:
        stop(process)  # SIGTERM: uvicorn finishes the requests in flight first, so any line would be written
    text = log.read_text()
    assert f"serving {MODEL} on http://" in text and ACCESS not in text, text[-2000:]
    assert "compiling serving shapes" not in text
