"""The four-method comparison's own parts: the scripted reviewer's decisions and the measured training runs.
(The experiment end to end is ``python -m experiments.compare_methods --smoke``; the HITL app it drives is
tested in tests/serve/test_hitl.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.compare_methods import Reviewer, run_measured, signals_as_exit, split_sentences, version_served

ROOT = Path(__file__).resolve().parents[1]


class WordJudge:
    """Sentiment by words: "great" +0.8, "fine" +0.3, "awful" -0.7 each, summed and clipped to [-1, 1]."""

    WEIGHTS = {"great": 0.8, "fine": 0.3, "awful": -0.7}

    def score(self, prompts, texts):
        assert len(prompts) == len(texts)
        return [max(-1.0, min(1.0, sum(w * t.lower().count(word) for word, w in self.WEIGHTS.items())))
                for t in texts]


def review(answers):
    return Reviewer("http://unused", "m", WordJudge(), max_tokens=8).review("q?", answers, "v3")


def test_a_good_answer_is_picked_and_accepted_and_a_bad_one_gets_a_thumbs_down():
    records = review(["It was awful.", "A great day."])
    assert [r["action"] for r in records] == ["pick", "accept", "thumbs_down"]
    assert records[0]["choice"] == {"responses": ["It was awful.", "A great day."], "chosen": 1}
    assert records[1]["response"] == "A great day." and records[2]["response"] == "It was awful."
    assert all(r["prompt"] == "q?" and r["model_version"] == "v3" for r in records)


def test_negative_sentences_are_edited_out_when_that_helps():
    records = review(["Fine food. Awful service!", "Awful."])
    edit = next(r for r in records if r["action"] == "edit")
    assert edit == {"prompt": "q?", "model_version": "v3", "action": "edit", "response": "Fine food. Awful service!",
                    "edit": "Fine food."}


def test_a_negative_answer_nothing_can_save_is_rejected():
    records = review(["Awful, awful.", "Awful."])
    assert [r["action"] for r in records] == ["pick", "reject", "thumbs_down"]
    assert records[1]["response"] == "Awful."  # the better (less negative) one is the one judged


def test_equal_answers_are_not_a_pick_and_get_one_verdict():
    records = review(["A great day.", "A great day."])
    assert [r["action"] for r in records] == ["accept"]


def test_neutral_answers_get_no_verdict():
    assert review(["It is a bus.", "It is a train."]) == []


def test_sentences_split_on_their_end_marks():
    assert split_sentences(" One. Two!  Three? four ") == ["One.", "Two!", "Three?", "four"]


def test_a_run_is_measured_by_its_peak_memory(tmp_path):
    result = run_measured([sys.executable, "-c", "x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096])"])
    assert result["peak_rss_mib"] > 300 and result["seconds"] >= 0


def test_a_failed_run_names_its_last_log_line(tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(RuntimeError, match="exited with 3: the reason"):
        run_measured([sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"], log=log)


def state(serving: str, versions: dict[str, str], retrain: str = "idle", training: str | None = None) -> dict:
    rows = [{"name": name, "status": status, "error": f"{name} broke"} for name, status in versions.items()]
    return {"serving": serving, "retrain": {"state": retrain, "version": training}, "versions": rows}


def test_a_failed_version_ends_the_wait_unless_it_is_being_retried():
    assert version_served(state("v1", {"v1": "ready", "v0": "ready"}), "v1")
    assert not version_served(state("v0", {"v1": "training", "v0": "ready"}, "training", "v1"), "v1")
    assert not version_served(state("v0", {"v0": "ready"}), "v1")  # not started yet: more feedback is coming
    # a restarted app trains the failed newest version again: the experiment waits for it
    assert not version_served(state("v0", {"v1": "failed", "v0": "ready"}, "training", "v1"), "v1")
    with pytest.raises(RuntimeError, match="retraining v1 failed: v1 broke"):
        version_served(state("v0", {"v1": "failed", "v0": "ready"}, "failed", "v1"), "v1")
    with pytest.raises(RuntimeError, match="retraining v1 failed"):
        version_served(state("v0", {"v1": "failed", "v0": "ready"}), "v1")


def test_sigterm_inside_the_stage_is_an_exit_that_runs_its_cleanup():
    cleaned = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as caught:
        with signals_as_exit():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            finally:
                cleaned.append(True)
    assert caught.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before


STAGE = """
import sys
from pathlib import Path
from experiments.compare_methods import hitl_stage
from tests.test_compare_methods import WordJudge
hitl_stage(Path("runs/compare"), ["a question", "another"], threshold=1000, versions=1, max_tokens=4, seed=0,
           judge=WordJudge(), server_options=("--model", sys.argv[1], "--no-warmup", "--max-model-len", "48"))
"""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_hitl_server_stops_when_the_experiment_is_stopped(tmp_path, signum):
    """SIGTERM: the stage's cleanup stops the server; SIGKILL: the server's parent-death signal does."""
    from tests.models.conftest import make_hf_model
    from tests.test_cli import tiny_tokenizer

    model = tmp_path / "tiny"
    make_hf_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    experiment = subprocess.Popen([sys.executable, "-c", STAGE, "../tiny"], cwd=cwd, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = cwd / "runs" / "compare" / "hitl" / "server.log"
    server = None
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and "jaxalign hitl: serving" in log.read_text()):  # it answers: the reviewer asks
            assert experiment.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.5)
        [server] = children_of(experiment.pid)
        experiment.send_signal(signum)
        assert experiment.wait(120) == (128 + signum if signum == signal.SIGTERM else -signum)
        deadline = time.monotonic() + 120
        while running(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not running(server), "the hitl server outlived the experiment"
    finally:
        experiment.kill()
        if server is not None and running(server):
            os.kill(server, signal.SIGKILL)


TRAINER = """
import signal, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
def stop(signum, frame):
    marker.write_text("saved on SIGTERM")  # what jaxalign train does: save a checkpoint, then exit
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
marker.write_text("training")
time.sleep(120)
"""
MEASURED = """
import sys
from experiments.compare_methods import run_measured
run_measured([sys.executable, "-c", sys.argv[1], sys.argv[2]])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_measured_training_run_is_stopped_gracefully_with_the_experiment(tmp_path, signum):
    """SIGTERM to the experiment: the stage stops its trainer with SIGTERM (it saves; never a SIGKILL first);
    SIGKILL: the trainer gets SIGTERM through its parent-death signal. Either way it does not outlive it."""
    marker = tmp_path / "trainer.txt"
    experiment = subprocess.Popen([sys.executable, "-c", MEASURED, TRAINER, str(marker)], cwd=tmp_path,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    trainer = None
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text() == "training"):
            assert experiment.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        [trainer] = children_of(experiment.pid)
        experiment.send_signal(signum)
        assert experiment.wait(60) == (128 + signum if signum == signal.SIGTERM else -signum)
        deadline = time.monotonic() + 30
        while running(trainer) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(trainer), "the training run outlived the experiment"
        assert marker.read_text() == "saved on SIGTERM"
    finally:
        experiment.kill()
        if trainer is not None and running(trainer):
            os.kill(trainer, signal.SIGKILL)
