"""The offline engine's host bookkeeping per decode step: a step's wall time minus the time of the
model and sampling inside it (DecodeRunner.run_body), at each batch size, on the tiny model on the
CPU, where run_body is synchronous, so the difference is what the host spends around it:
admission, block reservation, decode rows, input buffers, reading the tokens back, finishing.

Each figure is set beside the bf16 roofline step of Pixtral-12B at the same batch (the time an
H200 needs to stream its weights and KV cache once, `runtime/tp_memory.decode_roofline`): on a
GPU, bookkeeping that does not overlap the device's step adds this much to it.

    python bench host_overhead [--batches 1 8 32 128 256] [--steps 20] [--context 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pixtral_fast as pf
from pixtral_fast.benchmark import random_model
from pixtral_fast.config import ModelArgs
from pixtral_fast.runtime.tp_memory import decode_roofline, rank_plan
from pixtral_fast.tiny import TINY_ARGS
from pixtral_fast.tokenizer import Encoded

PIXTRAL_12B = Path(__file__).resolve().parents[1] / "tests" / "data" / "params.json"
PROMPT_TOKENS = 16


def engine_for(batch: int, steps: int) -> pf.Engine:
    model = random_model(TINY_ARGS, torch.device("cpu"), torch.float32).set_backend("reference")
    blocks = batch * -(-(PROMPT_TOKENS + steps + 4) // 16) + 1  # every sequence's whole length, and scratch
    return pf.Engine.from_model(model, num_blocks=blocks, block_size=16, max_batch_size=batch, progress=False)


def measure(batch: int, steps: int) -> dict:
    engine = engine_for(batch, steps)
    runner, inside = engine.decode_runner, []
    run_body = runner.run_body

    def timed(key):
        t0 = time.perf_counter()
        run_body(key)
        inside.append(time.perf_counter() - t0)

    runner.run_body = timed
    params = pf.SamplingParams(max_new_tokens=steps + 4, temperature=0.0, stop_token_ids=(0,))  # <unk>: never sampled here (asserted below)
    for i in range(batch):  # distinct prompts: none is a copy prefilled with another
        tokens = [1] + [1000 + (i * 7 + t) % 5000 for t in range(PROMPT_TOKENS - 1)]
        engine.add_request(Encoded(tokens=tokens, images=[]), params)
    engine.step()  # the prefill (and a first decode) of every sequence
    walls, models = [], []
    for _ in range(steps):
        inside.clear()
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
        models.append(sum(inside))
    assert engine.usage().running == batch, "a sequence finished early: the steps did not decode the whole batch"
    engine.close()
    host = [w - m for w, m in zip(walls, models)]
    return {"batch": batch, "step_ms": 1e3 * statistics.median(walls),
            "model_and_sampling_ms": 1e3 * statistics.median(models), "host_ms": 1e3 * statistics.median(host),
            "host_us_per_sequence": 1e6 * statistics.median(host) / batch}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench host_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per batch (median)")
    p.add_argument("--context", type=int, default=4096, help="the roofline's context per sequence")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    big = ModelArgs.from_params_json(PIXTRAL_12B)
    rank = rank_plan(big, 1, 0, torch.bfloat16)
    rows = []
    for batch in a.batches:
        row = measure(batch, a.steps)
        roofline_ms = decode_roofline(big, rank, 1, batch, a.context)["step_ms"]
        row.update(pixtral_12b_bf16_roofline_ms=roofline_ms, host_fraction_of_roofline=row["host_ms"] / roofline_ms)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    report = {"threads": torch.get_num_threads(), "prompt_tokens": PROMPT_TOKENS, "steps": a.steps,
              "roofline_context": a.context, "rows": rows}
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
