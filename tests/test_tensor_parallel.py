"""Tensor parallelism against one process (issue 12): the real multi-process engine (spawned
workers, gloo on the CPU, fp32 on the reference backend) gives the same logits and the same
greedy tokens as TP=1, from both checkpoint formats (the HF one sharded with an index), with KV
heads replicated when the ranks outnumber them and a vocabulary that does not divide evenly; and
each rank holds only its share of the decoder. (The same parity on 2 GPUs lives in
test_tensor_parallel_faults.py, whose tests each own their engines.)

Engines are module-scoped and parametrized, so pytest keeps one tensor-parallel engine (and its
workers) alive at a time; the greedy test reuses its case's engine."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.config import TextArgs
from pixtral_fast.parallel import ShardPlan
from pixtral_fast.tiny import TINY_LARGE_ARGS, make_tiny
from pixtral_fast.weights import hf_files
from tests.support.engines import assert_clean
from tests.support.tp import CPU_FP32, greedy_batch, request_with_images, tp_engine, write_sharded_hf

# Issue 12's bound for fp32 tensor-parallel logits: only the summation order of the split GEMMs
# and the all-reduces differs from one process (~1e-6 on O(1) logits). tests/tolerances.py has no
# bound this tight (its fp32 kernel bound is 2e-5), so it is named here.
TP_FP32_ATOL = 1e-5
SMALL_CACHE = 9  # 8 usable blocks of 16 tokens: less than the greedy batch below needs at once


@dataclass(frozen=True)
class Case:
    variant: str
    hf: bool   # the sharded HF folder, else the consolidated one
    size: int

    def __str__(self) -> str:
        return f"{self.variant}-{'hf-sharded' if self.hf else 'consolidated'}-tp{self.size}"


GREEDY_CASE = Case("pixtral-12b", hf=False, size=2)
CASES = [
    GREEDY_CASE,
    Case("pixtral-12b", hf=True, size=4),      # n_kv_heads 2 < 4 ranks: KV heads replicated, HF's permuted wk cut
    Case("pixtral-large", hf=False, size=3),   # n_kv_heads 1; vocab 32768 is not a multiple of 3
    Case("pixtral-large", hf=True, size=2),    # n_kv_heads 1, from the sharded HF folder
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(variant, hf) -> the tiny checkpoint folder, made once."""
    made = {}

    def get(variant: str, hf: bool):
        if (variant, hf) not in made:
            folder = make_tiny(tmp_path_factory.mktemp(variant), seed=0, variant=variant)
            made[variant, hf] = write_sharded_hf(folder, tmp_path_factory.mktemp(f"{variant}-hf")) if hf else folder
        return made[variant, hf]

    return get


def one_process(folder) -> pf.Engine:
    return pf.Engine.from_pretrained(folder, **(CPU_FP32 | {"num_blocks": SMALL_CACHE}))


@pytest.fixture(scope="module")
def reference(checkpoints):
    """reference(variant) -> a one-process engine on the consolidated folder, same cache."""
    made = {}

    def get(variant: str) -> pf.Engine:
        if variant not in made:
            made[variant] = one_process(checkpoints(variant, False))
        return made[variant]

    yield get
    for eng in made.values():
        eng.close()


@dataclass
class Running:
    case: Case
    engine: pf.Engine
    hf_logits: torch.Tensor | None  # a one-process engine's on the same HF folder


@pytest.fixture(scope="module", params=CASES, ids=str)
def parallel(request, checkpoints):
    """Module scope with params: pytest runs every test of one case, then closes its engine before
    starting the next (one process holds one tensor-parallel engine at a time)."""
    case = request.param
    folder = checkpoints(case.variant, case.hf)
    hf_logits = None
    if case.hf:  # the HF folder read in one process first (cheap; and a folder it cannot load fails here)
        with one_process(folder) as one:
            hf_logits = request_logits(one, one)
    with tp_engine(folder, case.size, num_blocks=SMALL_CACHE) as eng:
        yield Running(case, eng, hf_logits)


def request_logits(eng: pf.Engine, ref: pf.Engine) -> torch.Tensor:
    enc = ref.tokenizer.encode(request_with_images())
    assert len(enc.images) == 2 and ref.model.args.vision.image_token_id in enc.tokens
    logits = eng.prompt_logits(enc.tokens, enc.images)
    assert logits.dtype == torch.float32 and logits.shape == (len(enc.tokens), ref.model.args.text.vocab_size)
    return logits


# -- logits -------------------------------------------------------------------------------------------

def test_logits_equal_one_process(parallel, reference, checkpoints):
    case, eng = parallel.case, parallel.engine
    ref = reference(case.variant)
    text = ref.model.args.text
    assert len(eng.worker_pids) == case.size - 1 and eng.executor.size == case.size
    if case.size > text.n_kv_heads:
        assert eng.model.local_text.n_kv_heads == 1  # one whole (replicated) KV head per rank
    want = request_logits(ref, ref)
    if case.hf:  # really the sharded HF folder, not a consolidated one
        folder = checkpoints(case.variant, True)
        assert not (folder / "params.json").exists() and (folder / "model.safetensors.index.json").is_file()
        assert len(hf_files(folder)) == 2
        torch.testing.assert_close(parallel.hf_logits, want, atol=TP_FP32_ATOL, rtol=0)
    torch.testing.assert_close(request_logits(eng, ref), want, atol=TP_FP32_ATOL, rtol=0)


def test_vocab_padding_is_exercised():
    """pixtral-large's 32768-row vocabulary does not split 3 ways: each rank holds ceil(V/3) rows,
    the last one's tail zero padding (the logits test above gathers and cuts them)."""
    vocab, size = 32768, 3
    per = ShardPlan(size, 0).vocab_rows_per_rank(vocab)
    assert per * size > vocab and vocab % size
    starts_rows = [ShardPlan(size, r).vocab(vocab) for r in range(size)]
    assert [s for s, _ in starts_rows] == [0, per, 2 * per]
    assert sum(n for _, n in starts_rows) == vocab and starts_rows[-1][1] < per
    assert Case("pixtral-large", hf=False, size=3) in CASES and TINY_LARGE_ARGS.text.vocab_size == vocab
    assert TINY_LARGE_ARGS.text.n_heads % size == 0  # the split itself is possible


# -- each rank's share of the weights --------------------------------------------------------------

def expected_rank_bytes(t: TextArgs, size: int, element_size: int) -> dict[str, int]:
    """One rank's decoder and embedding/output bytes, from the config alone: wq/wo by query heads,
    wk/wv by KV heads (one whole KV head each when the ranks outnumber them), w1/w3/w2 by FFN
    width; the two norms of each layer whole; ceil(vocab / size) rows of the embedding and of the
    output."""
    q_heads = t.n_heads // size
    kv_heads = t.n_kv_heads // size if size <= t.n_kv_heads else 1
    per_layer = (t.dim * t.head_dim * (2 * q_heads + 2 * kv_heads)  # wq, wo, wk, wv
                 + 3 * t.dim * (t.hidden_dim // size)                # w1, w3, w2
                 + 2 * t.dim)                                        # attention_norm, ffn_norm
    vocab_rows = -(-t.vocab_size // size)
    return {"decoder_layers": t.n_layers * per_layer * element_size,
            "embedding_and_output": 2 * vocab_rows * t.dim * element_size}


def test_each_rank_holds_its_share_of_the_weights(parallel, reference):
    case, eng = parallel.case, parallel.engine
    t = reference(case.variant).model.args.text
    (whole,) = reference(case.variant).weight_bytes()
    ranks = eng.weight_bytes()
    assert len(ranks) == case.size
    assert {k: whole[k] for k in expected_rank_bytes(t, 1, 4)} == expected_rank_bytes(t, 1, 4)  # the formula itself
    expected = expected_rank_bytes(t, case.size, 4)
    for rank, got in enumerate(ranks):
        assert {k: got[k] for k in expected} == expected, f"rank {rank}"
        assert got["other"] == whole["other"] > 0, f"rank {rank}: the ViT, adapter and final norm are replicated"

    # the same, said as "1/TP of the total plus the replicated parts", from the measured whole
    norms = t.n_layers * 2 * t.dim * 4
    kv_whole = t.n_layers * 2 * t.n_kv_heads * t.head_dim * t.dim * 4
    if case.size <= t.n_kv_heads:
        split, replicated = whole["decoder_layers"] - norms, norms
    else:  # each rank holds one whole KV head: n_kv_heads' share of wk/wv, not 1/size
        split = whole["decoder_layers"] - norms - kv_whole
        replicated = norms + kv_whole // t.n_kv_heads
    assert split % case.size == 0
    assert ranks[0]["decoder_layers"] == split // case.size + replicated


# -- greedy generation through preemption -----------------------------------------------------------

@pytest.mark.parametrize("parallel", [GREEDY_CASE], indirect=True, ids=str)
def test_greedy_batch_through_preemption_equals_one_process(parallel, reference):
    tp2 = parallel.engine
    ref = reference(GREEDY_CASE.variant)
    requests, new = greedy_batch(), 30
    prompts = [len(ref.tokenizer.encode(r).tokens) for r in requests]
    capacity = (SMALL_CACHE - 1) * 16
    assert sum(prompts) < capacity < sum(prompts) + len(requests) * new  # the prompts fit together, the answers not

    before = tp2.stats.prefill_tokens
    got = tp2.generate(requests, max_new_tokens=new)
    # A preempted sequence re-prefills its prompt and what it generated (recompute).
    assert tp2.scheduler.preemptions > 0
    assert tp2.stats.prefill_tokens - before > sum(prompts)
    want = ref.generate(greedy_batch(), max_new_tokens=new)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert sum(len(c.tokens) for c in got) > capacity - sum(prompts)
    assert_clean(tp2)
