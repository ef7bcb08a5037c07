"""``jaxalign hitl`` end to end: the page driven in Debian's headless Chromium (Playwright), feedback over HTTP,
a retraining that hot-swaps the served model, rollback, bad input. (The app as a process of its own, killed,
restarted and started from other directories: tests/serve/test_hitl_processes.py.)"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from jaxalign.cli import build_parser
from jaxalign.serve.command import persistent_compilation_cache
from jaxalign.serve.hitl import RECOVERED_NOTICE, build_hitl
from tests.serve.conftest import running_app

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = ROOT / "tests" / "artifacts"
THRESHOLD = 5
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Every stage of a retraining on the tiny model: short rows, the tiny model's 48-token serving window, two steps.
TRAINING = ("data.max_length=64", "data.buckets=[64]", "train.total_steps=2")
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


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def ask_on(page, question: str = QUESTION, *, two: bool = False):
    """Ask until every answer has text: the tiny random model sometimes samples its end token first."""
    from playwright.sync_api import expect

    boxes = ["#answer-a", "#answer-b"] if two else ["#answer"]
    for _ in range(8):
        page.fill("#question", question)
        page.click("#ask-two" if two else "#ask")
        expect(page.locator("#double-version" if two else "#single-version")).to_have_text(
            "answered by " + page.locator("#serving").inner_text())
        expect(page.locator("#ask-meta")).to_have_text("")
        if all(page.locator(box).inner_text().strip() for box in boxes):
            return
    raise AssertionError("eight answers in a row were empty")


def test_the_page_end_to_end(hitl):
    """Ask, accept, edit, pick, thumbs; the fifth record retrains; the new version answers; roll back."""
    from playwright.sync_api import expect, sync_playwright

    url, output_dir = hitl
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # the first answers compile the prefill and decode programs
        dialogs, confirm = [], {"answer": False}
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message),
                                          dialog.accept() if confirm["answer"] else dialog.dismiss()))
        page.goto(url)
        expect(page.locator("#serving")).to_have_text("v0")
        expect(page.locator("#versions li", has_text="v0").locator(".tag.serving")).to_have_text("serving")
        banner = page.locator("#banner")

        page.click("#ask")  # an empty question is refused on the page
        expect(banner).to_have_text("Type a question first.")

        ask_on(page)
        page.click("[data-action=accept]")
        expect(banner).to_contain_text("Saved (1 record;")

        ask_on(page)
        page.click("[data-action=edit]")
        page.fill("#edit-box", "x" * 30_000)  # too long an edit: refused, nothing saved, the edit stays open
        page.click("#save-edit")
        expect(banner).to_contain_text("Not saved: ")
        expect(banner).to_contain_text("over the limit of 20,000 characters")
        page.fill("#edit-box", "the cat is on the mat")
        page.click("#save-edit")
        expect(banner).to_contain_text("Saved (2 records;")
        expect(page.locator("#history li").first).to_contain_text("edited to: the cat is on the mat")

        ask_on(page, two=True)
        page.click("[data-pick='1']")
        expect(banner).to_contain_text("Saved (3 records;")
        picked = page.locator("#answer-b").inner_text().strip()
        expect(page.locator("#history li").first).to_contain_text("picked: " + picked[:40])

        ask_on(page)
        answer = page.locator("#answer").inner_text().strip()
        up, down = page.locator("[data-action=thumbs_up]"), page.locator("[data-action=thumbs_down]")
        up.click()
        expect(banner).to_contain_text("Saved (4 records;")
        expect(up).to_have_text("Thumbs up recorded")  # said, and not recordable twice by accident
        expect(up).to_be_disabled()
        expect(down).to_be_disabled()
        expect(page.locator("#history li").first).to_contain_text("answer: " + answer[:40])
        ask_on(page)  # a new answer gets its own thumbs
        expect(up).to_have_text("Thumbs up")
        expect(down).to_be_enabled()
        down.click()
        expect(banner).to_contain_text("Saved (5 records;")

        expect(page.locator("#retrain-text")).to_contain_text("compiling", timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "hitl-training.png"))
        state = wait_for(lambda: (s := httpx.get(url + "/hitl/state", timeout=30).json())["serving"] == "v1"
                         or s["retrain"]["state"] == "failed" and s, RETRAIN_TIMEOUT_S, "v1 to be served", poll=2)
        assert state is True or state["retrain"]["state"] != "failed", state["retrain"]["message"]
        expect(page.locator("#serving")).to_have_text("v1")
        v1 = page.locator("#versions li", has_text="from v0")
        expect(v1.locator(".tag.serving")).to_have_text("serving")
        expect(v1).to_contain_text("sft 2 steps, dpo 2 steps, kto 2 steps")  # --train train.total_steps=2
        ask_on(page)  # the retrained version answers
        expect(page.locator("#single-version")).to_have_text("answered by v1")
        expect(page.locator("#history li")).to_have_count(5)
        page.screenshot(path=str(SCREENSHOTS / "hitl-v1.png"), full_page=True)

        serve_v0 = page.locator("#versions li", has_text="base model").get_by_role("button", name="Serve this")
        serve_v0.click()  # asks first: dismissed, nothing changes
        assert len(dialogs) == 1 and dialogs[0].startswith("Serve v0 instead of v1?"), dialogs
        time.sleep(1)
        assert httpx.get(url + "/hitl/state", timeout=30).json()["serving"] == "v1"
        confirm["answer"] = True
        serve_v0.click()
        expect(page.locator("#serving")).to_have_text("v0", timeout=60_000)
        browser.close()

    records = feedback_lines(output_dir)
    assert [r["action"] for r in records] == ["accept", "edit", "pick", "thumbs_up", "thumbs_down"]
    assert records[1]["edit"] == "the cat is on the mat"
    assert records[2]["choice"]["chosen"] == 1
    version = json.loads((output_dir / "versions" / "v1" / "version.json").read_text())
    assert version["status"] == "ready" and version["records"] == [0, 5]
    assert {stage for stage, info in version["stages"].items() if info["status"] == "done"} == {"sft", "dpo", "kto"}
    assert {info["steps"] for info in version["stages"].values()} == {2}
    for stage in ("sft", "dpo", "kto"):  # each stage is a versioned run: config, data, metrics, export
        run = output_dir / "versions" / "v1" / stage
        assert (run / "run.json").exists() and (run / "metrics.jsonl").exists() and (run / "export").is_dir()
        assert json.loads((run / "run.json").read_text())["config"]["train"]["total_steps"] == 2
    assert json.loads((output_dir / "current.json").read_text()) == {"version": "v0"}


def test_bad_feedback_is_refused_with_its_field(hitl):
    url, output_dir = hitl
    before = len(feedback_lines(output_dir)) if (output_dir / "feedback.jsonl").exists() else 0
    good = {"prompt": "q", "action": "accept", "response": "r", "model_version": "v0"}
    cases = [
        ({**good, "prompt": "  "}, "prompt"),
        ({**good, "action": "love"}, "action"),
        ({**good, "action": "edit"}, "edit"),
        ({**good, "edit": "y" * 30_000}, "edit"),
        ({**good, "model_version": "<img src=x onerror=alert(1)>"}, "model_version"),  # not a version
        ({**good, "model_version": 3}, "model_version"),
        ({**good, "system": ["s"]}, "system"),
        ({**good, "note": {}}, "note"),
        ({**good, "id": "chosen-by-the-client"}, "id"),
        ({**good, "rating": 5}, "rating"),
        ({**good, "action": "pick", "response": None, "choice": {"responses": ["a", "b"], "chosen": 1,
                                                                 "model_versions": ["v0", "v77"]}},
         "choice.model_versions[1]"),
        ({**good, "action": "pick", "response": None, "choice": {"responses": ["a", "b"], "chosen": "1"}},
         "choice.chosen"),
    ]
    cases += [({k: v for k, v in good.items() if k != missing}, missing) for missing in good]
    for body, field in cases:
        response = httpx.post(url + "/hitl/feedback", json=body, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], (body, response.text)
    for missing in good:
        message = httpx.post(url + "/hitl/feedback", json={k: v for k, v in good.items() if k != missing},
                             timeout=30).json()["error"]["message"]
        assert message == f"field '{missing}': missing"
    for content in (b"{not json", b"[1, 2]", b"null"):
        assert httpx.post(url + "/hitl/feedback", content=content, timeout=30).status_code == 400
    after = len(feedback_lines(output_dir)) if (output_dir / "feedback.jsonl").exists() else 0
    assert after == before


def test_every_hitl_route_refuses_bad_input_with_its_field(hitl):
    url, _ = hitl
    cases = [
        ("get", "/hitl/history?limit=ten", None, "limit"),
        ("get", "/hitl/history?limit=0", None, "limit"),
        ("get", "/hitl/history?limit=100000", None, "limit"),
        ("get", "/hitl/history?offset=3", None, "offset"),
        ("post", "/hitl/rollback", {"version": "v99"}, "version"),
        ("post", "/hitl/rollback", {"version": 1}, "version"),
        ("post", "/hitl/rollback", {}, "version"),
        ("post", "/hitl/rollback", {"version": "v0", "force": True}, "force"),
        ("post", "/hitl/retry", {"version": "v0"}, "version"),  # ready, not failed
        ("post", "/hitl/retry", {"version": "v99"}, "version"),
        ("post", "/hitl/retry", {"version": ["v1"]}, "version"),
        ("post", "/hitl/retrain", {"version": "v1"}, "version"),
    ]
    for method, path, body, field in cases:
        response = httpx.request(method, url + path, json=body, timeout=30)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["param"] == field, (path, body, response.text)
    assert httpx.get(url + "/hitl/history?limit=2", timeout=30).status_code == 200


def test_the_page_forbids_inline_script_and_ships_its_files(hitl):
    url, _ = hitl
    page = httpx.get(url + "/", timeout=30)
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/hitl.js" defer>']
    assert not re.search(r"\son\w+=|style=|<style", html)  # no inline handlers or styles either
    assert "__MODEL__" not in html and "__MAX_TOKENS__" not in html  # nothing is substituted into the page
    for path, kind in (("/hitl.js", "text/javascript"), ("/hitl.css", "text/css")):
        response = httpx.get(url + path, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "innerHTML" not in httpx.get(url + "/hitl.js", timeout=30).text


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
    assert state["records"] == 1
    # One sentence for the person at the page: what happened and what to do, no server paths.
    assert state["recovered"] == [RECOVERED_NOTICE]
    assert RECOVERED_NOTICE.count(". ") == 0 and RECOVERED_NOTICE.endswith(".") and "/" not in RECOVERED_NOTICE
    assert "set aside" in RECOVERED_NOTICE and "record it again" in RECOVERED_NOTICE
    assert len(feedback_lines(tmp_path)) == 2
    assert any(path.name.startswith("feedback.jsonl.torn") for path in tmp_path.iterdir())
