"""The shipped easy-VQA model's accuracy on a whole split (default: all 9,673 test questions),
greedy, through the Engine, with the breakdown by question kind and the throughput.

    python bench demo_accuracy                                   # fp32, reference ops, CPU
    python bench demo_accuracy --backend fast --dtype bfloat16    # our kernels (a GPU)
    python bench demo_accuracy --json bench/results/demo_accuracy_cpu.json

tests/test_demo_model.py holds the bar (97%) on a fixed sample of 200; this measures all of it."""
from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch

from pixtral_fast import easy_vqa
from pixtral_fast.runtime.engine import Engine
from pixtral_fast.train_demo import SHIPPED_DIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHIPPED_DIR))
    p.add_argument("--split", choices=easy_vqa.SPLITS, default="test")
    p.add_argument("--limit", type=int, default=None, help="the first N questions only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backend", choices=("reference", "fast", "auto"), default="reference")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    a = p.parse_args()

    qs = easy_vqa.questions(a.split)[:a.limit]
    with Engine.from_pretrained(a.model, device=a.device, dtype=getattr(torch, a.dtype), backend=a.backend) as engine:
        t0 = time.perf_counter()
        result = easy_vqa.evaluate(engine, qs, a.batch_size, progress=True)
        seconds = time.perf_counter() - t0
    by_kind = collections.defaultdict(lambda: [0, 0])
    for q, answer in zip(qs, result.answers):
        by_kind[easy_vqa.kind_of(q.answer)][0] += answer == q.answer
        by_kind[easy_vqa.kind_of(q.answer)][1] += 1
    report = {"model": a.model, "split": a.split, "questions": len(qs), "correct": result.correct,
              "accuracy": result.accuracy, "by_kind": {k: {"correct": c, "questions": n, "accuracy": c / n}
                                                       for k, (c, n) in sorted(by_kind.items())},
              "device": a.device, "dtype": a.dtype, "backend": a.backend, "batch_size": a.batch_size,
              "seconds": round(seconds, 1), "questions_per_s": round(len(qs) / seconds, 1),
              "host": platform.processor() or platform.machine(), "torch": torch.__version__,
              "wrong": [{"image": q.image_id, "question": q.text, "expected": q.answer, "got": answer}
                        for q, answer in zip(qs, result.answers) if answer != q.answer][:50]}
    print(f"{a.split}: {result} ({len(qs) / seconds:.0f} questions/s)")
    for k, v in report["by_kind"].items():
        print(f"  {k:<8} {v['correct']}/{v['questions']} = {v['accuracy']:.2%}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
