"""`pixtral-fast quantize SRC DST --scheme fp8|w4a16 [--group-size 128] [--include-vision]`: one
registration for pixtral_fast.cli's COMMANDS (add_quantize_command), like serve's. torch and the
quantizer are imported only when the command runs."""
from __future__ import annotations

import argparse


def group_size_arg(text: str) -> int:
    """argparse type of --group-size (quantize, bench): a positive multiple of 8."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (e.g. 32, 64, 128), got {value}")
    return value


def _quantize(a) -> None:
    from pixtral_fast.quantize_checkpoint import quantize_checkpoint

    print(quantize_checkpoint(a.src, a.dst, a.scheme, group_size=a.group_size, include_vision=a.include_vision))


def add_quantize_command(sub) -> argparse.ArgumentParser:
    q = sub.add_parser("quantize", help="round-to-nearest W4A16 / FP8 into a compressed-tensors HF folder",
                       description="Quantizes the decoder's linear layers of SRC (an HF or consolidated "
                                   "checkpoint) into DST, an HF folder in the compressed-tensors format that "
                                   "pixtral-fast, transformers and vLLM load.")
    q.add_argument("src", help="checkpoint folder to read")
    q.add_argument("dst", help="folder to write (absent or empty)")
    q.add_argument("--scheme", choices=("w4a16", "fp8"), required=True,
                   help="w4a16: int4 weights, one scale per group; fp8: e4m3 weights, one scale per output channel")
    q.add_argument("--group-size", type=group_size_arg, default=128, help="w4a16 group length (default 128)")
    q.add_argument("--include-vision", action="store_true", help="quantize the vision encoder's linears too")
    q.set_defaults(func=_quantize)
    return q


def add_bench_scheme_options(parser: argparse.ArgumentParser) -> None:
    """`bench`'s --scheme / --group-size (pixtral_fast.benchmark.run's scheme / group_size)."""
    parser.add_argument("--scheme", choices=("w4a16", "fp8"), default=None,
                        help="quantize the decoder's linears on the device (round-to-nearest, as `quantize` "
                             "does) and time the packed model; default: dense weights")
    parser.add_argument("--group-size", type=group_size_arg, default=128,
                        help="w4a16 group length (default 128)")
