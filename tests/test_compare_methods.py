"""The four-method comparison's own parts: the scripted reviewer's decisions and the measured training runs.
(The experiment end to end is ``python -m experiments.compare_methods --smoke``; the HITL app it drives is
tested in tests/serve/test_hitl.py.)"""

from __future__ import annotations

import sys

import pytest

from experiments.compare_methods import Reviewer, run_measured, split_sentences


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
