"""Load on ``jaxalign serve``: latency, time to first token and throughput at 1, 8, 32 and 100 concurrent clients.

Starts ``jaxalign serve`` (the embedded SmolLM2-135M-Instruct, float32, as a user would run it) on a free loopback
port, waits for its warm-up, then drives it with the official ``openai`` client (``AsyncOpenAI``, streaming,
so the time to the first token is the first chunk that carries text). Every client is a closed loop: it sends
its next request when the last one finished. Every request is a chat prompt from the sampling benchmark's
questions, sampled at temperature 1 / top-p 0.9 with ``ignore_eos``, and asks for a length drawn uniformly
from ``max_tokens ± 25 %`` (seeded; mean ``max_tokens``), as real responses vary. With one fixed length every
closed-loop client finishes in the same step and re-arrives at once, so each wave's prompts are all prefilled
before any first token: that synchronised case is measured too, at 32 clients (``synchronised_32``). Each
level sends a bounded number of requests (``--requests-per-client`` each, at least ``--min-requests`` in all)
under a wall-clock bound. Eight requests per client (the default) so that the level's opening burst, when every
client arrives at once, and its drain, when the last responses finish in an emptying batch, weigh less against
the sustained rate a server sees. Each level also reports that sustained rate directly: the tokens/s while all of
its clients are active (``all_active``: from the last client's first token to the first client's last one),
beside the whole level's (every token over the whole wall time).

The 1-client level is the baseline "same prompts sent one at a time". Targets: at 32 concurrent
clients the aggregate tokens/s is >= 8x the single client's, and the p95 time to first token is under 2 s.

    python benchmarks/serve_load.py [--clients 1 8 32 100] [--max-tokens 64] [--max-batch 32]
    python benchmarks/serve_load.py --quick       # clients 1 and 4, 8 tokens, few requests; writes no file

Writes ``benchmarks/results/serve_load.json`` (commit, machine, server options, per level: latency and TTFT
p50/p95/p99, tokens/s, requests) and a PNG of the same name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/serve_load.py`
from sampling_throughput import QUESTIONS

from jaxalign.serve.command import DEFAULT_PREFILL_WAIT

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "SmolLM2-135M-Instruct"
START_TIMEOUT_S = 900
LEVEL_TIMEOUT_S = 600
TARGET_SPEEDUP = 8.0
TARGET_TTFT_P95_S = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxalign.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-model-len", str(args.max_model_len), "--max-queue", "1024", "--prefill-wait",
               str(args.prefill_wait)]
    log = open(args.server_log, "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jaxalign serve exited with {process.returncode}; see {args.server_log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.terminate()
    raise RuntimeError(f"jaxalign serve did not answer /health within {START_TIMEOUT_S} s; see {args.server_log}")


def server_counters(port: int) -> dict:
    """From the server's /metrics: programs compiled so far by function (``jaxalign_xla_compilations_total``), the
    prompts that joined a decode step (``jaxalign_prompts_joined_total``) and the scheduler thread's seconds by
    phase (``jaxalign_scheduler_seconds_total``)."""
    counts, phases, joined = {}, {}, 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(("jaxalign_xla_compilations_total{", "jaxalign_scheduler_seconds_total{")):
            labels, value = line.rsplit(" ", 1)
            label = "function" if line.startswith("jaxalign_xla") else "phase"
            name = labels.split(f'{label}="', 1)[1].split('"', 1)[0]
            table = counts if label == "function" else phases
            table[name] = table.get(name, 0.0) + float(value)
        elif line.startswith("jaxalign_prompts_joined_total"):
            joined += float(line.rsplit(" ", 1)[1])
    return {"compiled": counts, "joined": joined, "phases": phases}


def measured(port: int, level) -> dict:
    """Run ``level`` (a coroutine) and add what the server did meanwhile: the programs it compiled (a warm server
    compiles none, and each one stalls every live row for its compile time), how many requests joined a decode
    step instead of being prefilled, and where its scheduler thread spent the level's time."""
    before = server_counters(port)
    result = asyncio.run(level)
    after = server_counters(port)
    result["compiled"] = {name: int(count - before["compiled"].get(name, 0))
                          for name, count in after["compiled"].items() if count > before["compiled"].get(name, 0)}
    result["joined"] = int(after["joined"] - before["joined"])
    result["scheduler_s"] = {phase: round(seconds - before["phases"].get(phase, 0.0), 3)
                             for phase, seconds in after["phases"].items()}
    return result


def all_active_rate(results: list[dict], finished: list[float]) -> dict | None:
    """Tokens/s while every client of a closed-loop level is active: from the moment the last client got its first
    token until the first client has sent its last request's last token (after it fewer clients remain: the
    level's drain). A token counts at the arrival of the chunk that carried it (a request's tokens spread evenly
    over its text chunks; with ``ignore_eos`` and no stop strings each chunk is one token)."""
    first_tokens = [r["chunk_times"][0] for r in results if r["client_first"] and r["chunk_times"]]
    if not first_tokens or not finished:
        return None
    start, end = max(first_tokens), min(finished)
    if end - start < 1.0:
        return None
    tokens = 0.0
    for r in results:
        if r["chunk_times"]:
            per_chunk = r["tokens"] / len(r["chunk_times"])
            tokens += per_chunk * sum(start <= t < end for t in r["chunk_times"])
    return {"window_s": end - start, "tokens": tokens, "tokens_per_s": tokens / (end - start)}


async def one_request(client, question: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    chunk_times = []  # arrivals of the chunks that carry text
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=1.0,
        top_p=0.9, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunk_times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"latency": end - started, "ttft": (chunk_times[0] if chunk_times else end) - started, "tokens": tokens,
            "chunk_times": chunk_times, "end": end}


async def run_level(port: int, clients: int, requests: int, max_tokens: int, *, vary: bool = True) -> dict:
    """``clients`` closed loops sharing ``requests`` requests. Besides the level's aggregate (every token over the
    whole wall time, its opening burst and its drain included), the rate while all clients are active
    (:func:`all_active_rate`), the sustained load a server sees from that many clients."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                         timeout=LEVEL_TIMEOUT_S)
    counter = iter(range(requests))
    spread = max_tokens // 4 if vary else 0
    lengths = np.random.default_rng(clients).integers(max_tokens - spread, max_tokens + spread + 1, size=requests)
    results: list[dict] = []
    finished: list[float] = []  # when each client sent its last token
    deadline = time.perf_counter() + LEVEL_TIMEOUT_S

    async def worker():
        first = True
        for index in counter:
            if time.perf_counter() > deadline:
                break
            result = await one_request(client, QUESTIONS[index % len(QUESTIONS)], int(lengths[index]))
            results.append(result | {"client_first": first})
            first = False
        finished.append(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    latency = np.asarray([r["latency"] for r in results])
    ttft = np.asarray([r["ttft"] for r in results])
    tokens = sum(r["tokens"] for r in results)

    def percentiles(values):
        return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}

    return {"clients": clients, "requests": len(results), "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "all_active": all_active_rate(results, finished),
            "latency_s": percentiles(latency), "ttft_s": percentiles(ttft)}


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [lv["clients"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(clients, [lv["tokens_per_s"] for lv in levels], "o-", label="whole level")
    active = [(lv["clients"], lv["all_active"]["tokens_per_s"]) for lv in levels if lv.get("all_active")]
    if active:
        left.plot(*zip(*active), "s--", label="while all clients are active")
        left.legend(fontsize=8)
    left.set(xscale="log", xlabel="concurrent clients", ylabel="aggregate tokens/s", title="throughput")
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        right.plot(clients, [lv["ttft_s"][key] for lv in levels], style, label=f"TTFT {key}")
        right.plot(clients, [lv["latency_s"][key] for lv in levels], style, alpha=0.4, label=f"latency {key}")
    right.axhline(TARGET_TTFT_P95_S, color="gray", lw=0.8)
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    right.legend(fontsize=7)
    fig.suptitle("jaxalign serve, SmolLM2-135M-Instruct fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prefill-wait", type=int, default=DEFAULT_PREFILL_WAIT,
                        help=f"the server's --prefill-wait (default {DEFAULT_PREFILL_WAIT}, the server's)")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--min-requests", type=int, default=12)
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/jaxalign_serve_load.log"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.max_tokens, args.min_requests, args.requests_per_client = [1, 4], 8, 4, 1
    port = free_port()
    started = time.perf_counter()
    server = start_server(port, args)
    print(f"server up in {time.perf_counter() - started:.0f} s (warm-up included)", flush=True)
    try:
        # Each level once with short requests first: compiles what the server's warm-up leaves to first use
        # (prefills of these prompt lengths, the small insert and relayout programs), so no level's numbers
        # include compiling. A server restarted on this machine loads them from JAX's compilation cache.
        for clients in args.clients:
            asyncio.run(run_level(port, clients, clients, 16))
        levels = []
        for clients in args.clients:
            requests = max(args.min_requests, clients * args.requests_per_client)
            level = measured(port, run_level(port, clients, requests, args.max_tokens))
            levels.append(level)
            print(f"{clients:>4} clients  {level['requests']:>4} requests  {level['tokens_per_s']:7.1f} tok/s  "
                  f"TTFT p50/p95/p99 {level['ttft_s']['p50']:.2f}/{level['ttft_s']['p95']:.2f}/"
                  f"{level['ttft_s']['p99']:.2f} s  latency p50/p95/p99 {level['latency_s']['p50']:.2f}/"
                  f"{level['latency_s']['p95']:.2f}/{level['latency_s']['p99']:.2f} s  "
                  f"joined {level['joined']}  compiled {level['compiled'] or 'nothing'}", flush=True)
            active = level["all_active"]
            print(f"{'':>6}all {clients} active: "
                  + (f"{active['tokens_per_s']:.1f} tok/s over {active['window_s']:.1f} s" if active else "-")
                  + "  scheduler s: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(level["scheduler_s"].items())),
                  flush=True)
        synchronised = None
        if 32 in args.clients:
            synchronised = measured(port, run_level(port, 32, 64, args.max_tokens, vary=False))
            print(f"  32 clients, one fixed length (synchronised waves): {synchronised['tokens_per_s']:.1f} tok/s, "
                  f"TTFT p50/p95 {synchronised['ttft_s']['p50']:.2f}/{synchronised['ttft_s']['p95']:.2f} s, "
                  f"compiled {synchronised['compiled'] or 'nothing'}")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(30)
    single = next((lv for lv in levels if lv["clients"] == 1), None)
    at32 = next((lv for lv in levels if lv["clients"] == 32), None)
    summary = {}
    if single and at32:
        speedup = at32["tokens_per_s"] / single["tokens_per_s"]
        summary = {"speedup_32_vs_1": speedup, "speedup_target": TARGET_SPEEDUP,
                   "speedup_met": speedup >= TARGET_SPEEDUP, "ttft_p95_32_s": at32["ttft_s"]["p95"],
                   "ttft_p95_target_s": TARGET_TTFT_P95_S, "ttft_met": at32["ttft_s"]["p95"] < TARGET_TTFT_P95_S}
        print(f"32 clients vs 1: {speedup:.1f}x aggregate tokens/s (target >= {TARGET_SPEEDUP:g}x: "
              f"{'met' if summary['speedup_met'] else 'NOT met'}); p95 TTFT {at32['ttft_s']['p95']:.2f} s (target < "
              f"{TARGET_TTFT_P95_S:g} s: {'met' if summary['ttft_met'] else 'NOT met'})")
        if at32["all_active"]:  # the sustained rate against the single client's (one client is always active)
            sustained = at32["all_active"]["tokens_per_s"] / single["tokens_per_s"]
            summary |= {"speedup_32_vs_1_all_active": sustained, "speedup_all_active_met": sustained >= TARGET_SPEEDUP}
            print(f"32 clients vs 1 while all 32 are active: {sustained:.1f}x")
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": "serve_load", "provenance": provenance.describe(),
              "server": {"model": MODEL, "max_batch": args.max_batch, "max_model_len": args.max_model_len,
                         "prefill_wait": args.prefill_wait, "dtype": "float32"},
              "load": {"max_tokens": f"uniform {args.max_tokens} +- 25 %", "temperature": 1.0, "top_p": 0.9,
                       "ignore_eos": True, "streaming": True, "requests_per_client": args.requests_per_client},
              "levels": levels, "synchronised_32": synchronised, "summary": summary,
              "server_metrics_excerpt": [line for line in metrics.splitlines()
                                         if line.startswith(("jaxalign_generation_tokens_total",
                                                             "jaxalign_prompt_tokens_total",
                                                             "jaxalign_prompt_tokens_cached_total",
                                                             "jaxalign_prompts_joined_total",
                                                             "jaxalign_requests_dropped_total"))]}
    path = RESULTS / "serve_load.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(levels, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
