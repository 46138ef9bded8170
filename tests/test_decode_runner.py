"""The decode runner: static buffers, bucket padding onto the scratch block, CUDA graphs on a GPU."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.graphs import DecodeRow, DecodeRunner
from pixtral_fast.runtime.kv_cache import PagedKVCache, plan_cache
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.conftest import DEVICE


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return pf.load_model(folder, device=DEVICE, dtype=dtype, backend="auto" if DEVICE == "cuda" else "reference",
                         progress=False)


def prefilled_engine(model, n_seqs, use_cuda_graphs, temperature=0.0):
    """An engine whose n_seqs sequences are prefilled, with a different prompt length each."""
    eng = pf.Engine.from_model(model, num_blocks=256, progress=False, use_cuda_graphs=use_cuda_graphs,
                               capture_on_start=False)
    params = [pf.SamplingParams(max_new_tokens=64, temperature=temperature, top_p=0.9, top_k=40, seed=i,
                                stop_token_ids=(2,)) for i in range(n_seqs)]
    seqs = [eng.add_request(Encoded(tokens=[1, 3] + [1000 + 7 * i + j for j in range(5 + 9 * i)] + [4], images=[]),
                            params[i]) for i in range(n_seqs)]
    for s in seqs:
        eng.blocks.allocate(s.id, len(s.tokens))
        eng.scheduler.waiting.remove(s)
        eng.scheduler.running.append(s)
        s.generated.append(eng._prefill([s])[0])
    return eng, seqs


def decode(eng, seqs, steps):
    out = []
    for _ in range(steps):
        rows = [eng._decode_row(s) for s in seqs]
        tokens = eng.runner.step(rows)
        for s, t in zip(seqs, tokens):
            s.generated.append(t)
        out.append(tokens)
    return out


def test_padding_rows_do_not_disturb_real_rows(model):
    eng3, seqs3 = prefilled_engine(model, 3, use_cuda_graphs=False)  # 3 rows padded to the bucket of 4
    batched = decode(eng3, seqs3, 6)
    for i in range(3):
        eng, seqs = prefilled_engine(model, 3, use_cuda_graphs=False)
        alone = decode(eng, [seqs[i]], 6)
        assert [step[0] for step in alone] == [step[i] for step in batched]


def test_rows_must_fit_their_blocks(model):
    eng, seqs = prefilled_engine(model, 1, use_cuda_graphs=False)
    row = eng._decode_row(seqs[0])
    bad = DecodeRow(**{**row.__dict__, "position": len(row.blocks) * 16})
    with pytest.raises(ValueError, match="lies past its"):
        eng.runner.step([bad])


def test_cpu_refuses_cuda_graphs(model):
    if DEVICE == "cuda":
        pytest.skip("CPU-only check")
    shape = plan_cache(model.args.text, model.dtype, "cpu", num_blocks=4)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        DecodeRunner(model, PagedKVCache(shape, "cpu"), 4, 4, use_cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])  # greedy graphs, and those with the sort + noise
@pytest.mark.parametrize("n", [1, 3, 13, 32])
def test_graph_replay_equals_eager_for_every_bucket(model, n, temperature):
    eager_eng, eager_seqs = prefilled_engine(model, n, use_cuda_graphs=False, temperature=temperature)
    graph_eng, graph_seqs = prefilled_engine(model, n, use_cuda_graphs=True, temperature=temperature)
    graph_eng.runner.capture(progress=False)
    assert decode(graph_eng, graph_seqs, 8) == decode(eager_eng, eager_seqs, 8)
    for (kg, vg), (ke, ve) in zip(graph_eng.cache.layers, eager_eng.cache.layers):
        assert torch.equal(kg[1:], ke[1:]) and torch.equal(vg[1:], ve[1:])  # block 0 is scratch
