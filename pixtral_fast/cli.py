"""The `pixtral-fast` command: generate, demo, bench, make-tiny, convert-hf."""
from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _generate(a) -> None:
    from pixtral_fast.runtime.engine import Engine

    engine = Engine.from_pretrained(a.model, device=a.device, dtype=DTYPES[a.dtype], backend=a.backend,
                                    nvtx=a.nvtx, max_batch_size=a.max_batch_size,
                                    use_cuda_graphs=False if a.no_cuda_graphs else None)
    print(f"pixtral-fast: {engine.describe()}", file=sys.stderr)
    content = [{"type": "image", "image": path} for path in a.image] + [{"type": "text", "text": a.prompt}]
    messages = [{"role": "user", "content": content}]
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    seed=a.seed)
    for piece in engine.stream(messages, **sampling):
        print(piece, end="", flush=True)
    print()


def _demo(a) -> None:
    from pixtral_fast import demo

    demo.run(a.dir, max_new_tokens=a.max_new_tokens, device=a.device, backend=a.backend)


def _bench(a) -> None:
    from pixtral_fast import benchmark

    report = benchmark.run(a.params, batches=a.batch, image_size=a.image_size, decode_steps=a.decode_steps,
                           context=a.context, device=a.device, dtype=DTYPES[a.dtype], backend=a.backend,
                           nvtx=a.nvtx, out=a.out, cuda_graphs=not a.no_cuda_graphs)
    json.dump(report, sys.stdout, indent=2)
    print()


def _make_tiny(a) -> None:
    from pixtral_fast.tiny import make_tiny

    print(make_tiny(a.dir, seed=a.seed))


def _convert_hf(a) -> None:
    from pixtral_fast.weights import convert_hf_to_consolidated

    print(convert_hf_to_consolidated(a.src, a.dst, dtype=DTYPES[a.dtype]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pixtral-fast", description="Pixtral-12B inference on one GPU")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images")
    g.add_argument("--model", required=True, help="folder: params.json + consolidated.safetensors, or HF format")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-batch-size", type=int, default=8)
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="run the pipeline on an embedded tiny checkpoint and image")
    d.add_argument("--dir", default=None, help="where the tiny checkpoint lives (made if absent)")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="end-to-end speed: time to first token and decode tok/s")
    b.add_argument("--params", required=True, help="params.json of the model to build")
    b.add_argument("--random-weights", action="store_true", required=True,
                   help="weights are made on the device (no checkpoint is read)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--image-size", type=int, default=1024)
    b.add_argument("--context", type=int, default=None, help="prompt tokens per sequence for decode (default: one image)")
    b.add_argument("--decode-steps", type=int, default=32)
    b.add_argument("--out", default=None, help="also write the report here, refreshed after each section")
    b.set_defaults(func=_bench)

    for cmd in (g, d, b):
        cmd.add_argument("--device", default=None)
        cmd.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for nsys)")
    for cmd in (g, b):
        cmd.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly (to profile each kernel)")
    for cmd in (g, b):
        cmd.add_argument("--dtype", choices=DTYPES, default="bf16")
    for cmd in (g, d, b):
        cmd.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto")

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the real format")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_make_tiny)

    c = sub.add_parser("convert-hf", help="HF Llava/Pixtral folder -> consolidated format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=DTYPES, default="bf16")
    c.set_defaults(func=_convert_hf)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pixtral-fast: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
