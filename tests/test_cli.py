"""``jaxalign generate`` on a tiny saved checkpoint (random Llama + a word-level ChatML tokenizer): one prompt
(streamed and printed), a file of prompts with several samples, the chat loop, and clear errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxalign.cli import main
from tests.models.conftest import make_hf_model

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["\n", " ", "user", "assistant", "system", "Hi", "Go", "away", ".", "sky", "blue", "?"]
# Filler words give the tokenizer exactly the model's 97 ids, so every sampled id decodes.
VOCAB = {token: index for index, token in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(97 - 16)])}
COMMON = ["--max-new-tokens", "5", "--seed", "3"]


def tiny_tokenizer(swap: tuple[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level ChatML tokenizer; ``swap``: two words whose ids are exchanged (a tokenizer of the same size
    that maps some words to other ids, which only a tokenizer comparison can tell apart)."""
    vocab = dict(VOCAB)
    if swap is not None:
        vocab[swap[0]], vocab[swap[1]] = VOCAB[swap[1]], VOCAB[swap[0]]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "tiny_llama"
    make_hf_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def generate(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_one_prompt_streamed_equals_printed(checkpoint, capsys):
    status, streamed, _ = generate(capsys, "--model", checkpoint, "--prompt", "Hi", *COMMON)
    assert status == 0
    status, printed, _ = generate(capsys, "--model", checkpoint, "--prompt", "Hi", "--no-stream", *COMMON)
    assert status == 0
    assert streamed == printed and streamed.strip(), "the streamed pieces add up to the full response"


def test_prompts_file_with_several_samples(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Hi"}, {"prompt": [{"role": "user", "content": "sky ?"}]}, {"prompt": "Go away ."}]) + "\n")
    output = tmp_path / "out" / "samples.jsonl"
    args = ["--model", checkpoint, "--prompts-file", prompts, "--n", "2", "--temperature", "1.0", "--output", output,
            "--system", "blue", *COMMON]
    status, _, err = generate(capsys, *args)
    assert status == 0 and "generating" in err and "wrote 6 responses" in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert rows[1]["prompt"] == "Hi" and rows[2]["prompt"] == [{"role": "user", "content": "sky ?"}]
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 5 for r in rows)
    first = output.read_text()
    assert generate(capsys, *args)[0] == 0
    assert output.read_text() == first, "the same seed gives the same samples"


def test_text_prompts_file_prints_jsonl(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n\nsky ?\n")
    status, out, _ = generate(capsys, "--model", checkpoint, "--prompts-file", prompts, "--raw", *COMMON)
    assert status == 0
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hi", "sky ?"]


def chat(capsys, monkeypatch, checkpoint, lines: list[str], *args: str) -> tuple[int, list[str], str]:
    """Run the chat loop on ``lines`` of input; returns the status, the replies and stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    status, out, err = generate(capsys, "--model", checkpoint, "--chat", *args, *COMMON)
    # Each reply is followed by the next "user> " prompt (replies cannot contain ">": it is not in VOCAB).
    return status, [piece.split("\nuser> ")[0] for piece in out.split("assistant> ")[1:]], err


def test_chat_loop_reset_and_exit(checkpoint, capsys, monkeypatch):
    greedy = ["--temperature", "0"]
    lines = ["Hi", "Go away .", "/reset", "Go away .", "/exit", "sky ?"]
    status, replies, err = chat(capsys, monkeypatch, checkpoint, lines, *greedy)
    assert status == 0 and "/exit" in err and "/reset" in err
    assert len(replies) == 3 and all(replies), "one reply per message; nothing after /exit"
    # After /reset the reply is the one to a fresh conversation; before it, the first turn changed it.
    status, fresh, _ = generate(capsys, "--model", checkpoint, "--prompt", "Go away .", "--no-stream", *greedy,
                                *COMMON)
    assert status == 0 and replies[2] == fresh.removesuffix("\n") and replies[1] != replies[2]


def test_chat_ends_at_end_of_input(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    status, out, _ = generate(capsys, "--model", checkpoint, "--chat", *COMMON)
    assert status == 0 and out.count("assistant> ") == 1 and out.count("user> ") == 2


def test_several_prompts_and_samples_are_printed_in_order(checkpoint, capsys):
    status, out, _ = generate(capsys, "--model", checkpoint, "--prompt", "Hi", "--prompt", "sky ?", "--n", "2",
                              *COMMON)
    assert status == 0
    headers = [line for line in out.splitlines() if line.startswith("--- prompt")]
    assert [h.split(" (")[0] for h in headers] == [f"--- prompt {i}, sample {j}" for i in range(2) for j in range(2)]
    assert all(h.endswith(("(stop)", "(length)")) for h in headers)


def test_missing_model_is_a_one_line_error(capsys):
    status, _, err = generate(capsys, "--model", "/no/such/dir", "--prompt", "Hi")
    assert status == 2 and "--model /no/such/dir: no such file or directory" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_missing_prompts_file_fails_before_loading_a_model(capsys, monkeypatch, name):
    def load_model(path, **options):
        raise AssertionError("the model was loaded before the prompts file was checked")

    monkeypatch.setattr("jaxalign.models.load_pretrained", load_model)
    status, _, err = generate(capsys, "--prompts-file", f"/no/such/{name}")  # the default model otherwise
    assert status == 2 and f"--prompts-file /no/such/{name}: no such file" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--chat", "--n", "2"], "--chat samples one reply per turn"),
    (["--chat", "--raw"], "--chat needs a tokenizer with a chat template"),
    (["--prompt", "Hi", "--top-p", "0"], r"SamplingParams.top_p must be in (0, 1]"),
    (["--prompt", "Hi", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_settings_are_one_line_errors(checkpoint, capsys, args, message):
    status, _, err = generate(capsys, "--model", checkpoint, *args)
    assert status == 2 and message in err and "Traceback" not in err


def test_empty_text_prompts_file(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n")
    status, _, err = generate(capsys, "--model", checkpoint, "--prompts-file", prompts)
    assert status == 2 and f"--prompts-file {prompts}: no prompts" in err


def test_bad_prompt_record_names_file_and_line(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": 3}\n')
    status, _, err = generate(capsys, "--model", checkpoint, "--prompts-file", prompts)
    assert status == 2 and f"{prompts}, line 2, field 'prompt'" in err


def test_checkpoint_without_tokenizer(checkpoint, capsys, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    status, _, err = generate(capsys, "--model", bare, "--prompt", "Hi")
    assert status == 2 and "has no tokenizer files" in err


def test_console_script_lists_generate():
    result = subprocess.run([sys.executable, "-m", "jaxalign.cli", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout
