"""Counting the kernel launches of a piece of work on any device, the CPU included.

Inside a CUDA graph each kernel still costs ~1.5-2.5 us to start, so at batch 1 the number of
launches per decode step bounds the speed as surely as the bytes read do. The counter sees:
- every aten op that launches a kernel on a GPU: views, allocations and metadata ops launch none;
  a host<->device copy counts (it is a memcpy the step waits on);
- every Triton kernel launch, compiled (Triton's launch hook) or interpreted (TRITON_INTERPRET=1:
  what the interpreter does with tensors inside a kernel is not counted);
- what the implementation of each of our custom ops (pixtral_fast::*) launches, not the op itself.
  An op without a Python implementation (the CUDA extension's decode attention) counts as one.
On the CPU this is the count a GPU would see for the same code path; a GPU run adds the torch
profiler's list of kernels (bench/device_check.sh's launches stage)."""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:  # torch's registry of Python custom ops (private; present since torch 2.4)
    from torch._library.custom_ops import _maybe_get_opdef
except ImportError:  # then each of our ops counts as one launch, as a C++ op does
    def _maybe_get_opdef(op):
        return None

aten = torch.ops.aten
# Ops that allocate, alias or describe memory without touching it on the device.
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
             aten.detach.default, aten.set_.source_Storage, aten.set_.source_Storage_storage_offset,
             aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
             aten.is_same_size.default, aten.resize_.default}


@dataclass
class LaunchCount:
    """Launches by (region, kernel name); a region is a label the caller sets (see `region`)."""
    counts: Counter = field(default_factory=Counter)

    def total(self, region: str | None = None) -> int:
        return sum(n for (r, _), n in self.counts.items() if region is None or r == region)

    def by_name(self, region: str | None = None) -> dict[str, int]:
        out: Counter = Counter()
        for (r, name), n in self.counts.items():
            if region is None or r == region:
                out[name] += n
        return dict(out.most_common())


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.result = LaunchCount()
        self.region_name = "other"
        self._paused = 0

    @contextlib.contextmanager
    def region(self, name: str):
        """Launches inside the block count under `name`."""
        outer, self.region_name = self.region_name, name
        try:
            yield
        finally:
            self.region_name = outer

    def add(self, name: str) -> None:
        if not self._paused:
            self.result.counts[(self.region_name, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            opdef = _maybe_get_opdef(func)
            if opdef is not None:  # our Python implementation, with this counter still on
                with self:
                    return opdef._init_fn(*args, **kwargs)
            self.add(f"{func.namespace}::{func.overloadpacket.__name__}")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        # An op that may alias (aten::to, reshape, contiguous) launches only when it did not.
        if func not in NO_KERNEL and not (func.is_view and _aliases(out, (args, kwargs))):
            self.add(f"aten::{func.overloadpacket.__name__}")
        return out

    def __enter__(self):
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(_triton_launches(self))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._hooks.close()


def _storages(tree) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _aliases(out, inputs) -> bool:
    """Whether every tensor `out` holds lives in the storage of an input."""
    return _storages(out) <= _storages(inputs)


@contextlib.contextmanager
def _triton_launches(counter: LaunchCounter):
    """Counts Triton launches into `counter` while the block runs, compiled or interpreted."""
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction

    def on_launch(metadata) -> None:
        try:
            name = metadata.get()["name"]
        except Exception:  # the metadata's shape differs across Triton versions; the count does not
            name = "kernel"
        counter.add(f"triton::{name}")

    original_run = InterpretedFunction.run

    def interpreted_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        counter.add(f"triton::{self.fn.__name__}")
        counter._paused += 1  # the interpreter's own tensor traffic is not the kernel's launches
        try:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter._paused -= 1

    chain = knobs.runtime.launch_enter_hook
    chained = hasattr(chain, "add")  # Triton >= 3.5: a HookChain; before, one callable or None
    if chained:
        chain.add(on_launch)
    else:
        knobs.runtime.launch_enter_hook = on_launch
    InterpretedFunction.run = interpreted_run
    try:
        yield
    finally:
        InterpretedFunction.run = original_run
        if chained:
            chain.remove(on_launch)
        else:
            knobs.runtime.launch_enter_hook = chain


def _count_by_layer(model, work) -> dict:
    """Runs work() under a counter whose region is "layer" inside any decoder layer."""
    from pixtral_fast.model.text import DecoderLayer

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    counter = LaunchCounter()

    def enter(*_):
        counter.region_name = "layer"

    def leave(*_):
        counter.region_name = "other"

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter),
                                                  layer.register_forward_hook(leave))]
    try:
        with torch.inference_mode(), counter:
            work()
    finally:
        for h in handles:
            h.remove()
    count, n = counter.result, max(1, len(layers))
    return {"total": count.total(), "layers": len(layers), "per_layer": count.total("layer") / n,
            "outside_layers": count.total("other"),
            "per_layer_by_kernel": {k: v / n for k, v in count.by_name("layer").items()},
            "outside_by_kernel": count.by_name("other")}


def prefill_launches(model, prompt_tokens: int) -> dict:
    """The launches of the decoder over one text prompt of `prompt_tokens` tokens, as prefill runs
    it (packed varlen attention, no cache): per decoder layer and outside (embedding, final norm)."""
    from pixtral_fast.model.text import AttentionMetadata

    tokens = torch.ones(prompt_tokens, dtype=torch.long, device=model.device)
    meta = AttentionMetadata.for_sequences([prompt_tokens], model.device)

    def work():
        model.run_decoder(model.tok_embeddings(tokens), meta)

    work()  # lazy one-time work outside the count
    return {"prompt_tokens": prompt_tokens, **_count_by_layer(model, work)}


def decode_step_launches(runner, batch: int, greedy: bool = True) -> dict:
    """The launches of one decode step of `batch` rows (a DecodeRunner's step body: what its CUDA
    graph replays), split into the decoder layers (per layer: they are alike) and the rest
    (embedding, final norm, output head, sampling). The step runs once first, uncounted, so that
    lazy one-time work (RoPE tables, autotuning) is not counted."""
    key = (batch, greedy, False, False)
    runner.fill_scratch(batch)
    runner.run_body(key)
    return {"batch": batch, **_count_by_layer(runner.model, lambda: runner.run_body(key))}
