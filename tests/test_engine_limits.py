"""The limits an engine is built with, checked before anything is allocated: the KV cache against
the memory left (exact at its bound) and the CPU cache's default size, max_batch_size against its
documented bound and against what the cache could run, num_blocks or memory_bytes, a vocabulary
smaller than the tokenizer's, and max_model_len past the model's context."""
from unittest.mock import patch

import pytest
import torch

import pixtral_fast as pf
import pixtral_fast.runtime.kv_cache as kv_cache_module
from pixtral_fast.cpu_memory import blocks_wanted
from pixtral_fast.runtime.config import MAX_BATCH_SIZE_LIMIT, EngineConfig
from tests.support.engines import model, new_engine, tiny_dir, tok  # noqa: F401  (fixtures)
from tests.support.token_prompts import prompt, run


# -- the KV cache's size --------------------------------------------------------------------------

@pytest.mark.parametrize("limits, named", [(dict(num_blocks=10**12), "num_blocks=1000000000000"),
                                           (dict(num_blocks=None, memory_bytes=10**18), "memory_bytes=1000000000000000000")])
def test_a_cache_larger_than_the_memory_left_is_refused_before_allocation(model, tok, limits, named):
    per_block = 2 * 2 * 16 * 2 * 64 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads of 64, fp32
    blocks = limits["num_blocks"] or limits["memory_bytes"] // per_block
    with pytest.raises(ValueError, match=rf"^{named}: the KV cache needs {blocks * per_block} bytes \({blocks} "
                                         rf"blocks of {per_block} bytes\) but \d+ bytes are available on the host"):
        new_engine(model, tok, **limits)


@pytest.mark.parametrize("spare, fits", [(-1, False), (0, True), (1, True)])
def test_the_memory_check_is_exact_at_its_bound(model, tok, spare, fits):
    need = 64 * 2 * 2 * 16 * 2 * 64 * 4
    with patch.object(kv_cache_module, "available_host_bytes", lambda: need + spare):
        if fits:
            assert new_engine(model, tok, num_blocks=64).cache.shape.num_blocks == 64
        else:
            with pytest.raises(ValueError, match=f"needs {need} bytes .* but {need - 1} bytes are available"):
                new_engine(model, tok, num_blocks=64)


def test_the_cpu_default_cache_is_sized_for_the_limits_not_a_fixed_budget(model, tok):
    """max_batch_size sequences of max_model_len tokens, plus the scratch block: not 512 MB."""
    eng = pf.Engine.from_model(model, tok, max_batch_size=2, max_model_len=64, progress=False)
    assert eng.cache.shape.num_blocks == blocks_wanted(16, 2, 64) == 9
    assert run(eng, prompt(60), prompt(60))[0].finish_reason == "length"  # each gets its whole context


# -- max_batch_size and the cache's size in blocks or bytes ------------------------------------------

def test_max_batch_size_has_a_documented_upper_bound():
    with pytest.raises(ValueError, match=f"max_batch_size must be at most {MAX_BATCH_SIZE_LIMIT}, got 10000000"):
        EngineConfig(max_batch_size=10**7)
    assert EngineConfig(max_batch_size=MAX_BATCH_SIZE_LIMIT).max_batch_size == MAX_BATCH_SIZE_LIMIT


def test_max_batch_size_beyond_what_the_cache_could_run_is_refused(model, tok):
    with pytest.raises(ValueError, match=r"max_batch_size=1000 is more sequences than the KV cache could ever run"):
        new_engine(model, tok, num_blocks=64, max_batch_size=1000)
    eng = new_engine(model, tok, num_blocks=64, max_batch_size=63)  # 63 usable blocks: 63 sequences can run
    assert eng.decode_runner is not None
    new_engine(model, tok, num_blocks=4)  # the default batch size always passes (small buffers)


def test_num_blocks_and_memory_bytes_together_are_refused():
    with pytest.raises(ValueError, match="num_blocks or memory_bytes, not both"):
        EngineConfig(num_blocks=64, memory_bytes=1 << 30)


# -- a vocabulary smaller than the tokenizer's is refused at load ----------------------------------

def test_a_vocabulary_smaller_than_its_tokenizer_is_refused_before_any_weight_loads(tmp_path, tok):
    import dataclasses

    from pixtral_fast.tiny import TINY_ARGS, make_tiny

    words = tok.tekken.n_words
    args = TINY_ARGS
    for vocab, refused in ((words - 1, True), (words, False)):
        args = dataclasses.replace(TINY_ARGS, text=dataclasses.replace(TINY_ARGS.text, vocab_size=vocab))
        folder = make_tiny(tmp_path / str(vocab), seed=0, args=args)
        if refused:
            with pytest.raises(pf.CheckpointError, match=rf"vocab_size {vocab}\) is smaller than its tokenizer's "
                                                         rf"\({words} tokens\)"):
                pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference")
            model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference")
            with pytest.raises(pf.CheckpointError, match="smaller than its tokenizer's"):
                pf.Engine.from_model(model, tok)
        else:
            pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference").close()


def test_a_max_model_len_past_the_models_context_is_refused_not_clamped(model):
    context = model.args.text.max_seq_len
    with pytest.raises(ValueError, match=rf"max_model_len={context + 1} is more than the model's context "
                                         rf"\({context} tokens"):
        pf.Engine.from_model(model, max_model_len=context + 1, num_blocks=8)
    engine = pf.Engine.from_model(model, max_model_len=context, num_blocks=8)
    assert engine.max_model_len == context
    engine.close()
