"""The engine: requests in, completions (or text streams) out.

Each step admits waiting requests, prefills them together (their images through one packed ViT
pass, their prompts through one varlen causal pass that fills the paged cache), then runs one
decode step for every running sequence through the (graph-captured) DecodeRunner."""
from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from mistral_common.protocol.instruct.request import ChatCompletionRequest

from pixtral_fast import _cuda_decode, ops
from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.config import CPU_CACHE_BYTES, EngineConfig
from pixtral_fast.runtime.detokenize import IncrementalDetokenizer
from pixtral_fast.runtime.graphs import DecodeRow, DecodeRunner
from pixtral_fast.runtime.kv_cache import BlockManager, PagedKVCache, plan_cache
from pixtral_fast.runtime.profiling import nvtx_range
from pixtral_fast.runtime.sampling import SamplingParams, sample
from pixtral_fast.runtime.scheduler import Scheduler, Sequence
from pixtral_fast.tokenizer import Encoded, Tokenizer


log = logging.getLogger("pixtral_fast")


class RequestError(ValueError):
    """This request cannot be served (the message says why); other requests are unaffected."""


@dataclass
class Completion:
    text: str
    tokens: list[int]           # the new token ids (a final stop token included)
    prompt_tokens: int
    finish_reason: str          # "stop" | "length" | "error" | "abort" (a stream closed early)
    error: str | None = None


@dataclass
class EngineStats:
    """Wall time of prefill and decode steps (each ends in a host read of the sampled tokens, so
    GPU work is included)."""
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_images: int = 0
    vit_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0


class Engine:
    def __init__(self, model: Pixtral, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None):
        self.model = model
        self._tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        memory_bytes = config.memory_bytes
        if model.device.type == "cpu" and config.num_blocks is None and memory_bytes is None:
            memory_bytes = CPU_CACHE_BYTES  # no free-memory query on the CPU
        shape = plan_cache(model.args.text, model.dtype, model.device, config.block_size, config.num_blocks,
                           memory_bytes, config.gpu_memory_fraction)
        self.cache = PagedKVCache(shape, model.device)
        self.blocks = BlockManager(shape.num_blocks, shape.block_size)
        self.max_model_len = min(config.max_model_len or model.args.text.max_seq_len, model.args.text.max_seq_len)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_prefill_tokens, self.max_model_len)
        max_blocks = -(-self.max_model_len // shape.block_size)
        self.runner = DecodeRunner(model, self.cache, config.max_batch_size, max_blocks, config.graph_buckets,
                                   config.use_cuda_graphs)
        log.info("engine: %s", self.describe())
        if config.capture_on_start:
            self.runner.capture(greedy_only=True, progress=config.progress)
        self.stats = EngineStats()
        self._ids = itertools.count()

    def describe(self) -> str:
        """Which implementation runs what: said once, never silently chosen."""
        model, shape = self.model, self.cache.shape
        decode = ops.decode_backend(model.device, model.dtype) if model.backend == "fast" else "reference"
        if decode == "triton" and model.device.type == "cuda":
            decode += f" (CUDA extension unavailable: {_cuda_decode.status()})"
        return (f"{model.device} {str(model.dtype).removeprefix('torch.')}, kernels={model.backend}, "
                f"decode attention={decode}, cuda graphs={self.runner.use_cuda_graphs}, "
                f"KV cache {shape.num_blocks} blocks x {shape.block_size} tokens, max_model_len={self.max_model_len}")

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer; Pixtral's Tekken from mistral_common when none was given
        (loaded on first use, so token-level callers never need it)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.default()
        return self._tokenizer

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.bfloat16, backend: str = "auto", **limits) -> "Engine":
        from pixtral_fast.model.load import load_model

        config = EngineConfig(**limits)
        model = load_model(path, device=device, dtype=dtype, backend=backend, progress=config.progress)
        return cls(model, Tokenizer.for_checkpoint(path), config)

    @classmethod
    def from_model(cls, model: Pixtral, tokenizer: Tokenizer | None = None, **limits) -> "Engine":
        return cls(model, tokenizer, EngineConfig(**limits))

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request: Any, params: SamplingParams) -> Sequence:
        """request: Encoded (token ids + images), a ChatCompletionRequest, or a message list. A
        request that cannot be served comes back already finished, with finish_reason 'error'."""
        if not params.stop_token_ids:
            params = replace(params, stop_token_ids=(self.tokenizer.eos_id,))
        seq = Sequence(id=next(self._ids), prompt=[], images=[], params=params,
                       seed=params.seed if params.seed is not None else secrets.randbits(62))
        try:
            encoded = request if isinstance(request, Encoded) else self.tokenizer.encode(request)
            seq.prompt = list(encoded.tokens)
            seq.images = [torch.as_tensor(img) for img in encoded.images]
            self._check_request(seq)
        except ValueError as e:
            self.scheduler.fail(seq, str(e))
            return seq
        self.scheduler.add(seq)
        return seq

    def _check_request(self, seq: Sequence) -> None:
        """What prefill would trip over, found before the request joins a batch."""
        model = self.model
        model.check_tokens(torch.tensor(seq.prompt, dtype=torch.int64))
        if seq.images and model.args.vision is None:
            raise ValueError("this checkpoint has no vision encoder; it cannot take images")
        patches = sum(r * c for r, c in (model.vision_encoder.check_image(i, img) for i, img in enumerate(seq.images)))
        n_img = 0 if model.args.vision is None else seq.prompt.count(model.args.vision.image_token_id)
        if n_img != patches:
            raise ValueError(f"the prompt holds {n_img} [IMG] tokens but its images give {patches} patches")

    def generate(self, request_or_batch: Any, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        """One request -> Completion (RequestError if it cannot be served); a batch -> list of
        Completions in order (failed ones carry finish_reason 'error' and the message)."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed)
        batch = is_batch(request_or_batch)
        seqs = [self.add_request(r, params) for r in (request_or_batch if batch else [request_or_batch])]
        while not all(s.finished for s in seqs):
            self.step()
        out = [self._completion(s) for s in seqs]
        if not batch and out[0].finish_reason == "error":
            raise RequestError(out[0].error)
        for i, c in enumerate(out):
            if c.error:
                c.error = f"request {i}: {c.error}"
        return out if batch else out[0]

    def stream(self, request: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None) -> Iterator[str]:
        """Text increments of one request as its tokens are decoded. Closing the iterator early
        ends the request and frees its cache blocks."""
        seq = self.add_request(request, SamplingParams(max_new_tokens, temperature, top_p, top_k, seed))
        detok, sent = IncrementalDetokenizer(self.tokenizer.decode), 0
        try:
            while True:
                if seq.finish_reason == "error":
                    raise RequestError(seq.error)
                for token in seq.generated[sent:]:
                    piece = "" if token in seq.params.stop_token_ids else detok.push(token)
                    if piece:
                        yield piece
                sent = len(seq.generated)
                if seq.finished:
                    rest = detok.flush()
                    if rest:
                        yield rest
                    return
                self.step()
        finally:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def _completion(self, seq: Sequence) -> Completion:
        text_ids = [t for t in seq.generated if t not in seq.params.stop_token_ids]
        return Completion(text=self.tokenizer.decode(text_ids) if text_ids else "", tokens=list(seq.generated),
                          prompt_tokens=len(seq.prompt), finish_reason=seq.finish_reason, error=seq.error)

    # -- one engine step --------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> None:
        newcomers = self.scheduler.admit()
        st = self.stats
        if newcomers:
            t0 = time.perf_counter()
            st.prefill_tokens += sum(len(s.tokens) for s in newcomers)
            with nvtx_range("prefill", self.config.nvtx):
                self._record(newcomers, self._prefill(newcomers))
            st.prefill_seconds += time.perf_counter() - t0
            st.prefill_images += sum(len(s.images) for s in newcomers)
        running = [s for s in self.scheduler.reserve_decode() if not s.finished]
        if running:
            t0 = time.perf_counter()
            with nvtx_range("decode_step", self.config.nvtx):
                rows = [self._decode_row(s) for s in running]
                self._record(running, self.runner.step(rows))
            st.decode_seconds += time.perf_counter() - t0
            st.decode_steps += 1
            st.decode_tokens += len(running)

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        model, device = self.model, self.model.device
        images = [img for s in seqs for img in s.images]
        t0 = time.perf_counter()
        with nvtx_range("vit", self.config.nvtx):
            features = model.encode_images(images) if images else None
            if features is not None and features.is_cuda:
                torch.cuda.synchronize()  # only so that the ViT's share of prefill is measured
        self.stats.vit_seconds += time.perf_counter() - t0
        tokens = torch.tensor([t for s in seqs for t in s.tokens], dtype=torch.int64, device=device)
        h = model.embed(tokens, features, check=False)  # _check_request matched [IMG] to patches
        lengths = [len(s.tokens) for s in seqs]
        slots = torch.tensor([x for s in seqs for x in self.blocks.slots(s.id)], dtype=torch.int64, device=device)
        meta = AttentionMetadata.for_sequences(lengths, device, slot_mapping=slots)
        h = model.decode_hidden(h, meta, self.cache.layers)
        logits = model.logits(h[meta.cu_seqlens[1:].long() - 1])
        return self._sample(logits, seqs).tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=logits.device)

        p = [s.params for s in seqs]
        return sample(logits, col([x.temperature for x in p], torch.float32), col([x.top_k for x in p], torch.int64),
                      col([x.top_p for x in p], torch.float32), col([s.seed for s in seqs], torch.int64),
                      col([len(s.generated) for s in seqs], torch.int64), greedy_only=all(x.greedy for x in p))

    def _decode_row(self, seq: Sequence) -> DecodeRow:
        position = len(seq.tokens) - 1  # the newest token: generated, its K/V not yet cached
        slot = self.blocks.append(seq.id)
        p = seq.params
        return DecodeRow(token=seq.generated[-1], position=position, slot=slot, blocks=self.blocks.tables[seq.id],
                         temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seq.seed,
                         step=len(seq.generated))

    def _record(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens):
            if seq.finished:
                continue
            seq.generated.append(token)
            if token in seq.params.stop_token_ids:
                self.scheduler.finish(seq, "stop")
            elif len(seq.generated) >= seq.params.max_new_tokens or len(seq.tokens) >= self.max_model_len:
                self.scheduler.finish(seq, "length")


def is_batch(request: Any) -> bool:
    """A list of messages (dicts or mistral_common message objects) is one conversation; a list
    of requests (message lists, ChatCompletionRequest objects, Encoded) is a batch."""
    if not isinstance(request, list) or not request:
        return False
    kinds = {isinstance(r, (list, ChatCompletionRequest, Encoded)) for r in request}
    if kinds == {True, False}:
        raise ValueError("a list mixes requests (message lists, ChatCompletionRequest, Encoded) with single "
                         "messages: pass one conversation, or a list of requests")
    return kinds == {True}
