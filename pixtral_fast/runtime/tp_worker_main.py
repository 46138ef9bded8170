"""`python -m pixtral_fast.runtime.tp_worker_main ...`: one tensor-parallel worker rank, as the
executor starts it. A module of its own, so that the worker code (tp_worker.py) is imported under its
own name, never run as __main__."""
import argparse

import torch

from pixtral_fast.runtime.tp_worker import main


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pixtral_fast.runtime.tp_worker_main",
                                description="one tensor-parallel worker rank (started by the driver)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--device-type", choices=("cpu", "cuda"), required=True)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--timeout-s", type=float, required=True)
    p.add_argument("--parent-fd", type=int, required=True)
    p.add_argument("--scratch", default=None, help="the driver's folder for ready-/error- files")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = _parse()
    main(a.rank, a.size, a.init_method, a.path, a.device_type, getattr(torch, a.dtype), a.backend, a.timeout_s,
         a.parent_fd, a.scratch)
