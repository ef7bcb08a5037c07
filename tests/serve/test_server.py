"""``jaxalign serve`` against live loopback servers over the tiny random Llama, driven by the official ``openai``
client (and ``httpx`` where the raw HTTP matters).

- The shared server (``server``/``client`` of conftest): chat and completions, streamed and whole, ``n``, stop
  strings, seeds, logprobs equal to a teacher-forced forward pass, stream usage, ``/v1/models``, ``/health``,
  ``/metrics``, batching that changes no token, and every bad request answered with OpenAI's error object.
- A server with two slots and a queue of one (``limited``): 429 on a full queue, request timeouts, clients that
  go away mid-request free their slots. Its decode steps are slowed down by a test wrapper, so the timings do
  not depend on the machine.
- A server with a doctor (``guided``): per-request guidance weights.
- ``jaxalign serve``'s command-line errors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from jaxalign.cli import main
from jaxalign.losses import token_logps
from jaxalign.models import CausalLMWithValueHead, load_hf, save_doctor
from jaxalign.rollout import ContinuousEngine
from jaxalign.serve.command import persistent_compilation_cache
from tests.models.conftest import make_hf_model
from tests.serve.conftest import MAX_MODEL_LEN, MODEL, REQUEST_TIMEOUT_S, running_server, serve_args
from tests.test_cli import tiny_tokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
SKY = [{"role": "user", "content": "sky ?"}]
HTTP_TIMEOUT = 60
WAIT_S = 20
LOGP_TOL = 1e-4


# --- helpers ------------------------------------------------------------------------------------------------


def post(url: str, path: str, body=None, *, content: bytes | None = None, timeout=HTTP_TIMEOUT) -> httpx.Response:
    if content is not None:
        return httpx.post(url + path, content=content, headers={"content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(url + path, json=body, timeout=timeout)


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": HI, **fields}


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def scrape(url: str) -> list:
    """``/metrics`` parsed: the samples of every metric family."""
    response = httpx.get(url + "/metrics", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]


def metric(url: str, name: str, **labels) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in scrape(url) if s.name == name and labels.items() <= s.labels.items())


@contextlib.contextmanager
def slow_steps(served, seconds: float):
    """Every decode step of the server's engine takes at least ``seconds`` (and records the live rows)."""
    engine = served.scheduler.engine
    step = engine.step
    live = []

    def slow():
        time.sleep(seconds)
        live.append(engine.live)
        return step()

    engine.step = slow
    try:
        yield live
    finally:
        del engine.step


def streamed_chat(chunks) -> tuple[dict, dict, list]:
    """``(texts, finish reasons, chunks)`` by choice index from a chat stream of the openai client."""
    texts, reasons, seen = {}, {}, []
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, seen


def streamed_completion(chunks) -> tuple[dict, dict, list]:
    texts, reasons, seen = {}, {}, []
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, seen


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a raw server-sent event stream (``[DONE]`` kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --- the shared server: fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(server):
    return server[1].tokenizer


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_hf(tiny_checkpoint)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def teacher_forced(model, prompt_ids: list[int], response_ids: list[int]) -> np.ndarray:
    """Each response token's log-probability and the whole log-softmax ``[N, V]`` behind it, from one forward
    pass over prompt + response."""
    ids = np.asarray([prompt_ids + response_ids], np.int32)
    logits = model(ids)[0]
    start = len(prompt_ids) - 1
    chosen = np.asarray(token_logps(logits[:, start:-1], ids[:, start + 1:]))[0]
    return chosen, np.asarray(jax.nn.log_softmax(logits[0, start:-1].astype(np.float32), axis=-1))


# --- chat and completions ------------------------------------------------------------------------------------


def test_models_and_health(server, client, tiny_checkpoint):
    url, _ = server
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].root == str(tiny_checkpoint.resolve())  # as vLLM lists it: which weights answer
    assert models[0].max_model_len == MAX_MODEL_LEN and models[0].guidance_dimensions == []
    health = httpx.get(url + "/health", timeout=HTTP_TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_chat_streamed_equals_whole(client, sampling):
    whole = client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=10, n=2, **sampling)
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in whole.choices)
    texts, reasons, chunks = streamed_chat(client.chat.completions.create(
        model=MODEL, messages=SKY, max_tokens=10, n=2, stream=True, **sampling))
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[0].choices[0].delta.role == "assistant", "the first chunk names the role"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    if sampling["temperature"] == 0:
        assert texts[0] == texts[1], "greedy samples are the same"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3, extra_body={"top_k": 20})],
                         ids=["greedy", "seeded"])
def test_completion_streamed_equals_whole(client, sampling):
    whole = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=10, **sampling)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("length", "stop")
    texts, reasons, chunks = streamed_completion(client.completions.create(
        model=MODEL, prompt="sky blue", max_tokens=10, stream=True, **sampling))
    assert texts == {0: whole.choices[0].text} and reasons == {0: whole.choices[0].finish_reason}


def test_token_id_prompt_equals_its_text(client, tokenizer):
    ids = list(tokenizer("sky blue ?")["input_ids"])
    by_text = client.completions.create(model=MODEL, prompt="sky blue ?", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)


def test_n_samples_have_indexes_and_usage(client, tokenizer):
    response = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=7, n=3, seed=4, logprobs=0,
                                         temperature=1.0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    counts = [len(c.logprobs.tokens) for c in response.choices]
    assert response.usage.prompt_tokens == len(tokenizer("sky blue")["input_ids"])
    assert response.usage.completion_tokens == sum(counts) and all(0 < n <= 7 for n in counts)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert len({c.text for c in response.choices}) == 3, "each sample draws its own tokens"
    # Sample j of a seeded request does not depend on n.
    single = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=7, n=1, seed=4, temperature=1.0)
    assert single.choices[0].text == response.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, n=2, logprobs=True, seed=1)
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    assert chat.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, HI))


def test_generation_stops_at_the_context_length(client):
    # Chat without max_tokens: up to the context length (48 tokens, 9 of them the prompt).
    response = client.chat.completions.create(model=MODEL, messages=HI, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (9, MAX_MODEL_LEN - 9)
    # The longest prompt leaves room for one token.
    longest = client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN - 1), max_tokens=1, temperature=0)
    assert longest.usage.completion_tokens == 1 and longest.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=[5] * MAX_MODEL_LEN, max_tokens=1)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"


def test_stop_strings_cut_the_text_before_them(client):
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0, logprobs=True)
    text = full.choices[0].message.content
    pieces = [e.token for e in full.choices[0].logprobs.content]
    assert full.choices[0].finish_reason == "length" and "".join(pieces) == text and len(pieces) == 16
    stop = pieces[4] + pieces[5]  # a stop string over two tokens
    expected = text[:text.find(stop)]
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0,
                                         stop=["never said", stop])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (expected, "stop")
    assert cut.usage.completion_tokens < 16
    texts, reasons, _ = streamed_chat(client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert (texts[0], reasons[0]) == (expected, "stop")
    # A stop string that never comes: the whole text (the held-back tail included), finish_reason "length".
    texts, reasons, _ = streamed_chat(client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=16, temperature=0, stop="never said", stream=True))
    assert (texts[0], reasons[0]) == (text, "length")
    completion = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=12, temperature=0)
    word = completion.choices[0].text[-4:]
    cut = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=12, temperature=0, stop=word)
    assert cut.choices[0].text == completion.choices[0].text[:completion.choices[0].text.find(word)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeds_reproduce(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, temperature=1.0,
                                              seed=seed).choices[0].message.content

    first, again, other, third = sample(1), sample(1), sample(2), sample(3)
    assert first == again
    assert len({first, other, third}) == 3, "different seeds draw different tokens at temperature 1"


def test_chat_logprobs_equal_a_teacher_forced_forward_pass(client, tokenizer, tiny_model):
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=11)):
        response = client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=12, logprobs=True,
                                                  top_logprobs=3, **sampling)
        content = response.choices[0].logprobs.content
        prompt_ids = chat_prompt_ids(tokenizer, SKY)
        assert response.usage.prompt_tokens == len(prompt_ids)
        ids = [tokenizer.convert_tokens_to_ids(entry.token) for entry in content]
        chosen, every = teacher_forced(tiny_model, prompt_ids, ids)
        np.testing.assert_allclose([entry.logprob for entry in content], chosen, atol=LOGP_TOL)
        for position, entry in enumerate(content):
            assert entry.bytes == list(entry.token.encode())
            top = entry.top_logprobs
            assert len(top) == 3
            top_ids = [tokenizer.convert_tokens_to_ids(t.token) for t in top]
            np.testing.assert_allclose([t.logprob for t in top], every[position, top_ids], atol=LOGP_TOL)
            assert top[0].logprob == pytest.approx(every[position].max(), abs=LOGP_TOL)
            assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        if sampling["temperature"] == 0:
            assert [t.top_logprobs[0].token for t in content] == [t.token for t in content]


def test_completion_logprobs_equal_a_teacher_forced_forward_pass(client, tokenizer, tiny_model):
    response = client.completions.create(model=MODEL, prompt="sky blue", max_tokens=10, temperature=1.0, seed=5,
                                         logprobs=3)
    choice = response.choices[0]
    logprobs = choice.logprobs
    prompt_ids = list(tokenizer("sky blue")["input_ids"])
    ids = [tokenizer.convert_tokens_to_ids(token) for token in logprobs.tokens]
    chosen, every = teacher_forced(tiny_model, prompt_ids, ids)
    np.testing.assert_allclose(logprobs.token_logprobs, chosen, atol=LOGP_TOL)
    for position, top in enumerate(logprobs.top_logprobs):
        assert len(top) == 3
        np.testing.assert_allclose(list(top.values()), every[position, [tokenizer.convert_tokens_to_ids(t)
                                                                         for t in top]], atol=LOGP_TOL)
    if choice.finish_reason == "length":
        assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]


def test_streamed_completion_logprobs_equal_the_whole_ones(client):
    body = dict(model=MODEL, prompt="sky blue", max_tokens=10, temperature=0, logprobs=1, stop="never said")
    whole = client.completions.create(**body).choices[0].logprobs
    tokens, logps, offsets = [], [], []
    for chunk in client.completions.create(**body, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logps += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert tokens == whole.tokens
    np.testing.assert_allclose(logps, whole.token_logprobs, atol=1e-6)
    assert offsets == whole.text_offset


def test_stream_usage(client):
    with_usage = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    last = with_usage[-1]
    assert last.choices == [] and (last.usage.completion_tokens, last.usage.total_tokens) == (6, 6 + 9)
    assert all(chunk.usage is None for chunk in with_usage[:-1])
    assert with_usage[-2].choices[0].finish_reason == "length"
    without = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                                  stream=True))
    assert without[-1].choices[0].finish_reason == "length" and without[-1].usage.completion_tokens == 6
    assert all(chunk.usage is None for chunk in without[:-1])
    completions = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert completions[-1].choices == [] and completions[-1].usage.completion_tokens == 8


def test_metrics_are_prometheus_text(server, client):
    url, _ = server
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    names = {sample.name for sample in scrape(url)}
    for name in ("jaxalign_requests_total", "jaxalign_time_to_first_token_seconds_count",
                 "jaxalign_time_to_first_token_seconds_bucket", "jaxalign_queue_depth",
                 "jaxalign_generation_tokens_per_second", "jaxalign_e2e_request_latency_seconds_count",
                 "jaxalign_generation_tokens_total", "jaxalign_prompt_tokens_total", "jaxalign_live_rows"):
        assert name in names, name
    assert metric(url, "jaxalign_requests_total", endpoint=CHAT, status="200", model=MODEL) >= 1
    assert metric(url, "jaxalign_time_to_first_token_seconds_count") >= 1
    assert metric(url, "jaxalign_generation_tokens_per_second") > 0, "tokens were generated in the last seconds"
    # A shape the server has run compiles nothing the second time (each compilation would stall every row).
    compiled = metric(url, "jaxalign_xla_compilations_total")
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert metric(url, "jaxalign_xla_compilations_total") == compiled
    # The gauges are set at the end of the scheduler's iteration, just after the response went out.
    wait_until(lambda: metric(url, "jaxalign_queue_depth") == 0 and metric(url, "jaxalign_live_rows") == 0,
               "the gauges to show an idle server")


def test_metrics_say_where_the_scheduler_spends_its_time(server, client):
    url, served = server
    phases = ("decode", "prefill", "deliver", "idle", "other")
    # The wait before a request is counted when the request wakes the scheduler: this one takes the wait since the
    # previous test, so that what follows counts only the scheduler's time from here on (and the scrape's).
    started = time.perf_counter()
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, temperature=0)
    before = {phase: metric(url, "jaxalign_scheduler_seconds_total", phase=phase) for phase in phases}
    with slow_steps(served, 0.1):  # 5 tokens: the first from the prefill, then 4 decode steps of >= 0.1 s
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
    time.sleep(0.3)  # the idle scheduler: its wait is counted when the next request wakes it
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, temperature=0)
    elapsed = time.perf_counter() - started
    spent = {phase: metric(url, "jaxalign_scheduler_seconds_total", phase=phase) - before[phase] for phase in phases}
    assert spent["decode"] >= 0.4 and spent["prefill"] > 0 and spent["idle"] >= 0.25, spent
    assert sum(spent.values()) <= elapsed, (spent, elapsed)  # one thread's time, each second counted once


@pytest.fixture(scope="module")
def with_system_prompt(tiny_checkpoint, tmp_path_factory):
    """The tiny model with a chat template that opens with a system prompt, as SmolLM2's does."""
    import shutil

    from tests.test_cli import CHAT_TEMPLATE, tiny_tokenizer

    directory = tmp_path_factory.mktemp("serve") / "system_prompt"
    shutil.copytree(tiny_checkpoint, directory)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ '<|im_start|>system\nGo away .<|im_end|>\n' }}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    with running_server(serve_args(directory)) as (url, served):
        yield url, served, tokenizer


def test_chat_prompts_reuse_the_chat_templates_opening(with_system_prompt, tiny_model):
    """The server caches the chat template's opening (system prompt and user turn tag) at start; a chat request
    computes only the tokens after it, with the logprobs of a teacher-forced pass over the whole prompt."""
    url, served, tokenizer = with_system_prompt
    head = served.chat_head()
    prompt_ids = chat_prompt_ids(tokenizer, SKY)
    assert head is not None and len(head) >= 8 and prompt_ids[:len(head)] == head
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)
    before = metric(url, "jaxalign_prompt_tokens_cached_total")
    response = client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=6, temperature=0, logprobs=True)
    assert metric(url, "jaxalign_prompt_tokens_cached_total") == before + len(head)
    content = response.choices[0].logprobs.content
    chosen, _ = teacher_forced(tiny_model, prompt_ids, [tokenizer.convert_tokens_to_ids(e.token) for e in content])
    np.testing.assert_allclose([e.logprob for e in content], chosen, atol=LOGP_TOL)
    client.completions.create(model=MODEL, prompt="sky ?", max_tokens=2)  # no chat opening: computed whole
    own_system = [{"role": "system", "content": "Hi"}, *SKY]  # another opening: computed whole
    client.chat.completions.create(model=MODEL, messages=own_system, max_tokens=2)
    assert metric(url, "jaxalign_prompt_tokens_cached_total") == before + len(head)


def test_without_the_prefix_cache_every_prompt_is_computed_whole(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint, no_prefix_cache=True)) as (url, served):
        response = httpx.post(url + CHAT, json={"model": MODEL, "messages": SKY, "max_tokens": 2},
                              timeout=HTTP_TIMEOUT)
        assert response.status_code == 200
        assert metric(url, "jaxalign_prompt_tokens_cached_total") == 0
        assert metric(url, "jaxalign_prompt_tokens_total") == response.json()["usage"]["prompt_tokens"]


def test_batching_is_invisible(server, client):
    _, served = server
    target = dict(model=MODEL, prompt="sky blue ?", max_tokens=12, temperature=0, logprobs=1)
    alone = client.completions.create(**target).choices[0].logprobs

    # Seventeen requests at once, in shapes not compiled yet: the server compiles about 36 s of programs for them
    # (five decode steps, three first-token and two prefill calls; 2 idle cores), and on CI's loaded two cores one
    # request waited past 120 s: they wait as long as the server lets them (a hang still fails).
    client = client.with_options(timeout=REQUEST_TIMEOUT_S)
    others = []
    for k in range(16):
        common = dict(model=MODEL, max_tokens=8 + k, seed=k, temperature=[0, 1.0, 0.7][k % 3])
        if k % 2:
            others.append(lambda c=common, k=k: client.chat.completions.create(
                messages=[{"role": "user", "content": "Go away ." if k % 4 == 1 else "Hi"}], n=1 + k % 3, **c))
        else:
            others.append(lambda c=common, k=k: client.completions.create(
                prompt="blue sky " * (1 + k % 5), stream=k % 4 == 0, **c))
    with slow_steps(served, 0.02) as live, concurrent.futures.ThreadPoolExecutor(max_workers=17) as pool:
        futures = [pool.submit(run) for run in others[:8]]
        futures.append(pool.submit(client.completions.create, **target))
        futures += [pool.submit(run) for run in others[8:]]
        results = [future.result(timeout=REQUEST_TIMEOUT_S) for future in futures]
    for result in results:  # drain the streams
        if not hasattr(result, "choices"):
            list(result)
    together = results[8].choices[0].logprobs
    assert together.tokens == alone.tokens
    np.testing.assert_allclose(together.token_logprobs, alone.token_logprobs, atol=1e-5)
    assert max(live) >= 4, f"the requests shared decode steps (most live rows {max(live)})"


# --- bad requests -------------------------------------------------------------------------------------------

LONG = " ".join(["sky"] * 60)
BAD_REQUESTS = {
    # name: (path, body or raw bytes, status, param, code, words of the message)
    "unknown model": (CHAT, chat_body(model="nope"), 404, "model", "model_not_found", "`nope` does not exist"),
    "no model": (CHAT, {"messages": HI}, 400, "model", None, "model is required"),
    "max_tokens a string": (CHAT, chat_body(max_tokens="five"), 400, "max_tokens", None,
                            "max_tokens must be an integer, got 'five'"),
    "temperature a string": (CHAT, chat_body(temperature="hot"), 400, "temperature", None,
                             "temperature must be a number, got 'hot'"),
    "temperature too high": (CHAT, chat_body(temperature=3), 400, "temperature", None, "between 0.0 and 2.0"),
    "n 0": (CHAT, chat_body(n=0), 400, "n", None, "n must be >= 1, got 0"),
    "n over the batch": (CHAT, chat_body(n=33), 400, "n", None,
                         "n must be <= 32, the rows this server decodes at once (its --max-batch), got 33"),
    "negative max_tokens": (CHAT, chat_body(max_tokens=-1), 400, "max_tokens", None, "max_tokens must be >= 1"),
    "seed a float": (CHAT, chat_body(seed=1.5), 400, "seed", None, "seed must be an integer"),
    "top_p 0": (CHAT, chat_body(top_p=0), 400, "top_p", None, "top_p must be in (0, 1]"),
    "empty messages": (CHAT, chat_body(messages=[]), 400, "messages", None, "messages must not be empty"),
    "no messages": (CHAT, {"model": MODEL}, 400, "messages", None, "messages is required"),
    "messages not a list": (CHAT, chat_body(messages="Hi"), 400, "messages", None, "messages must be a list"),
    "message without role": (CHAT, chat_body(messages=[{"content": "Hi"}]), 400, "messages[0].role", None,
                             "messages[0].role must be one of"),
    "content not text": (CHAT, chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
                         None, "messages[0].content must be a string"),
    "image content": (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
                      "messages[0].content", None, "must be a text part"),
    "prompt too long": (CHAT, chat_body(messages=[{"role": "user", "content": LONG}]), 400, "messages",
                        "context_length_exceeded", "maximum context length is 48 tokens"),
    "completion prompt too long": (COMPLETIONS, {"model": MODEL, "prompt": LONG}, 400, "prompt",
                                   "context_length_exceeded", "but the prompt has"),
    "prompt + max_tokens too long": (CHAT, chat_body(max_tokens=45), 400, "max_tokens", "context_length_exceeded",
                                     "you requested 54 tokens (9 in the prompt, 45 for the completion)"),
    "top_logprobs without logprobs": (CHAT, chat_body(top_logprobs=2), 400, "top_logprobs", None,
                                      "top_logprobs needs logprobs: true"),
    "top_logprobs over 20": (CHAT, chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs", None, "<= 20"),
    "completion logprobs over 5": (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "logprobs": 6}, 400, "logprobs",
                                   None, "logprobs must be <= 5"),
    "five stop strings": (CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None,
                          "at most 4 strings"),
    "empty stop string": (CHAT, chat_body(stop=[""]), 400, "stop", None, "must not be empty"),
    "stream_options without stream": (CHAT, chat_body(stream_options={"include_usage": True}), 400,
                                      "stream_options", None, "only allowed with stream: true"),
    "empty prompt": (COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", None, "must not be empty"),
    "two prompts": (COMPLETIONS, {"model": MODEL, "prompt": ["Hi", "sky"]}, 400, "prompt", None,
                    "one prompt per request"),
    "token id outside the vocabulary": (COMPLETIONS, {"model": MODEL, "prompt": [5, 97]}, 400, "prompt", None,
                                        "prompt token id 97 is outside the vocabulary of 97"),
    "malformed JSON": (CHAT, b'{"model": "tiny", ', 400, None, "invalid_json", "not valid JSON"),
    "not UTF-8": (CHAT, b"\xff\xfe", 400, None, "invalid_json", "not valid JSON"),
    "a JSON array": (CHAT, b'[{"model": "tiny"}]', 400, None, "invalid_json", "must be a JSON object, got list"),
    "presence_penalty": (CHAT, chat_body(presence_penalty=1), 400, "presence_penalty", None,
                         "presence_penalty is not supported"),
    "tools": (CHAT, chat_body(tools=[{"type": "function"}]), 400, "tools", None, "tools is not supported"),
    "guidance without doctors": (CHAT, chat_body(guidance={"preference_weights": {"safety": 1}}), 400,
                                 "guidance", None, "--doctor"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error(server, case):
    url, _ = server
    path, body, status, param, code, words = BAD_REQUESTS[case]
    response = post(url, path, content=body) if isinstance(body, bytes) else post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert words in error["message"]


ROUTES = {CHAT: {"POST"}, COMPLETIONS: {"POST"}, "/v1/models": {"GET"}, "/health": {"GET"}, "/metrics": {"GET"}}


def test_unknown_routes_get_an_openai_404(server):
    url, _ = server
    for method in ("GET", "POST", "DELETE"):
        missing = httpx.request(method, url + "/v1/nope", json={"model": MODEL}, timeout=HTTP_TIMEOUT)
        assert missing.status_code == 404
        assert missing.json()["error"] == {"message": "no route /v1/nope", "type": "invalid_request_error",
                                           "param": None, "code": None}


@pytest.mark.parametrize("path", list(ROUTES))
def test_wrong_methods_get_an_openai_405_with_allow(server, path):
    url, _ = server
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - ROUTES[path]):
        wrong = httpx.request(method, url + path, timeout=HTTP_TIMEOUT)
        assert wrong.status_code == 405, (method, wrong.text)
        assert {m.strip() for m in wrong.headers["allow"].split(",")} == ROUTES[path], "HTTP requires Allow on a 405"
        assert wrong.json()["error"] == {"message": f"{method} is not allowed on {path}",
                                         "type": "invalid_request_error", "param": None, "code": None}


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics", CHAT])
def test_head_answers_as_get_without_the_body(server, path):
    """``curl -I`` and uptime probes send HEAD: the GET's status and headers, no body; a POST route's 405
    names HEAD."""
    url, _ = server
    head = httpx.head(url + path, timeout=HTTP_TIMEOUT)
    if "GET" not in ROUTES[path]:
        assert head.status_code == 405 and head.content == b""
        return
    get = httpx.get(url + path, timeout=HTTP_TIMEOUT)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # its counters move between the two requests
        assert head.headers["content-length"] == get.headers["content-length"]


def test_the_openai_client_reads_the_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=HI)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    assert bad.value.param == "max_tokens" and "max_tokens must be >= 1" in bad.value.message


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    response = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, presence_penalty=0,
                                              frequency_penalty=0, logit_bias=None, extra_body={"unknown": 1})
    assert response.choices[0].finish_reason in ("length", "stop")


def test_never_a_500_and_still_serving(server, client):
    url, _ = server
    assert metric(url, "jaxalign_requests_total", status="500") == 0
    response = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0)
    assert response.choices[0].message.content


# --- bugs exposed on the shared server (last: they may answer 500) ------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("seed", 2**64), ("seed", -(2**63) - 1), ("top_k", 2**40)])
def test_out_of_range_integers_are_refused(server, field, value):
    url, _ = server
    response = post(url, CHAT, chat_body(max_tokens=3, **{field: value}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_a_request_failing_in_the_engine_fails_alone(server, monkeypatch):
    url, served = server
    engine = served.scheduler.engine
    admit = engine.admit

    def failing(prefilled, rows):
        if any(settings.seed == 666 for settings in rows.values()):
            raise RuntimeError("this request cannot be admitted")
        return admit(prefilled, rows)

    monkeypatch.setattr(engine, "admit", failing)
    results = {}

    def run(name, body, timeout):
        try:
            results[name] = post(url, CHAT, body, timeout=timeout).status_code
        except httpx.TimeoutException:
            results[name] = "no answer"

    with slow_steps(served, 0.2), concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        running = pool.submit(run, "running", chat_body(max_tokens=12, ignore_eos=True), WAIT_S)
        wait_until(lambda: served.scheduler.running == 1, "the first request to run")
        failing_one = pool.submit(run, "failing", chat_body(max_tokens=3, seed=666), WAIT_S)
        time.sleep(0.02)  # the next two arrive during one slow step: admitted in the same iteration
        beside = pool.submit(run, "admitted with it", chat_body(max_tokens=3, seed=1), 8)
        for future in (running, failing_one, beside):
            future.result(timeout=WAIT_S * 2)
    wait_until(lambda: served.scheduler.running == 0 and engine.live == 0, "the slots to be free")
    assert results == {"running": 200, "failing": 500, "admitted with it": 200}


# --- a server with two slots and a queue of one ------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tiny_checkpoint):
    with running_server(serve_args(tiny_checkpoint, max_batch=2, max_queue=1)) as (url, served):
        assert post(url, CHAT, chat_body(max_tokens=3, n=2)).status_code == 200  # compile before timing
        yield url, served


def limited_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)


def slots_free(served) -> bool:
    return served.scheduler.running == 0 and served.scheduler.queued == 0 and served.scheduler.engine.live == 0


def test_a_full_queue_answers_429(limited):
    url, served = limited
    with slow_steps(served, 0.05), concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(post, url, CHAT, chat_body(n=2, max_tokens=30, ignore_eos=True))  # both slots
        wait_until(lambda: served.scheduler.running == 1, "the first request to run")
        second = pool.submit(post, url, CHAT, chat_body(max_tokens=2))
        wait_until(lambda: served.scheduler.queued == 1, "the second request to wait")
        with pytest.raises(openai.RateLimitError) as refused:
            limited_client(url).chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert refused.value.status_code == 429 and refused.value.code == "queue_full"
        assert refused.value.type == "rate_limit_error"
        assert first.result(timeout=WAIT_S * 3).status_code == 200
        assert second.result(timeout=WAIT_S * 3).status_code == 200
    wait_until(lambda: slots_free(served), "the slots to be free")


def test_n_over_the_batch_is_refused(limited):
    url, _ = limited
    response = post(url, CHAT, chat_body(n=3))
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert response.json()["error"]["message"] == ("n must be <= 2, the rows this server decodes at once (its "
                                                   "--max-batch), got 3")


def test_a_request_past_its_timeout_gets_an_error(limited, monkeypatch):
    url, served = limited
    monkeypatch.setattr(served, "request_timeout", 0.5)
    dropped = metric(url, "jaxalign_requests_dropped_total")
    with slow_steps(served, 0.05):
        response = post(url, CHAT, chat_body(max_tokens=30, ignore_eos=True))
        assert response.status_code == 408, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "timeout")
        assert "timed out" in error["message"]
        with httpx.stream("POST", url + CHAT, json=chat_body(max_tokens=30, ignore_eos=True, stream=True),
                          timeout=HTTP_TIMEOUT) as streamed:
            events = sse_events(streamed)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    wait_until(lambda: slots_free(served), "the slots to be free")
    assert metric(url, "jaxalign_requests_dropped_total") == dropped + 2


def test_a_client_leaving_mid_stream_frees_its_slot(limited):
    url, served = limited
    dropped = metric(url, "jaxalign_requests_dropped_total")
    finished = metric(url, "jaxalign_e2e_request_latency_seconds_count")
    with slow_steps(served, 0.05):
        with httpx.stream("POST", url + CHAT, json=chat_body(max_tokens=35, ignore_eos=True, stream=True),
                          timeout=HTTP_TIMEOUT) as streamed:
            for line in streamed.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # one token came: leave
            assert served.scheduler.engine.live == 1
        wait_until(lambda: slots_free(served), "the slot of the client that left to be free", timeout=10)
    assert metric(url, "jaxalign_requests_dropped_total") == dropped + 1
    assert metric(url, "jaxalign_e2e_request_latency_seconds_count") == finished, "it was cancelled, not finished"


def test_a_client_leaving_a_whole_response_frees_its_slot(limited):
    url, served = limited
    dropped = metric(url, "jaxalign_requests_dropped_total")
    finished = metric(url, "jaxalign_e2e_request_latency_seconds_count")
    with slow_steps(served, 0.05):
        with pytest.raises(httpx.ReadTimeout):
            post(url, CHAT, chat_body(max_tokens=35, ignore_eos=True), timeout=httpx.Timeout(10, read=0.5))
        wait_until(lambda: slots_free(served), "the slot of the client that left to be free", timeout=10)
    assert post(url, CHAT, chat_body(max_tokens=2)).status_code == 200
    assert metric(url, "jaxalign_requests_dropped_total") == dropped + 1
    assert metric(url, "jaxalign_e2e_request_latency_seconds_count") == finished + 1, "only the last one finished"


# --- a guided server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doctor_dir(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_doctor")
    make_hf_model("llama_tied_3_layers", seed=1).save_pretrained(root / "safe_lm")
    doctor = CausalLMWithValueHead(load_hf(root / "safe_lm"), rngs=nnx.Rngs(0))
    return save_doctor(root / "safe", doctor, tiny_tokenizer(), dimension="safety",
                       metadata={"patient": str(tiny_checkpoint)})


@pytest.fixture(scope="module")
def guided(tiny_checkpoint, doctor_dir):
    with running_server(serve_args(tiny_checkpoint, doctor=[doctor_dir])) as (url, served):
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT)


def guided_reply(client, guidance=None, **fields):
    extra = {} if guidance is None else {"extra_body": {"guidance": guidance}}
    response = client.chat.completions.create(model=MODEL, messages=SKY, max_tokens=8, temperature=0, **fields,
                                              **extra)
    return response


def test_guided_server_lists_its_dimensions(guided):
    _, client = guided
    assert client.models.list().data[0].guidance_dimensions == ["safety"]


def test_guidance_weights_per_request(guided, client, tokenizer, tiny_model):
    _, steered_client = guided
    patient = guided_reply(client).choices[0].message.content  # the unguided server
    assert guided_reply(steered_client, {"beta": 0}).choices[0].message.content == patient
    assert guided_reply(steered_client, {"preference_weights": {"safety": 0}}).choices[0].message.content == patient
    default = guided_reply(steered_client).choices[0].message.content
    assert default == guided_reply(steered_client, {"preference_weights": {"safety": 1}, "alpha": 1,
                                                    "beta": 0.5}).choices[0].message.content
    strong = guided_reply(steered_client, {"beta": 2}, logprobs=True)
    assert strong.choices[0].message.content != patient, "the doctor steers"
    # beta multiplies the weights: w = 4 at the server's beta 0.5 is w = 1 at beta 2.
    assert guided_reply(steered_client, {"preference_weights": {"safety": 4}}).choices[0].message.content == \
        strong.choices[0].message.content
    # The logprobs are the patient's own, for steered tokens too.
    content = strong.choices[0].logprobs.content
    ids = [tokenizer.convert_tokens_to_ids(entry.token) for entry in content]
    chosen, _ = teacher_forced(tiny_model, chat_prompt_ids(tokenizer, SKY), ids)
    np.testing.assert_allclose([entry.logprob for entry in content], chosen, atol=LOGP_TOL)
    texts, _, _ = streamed_chat(steered_client.chat.completions.create(
        model=MODEL, messages=SKY, max_tokens=8, temperature=0, stream=True, extra_body={"guidance": {"beta": 2}}))
    assert texts[0] == strong.choices[0].message.content


@pytest.mark.parametrize(("guidance", "param", "words"), [
    ({"preference_weights": {"nope": 1}}, "guidance", "no doctor for the dimension(s) 'nope'; the doctors' "
                                                      "dimensions are 'safety'"),
    ({"preference_weights": {"safety": -1}}, "guidance", "the weight of 'safety' must be finite and >= 0"),
    ({"preference_weights": [1]}, "guidance.preference_weights", "must map dimension names to numbers"),
    ({"alpha": -1}, "guidance.alpha", "guidance.alpha must be a number >= 0"),
    ({"alpha": 0, "beta": 0}, "guidance", "the scores would be flat"),
    ({"gamma": 1}, "guidance", "unknown field(s) ['gamma']"),
    ("strong", "guidance", "guidance must be an object"),
])
def test_bad_guidance_is_refused(guided, guidance, param, words):
    url, _ = guided
    response = post(url, CHAT, chat_body(guidance=guidance))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


# --- the command line --------------------------------------------------------------------------------------


@pytest.fixture
def no_serving(monkeypatch):
    """``jaxalign serve`` in-process must fail before serving: starting uvicorn or warming up is a test failure,
    and so is a JAX setting left changed."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the server started despite a bad option")

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(ContinuousEngine, "warm_up", refuse)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    assert {name: getattr(jax.config, name) for name in names} == saved


def test_the_persistent_compilation_cache_is_written_only_inside_its_block(tmp_path):
    cache = tmp_path / "xla"

    def compile_new_program(scale):
        return jax.jit(lambda x: x * scale + 1.0)(jnp.ones(3)).block_until_ready()

    with persistent_compilation_cache(cache):
        compile_new_program(3.0)
        written = sorted(cache.iterdir())
    assert written, "nothing was written to the cache inside the block"
    with persistent_compilation_cache(None):
        compile_new_program(5.0)
    compile_new_program(7.0)  # after the block: this session's own setting, never the block's directory
    assert sorted(cache.iterdir()) == written


@pytest.mark.parametrize(("args", "message"), [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["--max-model-len", "-5"], "--max-model-len must be >= 1, got -5"),
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--request-timeout", "0"], "--request-timeout must be > 0, got 0.0"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be >= 1, got 0"),
    (["--preference-weights", '{"safety": 1}'], "--preference-weights needs --doctor"),
    (["--reward-model", "/no/such/rm"], "--reward-model /no/such/rm: no such directory"),
    (["--reward-dimension-weights", "1,2"], "--reward-dimension-weights combine a reward model's objectives: give "
                                            "--reward-model"),
    (["--mesh", "tensor"], "--mesh: 'tensor' is not AXIS=SIZE with AXIS one of data, fsdp, tensor"),
    (["--mesh", "model=2"], "--mesh: 'model=2' is not AXIS=SIZE"),
    (["--mesh", "tensor=2,tensor=1"], "--mesh: axis tensor is given twice"),
    (["--mesh", "tensor=two"], "--mesh: the size of tensor must be a positive int or -1, got 'two'"),
    (["--mesh", "tensor=0"], "--mesh tensor=0: MeshConfig.tensor must be a positive int or -1, got 0"),
    (["--mesh", "tensor=3"], "--mesh tensor=3: data 1 x tensor 3 = 3 does not divide the 1 device(s) here"),
    (["--mesh", "data=1,fsdp=1,tensor=2"], "--mesh data=1,fsdp=1,tensor=2: data 1 x fsdp 1 x tensor 2 = 2 devices, but "
                                           "1 are here"),
    (["--mesh", "data=-1,tensor=-1"], "--mesh data=-1,tensor=-1: MeshConfig: at most one axis may be -1"),
    (["--reward-model", "<doctor>", "--reward-dimension-weights", "1,x"],
     "--reward-dimension-weights: expected comma-separated numbers"),
    (["--doctor", "/no/such/doctor"], "--doctor /no/such/doctor: no such directory"),
    (["--doctor", "<doctor>", "--preference-weights", "{safety: 1}"], "--preference-weights is not valid JSON"),
    (["--doctor", "<doctor>", "--preference-weights", '{"helpfulness": 1}'],
     "--preference-weights: no doctor for the dimension(s) 'helpfulness'"),
])
def test_serve_command_line_errors(tiny_checkpoint, doctor_dir, capsys, no_serving, args, message):
    args = [str(doctor_dir) if arg == "<doctor>" else arg for arg in args]
    status = main(["serve", "--model", str(tiny_checkpoint), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"jaxalign serve: error: {message}"), err
