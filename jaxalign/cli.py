"""The ``jaxalign`` command.

Each subcommand registers itself on the parser with an ``add_<name>_command(subcommands)`` function that
sets ``run`` (``run(args) -> exit status``); ``main`` dispatches. Every failure ends with one
``jaxalign <command>: error: ...`` line, not a traceback: status 2 for bad input (a missing file, a malformed
record, an invalid setting), 1 for a run that failed (diverged, or an unexpected error). ``jaxalign --debug
<command>`` or ``JAXALIGN_DEBUG=1`` shows the traceback instead.

    jaxalign generate --prompt "Write a haiku about the sea."     # the embedded SmolLM2-135M-Instruct
    jaxalign generate --model ckpt_dir --prompts-file prompts.jsonl --n 4 --output samples.jsonl
    jaxalign generate --model model.gguf --chat
    jaxalign generate --doctor doctors/safety --doctor doctors/helpful --preference-weights '{"safety": 0.7}' --chat
    jaxalign train dpo --config hh_rlhf data.source=hh/train.jsonl.gz  # sft | reward | dpo (docs/offline-trainers.md)
    jaxalign eval --policy runs/hh_rlhf/export --prompts prompts.jsonl     # win rate, KL, rewards (docs/eval.md)
    jaxalign serve --port 8000                     # OpenAI-compatible server of the embedded default (docs/serving.md)
    jaxalign export runs/sentiment/dpo --format gguf --quant q8_0 --output dpo.gguf   # GGUF, ONNX, HF (docs/export.md)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from jaxalign.cpu_devices import provide_collective_threads
from jaxalign.hostmem import use_transparent_huge_pages

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
DEBUG_VARIABLE = "JAXALIGN_DEBUG"
CHAT_COMMANDS = "/exit or Ctrl-D quits, /reset clears the conversation"
GUIDED_CHAT_COMMANDS = "/weights shows the doctors' weights, /weights {\"dimension\": w, ...} sets them"
GUIDANCE_OPTIONS = ("--preference-weights", "--alpha", "--beta")


def add_generate_command(subcommands) -> None:
    from jaxalign.rollout.guided import DEFAULT_ALPHA, DEFAULT_BETA
    from jaxalign.serve.command import add_quantize_option

    parser = subcommands.add_parser(
        "generate", help="sample text from a model (one prompt, a file of prompts, or a chat)",
        description="Sample from a Hugging Face checkpoint directory, a GGUF file or the embedded default "
                    "(SmolLM2-135M-Instruct). Prompts go through the tokenizer's chat template unless --raw.")
    parser.add_argument("--model", help="checkpoint directory (config.json, weights, tokenizer files), .gguf file "
                                        "or Hugging Face Hub id (org/name[@revision], docs/hub.md); default: the "
                                        "embedded SmolLM2-135M-Instruct")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several); streamed when it is "
                                                          "the only one and --n is 1")
    source.add_argument("--prompts-file", type=Path, help="JSONL/JSON records with a 'prompt' field (text or "
                                                          "chat messages), or a text file with one prompt a line")
    source.add_argument("--chat", action="store_true", help="an interactive chat (the default without prompts)")
    parser.add_argument("--system", help="a system message put before every prompt")
    parser.add_argument("--raw", action="store_true", help="encode prompts as plain text, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=0.9, help="1 = off (default 0.9)")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-token-id", type=int, action="append",
                        help="end a response at this token (repeatable); default: the model's and tokenizer's EOS")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per compiled batch (--prompts-file)")
    parser.add_argument("--output", type=Path, help="write JSONL results here (default: print)")
    parser.add_argument("--no-stream", action="store_true", help="print a single response when it is complete")
    add_quantize_option(parser)
    guidance = parser.add_argument_group(
        "guided decoding (LLMDoctor)",
        "Doctors steer --model (the patient) token by token: p(y) ~ p_patient(y)^alpha * prod_i p_doctor_i(y)^(beta "
        "* w_i), w_i the weight of doctor i's preference dimension (docs/rollout.md).")
    guidance.add_argument("--doctor", action="append", type=Path, metavar="DIR",
                          help="a doctor directory (`jaxalign train tfpo`'s export: causal LM, value head, doctor.json "
                               "naming its preference dimension); repeat for several dimensions")
    guidance.add_argument("--preference-weights", metavar="JSON",
                          help='weights of the doctors\' dimensions, e.g. \'{"helpfulness": 0.8, "safety": 0.2}\'; a '
                               "dimension not named gets 0 (default: every doctor 1)")
    guidance.add_argument("--alpha", type=float, help=f"the patient's weight (default {DEFAULT_ALPHA})")
    guidance.add_argument("--beta", type=float, help=f"guidance strength: doctor i weighs beta * w_i (default "
                                                     f"{DEFAULT_BETA})")
    parser.set_defaults(run=run_generate)


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: the console script re-executes itself before JAX starts (command()).
    from jaxalign.eval.command import add_eval_command
    from jaxalign.methods.command import add_show_rewards_command, add_train_command
    from jaxalign.methods.export import add_export_command
    from jaxalign.methods.multistage import add_pipeline_command
    from jaxalign.methods.plan import add_plan_command
    from jaxalign.serve.command import add_serve_command
    from jaxalign.serve.hitl import add_hitl_command

    parser = argparse.ArgumentParser(prog="jaxalign", description="JAX/Flax preference alignment.")
    parser.add_argument("--debug", action="store_true",
                        help=f"on failure show the traceback, not one line (also: {DEBUG_VARIABLE}=1)")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_command(subcommands)
    add_train_command(subcommands)
    add_eval_command(subcommands)
    add_show_rewards_command(subcommands)
    add_serve_command(subcommands)
    add_hitl_command(subcommands)
    add_export_command(subcommands)
    add_plan_command(subcommands)
    add_pipeline_command(subcommands)
    return parser


def command() -> int:
    """The ``jaxalign`` console script: :func:`main` on ``sys.argv`` in a process whose ``malloc`` uses
    transparent huge pages (re-executed once to get them: :mod:`jaxalign.hostmem`) and whose emulated CPU
    devices, if any, have the threads their collectives need (:mod:`jaxalign.cpu_devices`)."""
    use_transparent_huge_pages()
    provide_collective_threads()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`train dpo --config x a=b`), which argparse's positional
    # matching does not allow: collect them from the leftovers of commands that take overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        with _quiet_background_errors(enabled=not debug):
            return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 (every failure ends in one line unless --debug)
        if debug:
            raise
        print(f"jaxalign {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(error, (OSError, ValueError)) else EXIT_FAILED


def _one_line(error: BaseException) -> str:
    """The error's message on one line. Bad input (ValueError, OSError; DataError is a ValueError) already
    names the file, record and field; anything else is unexpected, so its type and the --debug hint go too."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (OSError, ValueError, FloatingPointError)):
        return message
    return f"{type(error).__name__}: {message} (rerun with --debug for the traceback)"


@contextlib.contextmanager
def _quiet_background_errors(*, enabled: bool):
    """Hide the tracebacks that libraries' background threads log (Orbax's async checkpoint writers on a full
    disk print hundreds of lines) while the command runs; the failure still reaches the one error line."""
    if not enabled:
        yield
        return
    drop = _DropTracebacks()
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "jax")]
    for logger in loggers:
        logger.addFilter(drop)
    previous_hook = threading.excepthook
    threading.excepthook = lambda _hook_args: None
    try:
        yield
    finally:
        threading.excepthook = previous_hook
        for logger in loggers:
            logger.removeFilter(drop)


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None and record.levelno < logging.ERROR


# --- generate -------------------------------------------------------------------------------------------


def _prompt_records(args, tokenizer) -> tuple[list, list]:
    """``(as given, as encoded)``: the prompts as ``jaxalign.data`` prompt records, and the records to
    encode (chat messages, a system message first when one is given, unless ``--raw``)."""
    from jaxalign import data

    if args.prompts_file is not None:
        records = data.read_prompt_file(args.prompts_file, option="--prompts-file")
    else:
        records = [data.PromptRecord(text) for text in args.prompt]
    if args.raw:
        return records, records
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: pass --raw to encode prompts as plain text")
    return records, [data.PromptRecord(_as_chat(r.prompt, args.system), origin=r.origin) for r in records]


def _as_chat(prompt, system: str | None) -> tuple:
    from jaxalign import data

    messages = (data.Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if system is not None and (not messages or messages[0].role != "system"):
        messages = (data.Message("system", system), *messages)
    return messages


def _stop_token_ids(args, config, tokenizer) -> tuple[int, ...]:
    if args.stop_token_id:
        return tuple(args.stop_token_id)
    eos = tuple(config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos += (tokenizer.eos_token_id,)
    return eos


class _Streamer:
    """The sampler's per-token callback for one row. One object per session, so the loop compiles once;
    ``begin`` points it at the next response."""

    def __init__(self, out):
        self.out = out
        self.text = None

    def begin(self, tokenizer) -> None:
        from jaxalign.rollout import TextStream

        self.text = TextStream(tokenizer)

    def __call__(self, step, tokens, emitted) -> None:
        if self.text is not None and bool(emitted[0]):
            self.out.write(self.text.push(int(tokens[0])))
            self.out.flush()


def _responses(tokenizer, rollout) -> list[dict]:
    """Text, finish reason and length of every row of a rollout."""
    import numpy as np

    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
    stopped = np.asarray(rollout.stopped)
    return [{"response": tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True),
             "finish_reason": "stop" if stopped[row] else "length", "num_tokens": int(mask[row].sum())}
            for row in range(tokens.shape[0])]


def _encode(records, tokenizer):
    from jaxalign import data

    return data.tokenize(records, tokenizer, progress=False, source="prompts")


def _json_object(text: str, option: str):
    """``text`` parsed as JSON for ``option``: a one-line error for bad JSON or a key given twice."""
    def no_repeats(pairs):
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"{option}: {key!r} is given twice")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as error:
        raise ValueError(f"{option}: not valid JSON ({error.msg} at column {error.colno}); expected an object "
                         f"such as '{{\"safety\": 1.0}}', got {text!r}") from None


class _Guidance:
    """The doctors' settings of one ``generate`` run: checked before any model loads, then the current
    preference weights (``/weights`` in a chat replaces them without recompiling)."""

    def __init__(self, args):
        from jaxalign.rollout import DEFAULT_ALPHA, DEFAULT_BETA, read_dimensions

        self.doctors = list(args.doctor)
        self.dimensions = read_dimensions(self.doctors, source="--doctor")
        self.alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        self.beta = DEFAULT_BETA if args.beta is None else args.beta
        self.weights = self.checked(None if args.preference_weights is None else
                                    _json_object(args.preference_weights, "--preference-weights"),
                                    "--preference-weights")

    def checked(self, weights, source: str) -> dict[str, float]:
        """Every dimension's weight (unnamed ones 0; None: all 1), with alpha and beta checked against them."""
        from jaxalign.rollout import guidance_betas, resolve_weights

        guidance_betas(self.dimensions, weights, alpha=self.alpha, beta=self.beta, source=source)
        return resolve_weights(self.dimensions, weights, source=source)

    def record(self) -> dict:
        """What the results JSONL keeps of the guidance behind each sample."""
        return {"alpha": self.alpha, "beta": self.beta, "preference_weights": dict(self.weights),
                "doctors": {d: str(path) for d, path in zip(self.dimensions, self.doctors, strict=True)}}

    def describe(self) -> str:
        weights = ", ".join(f"{d} {w:g}" for d, w in self.weights.items())
        return (f"guided by {len(self.dimensions)} doctor(s): alpha {self.alpha:g}, beta {self.beta:g}, "
                f"weights {weights}")


def _check_guidance_options(args) -> None:
    if args.doctor is None:
        given = [option for option in GUIDANCE_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --doctor: guided decoding "
                             "weighs the patient against at least one doctor directory")


def run_generate(args) -> int:
    import jax

    from jaxalign import data, models
    from jaxalign.rollout import GuidedSampler, Sampler, SamplingParams
    from jaxalign.serve.command import load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_guidance_options(args)
    if args.prompts_file is not None and not args.prompts_file.is_file():  # before the model's long load
        raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
    guidance = None if args.doctor is None else _Guidance(args)  # the doctors' cards and weights, also before
    if guidance is None:
        model, tokenizer = load_model(args.model, quantize=args.quantize)
        # The tokenizer's pad id when it has one, else the engine's default (the config's pad or EOS id).
        sampler = Sampler(model, pad_token_id=tokenizer.pad_token_id)
    elif args.quantize is not None:  # the patient quantised, the (small) doctors as saved
        patient, tokenizer = load_model(args.model, quantize=args.quantize)
        doctors = []
        for directory in guidance.doctors:
            doctor, doctor_tokenizer = models.load_pretrained(directory, source="--doctor")
            models.check_same_tokenizer(tokenizer, doctor_tokenizer, patient=f"--model {args.model or 'default'}",
                                        doctor=f"--doctor {directory}")
            doctors.append(doctor)
        sampler = GuidedSampler(patient, list(zip(guidance.dimensions, doctors, strict=True)), alpha=guidance.alpha,
                                beta=guidance.beta, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id,
                                doctor_sources=[f"--doctor {directory}" for directory in guidance.doctors])
        print(guidance.describe(), file=sys.stderr)
    else:
        sampler = GuidedSampler.from_pretrained(args.model, guidance.doctors, alpha=guidance.alpha,
                                                beta=guidance.beta, patient_source="--model", doctor_source="--doctor")
        tokenizer = sampler.tokenizer
        print(guidance.describe(), file=sys.stderr)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, n=args.n,
                            stop_token_ids=_stop_token_ids(args, sampler.config, tokenizer))

    def generate(input_ids, attention_mask, key, stream=None):
        weights = {} if guidance is None else {"preference_weights": guidance.weights}
        return sampler.generate(input_ids, attention_mask, key=key, params=params, stream=stream, **weights)

    key = jax.random.key(args.seed)
    if args.prompt is None and args.prompts_file is None:
        return _chat(args, generate, tokenizer, params, key, guidance)

    records, encoded = _prompt_records(args, tokenizer)
    dataset = _encode(encoded, tokenizer)
    streamer = None
    if len(records) == 1 and args.n == 1 and not args.no_stream and args.output is None:
        streamer = _Streamer(sys.stdout)
        streamer.begin(tokenizer)
    results = []
    show_progress = args.prompts_file is not None
    from tqdm.auto import tqdm

    extra = {} if guidance is None else {"guidance": guidance.record()}
    started = time.perf_counter()
    with tqdm(total=len(records), unit="prompt", desc="generating", disable=not show_progress,
              file=sys.stderr) as bar:
        for batch_index, start in enumerate(range(0, len(records), args.batch_size)):
            rows = list(range(start, min(start + args.batch_size, len(records))))
            length = max(len(dataset.examples[i].sequences[0]) for i in rows)
            batch = data.collate(dataset, rows, length)
            out = generate(batch["input_ids"], batch["attention_mask"], jax.random.fold_in(key, batch_index),
                           stream=streamer)
            for offset, response in enumerate(_responses(tokenizer, out)):
                prompt_index = rows[offset // args.n]
                prompt = records[prompt_index].prompt
                results.append({"index": prompt_index, "sample": offset % args.n,
                                "prompt": prompt if isinstance(prompt, str) else [m.as_dict() for m in prompt],
                                **response, **extra})
            bar.update(len(rows))
    elapsed = time.perf_counter() - started
    if streamer is not None:
        print()
    elif args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", encoding="utf-8") as file:
            for result in results:
                file.write(json.dumps(result, ensure_ascii=False) + "\n")
        tokens = sum(r["num_tokens"] for r in results)
        print(f"wrote {len(results)} responses ({tokens} tokens, {tokens / elapsed:.0f} tokens/s including "
              f"compilation) to {args.output}", file=sys.stderr)
    elif args.prompts_file is not None:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
    else:
        many = len(results) > 1
        for result in results:
            if many:
                print(f"--- prompt {result['index']}, sample {result['sample']} ({result['finish_reason']})")
            print(result["response"])
    return 0


def _set_weights(guidance: _Guidance | None, argument: str) -> None:
    """The chat's ``/weights [JSON]``: show the doctors' weights, or replace them (a mistake is reported and
    the conversation goes on with the weights it had)."""
    if guidance is None:
        print("error: /weights needs --doctor (this chat has no doctors)", file=sys.stderr)
        return
    if argument:
        try:
            guidance.weights = guidance.checked(_json_object(argument, "/weights"), "/weights")
        except ValueError as error:
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return
    print(guidance.describe(), file=sys.stderr)


def _chat(args, generate, tokenizer, params, key, guidance: _Guidance | None) -> int:
    """Read a user message, stream the reply, keep the conversation, until /exit or end of input."""
    import jax

    from jaxalign import data

    if tokenizer.chat_template is None or args.raw:
        raise ValueError("--chat needs a tokenizer with a chat template (and no --raw)")
    if params.n != 1:
        raise ValueError("--chat samples one reply per turn: leave --n at 1")
    streamer = _Streamer(sys.stdout)
    messages = [] if args.system is None else [data.Message("system", args.system)]
    start = len(messages)
    commands = CHAT_COMMANDS if guidance is None else f"{CHAT_COMMANDS}, {GUIDED_CHAT_COMMANDS}"
    print(f"chatting with {args.model or 'SmolLM2-135M-Instruct (embedded)'}; {commands}", file=sys.stderr)
    for turn in itertools.count():
        try:
            text = input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            del messages[start:]
            continue
        command, _, argument = text.strip().partition(" ")
        if command == "/weights":
            _set_weights(guidance, argument.strip())
            continue
        messages.append(data.Message("user", text))
        dataset = _encode([data.PromptRecord(tuple(messages))], tokenizer)
        batch = data.collate(dataset, [0], len(dataset.examples[0].sequences[0]))
        print("assistant> ", end="", flush=True)
        streamer.begin(tokenizer)
        # The weights are traced: a /weights change reuses the compiled loop.
        out = generate(batch["input_ids"], batch["attention_mask"], jax.random.fold_in(key, turn), stream=streamer)
        print()
        messages.append(data.Message("assistant", _responses(tokenizer, out)[0]["response"]))


if __name__ == "__main__":
    sys.exit(command())
