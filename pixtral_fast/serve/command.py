"""`pixtral-fast serve`: the OpenAI-compatible server. Flag names follow vLLM's where it has one.

    pixtral-fast serve --model DIR [--host 127.0.0.1] [--port 8000] [--dtype auto] ...
    pixtral-fast serve --tiny            # the shipped easy-VQA demo model: try it with no weights
    python -m pixtral_fast.serve.command ...   # the same, without the pixtral-fast entry point
    pixtral-fast serve --model DIR --tensor-parallel-size 2   # rank 0 serves HTTP; 1 worker process
    torchrun --nproc-per-node 2 --no-python pixtral-fast serve --model DIR --tensor-parallel-size 2
                                         # rank 0 listens; the other ranks only run its model steps
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from pixtral_fast.command_line import EXIT_USER_ERROR, PROG, Parser

DTYPE_NAMES = {"auto": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """'8GiB', '512M', '1048576' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 8GiB, 512MiB, 1048576)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (0: any free port), got {value}")
    return value


def seconds(positive: bool) -> Callable[[str], float]:
    """A finite number of seconds, > 0 (positive) or >= 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {'>' if positive else '>='} 0, "
                                             f"got {text}")
        return value

    parse.__name__ = "seconds"
    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def folder(flag: str) -> Callable[[str], Path]:
    """An existing folder, checked while parsing: before anything loads."""
    def parse(text: str) -> Path:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such folder")
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
        return path

    parse.__name__ = f"{flag} folder"
    return parse


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions with images)")
    add_serve_arguments(s)
    s.set_defaults(func=run_serve)
    return s


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=folder("--model"), help="checkpoint folder (consolidated or HF format)")
    src.add_argument("--tiny", action="store_true", help="serve the shipped demo model (a tiny Pixtral trained "
                     "on easy-VQA: it answers questions about one coloured shape): try the server with no download")
    s.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights from --model's params.json/config.json (benchmarks)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    s.add_argument("--port", type=port_number, default=8000, help="0 picks a free port (printed on stderr)")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    s.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto")
    s.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the folder name)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    s.add_argument("--max-images-per-prompt", type=positive_int, default=8)
    s.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                   help="largest decoded input image, in pixels (checked before decoding)")
    s.add_argument("--max-image-bytes", type=byte_size, default=20 << 20, help="largest encoded image")
    s.add_argument("--max-request-bytes", type=byte_size, default=32 << 20, help="largest request body (413 past it)")
    s.add_argument("--media-fetch-timeout", type=seconds(positive=True), default=10.0, help="seconds to fetch the http(s) images of a request, all reads included")
    s.add_argument("--allowed-local-media-path", type=folder("--allowed-local-media-path"), default=None,
                   help="allow file:// image URLs under this folder (refused otherwise)")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="prompt tokens one request may have prefilled, counted once per choice (n); a request over "
                        "it gets a 400 before any prefill (default: --max-num-batched-tokens, the engine's "
                        "prefill budget of one step)")
    s.add_argument("--max-waiting", type=positive_int, default=256,
                   help="sequences waiting beyond the free batch slots before new requests get 503 + Retry-After")
    s.add_argument("--body-read-timeout", type=seconds(positive=True), default=30.0,
                   help="seconds for a whole request body to arrive (else 408)")
    s.add_argument("--shutdown-grace", type=seconds(positive=False), default=10.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before they are aborted")
    s.add_argument("--disable-uvicorn-access-log", action="store_true")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    e = s.add_argument_group("engine limits (Engine.from_pretrained)")
    e.add_argument("--max-num-seqs", "--max-batch-size", dest="max_num_seqs", type=positive_int, default=None,
                   help="sequences decoded together (default: the engine's)")
    e.add_argument("--max-model-len", type=positive_int, default=None, help="prompt + generation (default: the model's)")
    e.add_argument("--max-num-batched-tokens", type=positive_int, default=None, help="prompt tokens prefilled per step")
    e.add_argument("--gpu-memory-utilization", type=fraction, default=None,
                   help="fraction of the free GPU memory the KV cache takes")
    e.add_argument("--kv-cache-memory", type=byte_size, default=None, help="KV cache size in bytes (e.g. 8GiB)")
    e.add_argument("--num-gpu-blocks-override", type=positive_int, default=None, help="KV cache size in blocks")
    e.add_argument("--block-size", type=int, default=None, help="tokens per KV block (16..256, a power of two)")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    e.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="split the decoder over N GPUs (cuda:0..N-1) or N CPU processes; under torchrun, the "
                        "number of processes it starts")
    e.add_argument("--nvtx", action="store_true", help="NVTX ranges around prefill, ViT and decode steps")
    e.add_argument("--encoder-cache-memory", type=byte_size, default=None, metavar="BYTES",
                   help="image embeddings kept by content hash, so a repeated image skips the ViT "
                        "(default 1GiB; 0 turns the cache off)")
    e.add_argument("--cpu-threads", type=positive_int, default=None, metavar="N",
                   help="a CPU engine's intra-op threads (default: every core this process may use but one, "
                        "which the HTTP side keeps; OMP_NUM_THREADS, when set, instead)")


def engine_limits(a) -> dict:
    chosen = {"max_batch_size": a.max_num_seqs, "max_model_len": a.max_model_len,
              "max_prefill_tokens": a.max_num_batched_tokens, "gpu_memory_fraction": a.gpu_memory_utilization,
              "memory_bytes": a.kv_cache_memory, "num_blocks": a.num_gpu_blocks_override, "block_size": a.block_size,
              "encoder_cache_bytes": a.encoder_cache_memory}
    limits = {k: v for k, v in chosen.items() if v is not None}
    if a.enforce_eager:
        limits["use_cuda_graphs"] = False
    limits["nvtx"] = a.nvtx
    limits["progress"] = sys.stderr.isatty()
    limits["tensor_parallel_size"] = a.tensor_parallel_size
    limits["cpu_threads"] = a.cpu_threads or server_cpu_threads()
    return limits


def server_cpu_threads() -> int | None:
    """A CPU engine's default threads in the server: every core this process may use but one, so
    that tokenizing, image decoding and HTTP never wait for a core (vLLM's CPU default does the
    same); None where OMP_NUM_THREADS already says (torch reads it at start)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


def build_engine(a):
    import torch

    from pixtral_fast.model.load import read_args, resolve_device
    from pixtral_fast.runtime.engine import Engine
    from pixtral_fast.tokenizer import Tokenizer

    device = resolve_device(a.device)
    name = DTYPE_NAMES[a.dtype] or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, name)
    limits = engine_limits(a)
    if a.tiny:
        from pixtral_fast.train_demo import SHIPPED_DIR

        return Engine.from_pretrained(SHIPPED_DIR, device=device, dtype=dtype, backend=a.backend, **limits), "pixtral-fast-tiny"
    folder = Path(a.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder")
    if a.load_format == "dummy":
        from pixtral_fast.benchmark import random_model
        from pixtral_fast.runtime.config import EngineConfig

        if limits.pop("tensor_parallel_size") > 1:
            raise ValueError(f"--load-format dummy with --tensor-parallel-size {a.tensor_parallel_size}: random "
                             "weights are made in this process only, and the other ranks load their shards from "
                             "the checkpoint files; serve the checkpoint itself (--load-format auto)")
        model = random_model(read_args(folder), device, dtype).set_backend(a.backend)
        return Engine(model, Tokenizer.for_checkpoint(folder), EngineConfig(**limits)), folder.resolve().name
    return Engine.from_pretrained(folder, device=device, dtype=dtype, backend=a.backend, **limits), folder.resolve().name


def build_settings(a, default_name: str, prefill_budget: int | None = None):
    """The server's settings from its flags; `prefill_budget`, the engine's max_prefill_tokens,
    is the default of --max-prompt-tokens."""
    from pixtral_fast.serve.app import ServerSettings
    from pixtral_fast.serve.media import MediaLimits

    root = a.allowed_local_media_path
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--allowed-local-media-path {root}: no such folder")
    media = MediaLimits(max_images_per_prompt=a.max_images_per_prompt, max_image_pixels=a.max_image_pixels,
                        max_image_bytes=a.max_image_bytes, allowed_local_media_path=root,
                        fetch_timeout=a.media_fetch_timeout)
    return ServerSettings(model_name=a.served_model_name or default_name, api_key=a.api_key,
                          max_request_bytes=a.max_request_bytes, media=media, shutdown_grace=a.shutdown_grace,
                          max_prompt_tokens=a.max_prompt_tokens or prefill_budget,
                          body_read_timeout=a.body_read_timeout)


def _torchrun_follower() -> bool:
    """A torchrun rank > 0: it runs rank 0's model steps inside Engine.from_pretrained (and exits
    there); it never listens."""
    from pixtral_fast.parallel.comm import torchrun_rank

    launched = torchrun_rank()
    return launched is not None and launched[0] != 0


def run_serve(a) -> None:
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _torchrun_follower():
        build_engine(a)  # raises SystemExit(0) once rank 0's engine closes
        raise RuntimeError("a torchrun rank > 0 came back from Engine.from_pretrained")
    # The engine thread gives up the GIL inside every torch op and must win it back from the event
    # loop: a shorter switch interval keeps it from queueing behind HTTP work (5 ms by default).
    sys.setswitchinterval(0.0005)
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))  # before loading: a taken port fails fast
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {a.host} --port {a.port}: cannot listen there ({e.strerror or e})") from None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(sock.close)
        engine, default_name = build_engine(a)
        cleanup.callback(engine.close)  # stops the tensor-parallel workers, however the server ends
        _serve(a, engine, default_name, sock)


def _serve(a, engine, default_name: str, sock) -> None:
    import uvicorn

    from pixtral_fast.runtime.async_engine import AsyncEngine
    from pixtral_fast.serve.app import build_app

    settings = build_settings(a, default_name, engine.config.max_prefill_tokens)
    tokenizer = engine.tokenizer
    if hasattr(tokenizer, "max_image_pixels"):
        tokenizer.max_image_pixels = a.max_image_pixels
    print(f"pixtral-fast serve: {engine.describe()}", file=sys.stderr)
    async_engine = AsyncEngine(engine, max_waiting=a.max_waiting)
    app = build_app(async_engine, settings)
    # uvicorn's own limit only backs up the engine's: streams end at the grace period, then close
    config = uvicorn.Config(app, log_level=a.log_level, access_log=not a.disable_uvicorn_access_log,
                            timeout_graceful_shutdown=a.shutdown_grace + 5.0, lifespan="on",
                            http=half_close_h11_protocol())
    host, port = sock.getsockname()[:2]
    print(f"pixtral-fast serve: model {settings.model_name!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    _graceful_server(config, app.state.server, a.shutdown_grace).run(sockets=[sock])


def half_close_h11_protocol():
    """uvicorn's h11 protocol (named, so that an installed httptools changes nothing), except
    that a client which half-closes its socket (shutdown(SHUT_WR)) once its request is complete
    still gets the answer, and then the connection closes. uvicorn closes the socket at the
    client's EOF, which left such a client without an answer. The cost: the server cannot tell
    that half-close from a client that closed its socket entirely, so such a client's plain
    request now runs to its end (a stream is still aborted at its next write)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HalfCloseH11Protocol(H11Protocol):
        def eof_received(self) -> bool | None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete or self.conn.their_state is not h11.DONE:
                return None  # idle, or the request is incomplete: close, as uvicorn does
            cycle.keep_alive = False  # the client sends nothing more: close once it is answered
            return True  # keeps the transport open for writing the answer

    return HalfCloseH11Protocol


def _graceful_server(config, state, grace: float):
    """uvicorn's Server, except that on SIGTERM/SIGINT (1) the engine gets `grace` seconds to
    finish in-flight requests, then ends the rest (a 503, or an error event in a stream), so that their
    streams close properly before uvicorn would cut them, and requests not yet in the engine (still
    fetching images) get the same 503 (serve.app.RequestGuard), and (2) the process exits 0:
    uvicorn re-raises the signal once it has shut down, which would end the process *by* that signal."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None):
            closing = asyncio.ensure_future(state.stop_engine(grace))
            await super().shutdown(sockets)
            await closing

    return Server(config)


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog=f"{PROG} serve", description="OpenAI-compatible HTTP server")
    add_serve_arguments(p)
    a = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack on stderr
    try:
        run_serve(a)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except RuntimeError as e:  # a tensor-parallel rank died or timed out: one line, no traceback
        from pixtral_fast.parallel.comm import TensorParallelError

        if not isinstance(e, TensorParallelError):
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
