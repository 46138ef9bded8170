"""The engine: requests in, completions (or text streams) out.

Each step (runtime/engine_step.py) admits waiting requests, prefills them together
(runtime/prefill.py), then runs one decode step for every running sequence through the executor.

Thread model: one lock guards the scheduler, the block manager, the cache and the runner; step()
and abort() take it (abort waits for a step in flight). add_request() never waits for a step: it
tokenizes and checks the request unlocked and leaves it in a thread-safe inbox that the next step
moves into the queue. generate() and stream() called from several threads on one engine batch
together: each caller steps the shared batch until its own sequences finish, and a step advances
every running sequence, whoever added it. Sampling is keyed by (seed, token index), never by the
batch, so each caller gets the answer it would get alone.

Faults: a step never leaves the engine inconsistent (runtime/engine_step.py); generate() and
stream() abort their own requests on any exit.

Output: every request's text comes from its TextOutput (runtime/output.py), one output processor
for generate(), stream() and the AsyncEngine. A request with stop strings has its text advanced
inside the step, so that the token completing a stop string finishes the sequence there (finish
reason "stop", blocks freed); other requests are detokenized by their readers, off the step."""
from __future__ import annotations

import itertools
import logging
import secrets
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pixtral_fast import _cuda_decode, ops
from pixtral_fast.model.pixtral import Pixtral
from pixtral_fast.quant import describe_scheme
from pixtral_fast.parallel.plan import check_size
from pixtral_fast.runtime.config import EngineConfig
from pixtral_fast.runtime.constraints import TokenConstraint
from pixtral_fast.runtime.executor import Executor, LocalExecutor
from pixtral_fast.runtime.kv_cache import BlockManager
from pixtral_fast.runtime.launch import start_executor
from pixtral_fast.runtime.engine_step import EngineStep
from pixtral_fast.runtime.lifecycle import EngineLifecycle
from pixtral_fast.runtime.output import TextOutput, stop_strings
from pixtral_fast.runtime.requests import (Completion, EngineStats, EngineUsage, RequestError, describe_failure,
                                           image_tensors, is_batch)
from pixtral_fast.runtime.sampling import SamplingParams
from pixtral_fast.runtime.scheduler import Scheduler, Sequence
from pixtral_fast.runtime.structured_output import Grammar, compile_response_format
from pixtral_fast.runtime.tool_calls import ToolGrammar, compile_tools
from pixtral_fast.messages import WithTools
from pixtral_fast.tokenizer import Encoded, Tokenizer
from pixtral_fast.weights import check_tokenizer_vocab

__all__ = ["Engine", "Completion", "EngineStats", "EngineUsage", "RequestError", "is_batch"]

log = logging.getLogger("pixtral_fast")


class Engine(EngineStep, EngineLifecycle):
    def __init__(self, model: Pixtral, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 executor: Executor | None = None):
        """`executor`: what runs the steps (runtime/executor.py): by default this process, on
        `model`; from_pretrained may give a tensor-parallel one whose rank 0 `model` is. The
        engine owns it: close() stops it."""
        self.model = model
        self.executor = executor = executor if executor is not None else LocalExecutor(model)
        self._closed: str | None = None
        try:
            if tokenizer is not None:
                check_tokenizer_vocab(model.args.text.vocab_size, tokenizer.tekken.n_words, "the model")
            if tokenizer is not None and model.args.vision is not None:
                tokenizer.check_matches(model.args.vision)
            self._tokenizer = tokenizer
            self.config = config = config or EngineConfig()
            executor.setup(config)
        except BaseException:
            executor.close()
            raise
        # stops what the executor started (worker processes) at interpreter exit if close() was never called
        self._finalizer = weakref.finalize(self, executor.close)
        shape = executor.shape
        self.blocks = BlockManager(shape.num_blocks, shape.block_size)
        self.cache, self.decode_runner = executor.cache, executor.decode_runner
        self.max_model_len = executor.max_model_len
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_prefill_tokens, self.max_model_len)
        log.info("engine: %s", self.describe())
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.RLock()  # see the thread model above
        self._inbox: deque[Sequence] = deque()  # added, not yet queued: append/popleft are thread-safe
        # Each request's text (runtime/output.py); it lives as long as the request's Sequence does.
        self._outputs: weakref.WeakKeyDictionary[Sequence, TextOutput] = weakref.WeakKeyDictionary()
        if config.capture_on_start:
            self._call("capture", True, False, progress=config.progress)

    def _call(self, name: str, *args, **kwargs):
        """executor.name(*args); a failure that stopped the executor ends every request."""
        try:
            return getattr(self.executor, name)(*args, **kwargs)
        except BaseException:
            if self.executor.failure is not None:  # e.g. its ranks fell out of step: no request can run
                self._stopped(self.executor.failure)
            raise

    def describe(self) -> str:
        """Which implementation runs what: said once, never silently chosen."""
        model, shape = self.model, self.cache.shape
        decode = "reference"
        if model.backend == "fast":
            decode = ops.decode_backend(model.device, model.dtype, model.args.text.head_dim)
        if decode == "triton" and model.device.type == "cuda":
            decode += f" (CUDA extension unavailable: {_cuda_decode.status()})"
        weights = describe_scheme(model) or "dense"
        threads = f" ({torch.get_num_threads()} threads)" if model.device.type == "cpu" else ""
        placement = "".join(f"{part}, " for part in [self.executor.describe()] if part)
        dtype = str(model.dtype).removeprefix("torch.")
        return (f"{placement}{model.device}{threads} {dtype}, kernels={model.backend}, "
                f"weights={weights}, decode attention={decode}, cuda graphs={self.decode_runner.use_cuda_graphs}, "
                f"KV cache {shape.num_blocks} blocks x {shape.block_size} tokens, max_model_len={self.max_model_len}")

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size: token ids, top_k and logprobs are bounded by it."""
        return self.model.args.text.vocab_size

    def usage(self) -> EngineUsage:
        """What the engine holds now: sequences running and waiting, cache blocks used. Thread-safe."""
        with self._lock:
            blocks = self.blocks.usage()
            added = list(self._inbox)  # one C-level copy: another thread may be appending
            waiting = len(self.scheduler.waiting) + sum(1 for s in added if not s.finished)
            return EngineUsage(running=len(self.scheduler.running), waiting=waiting,
                               used_blocks=int(blocks["used_blocks"]), total_blocks=int(blocks["total_blocks"]))

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer; Pixtral's Tekken from mistral_common when none was given
        (loaded on first use, so token-level callers never need it)."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = Tokenizer.default()
        return self._tokenizer

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.bfloat16, backend: str = "auto",
                        tensor_parallel_size: int = 1, **limits) -> "Engine":
        """tensor_parallel_size=N > 1 splits the decoder over N ranks: N - 1 worker processes are
        spawned (rank r on cuda:r, NCCL; or all on the CPU, gloo), each loading only its share of
        the checkpoint; under torchrun (WORLD_SIZE set) the ranks join its group instead, and on
        ranks > 0 this call serves the driver's steps and then exits the process."""
        from pixtral_fast.model.load import checkpoint_path, read_args

        config = EngineConfig(**limits)
        size = check_size(tensor_parallel_size)
        tokenizer = Tokenizer.for_checkpoint(path)
        args = read_args(checkpoint_path(path))  # mismatches found before any weight loads
        check_tokenizer_vocab(args.text.vocab_size, tokenizer.tekken.n_words, str(path))
        if args.vision is not None:
            tokenizer.check_matches(args.vision)
        executor = start_executor(path, size, device, dtype, backend, config.progress)
        return cls(executor.model, tokenizer, config, executor=executor)

    @classmethod
    def from_model(cls, model: Pixtral, tokenizer: Tokenizer | None = None, **limits) -> "Engine":
        return cls(model, tokenizer, EngineConfig(**limits))

    # -- requests ---------------------------------------------------------------------------------

    def _admissible(self, params: SamplingParams) -> SamplingParams:
        """ValueError (naming the parameter) for parameters this model cannot honour; the stop
        tokens default to the tokenizer's end of sequence."""
        if not params.stop_token_ids:
            params = params.with_stop_token_ids((self.tokenizer.eos_id,))
        params.check_vocab(self.vocab_size)  # once per parameters object: the server's check counts
        return params

    def add_request(self, request: Any, params: SamplingParams, stop: str | list[str] | None = None,
                    constraint: TokenConstraint | None = None) -> Sequence:
        """request: Encoded (token ids + images), a ChatCompletionRequest, or a message list.
        `stop`: one stop string or several (runtime/output.py bounds them); the text ends before
        the first one found, finish_reason 'stop'. `constraint`: the tokens each next one may be
        (runtime/constraints.py; the request's own: it is advanced as the request samples). Its
        text: text_output(seq). Thread-safe, and
        never waits for a step. Parameters this model cannot honour raise ValueError before
        admission; a request that cannot be tokenized, checked or ever fit comes back already
        finished, with finish_reason 'error' and the reason in .error."""
        self._check_open()
        params, stops = self._admissible(params), stop_strings(stop)
        seq = Sequence(id=next(self._ids), prompt=[], images=[], params=params,  # count(): atomic
                       seed=params.seed if params.seed is not None else secrets.randbits(62), constraint=constraint)
        # decode on first use: token-level callers with stop ids of their own never load a tokenizer
        self._outputs[seq] = TextOutput(lambda ids: self.tokenizer.decode(ids), params.stop_token_ids, stops)
        try:
            encoded = request if isinstance(request, Encoded) else self.tokenizer.encode(request)
            images = image_tensors(encoded.images)
            self.model.check_request(encoded.tokens, images)
            seq.prompt, seq.images = [int(t) for t in encoded.tokens], images
        except Exception as e:  # whatever the tokenizer or the checks raise, the request fails alone
            seq.finish_reason, seq.error = "error", describe_failure(e)
            return seq
        refusal = self.scheduler.refusal(seq)
        if refusal is not None:
            seq.finish_reason, seq.error = "error", refusal
        else:
            self._inbox.append(seq)
        return seq

    def text_output(self, seq: Sequence) -> TextOutput:
        """The text of a request that add_request returned (its stop strings applied)."""
        return self._outputs[seq]

    def abort(self, seq: Sequence) -> None:
        """Ends a request now (finish_reason 'abort') and frees its cache blocks. Thread-safe;
        does nothing to a finished request."""
        with self._lock:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def fail(self, seq: Sequence, message: str) -> None:
        """Ends a request now with finish_reason 'error' and `message`, and frees its cache
        blocks. Thread-safe; does nothing to a finished request."""
        with self._lock:
            if not seq.finished:
                self.scheduler.fail(seq, message)

    def generate(self, request_or_batch: Any, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, logprobs: int | None = None, response_format: Any = None,
                 tools: Any = None, tool_choice: Any = None, parallel_tool_calls: bool | None = None):
        """One request -> Completion (RequestError if it cannot be served); a batch -> list of
        Completions in order (failed ones carry finish_reason 'error' and the message). `stop`: as
        the server's (see add_request), for every request of a batch; `logprobs`: as SamplingParams';
        `response_format`: OpenAI's ({"type": "json_object"} or {"type": "json_schema", ...}), the
        output constrained to it token by token (runtime/structured_output.py). `tools`,
        `tool_choice`, `parallel_tool_calls`: OpenAI's, shown in the prompt (an Encoded request's
        tokens are taken as they are) and enforced by a grammar (runtime/tool_calls.py); a call
        comes back in Completion.tool_calls with finish_reason 'tool_calls'."""
        params = self._admissible(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                 top_p=top_p, top_k=top_k, seed=seed, logprobs=logprobs))
        stops = stop_strings(stop)
        grammar = self.response_format_grammar(response_format)
        toolset = self.tools_grammar(tools, tool_choice, parallel_tool_calls)
        if grammar is not None and toolset is not None:
            raise ValueError("response_format and tools cannot be combined: give one of them")
        constrained = grammar or toolset
        batch = is_batch(request_or_batch)
        seqs: list[Sequence] = []
        try:
            for request in request_or_batch if batch else [request_or_batch]:
                if toolset is not None and not isinstance(request, Encoded):
                    request = WithTools(request, toolset.tools)
                seqs.append(self.add_request(request, params, stops, constrained and constrained.constraint()))
            self._step_until(lambda: all(s.finished for s in seqs))
            out = [self._with_tool_calls(self._completion(s), s, toolset) for s in seqs]
        finally:  # an exception or an interrupt must not leave our requests holding blocks
            for seq in seqs:
                self.abort(seq)
        if not batch and out[0].finish_reason == "error":
            raise RequestError(out[0].error)
        for i, c in enumerate(out):
            if c.error:
                c.error = f"request {i}: {c.error}"
        return out if batch else out[0]

    def stream(self, request: Any, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None,
               response_format: Any = None) -> Iterator[str]:
        """Text increments of one request as its tokens are decoded (RequestError once it fails),
        `stop` and `response_format` as in generate(). Bad parameters raise here; the request
        starts at the first next(). Closing the iterator early ends the request and frees its
        cache blocks."""
        params = self._admissible(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                 top_p=top_p, top_k=top_k, seed=seed))
        stops = stop_strings(stop)
        if is_batch(request):  # a list of conversations is not one conversation: say so, not pydantic
            raise ValueError("stream() takes one request, not a batch; use generate() for batches")
        grammar = self.response_format_grammar(response_format)
        return self._stream(request, params, stops, grammar and grammar.constraint())

    def response_format_grammar(self, response_format: Any) -> Grammar | None:
        """OpenAI's `response_format` compiled for this engine's tokenizer and vocabulary (None for
        plain text); its .constraint() is one request's (Engine.add_request). ValueError naming
        what cannot be compiled."""
        return compile_response_format(response_format, self.tokenizer, self.vocab_size)

    def tools_grammar(self, tools: Any, tool_choice: Any = None,
                      parallel_tool_calls: bool | None = None) -> ToolGrammar | None:
        """OpenAI's tools compiled for this engine's tokenizer and vocabulary (None without tools);
        its .constraint() is one request's. ValueError (messages.InputError: .param names the
        field) for tools, a choice or a tokenizer that cannot be honoured."""
        return compile_tools(tools, tool_choice, parallel_tool_calls, self.tokenizer, self.vocab_size)

    @staticmethod
    def _with_tool_calls(completion: Completion, seq: Sequence, toolset: ToolGrammar | None) -> Completion:
        """A finished request's calls read from its token ids (the text after [TOOL_CALLS] is the
        calls' JSON, not an answer: it is dropped)."""
        if toolset is None or completion.finish_reason != "stop":
            return completion
        calls = toolset.parse(completion.tokens, seq.params.stop_token_ids, seq.seed)
        if calls:
            completion.tool_calls, completion.text, completion.finish_reason = calls, "", "tool_calls"
        return completion

    def _stream(self, request: Any, params: SamplingParams, stops: tuple[str, ...],
                constraint: TokenConstraint | None) -> Iterator[str]:
        seq = self.add_request(request, params, stops, constraint)
        output, read, seen = self.text_output(seq), 0, 0
        try:
            while True:
                finished = seq.finished  # read before the tokens: a finished sequence's tokens are final
                seen = len(seq.generated)
                self._advance(seq, output, final=finished and seq.finish_reason != "error")
                text, read = output.read(read)
                if text:
                    yield text
                if finished:
                    if seq.finish_reason == "error":
                        raise RequestError(seq.error)
                    return
                self._step_until(lambda: seq.finished or len(seq.generated) > seen)
        finally:
            self.abort(seq)

    def _advance(self, seq: Sequence, output: TextOutput, final: bool) -> None:
        """A reader's advance of the request's text; a detokenization failure ends the request."""
        try:
            output.advance(seq.generated, final)
        except Exception as e:
            message = f"detokenization failed: {describe_failure(e)}"
            self.fail(seq, message)
            raise RequestError(message) from e

    def _completion(self, seq: Sequence) -> Completion:
        output, reason, error = self.text_output(seq), seq.finish_reason, seq.error
        try:
            output.advance(seq.generated, final=True)
            text = output.read()[0]
        except Exception as e:
            text, reason, error = "", "error", f"detokenization failed: {describe_failure(e)}"
        return Completion(text=text, tokens=list(seq.generated), prompt_tokens=len(seq.prompt),
                          finish_reason=reason, error=error, stop_reason=output.stop_reason(reason, seq.generated),
                          logprobs=list(seq.logprobs))

    def _step_until(self, done: Callable[[], bool]) -> None:
        """Steps the shared batch until done() holds; checked under the lock, so that a caller
        whose sequences another thread's step just finished does not step again for nothing."""
        while True:
            with self._lock:
                if done():
                    return
                self.step()
