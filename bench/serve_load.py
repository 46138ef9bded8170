"""Load test of `pixtral-fast serve`, reported the way vLLM's benchmark_serving reports: N
concurrent streaming clients replay a request mix (text-only and with images); request
throughput, output tokens/s, time to first token and inter-token latency (p50/p99) as JSON.

With --offline, the same workload first runs through the offline Engine in this process (the
same checkpoint and limits, --max-num-seqs = the concurrency, parsed by the server's own argument
parser), and the report gives both output tokens/s and their ratio: what the HTTP layer costs.
The offline engine is closed and its memory freed before the server starts, so that one GPU never
holds two full-size models (each side takes the best of --repeat runs, one side after the other).

    # CPU, tiny checkpoint: server tok/s must be >= 0.8x offline at 16 clients
    python bench serve_load --tiny --offline --concurrency 16 --num-requests 64
    # a running server
    python bench serve_load --url http://127.0.0.1:8000 --concurrency 32
    # the full-size model with random weights on a GPU (bench/device_check.sh)
    python bench serve_load --model tests/data --load-format dummy --offline --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support.serve_server import ServerProcess, data_url, picture, user_message

WORDS = ("describe the picture in detail and then explain what it could mean for someone who sees it "
         "for the first time tomorrow morning").split()


def workload(n: int, image_every: int, seed: int = 0) -> list[list[dict]]:
    """n requests: prompts of different lengths; every image_every-th one with an image of its own size."""
    requests = []
    for i in range(n):
        text = f"Request {i}: " + " ".join(WORDS[: 4 + (i * 7) % len(WORDS)])
        images = [data_url(picture(32 + 16 * (i % 5), 48 + 16 * (i % 3), seed + i))] if image_every and i % image_every == 0 else []
        requests.append(user_message(text, *images))
    return requests


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"mean_ms": 1e3 * statistics.fmean(values), "p50_ms": 1e3 * qs[49], "p99_ms": 1e3 * qs[98]}


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, messages: list[dict],
                      max_tokens: int, headers: dict) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    start = time.perf_counter()
    arrivals, text, usage = [], [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code, "error": (await response.aread()).decode()[:300]}
        pending = b""
        async for data in response.aiter_bytes():  # SSE events end with a blank line
            now = time.perf_counter()
            events = (pending + data).split(b"\n\n")
            pending = events.pop()
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        arrivals.append(now)
                        text.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"ok": True, "start": start, "end": end, "arrivals": arrivals, "text": "".join(text),
            "output_tokens": usage["completion_tokens"] if usage else 0,
            "prompt_tokens": usage["prompt_tokens"] if usage else 0}


async def run_clients(url: str, model: str | None, requests: list, concurrency: int, max_tokens: int,
                      api_key: str | None) -> tuple[list[dict], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    todo: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        todo.put_nowait((i, r))
    results: list[dict | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while not todo.empty():
                i, messages = todo.get_nowait()
                results[i] = await one_request(client, url, model, messages, max_tokens, headers)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def summarize(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["arrivals"][0] - r["start"] for r in ok if r["arrivals"]]
    itl = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    e2e = [r["end"] - r["start"] for r in ok]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
            "failures": [r for r in results if not r["ok"]][:3],
            "duration_s": wall, "request_throughput_per_s": len(ok) / wall,
            "output_tokens": out_tokens, "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
            "output_tokens_per_s": out_tokens / wall,
            "ttft": percentiles(ttft), "itl": percentiles(itl), "e2e_latency": percentiles(e2e)}


def offline_run(engine, requests: list, max_tokens: int) -> tuple[dict, list[str]]:
    """The same workload through the offline Engine (batch = concurrency), tokenization included.
    It runs on a worker thread, as the server's engine does: on a CPU shared with other work, torch
    ops issued from the main thread can run several times slower (OpenMP's worker threads spin),
    which would credit the server with a speed-up that has nothing to do with HTTP."""
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        out = pool.submit(engine.generate, requests, max_new_tokens=max_tokens).result()
        wall = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for c in out)
    return {"duration_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "request_throughput_per_s": len(requests) / wall}, [c.text for c in out]


def offline_engine(a):
    """The engine `pixtral-fast serve` would build from serve_args(a), in this process."""
    from pixtral_fast.serve.command import add_serve_arguments, build_engine

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return build_engine(parser.parse_args(serve_args(a)))[0]


def release_memory() -> None:
    """Gives a closed engine's device memory back before the server loads its own copy."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_args(a) -> list[str]:
    args = ["--tiny"] if a.tiny else ["--model", a.model, "--load-format", a.load_format]
    if a.device:
        args += ["--device", a.device]
    args += ["--dtype", a.dtype, "--backend", a.backend, "--max-num-seqs", str(a.concurrency),
             "--max-waiting", str(max(a.num_requests, 1)), "--disable-uvicorn-access-log", "--log-level", "warning"]
    if a.kv_cache_memory:
        args += ["--kv-cache-memory", str(a.kv_cache_memory)]
    if a.max_model_len:
        args += ["--max-model-len", str(a.max_model_len)]
    return args + a.server_arg


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server (nothing is started)")
    src.add_argument("--tiny", action="store_true", help="start a server on the embedded tiny checkpoint")
    src.add_argument("--model", help="start a server on this checkpoint folder")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache of the server and of the offline engine alike (e.g. 8GiB)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-every", type=int, default=2, help="every k-th request carries an image (0: none)")
    p.add_argument("--offline", action="store_true", help="also run the workload on the offline Engine")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each side; the fastest of each is reported (a shared machine)")
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 if server/offline tok/s is below this")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    a = p.parse_args(argv)
    if a.offline and a.url:
        p.error("--offline needs the server started here (--tiny or --model), with the same engine settings")
    requests = workload(a.num_requests, a.image_every)
    report = {"workload": {"requests": a.num_requests, "max_tokens": a.max_tokens, "image_every": a.image_every,
                           "with_images": sum(1 for r in requests if len(r[0]["content"]) > 1)}}
    offline_texts = None
    if a.offline:
        engine = offline_engine(a)
        try:
            offline_run(engine, requests[:2], 2)  # warm-up, as the server gets below
            for _ in range(a.repeat):
                side, offline_texts = offline_run(engine, requests, a.max_tokens)
                if "offline" not in report or side["duration_s"] < report["offline"]["duration_s"]:
                    report["offline"] = side
        finally:
            engine.close()
        del engine
        release_memory()
    server = None if a.url else ServerProcess(serve_args(a), Path(tempfile.mkdtemp()) / "server.log")
    try:
        url = a.url or server.url
        asyncio.run(run_clients(url, a.served_model_name, requests[:2], 2, 2, a.api_key))  # warm-up
        runs = [asyncio.run(run_clients(url, a.served_model_name, requests, a.concurrency, a.max_tokens,
                                        a.api_key)) for _ in range(a.repeat)]
    finally:
        if server is not None:
            report["server_exit_code"] = server.terminate()
    results, wall = min(runs, key=lambda run: run[1])
    report["server"] = summarize(results, wall, a.concurrency)
    if offline_texts is not None:
        report["server_vs_offline_output_tok_per_s"] = (report["server"]["output_tokens_per_s"]
                                                        / report["offline"]["output_tokens_per_s"])
        report["answers_equal_offline"] = sum(r["ok"] and r["text"] == t for r, t in zip(results, offline_texts))
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if offline_texts is not None:
        print(f"output tok/s: server {report['server']['output_tokens_per_s']:.1f}, offline "
              f"{report['offline']['output_tokens_per_s']:.1f}, ratio {report['server_vs_offline_output_tok_per_s']:.2f}",
              file=sys.stderr)
        if a.min_ratio is not None and report["server_vs_offline_output_tok_per_s"] < a.min_ratio:
            raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
