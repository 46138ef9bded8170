"""What runs the engine's steps: one interface, whatever the number of ranks.

The engine plans each step (its scheduler admits, reserves blocks, writes the rows) and hands the
plan to an executor: `prefill(batch)` and `decode(rows)` return the sampled tokens; `capture`
records the decode graphs; `prompt_logits` and `weight_bytes` ask every rank at once; `close`
releases what the executor started. A LocalExecutor runs them on this process's ModelRunner; the
TensorParallelExecutor (runtime/tp_executor.py) runs the same calls on every rank in step. The
engine never asks which one it has.

`failure` says why an executor can run no more steps (its ranks fell out of step); the engine then
ends every request with it. A LocalExecutor never fails that way: a step's fault belongs to the
step's requests, and the engine isolates it."""
from __future__ import annotations

import torch

from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.runtime.decode_step import DecodeRow, DecodeRunner
from pixtral_fast.runtime.kv_cache import CacheShape, PagedKVCache
from pixtral_fast.runtime.model_runner import ModelRunner
from pixtral_fast.runtime.prefill import PrefillBatch
from pixtral_fast.runtime.requests import EngineStats
from pixtral_fast.runtime.sampling import StepOutput


class Executor:
    """The interface (see the module docstring); `setup` builds the runner(s) for a config once."""

    model: Pixtral              # this process's model: the whole one, or rank 0's share
    runner: ModelRunner | None  # this process's runner, once set up
    failure: str | None         # why no step can run any more, or None
    stopped_error: type[Exception] = RuntimeError  # what the engine raises once `failure` stopped it

    def setup(self, config: EngineConfig) -> None:
        raise NotImplementedError

    def prefill(self, batch: PrefillBatch, stats: EngineStats, nvtx: bool = False) -> StepOutput:
        raise NotImplementedError

    def decode(self, rows: list[DecodeRow]) -> StepOutput:
        raise NotImplementedError

    def capture(self, greedy_only: bool = True, logprobs: bool = False, progress: bool = False) -> None:
        raise NotImplementedError

    def prompt_logits(self, tokens: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> list[dict[str, int]]:
        """Each rank's weight bytes by part, in rank order."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the model is spread ('' for one process), for Engine.describe()."""
        raise NotImplementedError

    def health(self) -> str | None:
        """Why no step can run now, or None (seen without running one)."""
        raise NotImplementedError

    @property
    def worker_pids(self) -> list[int]:
        """Processes this executor started and owns."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the executor started; idempotent."""
        raise NotImplementedError

    # What the engine plans with: read from this process's runner.
    @property
    def shape(self) -> CacheShape:
        return self._runner().shape

    @property
    def cache(self) -> PagedKVCache:
        return self._runner().cache

    @property
    def decode_runner(self) -> DecodeRunner:
        return self._runner().decode_runner

    @property
    def max_model_len(self) -> int:
        return self._runner().max_model_len

    def _runner(self) -> ModelRunner:
        if self.runner is None:
            raise RuntimeError("the executor is not set up: call setup(config) first")
        return self.runner


class LocalExecutor(Executor):
    """Every step on this process's model."""

    def __init__(self, model: Pixtral):
        self.model, self.runner, self.failure = model, None, None

    def setup(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(self.model, config)

    def prefill(self, batch: PrefillBatch, stats: EngineStats, nvtx: bool = False) -> StepOutput:
        return self._runner().prefill(batch, stats, nvtx)

    def decode(self, rows: list[DecodeRow]) -> StepOutput:
        return self._runner().decode(rows)

    def capture(self, greedy_only: bool = True, logprobs: bool = False, progress: bool = False) -> None:
        self._runner().capture(greedy_only, logprobs, progress)

    def prompt_logits(self, tokens: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
        return self._runner().prompt_logits(tokens, images)

    def weight_bytes(self) -> list[dict[str, int]]:
        return [self._runner().weight_bytes()]

    def describe(self) -> str:
        return ""

    def health(self) -> str | None:
        return None

    @property
    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass
