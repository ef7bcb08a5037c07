"""``jaxalign hitl`` end to end: the page driven in Debian's headless Chromium (Playwright), feedback over HTTP,
a retraining that hot-swaps the served model, rollback, bad input, and a SIGKILL during retraining."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jaxalign.cli import build_parser
from jaxalign.serve.command import persistent_compilation_cache
from jaxalign.serve.hitl import build_hitl
from tests.serve.conftest import running_app

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "tests" / "artifacts"
THRESHOLD = 5
# Every stage of a retraining on the tiny model: short rows, and the tiny model's 48-token serving window.
TRAINING = ("data.max_length=64", "data.buckets=[64]")
RETRAIN_TIMEOUT_S = 420
QUESTION = "where is the cat"


def hitl_args(checkpoint, output_dir, *extra: str):
    argv = ["hitl", "--model", str(checkpoint), "--output-dir", str(output_dir), "--no-warmup",
            "--max-model-len", "48", "--max-tokens", "12", "--retrain-threshold", str(THRESHOLD), *extra]
    for setting in TRAINING:
        argv += ["--train", setting]
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def hitl(tiny_checkpoint, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hitl")
    with persistent_compilation_cache(None), running_hitl(hitl_args(tiny_checkpoint, output_dir)) as url:
        yield url, output_dir


@contextlib.contextmanager
def running_hitl(args):
    hitl = build_hitl(args)
    try:
        with running_app(hitl.app, hitl.served) as url:
            yield url
    finally:
        hitl.close()


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def feedback_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "feedback.jsonl").read_text().splitlines()]


def test_the_page_end_to_end(hitl):
    """Ask, accept, edit, pick, thumbs; the fifth record retrains; the new version answers; roll back."""
    from playwright.sync_api import expect, sync_playwright

    url, output_dir = hitl
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # the first answers compile the prefill and decode programs
        page.goto(url)
        expect(page.locator("#serving")).to_have_text("v0")
        banner = page.locator("#banner")

        page.click("#ask")  # an empty question is refused on the page
        expect(banner).to_have_text("Type a question first.")

        def ask(two: bool = False):
            """Ask until every answer has text: the tiny random model sometimes samples its end token first."""
            boxes = ["#answer-a", "#answer-b"] if two else ["#answer"]
            for _ in range(8):
                page.fill("#question", QUESTION)
                page.click("#ask-two" if two else "#ask")
                expect(page.locator("#double-version" if two else "#single-version")).to_have_text(
                    "answered by " + page.locator("#serving").inner_text())
                if all(page.locator(box).inner_text().strip() for box in boxes):
                    return
            raise AssertionError("eight answers in a row were empty")

        ask()
        page.click("[data-action=accept]")
        expect(banner).to_contain_text("Saved (1 records")

        ask()
        page.click("[data-action=edit]")
        page.fill("#edit-box", "x" * 30_000)  # too long an edit: refused, nothing saved, the edit stays open
        page.click("#save-edit")
        expect(banner).to_contain_text("Not saved: ")
        expect(banner).to_contain_text("over the limit of 20,000 characters")
        page.fill("#edit-box", "the cat is on the mat")
        page.click("#save-edit")
        expect(banner).to_contain_text("Saved (2 records")

        ask(two=True)
        page.click("[data-pick='1']")
        expect(banner).to_contain_text("Saved (3 records")

        ask()
        page.click("[data-action=thumbs_up]")
        expect(banner).to_contain_text("Saved (4 records")
        page.click("[data-action=thumbs_down]")
        expect(banner).to_contain_text("Saved (5 records")

        expect(page.locator("#retrain-text")).to_contain_text("v1", timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "hitl-training.png"))
        state = wait_for(lambda: (s := httpx.get(url + "/hitl/state", timeout=30).json())["serving"] == "v1"
                         or s["retrain"]["state"] == "failed" and s, RETRAIN_TIMEOUT_S, "v1 to be served", poll=2)
        assert state is True or state["retrain"]["state"] != "failed", state["retrain"]["message"]
        expect(page.locator("#serving")).to_have_text("v1")
        ask()  # the retrained version answers
        expect(page.locator("#single-version")).to_have_text("answered by v1")
        expect(page.locator("#history li")).to_have_count(5)
        page.screenshot(path=str(SCREENSHOTS / "hitl-v1.png"), full_page=True)

        page.locator("#versions li", has_text="v0").get_by_role("button", name="Serve this").click()
        expect(page.locator("#serving")).to_have_text("v0", timeout=60_000)
        browser.close()

    records = feedback_lines(output_dir)
    assert [r["action"] for r in records] == ["accept", "edit", "pick", "thumbs_up", "thumbs_down"]
    assert records[1]["edit"] == "the cat is on the mat"
    assert records[2]["choice"]["chosen"] == 1
    version = json.loads((output_dir / "versions" / "v1" / "version.json").read_text())
    assert version["status"] == "ready" and version["records"] == [0, 5]
    assert {stage for stage, info in version["stages"].items() if info["status"] == "done"} == {"sft", "dpo", "kto"}
    for stage in ("sft", "dpo", "kto"):  # each stage is a versioned run: config, data, metrics, export
        run = output_dir / "versions" / "v1" / stage
        assert (run / "run.json").exists() and (run / "metrics.jsonl").exists() and (run / "export").is_dir()
    assert json.loads((output_dir / "current.json").read_text()) == {"version": "v0"}


def test_bad_feedback_is_refused_with_its_field(hitl):
    url, output_dir = hitl
    before = len(feedback_lines(output_dir)) if (output_dir / "feedback.jsonl").exists() else 0
    cases = [
        ({"prompt": "  ", "action": "accept", "response": "r", "model_version": "v0"}, "prompt"),
        ({"prompt": "q", "action": "love", "response": "r", "model_version": "v0"}, "action"),
        ({"prompt": "q", "action": "edit", "response": "r", "model_version": "v0"}, "edit"),
        ({"prompt": "q", "action": "accept", "response": "r", "model_version": "v0", "edit": "y" * 30_000}, "edit"),
    ]
    for body, field in cases:
        response = httpx.post(url + "/hitl/feedback", json=body, timeout=30)
        assert response.status_code == 400, (body, response.text)
        assert field in response.json()["error"]["message"], response.text
    response = httpx.post(url + "/hitl/feedback", content=b"{not json", timeout=30)
    assert response.status_code == 400
    response = httpx.post(url + "/hitl/rollback", json={"version": "v99"}, timeout=30)
    assert response.status_code == 400 and "v99" in response.json()["error"]["message"]
    after = len(feedback_lines(output_dir)) if (output_dir / "feedback.jsonl").exists() else 0
    assert after == before


def test_concurrent_clicks_are_all_saved(tiny_checkpoint, tmp_path):
    args = hitl_args(tiny_checkpoint, tmp_path, "--no-auto-retrain")
    with persistent_compilation_cache(None), running_hitl(args) as url:
        def click(i):
            body = {"prompt": f"question {i}", "action": "thumbs_up", "response": f"answer {i}", "model_version": "v0"}
            return httpx.post(url + "/hitl/feedback", json=body, timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(click, range(24)))
        state = httpx.get(url + "/hitl/state", timeout=30).json()
    assert statuses == [200] * 24
    assert sorted(r["prompt"] for r in feedback_lines(tmp_path)) == sorted(f"question {i}" for i in range(24))
    assert state["records"] == 24 and state["waiting"] == 24 and state["retrain"]["state"] == "idle"


def test_a_torn_feedback_file_is_set_aside_and_shown(tiny_checkpoint, tmp_path):
    good = {"prompt": "q", "action": "thumbs_up", "response": "r", "model_version": "v0"}
    args = hitl_args(tiny_checkpoint, tmp_path, "--no-auto-retrain")
    with persistent_compilation_cache(None), running_hitl(args) as url:
        assert httpx.post(url + "/hitl/feedback", json=good, timeout=30).status_code == 200
    with open(tmp_path / "feedback.jsonl", "ab") as file:
        file.write(b'{"schema": 1, "id": "torn", "action": "thu')  # a crash mid-write
    with persistent_compilation_cache(None), running_hitl(args) as url:
        state = httpx.get(url + "/hitl/state", timeout=30).json()
        assert httpx.post(url + "/hitl/feedback", json=good, timeout=30).status_code == 200
    assert state["records"] == 1 and state["recovered"], state
    assert "torn" in " ".join(state["recovered"]).lower() or "set aside" in " ".join(state["recovered"]).lower()
    assert len(feedback_lines(tmp_path)) == 2
    assert any(path.name.startswith("feedback.jsonl.torn") for path in tmp_path.iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hitl(checkpoint, output_dir: Path, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxalign.cli", "hitl", "--model", str(checkpoint), "--output-dir",
               str(output_dir), "--no-warmup", "--max-model-len", "48", "--max-tokens", "8",
               "--retrain-threshold", "3", "--port", str(port)]
    for setting in TRAINING:
        command += ["--train", setting]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    # A session of its own: the SIGKILL below takes the app and its training subprocess down together.
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_sigkill_during_retraining_resumes_at_the_next_start(tiny_checkpoint, tmp_path):
    output_dir, port = tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"

    def state():
        try:
            return httpx.get(url + "/hitl/state", timeout=5).json()
        except httpx.HTTPError:
            return None

    with open(tmp_path / "hitl.log", "ab") as log:
        process = start_hitl(tiny_checkpoint, output_dir, port, log)
        try:
            wait_for(state, 120, "the app to start")
            for i, action in enumerate(["accept", "thumbs_up", "thumbs_down"]):
                body = {"prompt": f"question {i}", "action": action, "response": f"answer {i}", "model_version": "v0"}
                assert httpx.post(url + "/hitl/feedback", json=body, timeout=30).status_code == 200
            checkpoints = output_dir / "versions" / "v1"
            wait_for(lambda: (s := state()) and s["retrain"]["state"] == "training" and s["retrain"]["step"] >= 1,
                     RETRAIN_TIMEOUT_S, "the retraining to take a step")
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        assert json.loads((checkpoints / "version.json").read_text())["status"] == "training"

        process = start_hitl(tiny_checkpoint, output_dir, port, log)
        try:
            final = wait_for(lambda: (s := state()) and s["serving"] == "v1" and s, RETRAIN_TIMEOUT_S,
                             "the resumed retraining to serve v1")
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
    assert final["records"] == 3
    assert [r["prompt"] for r in feedback_lines(output_dir)] == ["question 0", "question 1", "question 2"]
    version = json.loads((checkpoints / "version.json").read_text())
    assert version["status"] == "ready"
    assert json.loads((output_dir / "current.json").read_text()) == {"version": "v1"}
