"""The `pixtral-fast` command: generate, demo, train-demo, bench, make-tiny, convert-hf, serve.

`python -m pixtral_fast.cli ...` runs the same command; under torchrun use
`torchrun --no-python pixtral-fast ...`, which never puts the current folder on sys.path.

Each subcommand is one `add_*(subparsers)` registration in COMMANDS (serve's lives in
pixtral_fast/serve/command.py, which imports FastAPI and uvicorn only when it runs). Errors follow the habits of standard tools:
- a user error (bad arguments, device, config, checkpoint, image, sampling parameter; any
  ValueError or OSError), and a tensor-parallel rank that died or timed out (TensorParallelError),
  prints one line `pixtral-fast: error: ...` on stderr and exits 2 (under torchrun, a rank > 0
  says `pixtral-fast (rank R): error: ...`);
- Ctrl-C prints `pixtral-fast: error: interrupted` and exits 130;
- a closed stdout (`pixtral-fast generate ... | head -c 1`) ends quietly with exit 141, as a tool
  killed by SIGPIPE does;
- anything else is a bug: one line saying so, exit 1; `--debug` shows the traceback of any error.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from pixtral_fast.command_line import EXIT_BROKEN_PIPE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER_ERROR, PROG, Parser
from pixtral_fast.quantize_command import add_bench_scheme_options, add_quantize_command
from pixtral_fast.serve.command import add_serve_command

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch names, resolved lazily
BACKENDS = ("auto", "fast", "reference")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


# -- argument types (argparse turns their ArgumentTypeError into the one-line error) -----------------

def device_arg(text: str):
    from pixtral_fast.model.load import resolve_device

    try:
        return resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def existing_file(text: str) -> Path:
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text) and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text[:80]}: a URL; pixtral-fast does not fetch URLs "
                                         "(download the image and pass its path)")
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def add_runtime_options(cmd: argparse.ArgumentParser, dtype: bool = True, graphs: bool = True) -> None:
    cmd.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    cmd.add_argument("--backend", choices=BACKENDS, default="auto")
    cmd.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for nsys)")
    if dtype:
        cmd.add_argument("--dtype", choices=DTYPES, default="bf16")
    if graphs:
        cmd.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly (to profile each kernel)")


def add_parallel_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--tensor-parallel-size", "-tp", type=int_at_least(1), default=1, metavar="N",
                     help="split the decoder over N ranks: N GPUs (cuda:0..N-1, NCCL) or N CPU processes (gloo); "
                          "under torchrun, N = the number of processes it starts")


# -- generate ---------------------------------------------------------------------------------------

def check_images(paths: list[Path]) -> None:
    """Fails before the (long) model load on a file that is not an image; reads headers only."""
    from pixtral_fast.images import open_image

    for path in paths:  # the library's opener: its pixel cap, no PIL DecompressionBombWarning on stderr
        open_image(path, where=f"--image {path}").close()


def _generate(a) -> None:
    from pixtral_fast.runtime.engine import Engine
    from pixtral_fast.runtime.sampling import SamplingParams

    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    seed=a.seed)
    SamplingParams(**sampling)  # refuses nan, negatives, ... now rather than after loading 25 GB
    check_images(a.image)
    # Under torchrun, ranks > 0 serve rank 0's engine inside this call and exit 0 when it closes:
    # only rank 0 gets past it, so only rank 0 prints.
    engine = Engine.from_pretrained(a.model, device=a.device, dtype=torch_dtype(a.dtype), backend=a.backend,
                                    nvtx=a.nvtx, max_batch_size=a.max_batch_size,
                                    use_cuda_graphs=False if a.no_cuda_graphs else None,
                                    tensor_parallel_size=a.tensor_parallel_size)
    with engine:  # stops the tensor-parallel workers
        print(f"{PROG}: {engine.describe()}", file=sys.stderr)
        content = [{"type": "image", "image": path} for path in a.image] + [{"type": "text", "text": a.prompt}]
        with contextlib.closing(engine.stream([{"role": "user", "content": content}], **sampling)) as pieces:
            for piece in pieces:
                print(piece, end="", flush=True)
        print()


def add_generate(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="answer a prompt about images")
    g.add_argument("--model", required=True, help="folder: params.json + consolidated.safetensors, or HF format")
    g.add_argument("--image", action="append", default=[], type=existing_file, help="image file (repeatable)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-batch-size", type=int_at_least(1), default=8)
    add_runtime_options(g)
    add_parallel_option(g)
    g.set_defaults(func=_generate)
    return g


# -- demo, bench, make-tiny, convert-hf ---------------------------------------------------------------

def _demo(a) -> None:
    from pixtral_fast import demo

    demo.run(a.dir, device=a.device, backend=a.backend, sample_size=a.sample)


def add_demo(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help="answer easy-VQA questions with the shipped demo model, and its accuracy")
    d.add_argument("--dir", default=None, help="another checkpoint folder (a random tiny one is made there if it "
                                               "holds none); default: the shipped easy-VQA model")
    d.add_argument("--sample", type=int_at_least(1), default=200, help="test questions to measure accuracy on")
    add_runtime_options(d, dtype=False, graphs=False)
    d.set_defaults(func=_demo)
    return d


def _train_demo(a) -> None:
    from pixtral_fast import train_demo

    config = train_demo.TrainConfig(seed=a.seed, max_steps=a.max_steps)
    if a.epochs is not None:
        config.epochs = a.epochs
    record = train_demo.train(a.out, config, progress=not a.quiet)
    last = record["epochs"][-1]
    print(f"wrote {a.out}: {last['steps']} steps in {record['seconds']:.0f} s, accuracy on "
          f"{config.eval_questions} test questions {last['test_sample_accuracy']:.2%}")


def add_train_demo(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train-demo", help="train the easy-VQA demo model from scratch (CPU, one thread)")
    t.add_argument("--out", required=True, help="folder for the checkpoint (consolidated format + tekken.json)")
    t.add_argument("--epochs", type=int_at_least(1), default=None, help="default: the shipped model's")
    t.add_argument("--seed", type=int_at_least(0), default=0)
    t.add_argument("--max-steps", type=int_at_least(1), default=None, help="stop after this many steps")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train_demo)
    return t


def _bench(a) -> None:
    from pixtral_fast import benchmark

    common = dict(batches=a.batch, image_size=a.image_size, decode_steps=a.decode_steps, context=a.context,
                  device=a.device, dtype=torch_dtype(a.dtype), backend=a.backend, nvtx=a.nvtx, out=a.out,
                  cuda_graphs=not a.no_cuda_graphs, tensor_parallel_size=a.tensor_parallel_size)
    if a.model is not None:
        if a.random_weights or a.scheme is not None:
            raise ValueError("--model DIR times the checkpoint's own weights: drop --random-weights and --scheme "
                             "(or bench --params params.json --random-weights)")
        report = benchmark.run_checkpoint(a.model, **common)
    else:
        if not a.random_weights:
            raise ValueError("--params builds the model with random weights: add --random-weights "
                             "(or time a checkpoint with --model DIR)")
        report = benchmark.run(a.params, scheme=a.scheme, group_size=a.group_size, **common)
    json.dump(report, sys.stdout, indent=2)
    print()


def add_bench(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="end-to-end speed: time to first token and decode tok/s")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", help="params.json of the model to build (with --random-weights)")
    source.add_argument("--model", help="checkpoint folder: time its real weights (also across ranks: "
                        "--tensor-parallel-size N)")
    b.add_argument("--random-weights", action="store_true",
                   help="weights are made on the device (no checkpoint is read); with --tensor-parallel-size "
                        "N > 1: the per-rank memory plan and N-GPU roofline only")
    b.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 8, 32])
    b.add_argument("--image-size", type=int_at_least(1), default=1024)
    b.add_argument("--context", type=int_at_least(1), default=None,
                   help="prompt tokens per sequence for decode (default: one image)")
    b.add_argument("--decode-steps", type=int_at_least(1), default=32)
    b.add_argument("--out", default=None, help="also write the report here, refreshed after each section")
    add_bench_scheme_options(b)  # --scheme w4a16|fp8, --group-size
    add_runtime_options(b)
    add_parallel_option(b)
    b.set_defaults(func=_bench)
    return b


def _make_tiny(a) -> None:
    from pixtral_fast.tiny import make_tiny

    if os.path.exists(a.dir) and not os.path.isdir(a.dir):
        raise ValueError(f"{a.dir} is a file, not a folder")
    print(make_tiny(a.dir, seed=a.seed, variant=a.variant))


TINY_VARIANTS = ("pixtral-12b", "mistral-small-3.1", "pixtral-large")  # pixtral_fast.tiny.VARIANTS (checked)


def add_make_tiny(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the real format")
    t.add_argument("dir")
    t.add_argument("--seed", type=int_at_least(0), default=0)
    t.add_argument("--variant", choices=TINY_VARIANTS, default="pixtral-12b",
                   help="whose shapes and tokenizer: Pixtral-12B, Mistral-Small-3.1/3.2 (patch merger) or "
                        "Pixtral-Large (ViT head_dim 104, GQA group 12)")
    t.set_defaults(func=_make_tiny)
    return t


def _convert_hf(a) -> None:
    from pixtral_fast.weights import convert_hf_to_consolidated

    print(convert_hf_to_consolidated(a.src, a.dst, dtype=torch_dtype(a.dtype)))


def add_convert_hf(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("convert-hf", help="HF Llava / Mistral3 folder -> consolidated format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=DTYPES, default="bf16")
    c.set_defaults(func=_convert_hf)
    return c


def _export_hf(a) -> None:
    from pixtral_fast.hf_export import convert_consolidated_to_hf

    print(convert_consolidated_to_hf(a.src, a.dst, dtype=torch_dtype(a.dtype)))


def add_export_hf(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("export-hf", help="consolidated folder -> HF Llava / Mistral3 folder (transformers loads it)")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--dtype", choices=DTYPES, default="bf16")
    e.set_defaults(func=_export_hf)
    return e


# Each registration adds one subparser (with `func` set) to the subparsers it is given.
COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_generate, add_demo, add_train_demo, add_bench, add_make_tiny, add_convert_hf, add_export_hf, add_serve_command,
    add_quantize_command,
]


def parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Pixtral inference on one GPU, or split over several (--tensor-parallel-size)")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in COMMANDS:
        cmd = register(sub)
        if "--debug" not in cmd._option_string_actions:  # also after the subcommand's name
            cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


# -- errors ---------------------------------------------------------------------------------------------

def user_error_types() -> tuple[type[BaseException], ...]:
    """What a user can cause: bad values and files, images PIL refuses, mistral_common's request
    errors, and running out of memory. Everything else is our bug."""
    types: list[type[BaseException]] = [ValueError, OSError, ImportError]  # ImportError: an optional extra missing
    if "pixtral_fast.parallel.comm" in sys.modules:  # a rank died or timed out: said in one line, no traceback
        types.append(sys.modules["pixtral_fast.parallel.comm"].TensorParallelError)
    if "torch" in sys.modules:
        types.append(sys.modules["torch"].OutOfMemoryError)
    if "PIL.Image" in sys.modules:
        types.append(sys.modules["PIL.Image"].DecompressionBombError)
    if "mistral_common.exceptions" in sys.modules:
        types.append(sys.modules["mistral_common.exceptions"].MistralCommonException)
    return tuple(types)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a CheckpointError lists its problems on several)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    out = ""
    for line in (part.strip() for part in text.splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _fail(message: str, code: int) -> None:
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"  # torchrun: say which process
    where = "" if rank == "0" else f" (rank {rank})"
    with contextlib.suppress(OSError):  # stderr itself may be gone
        print(f"{PROG}{where}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _silence_stdout() -> None:
    """After a BrokenPipeError: point stdout at /dev/null so that the interpreter's final flush
    does not raise again (Python's documented recipe for SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class _ClosedStdout(io.TextIOBase):
    """sys.stdout when fd 1 was not open at start (`pixtral-fast generate ... >&-`; Python sets
    sys.stdout to None): writing to it is writing to a closed pipe, which ends quietly, exit 141."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "standard output is closed")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    try:
        args = parser().parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at exit
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 (the one place that turns errors into exit codes)
        if debug:
            raise
        if isinstance(e, user_error_types()):
            _fail(one_line(e), EXIT_USER_ERROR)
        _fail(f"internal error: {type(e).__name__}: {one_line(e)} (a bug: rerun with --debug for the traceback "
              "and report it)", EXIT_BUG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
