"""``jaxalign hitl``: a feedback web page on top of ``jaxalign serve``'s app, which retrains the model it serves.

The page (``GET /``: an HTML file, its script and its style sheet, no build step and no extra package; served
with a Content-Security-Policy that allows no inline script, and every text put in as text) asks the served model
through the same ``/v1/chat/completions`` endpoint any OpenAI client uses, streamed; a person accepts, edits or
rejects the answer, asks for two and picks the better, or gives a thumbs up or down. Each action is one record
in the feedback store, fsynced before the page says it is saved (``POST /hitl/feedback``). Every
``--retrain-threshold`` new records a new version trains in the background (:mod:`~jaxalign.serve.retrain`)
and is hot-swapped in when it is ready; the page shows which version answered, the retraining's progress, and
can serve any earlier version again (``POST /hitl/rollback``).

Why not Gradio: the page needs what the server already has (streaming, versions in ``system_fingerprint``),
and a second web stack would add a large dependency and a second process model for one page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from jaxalign.models.quantize import QUANT_TYPES
from jaxalign.serve import protocol
from jaxalign.serve.feedback import FeedbackError, FeedbackRecord, FeedbackStore
from jaxalign.serve.protocol import APIError, bad
from jaxalign.serve.retrain import Retrainer, RetryRefused, Versions

log = logging.getLogger("jaxalign.serve.hitl")
FEEDBACK_FILE = "feedback.jsonl"
HISTORY_LIMIT = 200
SWAP_TIMEOUT_S = 600.0
# The page's files: no inline script or style, so the policy below can forbid both (a text that slipped into
# the page as markup could not run).
PAGE_FILES = {"/": ("hitl.html", "text/html; charset=utf-8"),
              "/hitl.js": ("hitl.js", "text/javascript; charset=utf-8"),
              "/hitl.css": ("hitl.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# What the page says about a torn feedback line set aside at start-up (the log has the file, offset and sidecar).
RECOVERED_NOTICE = ("The app stopped last time while a record was being saved: that unconfirmed record was set "
                    "aside and every confirmed one is kept, so if your last click did not say \"Saved\", record it "
                    "again.")


def add_hitl_routes(app: FastAPI, served, store: FeedbackStore, versions: Versions, retrainer: Retrainer, *,
                    max_tokens: int) -> None:
    """The page and its JSON endpoints, on ``served``'s app."""
    static = resources.files("jaxalign.serve").joinpath("static")
    for route, (name, media_type) in PAGE_FILES.items():
        content = static.joinpath(name).read_bytes()
        app.add_api_route(route, _static(content, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/hitl/state")
    async def state():
        return {"model": served.name, "max_tokens": max_tokens, "serving": served.scheduler.version,
                "records": len(store), "waiting": retrainer.waiting, "threshold": retrainer.threshold,
                "auto": retrainer.auto, "retrain": dataclasses.asdict(retrainer.status),
                "recovered": [RECOVERED_NOTICE] if store.recovered else [],
                "versions": [_version_row(v) for v in reversed(versions.all())]}

    @app.get("/hitl/history")
    async def history(request: Request):
        unknown = sorted(set(request.query_params) - {"limit"})
        if unknown:
            raise bad(f"unknown query parameter(s) {unknown}; /hitl/history takes limit", unknown[0])
        limit = _integer(request.query_params.get("limit", "50"), "limit", 1, HISTORY_LIMIT)
        records = store.records()[-limit:]
        return {"records": [record.to_json() for record in reversed(records)]}

    @app.post("/hitl/feedback")
    async def feedback(request: Request):
        body = protocol.parse_body(await request.body())
        try:
            record = FeedbackRecord.from_request(body)  # a new id and the time are the server's
        except FeedbackError as error:
            raise bad(str(error), error.field, "invalid_feedback") from error
        known = versions.names()
        named = {"model_version": record.model_version}
        if record.choice is not None and record.choice.model_versions is not None:
            named |= {f"choice.model_versions[{i}]": v for i, v in enumerate(record.choice.model_versions)}
        for field, name in named.items():
            if name not in known:
                raise bad(f"field {field!r}: no version {name!r}; the versions are {known}", field, "unknown_version")
        await asyncio.to_thread(store.append, record)  # flushed and fsynced before the page hears "saved"
        log.info("feedback %s: %s on %s", record.id, record.action, record.model_version)
        await asyncio.to_thread(retrainer.feedback_added)  # may write a version's data snapshot
        return {"id": record.id, "records": len(store), "waiting": retrainer.waiting}

    @app.post("/hitl/retrain")
    async def retrain(request: Request):
        _fields(await request.body(), {})
        if retrainer.busy:
            raise APIError(409, f"{retrainer.status.version} is still training", code="busy")
        name = await asyncio.to_thread(retrainer.start)
        if name is None:
            raise APIError(409, "no new feedback to train on", code="nothing_to_train")
        return {"version": name}

    @app.post("/hitl/retry")
    async def retry(request: Request):
        name = _fields(await request.body(), {"version": True})["version"]
        try:
            return {"version": await asyncio.to_thread(retrainer.retry, name)}
        except RetryRefused as refusal:
            if refusal.busy:
                raise APIError(409, str(refusal), code="busy") from None
            raise bad(str(refusal), "version", "not_retryable") from None

    @app.post("/hitl/rollback")
    async def rollback(request: Request):
        name = _fields(await request.body(), {"version": True})["version"]
        known = {v.name: v for v in versions.all()}
        if name not in known:
            raise bad(f"no version {name!r}; the versions are {list(known)}", "version", "unknown_version")
        if known[name].status != "ready":
            raise bad(f"version {name} is {known[name].status}, not ready to serve", "version", "not_ready")
        if retrainer.status.state == "swapping":
            raise APIError(409, "a version is being loaded; try again in a moment", code="busy")
        await asyncio.to_thread(swap_to, served, known[name].model, name)
        versions.set_current(name)
        if known[name].served is None:  # a version a stop kept from being served: the restart must not serve it
            versions.save(dataclasses.replace(known[name], served=time.time()))
        log.info("rolled back to %s", name)
        return {"serving": name}


def _static(content: bytes, media_type: str):
    async def page():
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return page


def _fields(raw: bytes, fields: dict[str, bool]) -> dict:
    """A request body of version names: ``fields`` maps each name to whether it is required; an empty body is
    an empty object."""
    body = protocol.parse_body(raw) if raw.strip() else {}
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise bad(f"unknown field(s) {unknown}; this endpoint takes {list(fields) or 'no fields'}", unknown[0])
    for name, required in fields.items():
        value = body.get(name)
        if value is None and required:
            raise bad(f"field {name!r}: missing", name)
        if value is not None and not isinstance(value, str):
            raise bad(f"field {name!r}: expected a version name (a string), got {type(value).__name__}", name)
    return body


def _integer(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise bad(f"{name} must be an integer, got {text[:40]!r}", name) from None
    if not low <= value <= high:
        raise bad(f"{name} must be in {low}..{high}, got {value}", name)
    return value


def swap_to(served, model_path: str | None, name: str, quantize: str | None = None) -> None:
    """Load a version's weights (quantised as the served ones are) and serve them (returns once they serve;
    raises if they do not fit)."""
    from jaxalign.serve.command import load_model

    model, _ = load_model(model_path, source=f"version {name}", quantize=quantize)
    served.scheduler.swap_model(model, name).result(timeout=SWAP_TIMEOUT_S)


def _version_row(version) -> dict:
    return {"name": version.name, "parent": version.parent, "status": version.status,
            "records": list(version.records), "created": version.created, "error": version.error,
            "attempts": version.attempts,
            "stages": {stage: {k: v for k, v in info.items() if k != "data"} for stage, info in version.stages.items()}}


# --- the command line ----------------------------------------------------------------------------------------


def add_hitl_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "hitl", help="a feedback web page that retrains the model it serves (human in the loop)",
        description="Serve a model with a web page where a person asks questions and accepts, edits, rejects, "
                    "picks or rates its answers; every --retrain-threshold new records, LoRA SFT/DPO/KTO trains a "
                    "new version in the background and it replaces the served one (docs/hitl.md).")
    parser.add_argument("--model", type=model_location, help="checkpoint directory, .gguf file or Hub id "
                                                              "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", required=True, type=absolute_path,
                        help="feedback, versions and the served version live here; a restart resumes from it")
    parser.add_argument("--retrain-threshold", type=int, default=20,
                        help="new feedback records that start a retraining (default 20)")
    parser.add_argument("--no-auto-retrain", action="store_true",
                        help="retrain only when asked (the page's button or POST /hitl/retrain)")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every retraining stage over the hitl preset, e.g. "
                             "train.optimizer.learning_rate=5e-5 (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer the page asks for (default 256)")
    parser.add_argument("--max-batch", type=int, default=8, help="most rows decoding at once (default 8)")
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="most tokens of a request, prompt + answer (default 1024)")
    parser.add_argument("--no-warmup", action="store_true", help="compile on first use (see jaxalign serve)")
    parser.add_argument("--quantize", choices=QUANT_TYPES,
                        help="serve the model with its projections quantised (nf4 or int8, as jaxalign serve "
                             "--quantize) and retrain its adapters on that quantised base (model.quantize)")
    parser.set_defaults(run=run_hitl)


@dataclasses.dataclass
class Hitl:
    """A built ``jaxalign hitl`` (nothing started): run ``served.scheduler`` and ``app``; :meth:`close` after."""

    app: FastAPI
    served: object
    store: FeedbackStore
    versions: Versions
    retrainer: Retrainer

    def close(self) -> None:
        """Stop a running retraining (it resumes at the next start) and release the feedback file."""
        self.retrainer.stop()
        self.store.close()


def build_hitl(args) -> Hitl:
    """The app, its served model, feedback store and retrainer from ``jaxalign hitl``'s arguments."""
    from jaxalign.serve.app import create_app
    from jaxalign.serve.command import DEFAULT_PREFILL_WAIT, build_served

    _check(args)
    root = absolute_path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = None if args.model is None else model_location(args.model)
    versions = Versions(root, base_model=base)
    store = FeedbackStore(root / FEEDBACK_FILE)
    for message in store.recovered:
        log.warning("%s", message)
    current = versions.current
    serve_args = argparse.Namespace(
        model=current.model, served_model_name=_served_name(args.model), host=args.host, port=args.port,
        max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=64, request_timeout=600.0,
        prefill_tokens=2048, prefill_wait=DEFAULT_PREFILL_WAIT, no_prefix_cache=False, no_warmup=args.no_warmup,
        doctor=None, preference_weights=None, alpha=1.0, beta=0.5, mesh=None,
        reward_model=None, reward_dimension_weights=None, reward_batch_size=8, quantize=args.quantize)
    served = build_served(serve_args)
    served.scheduler.version = current.name
    overrides = tuple(args.train)
    if args.quantize is not None and not any(item.startswith("model.quantize") for item in overrides):
        overrides = (f"model.quantize={{type: {args.quantize}}}", *overrides)
    retrainer = Retrainer(root, store, versions, swap=lambda path, name: swap_to(served, path, name, args.quantize),
                          threshold=args.retrain_threshold, auto=not args.no_auto_retrain, overrides=overrides)
    app = create_app(served)
    add_hitl_routes(app, served, store, versions, retrainer, max_tokens=args.max_tokens)
    return Hitl(app, served, store, versions, retrainer)


def run_hitl(args) -> int:
    import uvicorn

    from jaxalign.serve.command import COMPILATION_CACHE, persistent_compilation_cache

    # force: importing orbax gives the root logger a WARNING handler first, which would hide the access log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    # uvicorn shuts down on SIGTERM and then raises it again with this handler in place: without one, that would
    # end the process before the finally below stops the retraining (its trainer would only learn of it from
    # its parent-death signal) and the scheduler.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    hitl = build_hitl(args)
    served, retrainer = hitl.served, hitl.retrainer
    if not args.no_warmup:
        with persistent_compilation_cache(COMPILATION_CACHE):
            served.scheduler.engine.warm_up(progress=sys.stderr)
    served.scheduler.start()
    retrainer.resume()
    print(f"jaxalign hitl: serving {served.scheduler.version} of {served.name}; open http://{args.host}:{args.port}/ "
          f"(feedback and versions in {args.output_dir})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(hitl.app, host=args.host, port=args.port, log_level="warning")
    finally:
        hitl.close()
        served.scheduler.stop()
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def absolute_path(text: str | Path) -> Path:
    """A path given on the command line, made absolute once against the directory the command runs in: the
    retraining stages run as other processes, and a restart may come from another directory."""
    return Path(text).expanduser().resolve()


def model_location(text: str) -> str:
    """``--model`` as the stages will read it: a local path made absolute (:func:`absolute_path`), anything that is
    not one passed on as it is (a Hugging Face Hub id, resolved by :func:`jaxalign.models.load_pretrained`)."""
    path = Path(text).expanduser()
    return str(absolute_path(path)) if path.exists() else str(text)


def _served_name(model: str | None) -> str:
    from jaxalign.serve.command import DEFAULT_NAME

    return DEFAULT_NAME if model is None else Path(model).name


def _check(args) -> None:
    for name, value, low in (("--retrain-threshold", args.retrain_threshold, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-batch", args.max_batch, 2), ("--max-model-len", args.max_model_len, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output-dir {args.output_dir} is a file, not a directory")
    for item in args.train:
        if "=" not in item:
            raise ValueError(f"--train {item!r}: expected KEY=VALUE, e.g. train.optimizer.learning_rate=5e-5")
