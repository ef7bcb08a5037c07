"""``jaxalign serve`` and oversized requests: a body over ``--max-request-bytes`` is refused with a 413 before it is
read whole, and a long prompt below it is parsed and tokenised off the event loop, so the streams already running
keep their pace."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time
import urllib.parse

import httpx
import openai
import pytest

from jaxalign.serve.protocol import DEFAULT_MAX_REQUEST_BYTES
from tests.serve.conftest import MODEL, running_server, serve_args
from tests.serve.test_server import CHAT, HI, HTTP_TIMEOUT, chat_body, metric, post, slow_steps, wait_until

# 2.1 MB of chat request: the tiny word-level tokenizer takes about 2.4 s for it on an idle 2-core machine.
HUGE = "lorem ipsum dolor " * 117650
STREAM_LEN = 128  # the tiny model's positions: a stream of 119 tokens after the 9 of the prompt
STEP_S = 0.1  # the pace of the stream's decode steps
MAX_GAP_S = 0.5
OVERLAP_S = 1.5  # the stream must run at least this long after the huge request was sent
LIMIT = 4096  # --max-request-bytes of the small-limit server
ANSWER_S = 10  # a refusal comes this fast, though the body it refuses never ends


# --- a long prompt does not stop the event loop -----------------------------------------------------------


@pytest.fixture(scope="module")
def long_streams(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint, max_batch=4, max_model_len=STREAM_LEN)) as (url, served):
        yield url, served


def stream_times(url: str, body: dict, times: list) -> None:
    """Append the arrival time of each server-sent event of a streamed request to ``times``."""
    with httpx.stream("POST", url + CHAT, json=body, timeout=HTTP_TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())


def test_a_huge_prompt_does_not_stall_running_streams(long_streams):
    url, served = long_streams
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": HUGE}], max_tokens=1)).encode()
    assert 2_000_000 < len(huge) < DEFAULT_MAX_REQUEST_BYTES, "under the default limit: it is read and tokenised"
    stream = chat_body(max_tokens=STREAM_LEN - 9, ignore_eos=True, stream=True, temperature=0)
    with slow_steps(served, STEP_S):
        stream_times(url, stream, [])  # compiles every shape the stream runs at (a compile would stall it)
        times: list[float] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            streaming = pool.submit(stream_times, url, stream, times)
            wait_until(lambda: len(times) >= 3, "the stream to run")
            sent = time.monotonic()
            refused = post(url, CHAT, content=huge)
            answered = time.monotonic()
            streaming.result(timeout=HTTP_TIMEOUT)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded", refused.text
    assert int(re.search(r"the prompt has (\d+) tokens", refused.json()["error"]["message"])[1]) > 700_000, \
        "it was tokenised whole"
    assert times[-1] - sent >= OVERLAP_S, "the stream ended too soon after the huge request to measure anything"
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)
            if later > sent and earlier < answered]
    assert max(gaps) < MAX_GAP_S, (f"the stream stopped for {max(gaps):.2f} s while the huge request was read and "
                                   f"tokenised ({answered - sent:.2f} s)")


# --- --max-request-bytes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limit(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint, max_request_bytes=LIMIT)) as (url, served):
        yield url, served


def raw_request(url: str, head: str, parts: list[bytes]) -> tuple[int, dict, dict]:
    """Send ``head`` (a request line and headers) and ``parts`` of a body on a raw socket, never finishing the body;
    ``(status, headers, JSON body)`` of the response that comes anyway."""
    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=ANSWER_S) as connection:
        connection.sendall(head.encode() + b"\r\n")
        for part in parts:
            connection.sendall(part)
        received = b""
        deadline = time.monotonic() + ANSWER_S
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _length(received):
            if time.monotonic() > deadline:
                raise AssertionError(f"no whole response within {ANSWER_S} s: {received[:200]!r}")
            try:
                more = connection.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no response within {ANSWER_S} s: the server waits for the body") from None
            if not more:
                break
            received += more
    header_block, _, body = received.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def _length(received: bytes) -> int:
    for line in received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n"):
        if line.lower().startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 30


def assert_too_large(status: int, body: dict) -> None:
    assert status == 413, body
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "request_too_large", None)
    assert f"over this server's limit of {LIMIT} bytes (--max-request-bytes)" in error["message"]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(small_limit):
    url, _ = small_limit
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            "Content-Length: 10000000\r\n")
    status, _, body = raw_request(url, head, [b'{"model": "tiny", "messages": ['])  # the rest never comes
    assert_too_large(status, body)
    assert "has 10000000 bytes" in body["error"]["message"]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(small_limit):
    url, _ = small_limit
    head = f"POST {CHAT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    kilobyte = b"x" * 1024
    chunks = [b"%x\r\n%s\r\n" % (len(kilobyte), kilobyte)] * (LIMIT // 1024 + 2)  # and never the last chunk
    status, _, body = raw_request(url, head, chunks)
    assert_too_large(status, body)


def test_clients_read_the_413_and_the_server_goes_on(small_limit):
    url, _ = small_limit
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)
    before = metric(url, "jaxalign_requests_total", endpoint=CHAT, status="413")
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "sky " * LIMIT}])
    assert refused.value.status_code == 413 and refused.value.code == "request_too_large"

    def chunked():  # httpx sends a generator without a Content-Length
        for _ in range(LIMIT // 512 + 1):
            yield b" " * 512

    streamed = httpx.post(url + CHAT, content=chunked(), headers={"content-type": "application/json"},
                          timeout=HTTP_TIMEOUT)
    assert_too_large(streamed.status_code, streamed.json())
    assert metric(url, "jaxalign_requests_total", endpoint=CHAT, status="413") == before + 2
    # A body of exactly the limit is read (padded with JSON whitespace), whole or chunked.
    body = json.dumps(chat_body(max_tokens=2)).encode()
    exact = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(exact) == LIMIT
    assert post(url, CHAT, content=exact).status_code == 200
    assert httpx.post(url + CHAT, content=iter([exact[:1000], exact[1000:]]), headers={"content-type":
                      "application/json"}, timeout=HTTP_TIMEOUT).status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].message.content


def test_the_default_limit_is_a_few_megabytes(server):
    url, served = server
    assert served.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 4 * 2**20
    over = b" " * (DEFAULT_MAX_REQUEST_BYTES + 1)
    response = post(url, CHAT, content=over)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
