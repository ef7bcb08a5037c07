"""Nothing the page shows can run as script: every field of every record, a version's fields and the model's name
set to script payloads, rendered in headless Chromium without one dialog; the page's policy blocks inline
handlers even where markup does get in; an answer cut off by the token limit is marked."""

from __future__ import annotations

import json
import shutil

import httpx

from jaxalign.serve.command import persistent_compilation_cache
from jaxalign.serve.feedback import Choice, FeedbackRecord
from tests.serve.test_hitl import SCREENSHOTS, ask_on, hitl_args, launch, running_hitl


def payload(name: str) -> str:
    """Markup that runs script wherever it is parsed as HTML (an alert names the field that leaked)."""
    return (f"<img src=x onerror=alert('{name}')><script>alert('{name}')</script>"
            f"\"><svg onload=alert('{name}')>")


def hostile_records() -> list[FeedbackRecord]:
    """A record of every action with every text and name field a payload, as an older app could have stored."""
    version = payload("model_version")
    common = dict(prompt=payload("prompt"), model_version=version, system=payload("system"), note=payload("note"))
    return [
        FeedbackRecord(action="accept", response=payload("response"), **common),
        FeedbackRecord(action="edit", response=payload("response"), edit=payload("edit"), **common),
        FeedbackRecord(action="pick", choice=Choice(responses=(payload("choice A"), payload("choice B")), chosen=1,
                                                    model_versions=(version, payload("choice version"))), **common),
        FeedbackRecord(action="thumbs_up", response=payload("thumbs"), **common),
    ]


def hostile_versions(output_dir, model: str) -> None:
    """v1 failed with a payload for its error and stage, v2 ready (and once served, so nothing retrains) with a
    payload for its parent and stage names: a hand-edited or foreign version.json."""
    versions = output_dir / "versions"
    for name, values in {
        "v1": {"parent": "v0", "status": "failed", "error": payload("error"),
               "stages": {payload("stage"): {"status": "done", "steps": payload("steps")}}},
        "v2": {"parent": payload("parent"), "status": "ready", "model": model, "served": 1.0,
               "stages": {payload("stage 2"): {"status": "done", "steps": 3}}},
    }.items():
        (versions / name).mkdir(parents=True)
        (versions / name / "version.json").write_text(json.dumps({"name": name, "records": [0, 0], **values}))


def test_no_field_the_page_shows_can_run_script(tiny_checkpoint, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    model = tmp_path / "<img src=x onerror=alert('model')>"  # the served name is the directory's
    shutil.copytree(tiny_checkpoint, model)
    output_dir = tmp_path / "hitl"
    output_dir.mkdir()
    (output_dir / "feedback.jsonl").write_bytes(b"".join(r.to_line() for r in hostile_records()))
    hostile_versions(output_dir, str(model))
    args = hitl_args(model, output_dir, "--no-auto-retrain", "--max-tokens", "1")
    SCREENSHOTS.mkdir(exist_ok=True)
    with persistent_compilation_cache(None), running_hitl(args) as url, sync_playwright() as playwright:
        # A new record with every text field a payload is accepted (it is text) and shown as text.
        fresh = {"prompt": payload("new prompt"), "action": "edit", "response": payload("new response"),
                 "edit": payload("new edit"), "system": payload("new system"), "note": payload("new note"),
                 "model_version": "v0"}
        assert httpx.post(url + "/hitl/feedback", json=fresh, timeout=30).status_code == 200
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url)
        history = page.locator("#history")
        expect(page.locator("#history li")).to_have_count(5)
        expect(history).to_contain_text(payload("new prompt"))  # shown literally, as text
        expect(history).to_contain_text("edited to: " + payload("new edit")[:60])
        expect(history).to_contain_text(payload("model_version"))
        expect(history).to_contain_text("picked: " + payload("choice B")[:60])
        expect(page.locator("#model")).to_have_text(model.name)
        expect(page.locator("#versions")).to_contain_text(payload("error"))
        expect(page.locator("#versions")).to_contain_text(payload("parent"))

        ask_on(page)  # max_tokens 1: a non-empty answer is one token, so the token limit cut it off
        expect(page.locator("#single-truncated")).to_be_visible()
        expect(page.locator("#single-truncated")).to_contain_text("truncated")
        page.wait_for_timeout(2500)  # a refresh of the side bar or two
        page.screenshot(path=str(SCREENSHOTS / "hitl-xss.png"), full_page=True)
        assert page.locator("img, svg, #history script, #versions script").count() == 0
        assert dialogs == []

        # The failed version's Retry button trains it again (here it fails again: its records give no data).
        page.locator("#versions li", has_text="failed").get_by_role("button", name="Retry").click()
        expect(page.locator("#banner")).to_have_text("Training v1 again…")
        expect(page.locator("#versions li", has_text="failed")).to_contain_text("no stage had data to train on")
        assert json.loads((output_dir / "versions" / "v1" / "version.json").read_text())["attempts"] == 2

        # Even markup that gets into the page cannot run: the policy blocks inline handlers and scripts.
        page.evaluate("""() => { window.leaked = 0;
            document.body.insertAdjacentHTML('beforeend', '<img src=x onerror="window.leaked = 1">'); }""")
        page.wait_for_timeout(1000)
        assert page.evaluate("window.leaked") == 0 and dialogs == []
        browser.close()
