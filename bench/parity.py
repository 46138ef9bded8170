"""The parity figures the README quotes, measured: fp32 logits' largest absolute difference
- against HF transformers (Llava + Pixtral) for the tiny HF folder and the same weights converted
  to the consolidated format, text only, one image and two images (the tests' bound: 1e-4);
- of a tensor-parallel engine (2 ranks, gloo) against one process, dense and quantized (W4A16
  g32, FP8), on a prompt with images (the tests' bounds: 1e-5 dense; tests/tolerances for fp32).

    python bench parity [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import pixtral_fast as pf
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.tiny import make_tiny
from pixtral_fast.weights import convert_hf_to_consolidated
from tests.support.hf_peer import IMAGE_CASES, hf_logits, prompt, save_tiny_hf, tiny_hf_model
from tests.support.tp import CPU_FP32, request_with_images

LOAD = dict(device="cpu", dtype=torch.float32, backend="reference", progress=False)


def hf_parity(root: Path) -> dict:
    hf_dir = save_tiny_hf(root / "hf", seed=0)
    cons_dir = convert_hf_to_consolidated(hf_dir, root / "consolidated", dtype=torch.float32)
    hf = tiny_hf_model(seed=0)
    out = {}
    for source, folder in (("hf_folder", hf_dir), ("consolidated", cons_dir)):
        model = pf.load_model(folder, **LOAD)
        for case, (grids, images) in IMAGE_CASES.items():
            tokens = prompt(*grids)
            out[f"{source}/{case}"] = (model(tokens, images) - hf_logits(hf, tokens, images)).abs().max().item()
    return out


def tp_parity(folder: Path) -> float:
    with pf.Engine.from_pretrained(folder, **(CPU_FP32 | {"num_blocks": 64})) as one:
        enc = one.tokenizer.encode(request_with_images())
        want = one.prompt_logits(enc.tokens, enc.images)
    with pf.Engine.from_pretrained(folder, tensor_parallel_size=2, **(CPU_FP32 | {"num_blocks": 64})) as two:
        return (two.prompt_logits(enc.tokens, enc.images) - want).abs().max().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pixtral-fast-parity-") as scratch:
        root = Path(scratch)
        report = {"hf_max_abs": hf_parity(root)}
        tiny = make_tiny(root / "tiny", seed=0)
        report["tp2_vs_tp1_max_abs"] = {"dense": tp_parity(tiny)}
        for scheme in ("w4a16", "fp8"):
            folder = quantize_checkpoint(tiny, root / scheme, scheme, group_size=32, progress=False)
            report["tp2_vs_tp1_max_abs"][scheme] = tp_parity(folder)
    print(json.dumps(report, indent=1))
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
