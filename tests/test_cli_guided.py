"""``jaxalign generate --doctor``: LLMDoctor guided decoding from the command line on tiny checkpoints (a 2-layer
patient, 3-layer doctors, the word-level ChatML tokenizer of tests/test_cli.py): weights in every mode, the
results' record of them, ``/weights`` in a chat without recompiling, and one-line errors for every bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from flax import nnx

from jaxalign.cli import main
from jaxalign.models import CausalLMWithValueHead, load_hf, save_doctor
from tests.models.conftest import make_hf_model
from tests.rollout.conftest import count_engine_compilations
from tests.test_cli import COMMON, tiny_tokenizer

GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """The patient checkpoint and doctor directories (and some that are not doctors)."""
    root = tmp_path_factory.mktemp("cli_guided")
    patient = root / "patient"
    make_hf_model("llama").save_pretrained(patient)
    tiny_tokenizer().save_pretrained(patient)

    def doctor(name: str, dimension: str, seed: int, tokenizer=None) -> Path:
        lm_dir = root / f"{name}_lm"
        make_hf_model("llama_tied_3_layers", seed=seed).save_pretrained(lm_dir)
        lm = load_hf(lm_dir)
        return save_doctor(root / name, CausalLMWithValueHead(lm, rngs=nnx.Rngs(0)), tokenizer or tiny_tokenizer(),
                           dimension=dimension, metadata={"patient": str(patient)})

    found = {"patient": patient, "safety": doctor("safe", "safety", 1),
             "helpfulness": doctor("helpful", "helpfulness", 2), "safety_again": doctor("safe_again", "safety", 3),
             "swapped": doctor("swapped", "honesty", 1, tiny_tokenizer(swap=("sky", "blue")))}
    no_head = root / "no_head"
    shutil.copytree(found["safety"], no_head)
    (no_head / "value_head.safetensors").unlink()
    found["no_head"] = no_head
    return found


def generate(capsys, *args) -> tuple[int, str, str]:
    status = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def reply(capsys, dirs, *args) -> str:
    status, out, err = generate(capsys, "--model", dirs["patient"], "--prompt", "sky ?", "--no-stream", *GREEDY,
                                *COMMON, *args)
    assert status == 0, err
    return out


def test_weights_steer_a_single_prompt(dirs, capsys):
    patient = reply(capsys, dirs)
    off = reply(capsys, dirs, "--doctor", dirs["safety"], "--preference-weights", '{"safety": 0}')
    assert off == patient, "a doctor at weight 0 leaves the patient's greedy reply"
    steered = reply(capsys, dirs, "--doctor", dirs["safety"], "--beta", "2")
    assert steered != patient
    doctor_only = reply(capsys, dirs, "--doctor", dirs["safety"], "--alpha", "0", "--beta", "1")
    assert doctor_only not in (patient, steered)
    # The weight multiplies beta: w = 4 at beta 0.5 is w = 1 at beta 2.
    assert reply(capsys, dirs, "--doctor", dirs["safety"], "--preference-weights", '{"safety": 4}') == steered


def test_prompts_file_is_batched_and_records_the_weights(dirs, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nsky ?\nGo away .\nblue\n")  # two batches of 2 prompts (one compiled program)
    output = tmp_path / "guided.jsonl"
    weights = '{"helpfulness": 0.8, "safety": 0.2}'
    status, _, err = generate(capsys, "--model", dirs["patient"], "--prompts-file", prompts, "--batch-size", "2",
                              "--doctor", dirs["safety"], "--doctor", dirs["helpfulness"], "--preference-weights",
                              weights, "--n", "2", "--temperature", "1", "--output", output, *COMMON)
    assert status == 0 and "wrote 8 responses" in err
    assert "guided by 2 doctor(s): alpha 1, beta 0.5, weights safety 0.2, helpfulness 0.8" in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(4) for j in range(2)]
    assert all(r["guidance"] == {"alpha": 1.0, "beta": 0.5, "preference_weights": {"safety": 0.2, "helpfulness": 0.8},
                                 "doctors": {"safety": str(dirs["safety"]), "helpfulness": str(dirs["helpfulness"])}}
               for r in rows)
    # Unguided results carry no guidance record.
    status, out, _ = generate(capsys, "--model", dirs["patient"], "--prompts-file", prompts, *COMMON)
    assert status == 0 and all("guidance" not in json.loads(line) for line in out.splitlines())


def chat(capsys, monkeypatch, dirs, lines: list[str], *args) -> tuple[int, list[str], str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    status, out, err = generate(capsys, "--model", dirs["patient"], "--chat", *GREEDY, *COMMON, *args)
    return status, [piece.split("\nuser> ")[0] for piece in out.split("assistant> ")[1:]], err


def test_chat_weights_change_without_recompiling(dirs, capsys, monkeypatch):
    lines = ["sky ?", "/reset", '/weights {"safety": 0}', "sky ?", "/reset", "/weights", '/weights {"safety": 4}',
             "sky ?", "/reset", '/weights {"nope": 1}', "/weights {safety}", "sky ?"]
    with count_engine_compilations() as compiled:
        status, replies, err = chat(capsys, monkeypatch, dirs, lines, "--doctor", dirs["safety"])
    assert status == 0 and "/weights" in err and len(replies) == 4
    assert len(compiled) == 1, "one program for the whole chat: the weights are traced"
    patient = reply(capsys, dirs).removesuffix("\n")
    assert replies[1] == patient, "/weights {safety: 0}: the patient's reply"
    assert replies[2] != patient and replies[0] != patient, "the doctor steers at weights 1 (the default) and 4"
    assert replies[3] == replies[2], "bad /weights are refused and the weights stay as they were"
    assert "weights safety 0" in err, "/weights alone shows the weights"
    assert "error: /weights: no doctor for the dimension(s) 'nope'; the doctors' dimensions are 'safety'" in err
    assert "error: /weights: not valid JSON" in err


def test_chat_without_doctors_refuses_weights(dirs, capsys, monkeypatch):
    status, replies, err = chat(capsys, monkeypatch, dirs, ['/weights {"safety": 1}', "Hi"])
    assert status == 0 and len(replies) == 1
    assert "error: /weights needs --doctor" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--preference-weights", '{"safety": 1}'], "--preference-weights needs --doctor"),
    (["--alpha", "1", "--beta", "0.2"], "--alpha, --beta need --doctor"),
    (["--doctor", "<safety>", "--preference-weights", "{safety: 1}"],
     "--preference-weights: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (["--doctor", "<safety>", "--preference-weights", '{"helpfulness": 1}'],
     "--preference-weights: no doctor for the dimension(s) 'helpfulness'; the doctors' dimensions are 'safety'"),
    (["--doctor", "<safety>", "--preference-weights", '{"safety": -1}'],
     "--preference-weights: the weight of 'safety' must be finite and >= 0, got -1"),
    (["--doctor", "<safety>", "--preference-weights", '{"safety": NaN}'], "must be finite and >= 0, got nan"),
    (["--doctor", "<safety>", "--preference-weights", '{"safety": 1, "safety": 2}'],
     "--preference-weights: 'safety' is given twice"),
    (["--doctor", "<safety>", "--preference-weights", "[1]"], "--preference-weights: expected an object mapping"),
    (["--doctor", "<safety>", "--alpha", "-1"], "alpha (the patient's weight) must be finite and >= 0, got -1.0"),
    (["--doctor", "<safety>", "--beta", "inf"], "beta (the doctors' weight) must be finite and >= 0, got inf"),
    (["--doctor", "<safety>", "--alpha", "0", "--preference-weights", "{}"], "alpha and every doctor's weight"),
    (["--doctor", "<patient>"], "--doctor <patient> is not a doctor: it has no doctor.json"),
    (["--doctor", "<no_head>"], "--doctor <no_head> is not a doctor: it has no value_head.safetensors"),
    (["--doctor", "/no/such/doctor"], "--doctor /no/such/doctor: no such directory"),
    (["--doctor", "<safety>", "--doctor", "<safety_again>"],
     "--doctor <safety> and --doctor <safety_again> are both doctors for the dimension 'safety'"),
])
def test_bad_guidance_fails_before_loading_a_model(dirs, capsys, monkeypatch, args, message):
    def load_model(path, **options):
        raise AssertionError("a model was loaded before the guidance was checked")

    monkeypatch.setattr("jaxalign.models.load_pretrained", load_model)
    def fill(text: str) -> str:  # <name>: the directory of that name
        return re.sub(r"<(\w+)>", lambda match: str(dirs[match.group(1)]), text)

    status, _, err = generate(capsys, "--model", dirs["patient"], "--prompt", "Hi", *map(fill, args))
    assert status == 2 and fill(message) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jaxalign generate: error: ")


def test_a_doctor_with_another_tokenizer(dirs, capsys):
    status, _, err = generate(capsys, "--model", dirs["patient"], "--prompt", "Hi", "--doctor", dirs["swapped"])
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert (f"--model {dirs['patient']} and --doctor {dirs['swapped']} do not share a tokenizer ('blue' is 14 vs 13"
            in err)
