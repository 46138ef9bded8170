"""The encoder cache (runtime/encoder_cache.py): image embeddings by content hash, bounded in bytes,
least recently used evicted; a repeated image skips the ViT and the outputs (greedy tokens and
logprobs) equal those with the cache off, in fp32 on the CPU."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.runtime.encoder_cache import EncoderCache, image_key
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Tokenizer
from tests.support.engines import assert_clean
from tests.support.serve_server import picture
from tests.tolerances import MODEL_FP32_ATOL


def test_the_key_is_the_content_shape_and_dtype():
    a = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
    assert image_key(a) == image_key(a.clone()) and len(image_key(a)) == 32
    b = a.clone()
    b[2, 31, 47] += 1e-6
    assert image_key(b) != image_key(a)
    assert image_key(a.reshape(3, 48, 32)) != image_key(a)  # the same bytes in another shape
    assert image_key(a.double()) != image_key(a) and image_key(a.mT) != image_key(a)


def test_lru_within_the_byte_budget():
    cache = EncoderCache(max_bytes=3 * 400)
    rows = {k: torch.full((10, 10), float(i)) for i, k in enumerate([b"a", b"b", b"c", b"d"])}  # 400 bytes each
    for k in (b"a", b"b", b"c"):
        cache.put(k, rows[k])
    assert cache.get(b"a") is rows[b"a"]  # a is now the most recent: b goes first
    cache.put(b"d", rows[b"d"])
    assert list(cache.entries) == [b"c", b"a", b"d"] and cache.bytes == 1200 and cache.stats.evictions == 1
    cache.put(b"huge", torch.zeros(1000))  # larger than the whole budget: not kept, nothing evicted
    assert b"huge" not in cache.entries and cache.stats.evictions == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    model = pf.load_model(folder, device="cpu", dtype=torch.float32, backend="reference", progress=False)
    return model, Tokenizer.for_checkpoint(folder)


def chat(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def run(engine, requests):
    return engine.generate(requests, max_new_tokens=6, logprobs=3)


def assert_same_outputs(got, want):
    """Tokens and alternatives exactly; logprobs within fp32's model-level bound: a ViT pass over
    another batch of images rounds an image's embedding differently (~1e-6 in fp32: its GEMMs
    sum in another order), as the same image in two batches does without a cache."""
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for g, w in zip(got, want):
        assert [[t for t, _ in x.top] for x in g.logprobs] == [[t for t, _ in x.top] for x in w.logprobs]
        values = lambda c: torch.tensor([[x.logprob] + [v for _, v in x.top] for x in c.logprobs])  # noqa: E731
        torch.testing.assert_close(values(g), values(w), atol=MODEL_FP32_ATOL, rtol=0)


def test_cached_embeddings_give_the_outputs_of_no_cache(tiny):
    model, tok = tiny
    same_size = [picture(48, 32, 1), picture(48, 32, 2)]  # two different images of one size
    turns = [[chat("What is it?", same_size[0])],
             [chat("What is it?", same_size[0]), chat("And this?", same_size[1])],
             [chat("Both?", same_size[1], same_size[0])]]
    off = pf.Engine.from_model(model, tok, num_blocks=64, progress=False, encoder_cache_bytes=0)
    on = pf.Engine.from_model(model, tok, num_blocks=64, progress=False)
    encoded = []
    real = model.encode_images

    def counting(images):
        encoded.append(len(images))
        return real(images)

    model.encode_images = counting
    try:
        want = [run(off, t) for t in turns]
        encoded.clear()
        got = [run(on, t) for t in turns]
    finally:
        del model.encode_images
    for g, w in zip(got, want):
        assert_same_outputs(g, w)
    assert encoded == [1, 1], "the second image once, the first never again"
    stats = on.executor.runner.encoder_cache.stats
    assert (stats.hits, stats.misses) == (3, 2)
    assert off.executor.runner.encoder_cache is None
    assert_clean(on)


def test_an_image_repeated_in_one_prompt_is_encoded_once(tiny):
    model, tok = tiny
    engine = pf.Engine.from_model(model, tok, num_blocks=64, progress=False)
    image = picture(40, 40, 5)
    alone = pf.Engine.from_model(model, tok, num_blocks=64, progress=False, encoder_cache_bytes=0)
    assert_same_outputs(run(engine, [chat("Twice?", image, image)]), run(alone, [chat("Twice?", image, image)]))
    assert (engine.executor.runner.encoder_cache.stats.misses, engine.executor.runner.encoder_cache.stats.hits) == (1, 0)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1GiB"])
def test_the_budget_is_an_integer(bad):
    with pytest.raises(ValueError, match="encoder_cache_bytes must be an integer >= 0"):
        pf.Engine.from_model(None, None, encoder_cache_bytes=bad)
