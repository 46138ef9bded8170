"""The decode runner with OUR kernels (backend "fast": on the CPU under TRITON_INTERPRET=1, as
tests/conftest.py sets up), every output checked against an independent oracle: the reference
model's full recomputation in fp32 (log_softmax of its last-row logits), never the runner itself."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.model.text import AttentionMetadata
from pixtral_fast.runtime.decode_step import DEFAULT_BUCKETS, DecodeRow, DecodeRunner, graph_buckets
from pixtral_fast.runtime.kv_cache import SCRATCH_BLOCK, BlockManager, PagedKVCache, plan_cache
from pixtral_fast.tiny import make_tiny
from tests.conftest import DEVICE
from tests.tolerances import MODEL_FP32_ATOL, TOL

PROMPTS = [[1, 3] + [1000 + 7 * i + j for j in range(5 + 9 * i)] + [4] for i in range(3)]  # 8, 17, 26 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, oracle): the fast backend (fp32 on the CPU, bf16 on a GPU) and the reference in fp32."""
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    fast_dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    fast = pf.load_model(folder, device=DEVICE, dtype=fast_dtype, backend="fast", progress=False)
    ref = pf.load_model(folder, device=DEVICE, dtype=torch.float32, backend="reference", progress=False)
    return fast, ref


class DecodeBatch:
    """Sequences prefilled (packed, greedy first token) through the model's own API into a paged
    cache, then decoded by a DecodeRunner; history[s] holds each row's tokens that step s read."""

    def __init__(self, model, prompts, logprobs=None, temperature=0.0, top_k=0, top_p=1.0, max_batch=None,
                 max_blocks=4, graphs=False, num_blocks=None, block_size=16):
        self.model, self.block_size, n = model, block_size, len(prompts)
        num_blocks = num_blocks or 4 * n + 16  # room for every row's growth, and free blocks to poison
        self.cache = PagedKVCache(plan_cache(model.args.text, model.dtype, model.device, block_size, num_blocks),
                                  model.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = DecodeRunner(model, self.cache, max_batch or n, max_blocks, use_cuda_graphs=graphs)
        self.logprobs = logprobs if isinstance(logprobs, list) else [logprobs] * n
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.tokens, self.history = [list(p) for p in prompts], []
        for i, p in enumerate(prompts):
            self.blocks.allocate(i, len(p))
        device = model.device
        flat = torch.tensor([t for p in prompts for t in p], device=device)
        slots = torch.tensor([x for i in range(n) for x in self.blocks.slots(i)], device=device)
        meta = AttentionMetadata.for_sequences([len(p) for p in prompts], device, slot_mapping=slots)
        with torch.inference_mode():
            h = model.run_decoder(model.tok_embeddings(flat), meta, self.cache.layers)
            last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
            for seq, t in zip(self.tokens, model.logits(h[last.to(device)]).argmax(-1).tolist()):
                seq.append(t)
        self.prompt_lens = [len(p) for p in prompts]

    def rows(self) -> list[DecodeRow]:
        return [DecodeRow(token=seq[-1], position=len(seq) - 1, slot=self.blocks.append(i),
                          blocks=self.blocks.tables[i], seed=100 + i, step=len(seq) - self.prompt_lens[i],
                          logprobs=self.logprobs[i], **self.sampling)
                for i, seq in enumerate(self.tokens)]

    def decode(self, steps: int):
        outs = []
        for _ in range(steps):
            self.history.append([list(seq) for seq in self.tokens])
            out = self.runner.step(self.rows())
            for seq, t in zip(self.tokens, out.tokens):
                seq.append(t)
            outs.append(out)
        return outs

    def poison_unowned(self, value: float) -> int:
        """Fills every block no sequence holds (the free ones, which sequences grow into, and the
        scratch block) with value; returns one of them, kept out of the free list as junk."""
        junk = self.blocks.free_blocks.pop()
        for k, v in self.cache.layers:
            for b in [SCRATCH_BLOCK, junk, *self.blocks.free_blocks]:
                k[b] = value
                v[b] = value
        return junk


def assert_matches_oracle(ref, batch: DecodeBatch, outs, rows=None, greedy=True):
    """Each checked row's token and logprobs against log_softmax of the reference's full fp32
    recompute, within the model's dtype tolerance (MODEL_FP32_ATOL; TOL[bf16] for a bf16 model),
    tie-robust: a token or an id's rank is compared only where the oracle's gap exceeds it."""
    atol, rtol = (MODEL_FP32_ATOL, 0.0) if batch.model.dtype == torch.float32 else TOL[batch.model.dtype]
    for step, out in enumerate(outs):
        for i in rows if rows is not None else range(len(out.tokens)):
            oracle = ref(torch.tensor(batch.history[step][i]))[-1].double().log_softmax(-1).cpu()
            token, got, where = out.tokens[i], out.logprobs[i], f"step {step} row {i}"
            if greedy:
                top2 = oracle.topk(2).values
                tol = atol + rtol * top2.abs().max().item()  # each side's error bound
                assert oracle[token] >= top2[0] - 2 * tol, where
                if top2[0] - top2[1] > 2 * tol:
                    assert token == oracle.argmax().item(), where
            elif batch.sampling["top_k"]:  # the sampled token lies in the oracle's top-k (ties aside)
                tol = atol + rtol * oracle[token].abs().item()
                assert (oracle > oracle[token] + 2 * tol).sum() < batch.sampling["top_k"], where
            if batch.logprobs[i] is None:
                assert got is None, where
                continue
            assert got.token == token, where
            torch.testing.assert_close(got.logprob, oracle[token].item(), atol=atol, rtol=rtol, msg=where)
            ids, values = [t for t, _ in got.top], torch.tensor([v for _, v in got.top], dtype=torch.float64)
            assert len(ids) == batch.logprobs[i] == len(set(ids)), where
            torch.testing.assert_close(values, oracle[ids], atol=atol, rtol=rtol, msg=where)
            torch.testing.assert_close(values, oracle.topk(len(ids)).values, atol=atol, rtol=rtol, msg=where)


def test_buckets_cover_every_batch_up_to_512():
    assert DEFAULT_BUCKETS[:4] == (1, 2, 4, 8) and DEFAULT_BUCKETS[-1] == 512
    assert all(b % 8 == 0 for b in DEFAULT_BUCKETS[3:]) and len(DEFAULT_BUCKETS) == 3 + 64


def test_a_batch_replays_the_smallest_bucket_that_holds_it(models):
    fast, _ = models
    shape = plan_cache(fast.args.text, fast.dtype, DEVICE, num_blocks=4)
    runner = DecodeRunner(fast, PagedKVCache(shape, DEVICE), 300, 4, use_cuda_graphs=False)
    assert runner.buckets == tuple(b for b in DEFAULT_BUCKETS if b < 300) + (300,)  # none above max_batch
    for n in range(1, 301):
        bucket = runner.bucket_for(n)
        assert bucket >= n and all(b < n for b in runner.buckets if b < bucket)
    assert graph_buckets((1, 2, 4, 8, 16, 32), 20) == (1, 2, 4, 8, 16, 20)  # capped at max_batch
    assert graph_buckets((32, 4, 4, 0), 64) == (4, 32)  # a ladder that stops short: eager past it
    wide = DecodeRunner(fast, PagedKVCache(shape, DEVICE), 600, 4, use_cuda_graphs=False)
    assert wide.buckets == DEFAULT_BUCKETS and wide.bucket_for(513) is None  # past 512: eager, unpadded


def test_padding_rows_do_not_disturb_real_rows(models):
    """3 rows padded to the bucket of 4 with the scratch block poisoned (NaN): every real row
    matches the oracle at every step, and decodes as it does alone (bucket 1, no padding)."""
    fast, ref = models
    batch = DecodeBatch(fast, PROMPTS, logprobs=5, max_batch=8)
    assert batch.runner.bucket_for(3) == 4
    batch.poison_unowned(float("nan"))
    batched = batch.decode(3)
    assert all(all(out.finite) for out in batched)
    # the padding row writes and reads the scratch block only (a duplicate slot would race with a
    # real row's write, and which write wins is the device's choice: values alone cannot see it)
    buffers = batch.runner.buffers
    assert buffers.slots[3].item() == SCRATCH_BLOCK * batch.block_size and buffers.seq_lens[3].item() == 1
    assert (buffers.block_table[3] == SCRATCH_BLOCK).all()
    assert_matches_oracle(ref, batch, batched)
    for i in range(3):
        alone = DecodeBatch(fast, [PROMPTS[i]], logprobs=5)
        outs = alone.decode(3)
        assert_matches_oracle(ref, alone, outs)
        if DEVICE == "cpu":  # the same splits at any batch size here; a GPU picks them by batch (bf16 ties)
            assert [out.tokens[0] for out in outs] == [out.tokens[i] for out in batched]


def test_stale_block_table_entries_are_never_read(models):
    """A step's block table keeps stale ids past each row's blocks (a longer sequence's, or any
    junk): they point at a block full of NaN here, and the result still matches the oracle."""
    fast, ref = models
    batch = DecodeBatch(fast, PROMPTS[:2], logprobs=3, max_blocks=8)
    junk = batch.poison_unowned(float("nan"))
    batch.runner.buffers.block_table.fill_(junk)
    outs = batch.decode(2)
    assert batch.runner.buffers.block_table[0, -1].item() == junk  # the junk really was in the table
    assert_matches_oracle(ref, batch, outs)


def test_batches_past_32_rows(models):
    """33 rows replay the bucket of 40 (eager on the CPU): the runner's padding and outputs hold
    past the old 32-row ladder. The runner's logic is under test here, so the CPU runs it on the
    reference backend (40 rows of interpreted kernels would take minutes); the GPU on ours."""
    fast, ref = models
    prompts = [[1, 3, 1000 + i, 1100 + 3 * i, 4] for i in range(33)]
    batch = DecodeBatch(fast if DEVICE == "cuda" else ref, prompts, logprobs=2, max_batch=64)
    assert batch.runner.bucket_for(33) == 40
    outs = batch.decode(2)
    assert_matches_oracle(ref, batch, outs, rows=[0, 16, 32])


def test_logprobs_only_where_asked(models):
    fast, ref = models
    batch = DecodeBatch(fast, PROMPTS, logprobs=[None, 4, 0])
    outs = batch.decode(2)
    for out in outs:
        assert out.logprobs[0] is None and len(out.logprobs[1].top) == 4 and out.logprobs[2].top == []
    assert_matches_oracle(ref, batch, outs, rows=[1, 2])
    plain = DecodeBatch(fast, PROMPTS).decode(2)
    assert [o.tokens for o in plain] == [o.tokens for o in outs] and plain[0].logprobs == [None] * 3


def test_sampled_rows_report_the_logprob_of_the_sampled_token(models):
    fast, ref = models
    batch = DecodeBatch(fast, PROMPTS, logprobs=2, temperature=1.5, top_k=40, top_p=0.95)
    outs = batch.decode(2)
    assert_matches_oracle(ref, batch, outs, greedy=False)


def test_rows_must_fit_their_blocks(models):
    fast, _ = models
    batch = DecodeBatch(fast, PROMPTS[:1])
    row = batch.rows()[0]
    bad = DecodeRow(**{**row.__dict__, "position": len(row.blocks) * batch.block_size})
    with pytest.raises(ValueError, match="lies past its"):
        batch.runner.step([bad])


def test_cpu_refuses_cuda_graphs(models):
    if DEVICE == "cuda":
        pytest.skip("CPU-only check")
    fast, _ = models
    shape = plan_cache(fast.args.text, fast.dtype, "cpu", num_blocks=4)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        DecodeRunner(fast, PagedKVCache(shape, "cpu"), 4, 4, use_cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])  # greedy graphs, and those with the sort + noise
@pytest.mark.parametrize("n", [1, 3, 13, 32, 33, 200])
def test_graph_replay_matches_eager_and_the_oracle(models, n, temperature):
    fast, ref = models
    prompts = [PROMPTS[i % 3][: 6 + i % 20] for i in range(n)]
    kw = dict(temperature=temperature, top_k=40, top_p=0.9, logprobs=3, max_batch=max(n, 32))
    eager, graphed = DecodeBatch(fast, prompts, graphs=False, **kw), DecodeBatch(fast, prompts, graphs=True, **kw)
    eager_out, graph_out = eager.decode(6), graphed.decode(6)
    assert (graphed.runner.bucket_for(n), temperature == 0, True, False) in graphed.runner.graphs
    assert [o.tokens for o in graph_out] == [o.tokens for o in eager_out]
    assert_matches_oracle(ref, graphed, graph_out, rows=sorted({0, n // 2, n - 1}), greedy=temperature == 0)
    for (kg, vg), (ke, ve) in zip(graphed.cache.layers, eager.cache.layers):
        assert torch.equal(kg[SCRATCH_BLOCK + 1:], ke[SCRATCH_BLOCK + 1:])
        assert torch.equal(vg[SCRATCH_BLOCK + 1:], ve[SCRATCH_BLOCK + 1:])


@pytest.mark.gpu
def test_greedy_steps_without_logprobs_replay_the_plain_graph(models):
    fast, _ = models
    batch = DecodeBatch(fast, PROMPTS, graphs=True)
    batch.runner.capture(progress=False)
    batch.decode(2)
    assert set(batch.runner.graphs) == {(b, True, False, False) for b in batch.runner.buckets}
