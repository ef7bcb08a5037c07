"""Hot-swapping the served weights (what the human-in-the-loop app does after each retraining): running
requests finish on the old version, later ones run on the new one, and each response names its version."""

from __future__ import annotations

import pytest
from flax import nnx

from jaxalign.models import LoRAConfig, apply_lora, load_hf
from jaxalign.rollout import ContinuousEngine, RowSettings
from tests.models.conftest import make_hf_model
from tests.serve.conftest import MODEL, running_server, serve_args
from tests.test_cli import tiny_tokenizer

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def retrained_checkpoint(tmp_path_factory):
    """Same structure as the served tiny Llama, other weights."""
    directory = tmp_path_factory.mktemp("serve") / "retrained"
    make_hf_model("llama", seed=1).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def with_adapters(checkpoint):
    """The served model with LoRA adapters: another structure (export merges adapters away)."""
    return apply_lora(load_hf(checkpoint), LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(0))


def greedy_tokens(model, prompt_ids: list[int], count: int) -> list[int]:
    engine = ContinuousEngine(model, max_batch=2, max_model_len=48)
    out = engine.admit(engine.prefill(prompt_ids), {"row": RowSettings(temperature=0.0)})
    tokens = [out["row"].token]
    while len(tokens) < count:
        tokens.append(engine.step()["row"].token)
    return tokens


def test_replace_model_refuses_live_rows_and_other_structures(tiny_checkpoint):
    model = load_hf(tiny_checkpoint)
    engine = ContinuousEngine(model, max_batch=2, max_model_len=48)
    with pytest.raises(ValueError, match="served structure"):
        engine.replace_model(with_adapters(tiny_checkpoint))
    engine.admit(engine.prefill([5, 6, 7]), {"row": RowSettings(temperature=0.0)})
    with pytest.raises(RuntimeError, match="1 row"):
        engine.replace_model(model)
    engine.release("row")
    engine.replace_model(model)


def test_a_swap_lets_running_requests_finish_on_the_old_version(tiny_checkpoint, retrained_checkpoint):
    from openai import OpenAI

    old, new = load_hf(tiny_checkpoint), load_hf(retrained_checkpoint)
    tokenizer = tiny_tokenizer()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected_old, expected_new = greedy_tokens(old, prompt_ids, 12), greedy_tokens(new, prompt_ids, 12)
    assert expected_old != expected_new
    with running_server(serve_args(tiny_checkpoint)) as (url, served):
        served.scheduler.version = "v0"
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def complete():
            return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})

        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))  # the request holds its row: the swap must wait for it
        assert first.system_fingerprint == "v0"
        swapped = served.scheduler.swap_model(new, "v1")
        rest = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert swapped.result(timeout=30) == "v1"
        after = complete()
    old_text = first.choices[0].text + rest
    assert old_text == tokenizer.decode(expected_old)
    assert after.system_fingerprint == "v1"
    assert after.choices[0].text == tokenizer.decode(expected_new)


def test_a_swap_to_another_structure_fails_and_keeps_serving(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint)) as (url, served):
        served.scheduler.version = "v0"
        future = served.scheduler.swap_model(with_adapters(tiny_checkpoint), "v1")
        with pytest.raises(ValueError, match="served structure"):
            future.result(timeout=30)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert response.system_fingerprint == "v0"
    assert response.choices[0].finish_reason == "length"
