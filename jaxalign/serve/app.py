"""The HTTP side: a FastAPI app with OpenAI's endpoints on top of the :class:`~jaxalign.serve.scheduler.Scheduler`.

``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events when ``stream`` is
true, exactly as OpenAI's clients parse them: ``data: {chunk}`` lines, ``data: [DONE]`` last), ``GET
/v1/models``, ``GET /health``, ``GET /metrics``. Every refusal is OpenAI's error object with a 4xx status
(:mod:`~jaxalign.serve.protocol`); a client that goes away mid-request frees its decode slots at the
scheduler's next iteration.

Nothing slow runs on the event loop, which every stream shares: a body over ``max_request_bytes`` is refused (413)
before it is read, and parsing, the chat template and tokenising run in a thread pool (a 2 MB prompt takes seconds
to tokenise). Each answered request is one line on the ``jaxalign.serve.access`` logger (unless ``access_log`` is
off): client, request line, status, seconds, prompt and completion tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxalign.rollout.guided import guidance_betas
from jaxalign.serve import protocol
from jaxalign.serve.live_rewards import LiveRewards
from jaxalign.serve.metrics import CONTENT_TYPE, Metrics
from jaxalign.serve.protocol import DEFAULT_MAX_REQUEST_BYTES, APIError, Generation, bad
from jaxalign.serve.scheduler import Event, Job, Scheduler, settings_for

log = logging.getLogger("jaxalign.serve")
access_log = logging.getLogger("jaxalign.serve.access")
DISCONNECT_POLL_S = 0.25
# Threads that parse and tokenise requests, several so that a short prompt need not wait behind a long one (the Rust
# tokenizers release the GIL while they work, so these threads do not hold up the event loop).
PREPARE_WORKERS = 4
_ACCESS = "jaxalign.access"  # the scope key of a request's access record (see _RequestLog)
_HEAD = "jaxalign.head"  # set on a HEAD request answered as its GET (see _HeadAsGet)


def _prepare_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="jaxalign-prepare")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for the scheduler: validated, its prompt encoded, its rows' settings drawn."""

    generation: Generation
    prompt_ids: list[int]
    settings: list
    max_tokens: int


@dataclasses.dataclass
class ServedModel:
    """What the app serves.

    Attributes:
        name: the model id clients send (``/v1/models`` lists it).
        root: where its weights came from (an absolute path, or a Hub id), listed as ``root`` as vLLM does.
        tokenizer: encodes prompts (its chat template for chat requests) and decodes tokens.
        scheduler: runs the engine.
        metrics: the server's metrics.
        dimensions: the doctors' preference dimensions, in engine order (empty: unguided).
        alpha, beta, preference_weights: the guidance a request gets when it names none.
        request_timeout: seconds a request may take from arrival to its last token.
        rewards: scores every finished response for ``/metrics`` (``--reward-model``), or None.
        max_request_bytes: the largest request body read; a larger one gets a 413 (``--max-request-bytes``).
        access_log: one line per answered request on the ``jaxalign.serve.access`` logger (``--no-access-log``).
        workers: the threads :meth:`prepare` runs in.
    """

    name: str
    tokenizer: object
    scheduler: Scheduler
    metrics: Metrics
    dimensions: Sequence[str] = ()
    alpha: float = 1.0
    beta: float = 0.5
    preference_weights: dict[str, float] | None = None
    request_timeout: float = 600.0
    rewards: LiveRewards | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    access_log: bool = True
    workers: concurrent.futures.ThreadPoolExecutor = dataclasses.field(default_factory=_prepare_pool, repr=False)
    created: int = dataclasses.field(default_factory=protocol.now)
    root: str | None = None

    @property
    def max_model_len(self) -> int:
        return self.scheduler.engine.max_model_len

    def weights(self, guidance: protocol.Guidance | None) -> tuple[float, ...] | None:
        """The engine's ``[α, β_1, ...]`` for a request (None unguided)."""
        if not self.dimensions:
            if guidance is not None:
                raise bad("guidance needs a server started with --doctor (this one has no doctors)", "guidance")
            return None
        guidance = guidance or protocol.Guidance()
        alpha = self.alpha if guidance.alpha is None else guidance.alpha
        weights = self.preference_weights if guidance.preference_weights is None else guidance.preference_weights
        try:
            betas = guidance_betas(self.dimensions, weights, alpha=alpha,
                                   beta=self.beta if guidance.beta is None else guidance.beta,
                                   source="guidance.preference_weights")
        except ValueError as error:
            raise bad(str(error), "guidance") from None
        return (alpha, *betas)

    def chat_head(self) -> list[int] | None:
        """The tokens every chat prompt without a system message of its own begins with (the chat template's
        system prompt and the user turn's opening), or None (no chat template, or fewer than 8 such tokens).

        Found as the longest common token prefix of a few rendered conversations, one of them with an empty
        message (so no token of a message's content can be part of it); a prompt the tokenizer splits differently
        at the boundary simply does not use it."""
        if self.tokenizer.chat_template is None:
            return None
        encoded = []
        for text in ("", "Hello!", "What is 2 + 2?"):
            try:
                encoded.append(self.chat_ids([{"role": "user", "content": text}]))
            except APIError:
                return None
        common = 0
        while all(len(e) > common and e[common] == encoded[0][common] for e in encoded):
            common += 1
        return encoded[0][:common] if common >= 8 else None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt tokens of chat ``messages`` (the chat template, then the assistant turn's opening)."""
        tokenizer = self.tokenizer
        if tokenizer.chat_template is None:
            raise bad("this model's tokenizer has no chat template: use /v1/completions", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own checks (e.g. roles it refuses) raise anything
            raise bad(f"the chat template refused these messages: {error}", "messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, generation: Generation) -> list[int]:
        tokenizer = self.tokenizer
        if generation.kind == "chat":
            return self.chat_ids(generation.prompt)
        if isinstance(generation.prompt, str):
            return list(tokenizer(generation.prompt)["input_ids"])
        vocab = self.scheduler.engine.config.vocab_size
        outside = [t for t in generation.prompt if not 0 <= t < vocab]
        if outside:
            raise bad(f"prompt token id {outside[0]} is outside the vocabulary of {vocab}", "prompt")
        return list(generation.prompt)

    def prepare(self, raw: bytes, kind: str) -> Prepared:
        """A ``kind`` (``"chat"`` or ``"completion"``) request body validated and encoded, or the
        :class:`~jaxalign.serve.protocol.APIError` refusing it. CPU work in proportion to the body: the app runs it
        in :attr:`workers`, off the event loop."""
        generation = protocol.parse_generation(protocol.parse_body(raw), kind, max_n=self.scheduler.engine.max_batch)
        if generation.model != self.name:
            raise APIError(404, f"the model `{generation.model}` does not exist; this server serves `{self.name}`",
                           param="model", code="model_not_found")
        prompt_ids = self.encode(generation)
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise bad(f"this model's maximum context length is {limit} tokens, but the prompt has {len(prompt_ids)} "
                      "tokens: shorten it", "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        max_tokens = generation.max_tokens or limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise bad(f"this model's maximum context length is {limit} tokens, but you requested "
                      f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                      "completion): reduce max_tokens or the prompt", "max_tokens", "context_length_exceeded")
        seed = generation.seed if generation.seed is not None else secrets.randbits(31)
        settings = settings_for(n=generation.n, temperature=generation.temperature, top_p=generation.top_p,
                                top_k=generation.top_k, min_p=generation.min_p, seed=seed,
                                top_logprobs=max(generation.top_logprobs, int(generation.logprobs)),
                                weights=self.weights(generation.guidance))
        return Prepared(generation, prompt_ids, settings, max_tokens)


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI app serving ``served`` (start its scheduler first)."""
    app = FastAPI(title="jaxalign", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        method = "HEAD" if request.scope.get(_HEAD) else request.method
        message = {404: f"no route {request.url.path}", 405: f"{method} is not allowed on {request.url.path}"}
        body = APIError(error.status_code, message.get(error.status_code, str(error.detail))).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}").body(), status_code=500)

    app.add_middleware(_HeadAsGet)
    app.add_middleware(_LimitBody, served=served)
    app.add_middleware(_RequestLog, served=served)  # outermost: it sees the limit's 413s too

    @app.get("/health")
    async def health():
        alive = served.scheduler._thread is not None and served.scheduler._thread.is_alive()
        if not alive:
            raise APIError(503, "the scheduler is not running")
        return {"status": "ok", "queued": served.scheduler.queued, "running": served.scheduler.running}

    @app.get("/v1/models")
    async def models():
        entry = {"id": served.name, "object": "model", "created": served.created, "owned_by": "jaxalign",
                 "root": served.root, "max_model_len": served.max_model_len,
                 "guidance_dimensions": list(served.dimensions)}
        if served.scheduler.version is not None:  # the weights now answering (a retrained version swapped in)
            entry["system_fingerprint"] = served.scheduler.version
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(served, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(served, request, "completion")

    return app


async def _generate(served: ServedModel, request: Request, kind: str):
    arrived = time.perf_counter()
    raw = await request.body()  # at most max_request_bytes (_LimitBody)
    loop = asyncio.get_running_loop()
    prepared = await loop.run_in_executor(served.workers, served.prepare, raw, kind)
    generation = prepared.generation
    job = Job(prompt_ids=prepared.prompt_ids, settings=prepared.settings, max_tokens=prepared.max_tokens,
              stops=generation.stop, deadline=arrived + served.request_timeout, loop=loop, queue=asyncio.Queue(),
              submitted=arrived, ignore_eos=generation.ignore_eos)
    served.scheduler.submit(job)
    response = _Response(served, generation, len(prepared.prompt_ids))
    request.scope.get(_ACCESS, {})["response"] = response  # its tokens go into the access log
    if generation.stream:
        return StreamingResponse(_stream(job, response), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(job, response, request)


class _RequestLog:
    """Counts answered requests by route and status for ``/metrics`` (not ``/metrics`` itself; unknown paths as
    ``unmatched``) and writes the access log line of each.

    Plain ASGI middlewares, this one and :class:`_LimitBody`: Starlette's ``BaseHTTPMiddleware`` would hide a
    client's disconnect from the endpoint, whose slots would then run to the end for nobody.
    """

    ROUTES = frozenset({"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"})

    def __init__(self, app, *, served: ServedModel):
        self.app = app
        self.served = served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        record = scope[_ACCESS] = {}

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if scope["path"] != "/metrics":
                self.served.metrics.request(scope["path"] if scope["path"] in self.ROUTES else "unmatched", status)
            if self.served.access_log:
                _log_access(scope, status, time.perf_counter() - started, record.get("response"))


def _log_access(scope, status: int, seconds: float, response: _Response | None) -> None:
    client = scope.get("client")
    # The path as the client sent it (still percent-encoded): a decoded %0A would forge a line of the log.
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    tokens = "" if response is None else (f", tokens: {response.prompt_tokens} prompt, "
                                          f"{response.completion_tokens} completion")
    access_log.info('%s "%s %s HTTP/%s" %d %.3f s%s', "-" if client is None else f"{client[0]}:{client[1]}",
                    scope["method"], target.decode("latin-1"), scope.get("http_version", "1.1"), status, seconds,
                    tokens)


class _HeadAsGet:
    """Answers HEAD as the route's GET without the body (RFC 9110 9.3.2: the same status and headers, the same
    Content-Length), so ``curl -I`` and uptime probes work: FastAPI's GET routes answer HEAD with 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", _HEAD: True}, receive, headers_only)


class _LimitBody:
    """Refuses a request body over ``served.max_request_bytes`` with a 413, without reading it whole: by its
    Content-Length before reading any of it, or (a chunked body) as soon as the bytes read pass the limit."""

    def __init__(self, app, *, served: ServedModel):
        self.app = app
        self.served = served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.served.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            error = _too_large(limit, int(declared))
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        read = 0

        async def counting_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:  # raised inside the endpoint's read: the app's handler answers it
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int, size: int | None = None) -> APIError:
    size = "is" if size is None else f"has {size} bytes,"
    return APIError(413, f"the request body {size} over this server's limit of {limit} bytes (--max-request-bytes)",
                    code="request_too_large")


class _Response:
    """Builds a request's response objects (whole, or chunk by chunk) from scheduler events."""

    def __init__(self, served: ServedModel, generation: Generation, prompt_tokens: int):
        self.tokenizer = served.tokenizer
        self.rewards = served.rewards
        self.generation = generation
        self.chat = generation.kind == "chat"
        self.prompt_tokens = prompt_tokens
        self.id = protocol.new_id(generation.kind)
        self.created = protocol.now()
        self.model = served.name
        self.fingerprint: str | None = None  # the model version, from the job's "start" event
        self.completion_tokens = 0  # so far (the access log's count for a client that left)
        n = generation.n
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprob_entries(self, tokens) -> list[dict]:
        """Chat logprobs entries (``{"token", "logprob", "bytes", "top_logprobs"}``) of ``TokenOut``s."""
        entries = []
        for out in tokens:
            text = self._token_text(out.token)
            top = [] if out.top is None else [
                {"token": (t := self._token_text(i)), "logprob": v, "bytes": list(t.encode())}
                for i, v in zip(*out.top, strict=True)][:self.generation.top_logprobs]
            entries.append({"token": text, "logprob": out.logprob, "bytes": list(text.encode()), "top_logprobs": top})
        return entries

    def completion_logprobs(self, entries: list[dict], offset: int) -> dict:
        """Legacy completions logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""
        offsets, position = [], offset
        for entry in entries:
            offsets.append(position)
            position += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def apply(self, event: Event) -> None:
        if event.kind == "start":
            self.fingerprint = event.version
        elif event.kind == "delta":
            self.texts[event.index] += event.text
            self.completion_tokens += len(event.tokens)
            if self.generation.logprobs:
                self.logprobs[event.index].extend(self.logprob_entries(event.tokens))
        elif event.kind == "finish":
            self.reasons[event.index] = event.reason

    def finished(self) -> None:
        """Hand the finished responses to the server's reward monitor, if it has one (never waits for it, and never
        fails the request: the responses are already the client's)."""
        if self.rewards is None:
            return
        try:
            prompt = self.generation.prompt
            if not self.chat and not isinstance(prompt, str):  # token ids: the reward model reads text
                prompt = self.tokenizer.decode(prompt)
            self.rewards.submit(prompt, list(self.texts))
        except Exception:
            log.exception("handing a finished response to the reward monitor failed")

    def whole(self, completion_tokens: int) -> dict:
        choices = []
        for index, (text, reason) in enumerate(zip(self.texts, self.reasons, strict=True)):
            logprobs = None
            if self.generation.logprobs:
                logprobs = ({"content": self.logprobs[index]} if self.chat
                            else self.completion_logprobs(self.logprobs[index], 0))
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": protocol.usage(self.prompt_tokens, completion_tokens), "system_fingerprint": self.fingerprint}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": self.fingerprint}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta_choice(self, event: Event, offset: int) -> dict:
        logprobs = None
        if self.generation.logprobs:
            entries = self.logprob_entries(event.tokens)
            logprobs = {"content": entries} if self.chat else self.completion_logprobs(entries, offset)
        if self.chat:
            return {"index": event.index, "delta": {"content": event.text}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": event.index, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def finish_choice(self, index: int, reason: str) -> dict:
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}


async def _collect(job: Job, response: _Response, request: Request) -> dict:
    """Wait for the whole response; cancel the job if the client disconnects meanwhile."""

    async def events() -> int:
        while True:
            event = await job.queue.get()
            if event.kind == "error":
                raise event.error
            response.apply(event)
            if event.kind == "done":
                response.completion_tokens = event.completion_tokens
                response.finished()
                return event.completion_tokens

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    waiting, watcher = asyncio.ensure_future(events()), asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:  # the client left
            job.cancel()
            waiting.cancel()
            return Response(status_code=499)
        return response.whole(waiting.result())
    finally:
        watcher.cancel()
        if not waiting.done():
            job.cancel()
            waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


async def _stream(job: Job, response: _Response) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat), text chunks, finish chunks, ``[DONE]``.

    Usage rides on the last chunk; with ``stream_options.include_usage`` it comes instead in an extra final chunk
    with no choices, as OpenAI sends it.
    """
    generation = response.generation
    offsets = [0] * generation.n
    held_finish: list[dict] = []
    try:
        while True:
            event = await job.queue.get()
            if event.kind == "start":  # the first chunk waits for the rows, to name the version that answers
                response.apply(event)
                if response.chat:
                    yield response.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None} for i in range(generation.n)])
            elif event.kind == "error":
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            if event.kind == "delta" and (event.text or event.tokens):
                response.texts[event.index] += event.text
                response.completion_tokens += len(event.tokens)
                yield response.chunk([response.delta_choice(event, offsets[event.index])])
                if generation.logprobs and not response.chat:  # text_offset counts the tokens' text
                    offsets[event.index] += sum(len(response._token_text(t.token)) for t in event.tokens)
            elif event.kind == "finish":
                if held_finish:  # send the previous one: the last must wait for the usage
                    yield response.chunk(held_finish)
                held_finish = [response.finish_choice(event.index, event.reason)]
            elif event.kind == "done":
                response.completion_tokens = event.completion_tokens
                response.finished()
                usage = protocol.usage(response.prompt_tokens, event.completion_tokens)
                if generation.include_usage:
                    yield response.chunk(held_finish)
                    yield response.chunk([], usage)
                else:
                    yield response.chunk(held_finish, usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once done; frees the slots when the client went away mid-stream
