"""Small OpenAI-compatible judges on loopback for the LLM-judge tests: one that reads the answers and decides,
one biased to a position, one that answers garbage, a 429 storm, a 5xx, and one that hangs."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    """``mode``: ``"fair"`` (prefers the answer with more ``good``; a tie when equal; grades 1 + 3 × count),
    ``"first"`` (always ``[[A]]``), ``"garbage"``, ``"storm"`` (429 with Retry-After for the first
    ``failures`` tries of each request body), ``"error"`` (HTTP 503 always), ``"hang"`` (never answers a
    completion; ``/models`` answers)."""

    def __init__(self, mode: str, *, failures: int = 2):
        self.mode, self.failures = mode, failures
        self.lock = threading.Lock()
        self.requests = 0
        self.tries: dict[bytes, int] = {}
        self.bodies: list[dict] = []
        self.release = threading.Event()
        self.root: str | None = None  # what /models lists as the weights' path (vLLM's and jaxalign serve's root)
        self.created = 0

    def reply(self, body: dict) -> str:
        content = body["messages"][-1]["content"]
        if self.mode == "garbage":
            return "I cannot decide [[maybe]] ... 7/10?"
        if self.mode == "first":
            return "Both fine. [[A]]"
        if "[Assistant A's answer]" in content:
            a = re.search(r"\[Assistant A's answer\]\n(.*?)\n\[End of assistant A", content, re.S).group(1)
            b = re.search(r"\[Assistant B's answer\]\n(.*?)\n\[End of assistant B", content, re.S).group(1)
            ca, cb = a.count("good"), b.count("good")
            return "Reasoning. " + ("[[A]]" if ca > cb else "[[B]]" if cb > ca else "[[C]]")
        answer = content.rsplit("[Assistant", 1)[-1]  # the graded answer comes last
        return f"Rating: [[{min(10, 1 + 3 * answer.count('good'))}]]"


def _handler(judge: FakeJudge):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, payload: dict, headers: dict | None = None):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.endswith("/models"):
                entry = {"id": "fake-judge", "object": "model", "created": judge.created}
                if judge.root is not None:
                    entry["root"] = judge.root
                self._send(200, {"object": "list", "data": [entry]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with judge.lock:
                judge.requests += 1
                tries = judge.tries[raw] = judge.tries.get(raw, 0) + 1
            body = json.loads(raw)
            judge.bodies.append(body)
            if judge.mode == "hang":
                judge.release.wait(30)
                return
            if judge.mode == "error":
                self._send(503, {"error": {"message": "overloaded"}})
                return
            if judge.mode == "storm" and tries <= judge.failures:
                self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.01"})
                return
            self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": judge.reply(body)}}]})

    return Handler


@contextlib.contextmanager
def fake_judge(mode: str, **options):
    """Yields ``(base_url, judge)`` of a fake judge on an ephemeral loopback port."""
    judge = FakeJudge(mode, **options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", judge
    finally:
        judge.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
        time.sleep(0)
