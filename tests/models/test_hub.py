"""Models by Hugging Face Hub id: resolved in a Hub cache written in huggingface_hub's own layout, offline;
revisions pinned by branch, tag or commit; a local path wins; every failure one line that says how to fix it
(offline and not cached, Hub unreachable, no such repo or revision, gated without a token: the last three
answered by a stand-in Hub on 127.0.0.1)."""

from __future__ import annotations

import http.server
import threading

import jax
import numpy as np
import pytest
from flax import nnx
from huggingface_hub import constants

from jaxalign.models import load_hf, load_pretrained
from jaxalign.models.hub import is_hub_id, provenance
from tests.models.conftest import make_hf_model
from tests.models.hub_cache import add_snapshot
from tests.test_cli import tiny_tokenizer

MAIN = "1" * 40
TAGGED = "2" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """HF_HOME with ``org/tiny`` at two commits: ``main`` (seed 0) and tag ``v1`` (seed 1)."""
    root = tmp_path_factory.mktemp("hub")
    for seed, commit, refs in ((0, MAIN, ("main",)), (1, TAGGED, ("v1",))):
        checkpoint = root / f"checkpoint{seed}"
        make_hf_model("llama", seed=seed).save_pretrained(checkpoint)
        tiny_tokenizer().save_pretrained(checkpoint)
        add_snapshot(root / "home", "org/tiny", checkpoint, commit, refs)
    return root


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def weights(model) -> np.ndarray:
    """Every parameter of ``model``, flattened in order: equal exactly when the same weights were loaded (a
    forward pass per load would compile each time)."""
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))])


def test_a_hub_id_loads_from_the_cache_offline_at_its_pinned_revision(offline):
    model, tokenizer = load_pretrained("org/tiny", source="--model")
    np.testing.assert_array_equal(weights(model), weights(load_hf(offline / "checkpoint0")))
    assert tokenizer("Hi")["input_ids"] == tiny_tokenizer()("Hi")["input_ids"]
    tagged = weights(load_hf(offline / "checkpoint1"))
    assert not np.allclose(weights(model), tagged)
    for name, revision in (("org/tiny", "v1"), ("org/tiny", TAGGED), (f"org/tiny@{TAGGED}", None)):
        np.testing.assert_array_equal(weights(load_pretrained(name, revision=revision)[0]), tagged)
    assert provenance("org/tiny") == {"hub_id": "org/tiny", "revision": "main", "commit": MAIN,
                                      "snapshot": str(offline / "home/hub/models--org--tiny/snapshots" / MAIN)}
    assert provenance("org/tiny", "v1")["commit"] == TAGGED


def test_a_local_directory_wins_over_a_hub_id(offline, monkeypatch):
    local = offline / "work" / "org" / "tiny"
    local.parent.mkdir(parents=True)
    local.symlink_to(offline / "checkpoint1")
    monkeypatch.chdir(offline / "work")
    assert not is_hub_id("org/tiny")
    np.testing.assert_array_equal(weights(load_pretrained("org/tiny")[0]), weights(load_hf(offline / "checkpoint1")))
    assert provenance("org/tiny") == {"path": str(local.resolve())}
    with pytest.raises(ValueError, match="a revision .* applies to a Hugging Face Hub id, not to the local path"):
        load_pretrained("org/tiny", revision="v1")


def test_names_spelled_as_paths_are_never_hub_ids():
    for name in ("./org/tiny", "/no/such/dir", "runs/a/export", "model.gguf", "../x", "~/m"):
        assert not is_hub_id(name), name
    for name in ("gpt2", "meta-llama/Llama-2-7b-hf", "org/name@v1.0"):
        assert is_hub_id(name), name


@pytest.mark.parametrize(("name", "revision", "message"), [
    ("org/absent", None, r"--model org/absent: no such local path, and not in the Hugging Face cache \(.*hub\) "
                         r"while HF_HUB_OFFLINE=1 forbids downloading it: run `hf download org/absent` where the Hub "
                         r"is reachable \(with HF_HOME pointing at this cache\), or unset HF_HUB_OFFLINE"),
    ("org/tiny", "v2", r"--model org/tiny \(revision v2\): no such local path, and not in the Hugging Face cache .*"
                       r"`hf download org/tiny --revision v2`"),
    ("org/tiny@", None, r"--model org/tiny@: nothing after '@'"),
])
def test_offline_and_not_cached_is_one_line_saying_how_to_fix_it(offline, name, revision, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message) as raised:
        load_pretrained(name, revision=revision, source="--model")
    assert "\n" not in str(raised.value)


class StandInHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to a repo look-up: 404 RepoNotFound, 401 GatedRepo, 404 RevisionNotFound."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, code = ((401, "GatedRepo") if "/gated/" in self.path else
                        (404, "RevisionNotFound") if "/revision/nope" in self.path else (404, "RepoNotFound"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub(hub, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(hub / "no_token_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hub / "no_token_home" / "token"))
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("name", "revision", "error", "message"), [
    ("org/missing", None, FileNotFoundError, r"model\.path org/missing: no such local path and no such model on the "
                                             r"Hugging Face Hub \(http://127\.0\.0\.1:\d+\); check the spelling, or "
                                             r"set HF_TOKEN if it is private"),
    ("gated/llama", None, PermissionError, r"model\.path gated/llama is a gated model on the Hugging Face Hub: set "
                                           r"HF_TOKEN to a token of an account that accepted it \(or run `hf auth "
                                           r"login`\) at http://127\.0\.0\.1:\d+/gated/llama"),
    ("org/model", "nope", FileNotFoundError, r"model\.path org/model \(revision nope\): the model has no revision "
                                             r"'nope' on the Hugging Face Hub"),
])
def test_what_the_hub_refuses_is_one_line(stand_in_hub, name, revision, error, message):
    with pytest.raises(error, match=message) as raised:
        load_pretrained(name, revision=revision, source="model.path")
    assert "\n" not in str(raised.value)


def test_an_unreachable_hub_and_no_cache_is_one_line(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(FileNotFoundError, match=r"--policy org/tiny: no such local path, not in the Hugging Face "
                                                r"cache .*and the Hub \(http://127\.0\.0\.1:9\) could not be reached"):
        load_pretrained("org/tiny", source="--policy")


def test_a_teacher_by_hub_id_is_not_pinned_to_the_students_revision(offline):
    """``model.revision`` names a commit of the run's own model: a distillation teacher (or a TFPO patient,
    the same spec) by Hub id loads its own ``main``, or the revision after its ``@``."""
    from jaxalign.methods import distill, recipe

    config = recipe.load_run_config({"output_dir": "out", "data": {"source": "-"}, "train": {"total_steps": 1},
                                     "model": {"path": "org/tiny", "revision": "v1"}, "teacher": "org/tiny"},
                                    method="distill")
    student, tokenizer = load_pretrained("org/tiny", revision="v1")
    main_weights, tagged = weights(load_hf(offline / "checkpoint0")), weights(load_hf(offline / "checkpoint1"))
    np.testing.assert_array_equal(weights(distill.load_teacher(config, student, tokenizer)), main_weights)
    pinned = recipe.load_run_config({**config.to_dict(), "teacher": "org/tiny@v1"}, method="distill")
    np.testing.assert_array_equal(weights(distill.load_teacher(pinned, student, tokenizer)), tagged)
