"""The executor for a checkpoint: this process, or a tensor-parallel group of processes."""
from __future__ import annotations

import torch

from pixtral_fast.model.load import load_model
from pixtral_fast.parallel.plan import check_size
from pixtral_fast.runtime import tp_executor
from pixtral_fast.runtime.executor import Executor, LocalExecutor


def start_executor(path, tensor_parallel_size: int, device, dtype: torch.dtype, backend: str,
                   progress: bool) -> Executor:
    """N = tensor_parallel_size > 1 splits the decoder over N ranks (runtime/tp_executor.py), each
    loading only its share of the checkpoint; N = 1 loads it here."""
    if check_size(tensor_parallel_size) == 1:
        return LocalExecutor(load_model(path, device=device, dtype=dtype, backend=backend, progress=progress))
    return tp_executor.start(path, tensor_parallel_size, device, dtype, backend, progress)
