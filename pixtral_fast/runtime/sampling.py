"""Sampling on the device, with no host sync, so that it lives inside the captured decode graph.

Per-row parameters come in tensors (temperature, top_k, top_p, seed, step). Randomness is a
counter-based hash of (seed, step, token id) turned into Gumbel noise: the same seed gives the same
tokens on any device, in any batch, captured or eager — no generator state to carry.

Every step also yields a per-row finite flag (the row's logits held no NaN/inf and were not all
equal: see usable_rows) and, for steps where some row asks for them, log-probabilities; both
travel with the sampled tokens in one tensor, so that a step costs one host read (read_step)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np
import torch

MAX_LOGPROBS = 20                  # the most alternatives a row may ask for (OpenAI's cap)
MAX_TEMPERATURE = 3.4028234663852886e38  # the largest float32: the device holds temperatures in fp32
_INT64_MIN, _UINT64 = -(1 << 63), 1 << 64


def _integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """value as a Python int; bools and floats (even 3.0) are refused: they are never what was meant."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def reduce_seed(seed: int) -> int:
    """Any Python int -> the int64 with the same value modulo 2**64 (two's complement). Seeds that
    already fit an int64 are unchanged; larger ones wrap, so seed and seed + 2**64 sample alike."""
    return (seed - _INT64_MIN) % _UINT64 + _INT64_MIN


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Every field is checked here, with a ValueError naming it:
    max_new_tokens int >= 1; temperature finite in [0, MAX_TEMPERATURE] (0: greedy); top_p finite in
    (0, 1] (the smallest set of most likely tokens whose mass reaches top_p is kept, the token that
    crosses top_p included: a token whose preceding mass equals top_p exactly is not kept; among
    equal logits the lower id counts as more likely, as in argmax); top_k int >= 0 (0: no limit);
    seed None or any int (stored reduced to int64 by reduce_seed); stop_token_ids a tuple/list of
    ints >= 0 (empty: the engine stops at EOS); logprobs None (off) or n in 0..MAX_LOGPROBS: the
    chosen token's logprob plus the n most likely.
    Bounds that depend on the model (top_k, stop ids, logprobs vs the vocabulary) are check_vocab's."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    logprobs: int | None = None
    # The vocabulary check_vocab passed (not a parameter): the input processor checks a request's
    # parameters once, and the later calls on the same object (the engine's, the prefill's) return.
    _checked_vocab: int | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        fix("max_new_tokens", _integer("max_new_tokens", self.max_new_tokens, low=1))
        temperature = _real("temperature", self.temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:.4g}] (0: greedy), got {temperature}")
        fix("temperature", temperature)
        top_p = _real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        fix("top_p", top_p)
        fix("top_k", _integer("top_k", self.top_k, low=0))
        if self.seed is not None:
            fix("seed", reduce_seed(_integer("seed", self.seed)))
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (tuple, list)):
            raise ValueError(f"stop_token_ids must be a tuple or list of token ids, got {stops!r}")
        fix("stop_token_ids", tuple(_integer("stop_token_ids", t, low=0) for t in stops))
        if self.logprobs is not None:
            fix("logprobs", _integer("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_stop_token_ids(self, stop_token_ids) -> SamplingParams:
        """A copy that stops at these ids; a vocabulary check passed stays passed where they lie in it."""
        copy = replace(self, stop_token_ids=stop_token_ids)
        vocab = self._checked_vocab
        if vocab is not None and all(0 <= t < vocab for t in copy.stop_token_ids):
            object.__setattr__(copy, "_checked_vocab", vocab)
        return copy

    def check_vocab(self, vocab_size: int) -> None:
        """The bounds that depend on the model: ValueError naming the parameter. Checked once per
        object and vocabulary."""
        if self._checked_vocab == vocab_size:
            return
        check_vocab_bounds(self, vocab_size)
        object.__setattr__(self, "_checked_vocab", vocab_size)


def check_vocab_bounds(params: SamplingParams, vocab_size: int) -> None:
    """SamplingParams.check_vocab's work, done once per object."""
    if params.top_k > vocab_size:
        raise ValueError(f"top_k must be at most the vocabulary size {vocab_size} (0: no limit), got {params.top_k}")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids must lie in [0, {vocab_size}), got {bad[0]}")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise ValueError(f"logprobs must be at most the vocabulary size {vocab_size}, got {params.logprobs}")


@dataclass
class TokenLogprobs:
    """log_softmax of the row's raw fp32 logits (before temperature, top-k or top-p)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]   # the n most likely (id, logprob), by descending logprob


@dataclass
class StepOutput:
    """One step's result per row. finite[i] False: row i's logits held NaN/inf or were all equal
    (usable_rows), and its token (and logprobs) mean nothing."""
    tokens: list[int]
    finite: list[bool]
    logprobs: list[TokenLogprobs | None]


# -- the noise ----------------------------------------------------------------------------------

def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch stores it (torch multiplies int64 with wraparound)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_K1, _K2, _K3 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(0, 1) uniforms [B, vocab] from a splitmix64-style mix of (seed, step, token id)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * _K1 + step[:, None] * _K3 + ids[None, :] * _K2
    x = (x ^ _shr(x, 30)) * _K2
    x = (x ^ _shr(x, 27)) * _K3
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


# -- sampling (device side, capturable) ----------------------------------------------------------

def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """bool [B]: row i of logits [B, V] (fp32) is finite and not all equal. A hidden state too
    large for its RMSNorm (mean(x^2) overflows, rsqrt gives 0) comes out as zero, and so do its
    logits: finite, but meaningless. One reduction, as the finite check alone cost: the row's
    variance is NaN when it holds NaN or +-inf (CPU and CUDA kernels alike) and 0 when every
    logit is equal (exactly, for the all-zero row an overflowed hidden state gives). At the far
    ends the variance itself gives out, and the row counts as overflowed too: logits spread by
    less than ~1e-19 (it underflows to 0) or past ~1e38 (NaN)."""
    if logits.shape[-1] == 1:  # one token: nothing to be equal to
        return torch.isfinite(logits[:, 0])
    return logits.var(dim=-1, correction=0) > 0


BITS_PER_WORD = 32  # an allowed-token bitmask packs token t into bit t % 32 of int32 word t // 32


def bitmask_words(vocab: int) -> int:
    """int32 words of an allowed-token bitmask over `vocab` tokens."""
    return -(-vocab // BITS_PER_WORD)


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [B, vocab] from int32 words [B, bitmask_words(vocab)]: token t is allowed where bit
    t % 32 of word t // 32 is set (llguidance's layout). Shifts on the device, capturable."""
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, step: torch.Tensor, greedy_only: bool = False,
           allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token int64 [B], finite bool [B]) per row of logits [B, V] (fp32). Rows with
    temperature 0 take the argmax. greedy_only: the caller knows every row is greedy and skips
    the sort. finite: usable_rows of the model's logits (else the row's token means nothing).
    allowed: int32 bitmask words [B, bitmask_words(V)] (a grammar's next tokens; all bits set for a
    free row): the others are out of the argmax and the draw, as if their logits were -inf."""
    finite = usable_rows(logits)
    if allowed is not None:
        logits = logits.masked_fill(~unpack_bitmask(allowed, logits.shape[-1]), float("-inf"))
    best = logits.argmax(dim=-1)
    if greedy_only:
        return best, finite
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    # stable: equal logits keep id order, so a tie that top-k/top-p cuts keeps the lower id, as argmax does
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = (mass_before < top_p[:, None]) & ((top_k[:, None] == 0) | (rank < top_k[:, None]))
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform_noise(seed, step, vocab).gather(1, order)))
    choice = torch.where(keep, sorted_logits + gumbel, float("-inf")).argmax(dim=-1)
    sampled = order.gather(1, choice[:, None])[:, 0]
    return torch.where(temperature > 0, sampled, best), finite


def logprob_width(vocab: int) -> int:
    """How many alternatives a logprobs step computes: every row's request fits in it."""
    return min(MAX_LOGPROBS, vocab)


def pack_plain(tokens: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """int64 [2, B]: tokens, finite — what read_step reads when no row wants logprobs."""
    return torch.stack([tokens, finite.to(torch.int64)])


def pack_with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """float64 [B, 3 + 2n] (n = logprob_width): token, finite, the token's logprob, the n most
    likely ids, their logprobs. Ids fit float64 exactly; fp32 logprobs convert exactly."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    top_values, top_ids = logprobs.topk(logprob_width(logits.shape[-1]), dim=-1)
    columns = [tokens[:, None], finite[:, None], chosen, top_ids, top_values]
    return torch.cat([c.to(torch.float64) for c in columns], dim=1)


def read_step(packed: torch.Tensor, logprobs: list[int | None]) -> StepOutput:
    """The one host read of a step: packed from pack_plain or pack_with_logprobs, for len(logprobs)
    rows; row i gets TokenLogprobs with its logprobs[i] alternatives when that is not None."""
    if packed.dtype == torch.int64:
        tokens, finite = packed.tolist()
        return StepOutput(tokens, [bool(f) for f in finite], [None] * len(tokens))
    rows = packed.tolist()
    width = (packed.shape[1] - 3) // 2
    out = StepOutput([int(r[0]) for r in rows], [bool(r[1]) for r in rows], [])
    for r, n in zip(rows, logprobs):
        if n is None:
            out.logprobs.append(None)
            continue
        top = [(int(i), v) for i, v in zip(r[3:3 + n], r[3 + width:3 + width + n])]
        out.logprobs.append(TokenLogprobs(int(r[0]), r[2], top))
    return out


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                steps: list[int], allowed: list[np.ndarray | None] | None = None) -> StepOutput:
    """Host helper (prefill): one row of logits [B, V] per params; seeds are the sequences' noise
    seeds (int64), steps their noise counters (tokens generated so far); allowed, per row, None or
    its int32 bitmask words (see sample). One host read."""
    if logits.ndim != 2 or logits.shape[0] != len(params) or len(seeds) != len(params) or len(steps) != len(params):
        raise ValueError(f"sample_rows: logits {tuple(logits.shape)} need one row per params ({len(params)}), "
                         f"seeds ({len(seeds)}) and steps ({len(steps)})")
    for p in params:
        p.check_vocab(logits.shape[1])

    def column(values, dtype):
        return torch.tensor(values, dtype=dtype, device=logits.device)

    logits = logits.float()
    tokens, finite = sample(logits, column([p.temperature for p in params], torch.float32),
                            column([p.top_k for p in params], torch.int64),
                            column([p.top_p for p in params], torch.float32),
                            column([reduce_seed(s) for s in seeds], torch.int64), column(steps, torch.int64),
                            greedy_only=all(p.greedy for p in params),
                            allowed=stacked_bitmask(allowed, logits.shape[1], logits.device))
    wanted = [p.logprobs for p in params]
    if any(n is not None for n in wanted):
        return read_step(pack_with_logprobs(logits, tokens, finite), wanted)
    return read_step(pack_plain(tokens, finite), wanted)


def stacked_bitmask(rows: list[np.ndarray | None] | None, vocab: int, device) -> torch.Tensor | None:
    """int32 words [B, bitmask_words(vocab)] on `device` from per-row masks (None: every token
    allowed), or None when no row has one."""
    if rows is None or all(r is None for r in rows):
        return None
    words = np.full((len(rows), bitmask_words(vocab)), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        if row is not None:
            words[i] = row
    return torch.from_numpy(words).to(device)
