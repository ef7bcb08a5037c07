"""The OpenAI request and response shapes: validation into a typed :class:`Generation`, errors, and payloads.

Every check names the field it refused, and every refusal is an :class:`APIError` that the app turns into the
JSON OpenAI clients parse (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.

Accepted fields (OpenAI's names and meanings): ``model``, ``messages`` (chat) or ``prompt`` (completions),
``max_tokens`` (chat also ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``n``, ``seed``,
``logprobs`` (chat: bool with ``top_logprobs``; completions: an int, the top count), ``stream`` with
``stream_options.include_usage``. Extensions, as vLLM has them: ``top_k``, ``min_p``, ``ignore_eos`` (generate
exactly ``max_tokens``, for load tests), and jaxalign's
``guidance`` (``{"preference_weights": {dimension: weight}, "alpha": a, "beta": b}``, guided servers only).
Fields OpenAI has and jaxalign does not implement (``presence_penalty``, ``tools``, ...) are refused when set
to anything but their no-op default, so a client never gets silently different behaviour; unknown fields
are ignored, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Any

# The largest request body read (``--max-request-bytes``): far above any prompt that fits a context, and small
# enough that parsing and tokenising one costs seconds, not minutes.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
# Most stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
ROLES = ("system", "user", "assistant", "developer", "tool")
# OpenAI parameters whose effect jaxalign does not implement: accepted only at their neutral value.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None, "tool_choice": None,
           "response_format": None, "best_of": 1, "echo": False, "suffix": None, "functions": None}


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _error_type(status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status: the client's fault unless it is a timeout or a rate limit."""
    special = {408: "timeout_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
    if status in special:
        return special[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A request's guided-decoding settings (None fields: the server's defaults)."""

    preference_weights: dict[str, float] | None = None
    alpha: float | None = None
    beta: float | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """A validated request: what to encode and how to sample it.

    ``prompt`` is chat messages (a list of ``{"role", "content"}``) for chat, else text or token ids.
    ``max_tokens`` None means "up to the context length".
    """

    kind: str  # "chat" or "completion"
    model: str
    prompt: Any
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    guidance: Guidance | None


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (400 on anything else)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise bad(f"{name} must be between {low} and {high}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int | None = None,
             high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", name)
    if low is not None and value < low:
        raise bad(f"{name} must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise bad(f"{name} must be <= {high}, got {value}", name)
    return value


def _boolean(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of strings, got {value!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad("stop strings must not be empty", "stop")
    return tuple(stops)


def _messages(value: Any) -> list[dict]:
    if value is None:
        raise bad("messages is required for /v1/chat/completions", "messages")
    if not isinstance(value, list):
        raise bad(f"messages must be a list of messages, got {type(value).__name__}", "messages")
    if not value:
        raise bad("messages must not be empty", "messages")
    out = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            parts = []
            for part_index, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{where}.content[{part_index}] must be a text part "
                              '{"type": "text", "text": ...} (this model reads text only)', f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string, got {content!r}", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(value: Any) -> str | list[int]:
    """A completion prompt: text or token ids (a one-element list of either is unwrapped)."""
    if value is None:
        raise bad("prompt is required for /v1/completions", "prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad("prompt must not be empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request; send several "
              "prompts as several requests)", "prompt")


def _guidance(value: Any) -> Guidance | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"guidance must be an object, got {value!r}", "guidance")
    unknown = set(value) - {"preference_weights", "alpha", "beta"}
    if unknown:
        raise bad(f"guidance has unknown field(s) {sorted(unknown)}: it takes preference_weights, alpha, beta",
                  "guidance")
    weights = value.get("preference_weights")
    if weights is not None:
        if not isinstance(weights, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in weights.items()):
            raise bad("guidance.preference_weights must map dimension names to numbers",
                      "guidance.preference_weights")
        weights = {k: float(v) for k, v in weights.items()}
    scale = {}
    for name in ("alpha", "beta"):
        number = value.get(name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)
                                   or not math.isfinite(number) or number < 0):
            raise bad(f"guidance.{name} must be a number >= 0, got {number!r}", f"guidance.{name}")
        scale[name] = None if number is None else float(number)
    return Guidance(weights, **scale)


def _samples(body: dict, max_n: int) -> int:
    """``n``: each sample decodes in a row of its own, so a request may ask for at most the server's batch."""
    n = _integer(body, "n", 1, 1)
    if n > max_n:
        raise bad(f"n must be <= {max_n}, the rows this server decodes at once (its --max-batch), got {n}", "n")
    return n


def _top_p(body: dict) -> float:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0:
        raise bad("top_p must be in (0, 1]; for greedy decoding set temperature to 0", "top_p")
    return value


def parse_generation(body: dict, kind: str, *, max_n: int) -> Generation:
    """Validate a chat (``kind="chat"``) or completion request body."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: a model name from /v1/models", "model")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            raise bad(f"{name} is not supported by this server (leave it out)", name)
    if kind == "chat":
        prompt = _messages(body.get("messages"))
        max_tokens = _integer(body, "max_completion_tokens", None, 1)
        max_tokens = _integer(body, "max_tokens", max_tokens, 1)
        logprobs = _boolean(body.get("logprobs"), "logprobs")
        top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        prompt = _prompt(body.get("prompt"))
        max_tokens = _integer(body, "max_tokens", 16, 1)  # OpenAI's completions default
        top_logprobs = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        logprobs = top_logprobs is not None
        top_logprobs = top_logprobs or 0
    stream = _boolean(body.get("stream"), "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = _boolean((options or {}).get("include_usage"), "stream_options.include_usage")
    if options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    return Generation(
        kind=kind, model=model, prompt=prompt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=max(_integer(body, "top_k", 0, -1, 2**31 - 1), 0),  # vLLM's -1 (off) is jaxalign's 0
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        n=_samples(body, max_n),
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", None, -2**63, 2**63 - 1),  # OpenAI's int64
        logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, include_usage=include_usage,
        ignore_eos=_boolean(body.get("ignore_eos"), "ignore_eos"),
        guidance=_guidance(body.get("guidance")),
    )


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
