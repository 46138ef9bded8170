"""`pixtral-fast serve` beside vLLM's CPU build on the same consolidated checkpoint, the same
workload and the same client, one server at a time, alternating rounds (medians reported):
- output tokens/s with N concurrent streaming clients over a mix of text-only and image requests;
- single-request end-to-end latency with one 512x512 image and 64 new tokens (and its TTFT/ITL).
Prefix caching is off on both sides. The peer is installed by ../shared/peers/vllm-cpu/setup.sh
and started by its serve.sh; without it the script says so and exits 0 (nothing to compare).

    python bench vs_vllm [--model DIR] [--rounds 2] [--concurrency 16] [--out FILE]

Without --model a tiny consolidated checkpoint (make-tiny, seed 0) is written to a scratch folder."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serve_load import run_clients, summarize, workload
from tests.support.serve_server import ServerProcess, data_url, picture, user_message

PEER_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "pixtral-fast-peers" / "vllm-cpu"))
PEER_SERVE = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-cpu" / "serve.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerServer:
    """vLLM's OpenAI server on a loopback port, started by the peer's serve.sh."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")
        self.proc = subprocess.Popen(["bash", str(PEER_SERVE), str(model), str(self.port), "--no-enable-prefix-caching"],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}: see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM did not start within 600 s: see {log}")

    def terminate(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)
        self._log.close()


def ours(model: Path, log: Path, concurrency: int) -> ServerProcess:
    args = ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-model-len", "4096",
            "--max-num-seqs", str(concurrency), "--disable-uvicorn-access-log", "--log-level", "warning"]
    return ServerProcess(args, log, startup_timeout=600)


def measure(url: str, name: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    load = workload(requests, image_every=2)
    results, wall = asyncio.run(run_clients(url, name, load, concurrency, max_tokens, None))
    single = [user_message("Describe the picture.", data_url(picture(512, 512, 7)))]
    one, one_wall = asyncio.run(run_clients(url, name, single, 1, 64, None))
    return {"load": summarize(results, wall, concurrency), "single_512": summarize(one, one_wall, 1)}


def median_of(rounds: list[dict], path: tuple[str, ...]) -> float:
    values = []
    for r in rounds:
        v = r
        for key in path:
            v = v[key]
        values.append(v)
    return statistics.median(values)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python bench vs_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not (PEER_VENV / "bin" / "python").exists() or not PEER_SERVE.exists():
        print(f"skipped: vLLM's CPU build is not installed ({PEER_VENV}; ../shared/peers/vllm-cpu/setup.sh "
              "installs it)", file=sys.stderr)
        return None
    scratch = Path(tempfile.mkdtemp(prefix="pixtral-fast-vs-vllm-"))
    model = a.model
    if model is None:
        from pixtral_fast.tiny import make_tiny

        model = make_tiny(scratch / "tiny", seed=0)
    name = model.resolve().name
    rounds: dict[str, list[dict]] = {"pixtral_fast": [], "vllm": []}
    for r in range(a.rounds):
        for side in ("pixtral_fast", "vllm"):
            log = scratch / f"{side}-{r}.log"
            server = ours(model, log, a.concurrency) if side == "pixtral_fast" else PeerServer(model, log)
            try:
                rounds[side].append(measure(server.url, name, a.concurrency, a.num_requests, a.max_tokens))
            finally:
                server.terminate()
            print(f"round {r} {side}: {rounds[side][-1]['load']['output_tokens_per_s']:.1f} tok/s, "
                  f"single 512x512: {1e3 * rounds[side][-1]['single_512']['duration_s']:.0f} ms", file=sys.stderr)
    tok_s = {s: median_of(v, ("load", "output_tokens_per_s")) for s, v in rounds.items()}
    single = {s: 1e3 * median_of(v, ("single_512", "duration_s")) for s, v in rounds.items()}
    report = {"model": str(model), "concurrency": a.concurrency, "rounds": a.rounds,
              "output_tokens_per_s": tok_s, "tokens_per_s_ratio": tok_s["pixtral_fast"] / tok_s["vllm"],
              "single_512_e2e_ms": single, "single_latency_ratio": single["pixtral_fast"] / single["vllm"],
              "details": rounds}
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=1))
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)  # kept only when a round failed: its logs are there
    return report


if __name__ == "__main__":
    main()
