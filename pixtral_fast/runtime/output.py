"""The output processor: one sequence's text as its tokens come, with its stop strings.

Engine.generate, Engine.stream and the AsyncEngine all read a sequence's text from its TextOutput,
so that a stop string ends a request the same way offline and behind the server: the text before
it is returned, the stop string and all after it never are, and the finish reason is "stop". The
engine advances the output of a request that has stop strings inside each step, so that a match
finishes the sequence there and frees its cache blocks; readers advance it to the tokens they
have seen (a request without stop strings is detokenized by its reader only, off the step)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence as Seq

from pixtral_fast.runtime.detokenize import IncrementalDetokenizer

MAX_STOP = 16          # stop strings per request
MAX_STOP_CHARS = 256   # characters per stop string: their matching stays trivially cheap


def stop_strings(stop: str | Seq[str] | None) -> tuple[str, ...]:
    """The request's stop strings, checked: one str is one stop string (not its characters); at
    most MAX_STOP of them, each a non-empty str of at most MAX_STOP_CHARS characters."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOP:
        raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop: stop strings must be non-empty strings, got {s!r}")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, got one of {len(s)}")
    return tuple(stops)


class StopMatcher:
    """Text assembly for one sequence: incremental detokenization plus stop strings. Text that
    could still become a stop string is held back; a matched stop string and all after it are dropped.

    Linear in the text: each stop string keeps the first position of the held text where it may
    still begin (every earlier one was ruled out for good), so a push scans only the new text plus
    at most (longest stop - 1) held characters."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Seq[int], stops: Seq[str]):
        self.detok = IncrementalDetokenizer(decode)
        self.stop_ids = set(stop_ids)
        self.stops = [s for s in stops if s]
        self.held = ""
        self.starts = [0] * len(self.stops)   # per stop: where in `held` it may still begin
        self.stopped = False
        self.matched: str | None = None       # the stop string found, once stopped

    def push(self, token: int) -> str:
        text = "" if token in self.stop_ids else self.detok.push(token)
        return self._release(text, final=False)

    def finish(self) -> str:
        return self._release(self.detok.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        self.held += text
        cut = self._first_match()
        if cut is not None:
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        if final:
            out, self.held = self.held, ""
            return out
        self.starts = [_first_partial_match(s, self.held, start) for s, start in zip(self.stops, self.starts)]
        keep_from = min(self.starts, default=len(self.held))
        out, self.held = self.held[:keep_from], self.held[keep_from:]
        self.starts = [start - keep_from for start in self.starts]
        return out

    def _first_match(self) -> int | None:
        found = [(at, s) for s, start in zip(self.stops, self.starts) if (at := self.held.find(s, start)) >= 0]
        if not found:
            return None
        at, self.matched = min(found, key=lambda f: f[0])
        return at


def _first_partial_match(stop: str, text: str, start: int) -> int:
    """The first position >= start where the rest of `text` is a proper prefix of `stop`
    (len(text) if none). Only the last len(stop) - 1 characters can hold one."""
    at = max(start, len(text) - len(stop) + 1)
    while (at := text.find(stop[0], at)) >= 0:
        if stop.startswith(text[at:]):
            return at
        at += 1
    return len(text)


class TextOutput:
    """The text of one sequence, advanced over its generated tokens. Thread-safe: the engine
    (inside a step) and a reader may both advance it; each token is taken once, in order. Once a
    stop string matched, or after the final advance, it takes no more tokens. A failure to
    detokenize ends it too, and is raised to the caller that met it."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Seq[int], stops: Seq[str]):
        self.stops = tuple(stops)
        self._matcher = StopMatcher(decode, stop_ids, stops)
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._taken = 0       # generated tokens taken so far
        self._ended = False

    @property
    def stopped(self) -> bool:
        """A stop string matched: the last token taken completed it."""
        return self._matcher.stopped

    @property
    def matched(self) -> str | None:
        return self._matcher.matched

    @property
    def tokens_taken(self) -> int:
        return self._taken

    def advance(self, generated: Seq[int], final: bool = False) -> None:
        """Takes generated[tokens_taken:], up to a stop string's match; final: the sequence has
        ended, and text held back (a partial stop string, a cut character) is released."""
        with self._lock:
            if self._ended:
                return
            try:
                self._take(generated, final)
            except BaseException:
                self._ended = True
                raise

    def _take(self, generated: Seq[int], final: bool) -> None:
        for token in generated[self._taken:]:
            self._taken += 1
            self._pieces.append(self._matcher.push(token))
            if self._matcher.stopped:
                self._ended = True
                return
        if final:
            self._pieces.append(self._matcher.finish())
            self._ended = True

    def stop_reason(self, finish_reason: str | None, tokens: Seq[int]) -> str | int | None:
        """What stopped a request that finished with 'stop' after `tokens`: the stop string
        matched, or the stop token id generated last; None for any other finish."""
        if finish_reason != "stop" or not tokens:
            return None
        return self.matched if self.stopped else tokens[-1]

    def read(self, start: int = 0) -> tuple[str, int]:
        """The text released from piece `start` on, and where the next read starts."""
        with self._lock:
            end = len(self._pieces)
            return "".join(self._pieces[start:end]), end
