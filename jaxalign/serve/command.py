"""``jaxalign serve``: load a model (and doctors), start the scheduler, run the app under uvicorn."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path

from jaxalign.models.quantize import QUANT_TYPES
from jaxalign.rollout.guided import DEFAULT_ALPHA, DEFAULT_BETA
from jaxalign.serve.protocol import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PREFILL_WAIT = 0
COMPILATION_CACHE = Path.home() / ".cache" / "jaxalign" / "xla"


def add_serve_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "serve", help="an OpenAI-compatible server (continuous batching, streaming, guided decoding)",
        description="Serve a model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, "
                    "/health, /metrics (docs/serving.md).")
    parser.add_argument("--model", help="checkpoint directory, .gguf file or Hugging Face Hub id (org/name[@revision], "
                                        "docs/hub.md); default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the directory or file "
                                                    f"name; {DEFAULT_NAME} for the embedded default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="most rows decoding at once (default 32)")
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="most tokens of a request, prompt + completion (default 1024)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting for a slot; more get HTTP 429 (default 256)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds from arrival to the last token before a request is dropped (default 600)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                        help="largest request body read; a larger one gets HTTP 413 before it is read (default "
                             f"{DEFAULT_MAX_REQUEST_BYTES}, {DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)")
    parser.add_argument("--no-access-log", action="store_true",
                        help="no log line per request (by default each request is logged on stderr with its "
                             "status, seconds and tokens)")
    parser.add_argument("--prefill-tokens", type=int, default=2048,
                        help="most prompt tokens admitted between two decode steps (default 2048, vLLM's "
                             "max_num_batched_tokens: a burst of chat requests starts in one iteration)")
    parser.add_argument("--prefill-wait", type=int, default=DEFAULT_PREFILL_WAIT, metavar="STEPS",
                        help="most decode steps a request arriving while others decode is held so that arrivals "
                             "share a prefill (each prefill call stalls every running row; default "
                             f"{DEFAULT_PREFILL_WAIT}; 0: admit at once)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt whole (by default the chat template's opening, the same for "
                             "every chat request without its own system message, is computed once and reused)")
    parser.add_argument("--mesh", metavar="AXIS=SIZE,...",
                        help="serve on a device mesh over the axes data, fsdp and tensor, e.g. tensor=4 "
                             "(Megatron-style model parallelism for a model larger than one device) or "
                             "data=2,tensor=4; an axis left out has size 1, fsdp takes the devices left over (-1 asks "
                             "for that on any axis). Parameters are placed with the training rules, the decode rows "
                             "split over data x fsdp, the KV cache's heads over tensor (default: one device, no mesh)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="compile on first use instead of before accepting requests (the warm-up compiles "
                             "every batch x cache-length decode step: minutes the first time on a small CPU, "
                             "seconds once JAX's compilation cache in ~/.cache/jaxalign/xla has them)")
    add_quantize_option(parser)
    monitor = parser.add_argument_group(
        "reward on live traffic", "Score every finished response with a reward model, off the request path, and "
                                  "export the rewards on /metrics (docs/serving.md).")
    monitor.add_argument("--reward-model", type=Path, metavar="DIR",
                         help="a reward model directory (jaxalign train reward's export)")
    monitor.add_argument("--reward-dimension-weights", metavar="W1,W2,...",
                         help="weights combining a multi-objective reward model's objectives into one reward "
                              "(default: the weights it was saved with)")
    monitor.add_argument("--reward-batch-size", type=int, default=8,
                         help="most responses per scoring call (default 8)")
    guidance = parser.add_argument_group(
        "guided decoding (LLMDoctor)", "Doctors steer --model token by token; a request may set its own weights "
                                       "with the `guidance` field (docs/serving.md).")
    guidance.add_argument("--doctor", action="append", type=Path, metavar="DIR", help="a doctor directory (repeat)")
    guidance.add_argument("--preference-weights", metavar="JSON", help="default weights of the doctors' dimensions")
    guidance.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"the patient's weight ({DEFAULT_ALPHA})")
    guidance.add_argument("--beta", type=float, default=DEFAULT_BETA, help=f"guidance strength ({DEFAULT_BETA})")
    parser.set_defaults(run=run_serve)


def parse_mesh(text: str):
    """``--mesh``'s ``data=2,tensor=4`` as a :class:`~jaxalign.train.config.MeshConfig` (axes left out: data and
    tensor 1, fsdp -1, i.e. the devices left over; fsdp 1 when another axis is given as -1).

    Raises:
        ValueError: an unknown axis, one given twice, or a size that is not a positive int or -1.
    """
    from jaxalign.models.sharding import MESH_AXES
    from jaxalign.train.config import MeshConfig

    sizes = {}
    for item in text.split(","):
        name, equals, value = (part.strip() for part in item.partition("="))
        if not equals or name not in MESH_AXES:
            raise ValueError(f"--mesh: {item.strip()!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} "
                             f"(e.g. --mesh data=2,tensor=4)")
        if name in sizes:
            raise ValueError(f"--mesh: axis {name} is given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: the size of {name} must be a positive int or -1, got {value!r}") from None
    try:
        return MeshConfig(**{"fsdp": 1 if -1 in sizes.values() else -1, **sizes})
    except ValueError as error:
        raise ValueError(f"--mesh {text}: {error}") from None


def _check_mesh(text: str) -> None:
    """``--mesh`` parses and covers exactly this process's devices (before any model is loaded)."""
    import jax

    from jaxalign.models.sharding import MESH_AXES

    config, devices = parse_mesh(text), jax.device_count()
    named = {name: size for name, size in zip(MESH_AXES, config.shape, strict=True) if size != -1}
    product = " x ".join(f"{name} {size}" for name, size in named.items())
    known = math.prod(named.values())
    if -1 in config.shape and devices % known:
        raise ValueError(f"--mesh {text}: {product} = {known} does not divide the {devices} device(s) here")
    if -1 not in config.shape and known != devices:
        raise ValueError(f"--mesh {text}: {product} = {known} devices, but {devices} are here")


def _option(args, name: str):
    """``args.name``, or its default where the namespace lacks it (``jaxalign hitl`` builds its own namespace, with
    the options it offers)."""
    return getattr(args, name, {"max_request_bytes": DEFAULT_MAX_REQUEST_BYTES, "no_access_log": False}[name])


def _check(args) -> dict[str, float] | None:
    for name in ("max_batch", "max_model_len", "max_queue", "prefill_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if _option(args, "max_request_bytes") < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.prefill_wait < 0:
        raise ValueError(f"--prefill-wait must be >= 0 decode steps, got {args.prefill_wait}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.reward_model is None and args.reward_dimension_weights is not None:
        raise ValueError("--reward-dimension-weights combine a reward model's objectives: give --reward-model")
    if args.reward_batch_size < 1:
        raise ValueError(f"--reward-batch-size must be >= 1, got {args.reward_batch_size}")
    if args.reward_model is not None and not args.reward_model.is_dir():
        raise ValueError(f"--reward-model {args.reward_model}: no such directory")
    if args.reward_dimension_weights is not None:
        from jaxalign.eval.judges import parse_dimension_weights

        parse_dimension_weights(args.reward_dimension_weights, "--reward-dimension-weights")
    if args.mesh is not None:
        _check_mesh(args.mesh)
    if args.doctor is None:
        if args.preference_weights is not None:
            raise ValueError("--preference-weights needs --doctor")
        return None
    if args.preference_weights is None:
        return None
    try:
        weights = json.loads(args.preference_weights)
    except json.JSONDecodeError as error:
        raise ValueError(f"--preference-weights is not valid JSON: {error}") from None
    if not isinstance(weights, dict):
        raise ValueError(f"--preference-weights must be a JSON object of dimension: weight, got {weights!r}")
    return weights


def add_quantize_option(parser) -> None:
    """``--quantize nf4|int8``: the served (or sampled) model's projections stored quantised."""
    parser.add_argument("--quantize", choices=QUANT_TYPES,
                        help="hold --model's decoder projections quantised, dequantised inside each product: nf4 "
                             "(bitsandbytes' 4-bit NormalFloat, blocks of 64, double quantisation; ~4.1 bits a "
                             "weight) or int8 (one scale per output channel); docs/models.md has their fidelity")


def load_model(path: str | None, *, source: str = "--model", quantize: str | None = None):
    """``(causal LM, tokenizer)`` of ``path`` (:func:`jaxalign.models.load_pretrained`), quantised when
    ``quantize`` names a type; settings the checkpoint cannot take fail from its ``config.json``, before any
    weight is read."""
    from jaxalign import models
    from jaxalign.models.quantize import check_checkpoint

    config = None if quantize is None else models.QuantizeConfig(type=quantize)
    try:
        if config is not None:
            check_checkpoint(path, config)
        model, tokenizer = models.load_pretrained(path, source=source)
        if config is not None:
            models.quantize_model(model, config)
    except ValueError as error:
        if config is None:
            raise
        message = str(error).replace("QuantizeConfig.", "").replace("quantize_model: ", "")
        raise ValueError(f"--quantize {quantize}: {message} ({source} {path or 'embedded default'})") from None
    return model, tokenizer


def _weights_root(path: str | None) -> str:
    """``/v1/models``' ``root``: a local model's absolute path, a Hub id as given, the embedded default's file."""
    from jaxalign import models

    if path is None:
        return str(models.default_model_path())
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def build_served(args):
    """Load the models and build the :class:`~jaxalign.serve.app.ServedModel` (scheduler not started)."""
    from jaxalign import models
    from jaxalign.rollout.continuous import ContinuousEngine
    from jaxalign.rollout.guided import guidance_betas, read_dimensions
    from jaxalign.serve.app import ServedModel
    from jaxalign.serve.metrics import Metrics
    from jaxalign.serve.scheduler import Scheduler
    from jaxalign.train.mesh import make_mesh

    weights = _check(args)
    mesh = None if args.mesh is None else make_mesh(parse_mesh(args.mesh))
    dimensions = read_dimensions(args.doctor, source="--doctor") if args.doctor else []
    if dimensions:
        guidance_betas(dimensions, weights, alpha=args.alpha, beta=args.beta, source="--preference-weights")
    model, tokenizer = load_model(args.model, quantize=getattr(args, "quantize", None))
    doctors = []
    for directory in args.doctor or ():
        doctor, doctor_tokenizer = models.load_pretrained(directory, source="--doctor")
        models.check_same_tokenizer(tokenizer, doctor_tokenizer, patient=f"--model {args.model or 'default'}",
                                    doctor=f"--doctor {directory}")
        doctors.append(doctor)
    config = model.config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.eos_token_ids or (0,))[0]
    engine = ContinuousEngine(model, guides=doctors, max_batch=args.max_batch, max_model_len=args.max_model_len,
                              pad_token_id=pad, mesh=mesh)
    stops = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    name = args.served_model_name or (DEFAULT_NAME if args.model is None else Path(args.model).name)
    metrics = Metrics(name)
    scheduler = Scheduler(engine, tokenizer, stop_token_ids=sorted(stops), max_queue=args.max_queue,
                          prefill_tokens=args.prefill_tokens, prefill_wait=args.prefill_wait, metrics=metrics)
    served = ServedModel(name=name, root=_weights_root(args.model), tokenizer=tokenizer, scheduler=scheduler,
                         metrics=metrics, dimensions=dimensions,
                         alpha=args.alpha, beta=args.beta, preference_weights=weights,
                         request_timeout=args.request_timeout,
                         max_request_bytes=_option(args, "max_request_bytes"),
                         access_log=not _option(args, "no_access_log"))
    if args.reward_model is not None:
        served.rewards = live_rewards(args, metrics, name)
    head = None if args.no_prefix_cache else served.chat_head()
    if head is not None and len(head) < args.max_model_len - 1:
        engine.add_head(head)
    return served


def live_rewards(args, metrics, name: str):
    """The started :class:`~jaxalign.serve.live_rewards.LiveRewards` of ``--reward-model``."""
    from jaxalign.eval.judges import load_reward_judge, parse_dimension_weights
    from jaxalign.serve.live_rewards import LiveRewards

    weights = args.reward_dimension_weights
    weights = None if weights is None else parse_dimension_weights(weights, "--reward-dimension-weights")
    judge, _, _ = load_reward_judge(args.reward_model, dimension_weights=weights, batch_size=args.reward_batch_size,
                                    weights_option="--reward-dimension-weights")
    try:  # chat and completion requests must render for it (its tokenizer may be another than the served one's)
        judge.encode([[{"role": "user", "content": "Hello!"}], "Hello!"], ["Hi.", "Hi."])
    except ValueError as error:
        raise ValueError(f"--reward-model {args.reward_model}: cannot render requests for scoring: {error}") from None
    rewards = LiveRewards(judge, metrics.registry, model=name, batch_size=args.reward_batch_size)
    rewards.start()
    return rewards


@contextlib.contextmanager
def persistent_compilation_cache(directory: Path | None):
    """JAX's persistent compilation cache in ``directory`` (``None``: off) inside the block; the previous setting
    after it. JAX decides once per process whether the cache is used, so both ends reset its cache object.

    ``jaxalign serve`` writes the cache only while it warms up (the programs a restart needs); compiles that
    happen later, in the scheduler thread while requests wait, do not also pay for a disk write."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", None if directory is None else str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the small copy programs too
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def run_serve(args) -> int:
    import uvicorn

    from jaxalign.serve.app import create_app

    _check(args)  # bad options fail before anything changes
    # force: orbax logs through absl while it is imported, and absl's first log line gives the root logger a
    # handler at WARNING, which would make this a no-op and hide every INFO line, the access log's included.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    served = build_served(args)
    if not args.no_warmup:
        # Compiled programs survive restarts: a second start of the same model skips most of the compiling.
        with persistent_compilation_cache(COMPILATION_CACHE):
            served.scheduler.engine.warm_up(progress=sys.stderr)
    served.scheduler.start()
    mesh = served.scheduler.engine.mesh
    placement = "" if mesh is None else ", mesh " + " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    scoring = "" if args.reward_model is None else f", responses scored by {args.reward_model}"
    print(f"serving {served.name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, max model "
          f"length {args.max_model_len}{placement}{scoring})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    finally:
        served.scheduler.stop()
        if served.rewards is not None:
            served.rewards.stop()
    return 0
