"""The decode path against an implementation nobody here wrote: HF transformers' `generate`
(greedy, with its own KV cache) on a tiny Llava + Pixtral checkpoint, against our engine (paged KV
cache, prefill then decode steps) loaded from the same HF folder. fp32 (on the CPU here; on the GPU
where there is one, CUDA graphs included), 20 new tokens,
prompts with one and with two images, on the reference backend, and with one image on our kernels
(under the interpreter on the CPU). Token for token: any fault in the decode path (positions, RoPE at an
offset, the cache layout, image features at the wrong rows) changes the continuation."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tokenizer import Encoded
from tests.conftest import DEVICE
from tests.support.hf_peer import hf_inputs, image_tokens, save_tiny_hf, tiny_hf_model

BOS, EOS, INST, END_INST = 1, 2, 3, 4
NEW_TOKENS = 20


def image(rows, cols, seed):
    return torch.randn(3, 16 * rows, 16 * cols, generator=torch.Generator().manual_seed(seed))


CASES = {
    "one_image": ([(3, 5)], [image(3, 5, 11)], (300, 301, 302)),
    "two_images": ([(2, 6), (5, 3)], [image(2, 6, 12), image(5, 3, 13)], (410, 77, 9, 250)),
}


def prompt_tokens(grids, text) -> list[int]:
    tokens = [BOS, INST]
    for rows, cols in grids:
        tokens += image_tokens(rows, cols)
    return tokens + list(text) + [END_INST]


@pytest.fixture(scope="module")
def hf_and_folder(tmp_path_factory):
    folder = save_tiny_hf(tmp_path_factory.mktemp("hf_generate"), seed=3)
    return tiny_hf_model(seed=3).to(DEVICE), folder


@pytest.fixture(scope="module")
def engines(hf_and_folder):
    _, folder = hf_and_folder
    return {backend: pf.Engine.from_model(pf.load_model(folder, device=DEVICE, dtype=torch.float32, backend=backend,
                                                        progress=False), num_blocks=64, progress=False)
            for backend in ("reference", "fast")}


@torch.no_grad()
def hf_greedy(model, tokens: list[int], images, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([tokens], device=DEVICE)
    image_args = {k: v.to(DEVICE) for k, v in hf_inputs(images).items()}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **image_args,
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                         eos_token_id=EOS, pad_token_id=0)
    return out[0, len(tokens):].tolist()


@pytest.mark.parametrize(("case", "backend"), [("one_image", "reference"), ("two_images", "reference"),
                                               ("one_image", "fast")])  # the interpreter is slow: one case
def test_engine_greedy_equals_hf_generate(hf_and_folder, engines, case, backend):
    hf, _ = hf_and_folder
    grids, images, text = CASES[case]
    tokens = prompt_tokens(grids, text)
    expected = hf_greedy(hf, tokens, images, NEW_TOKENS)
    # The comparison means something only if the continuation is long and varied.
    assert len(expected) == NEW_TOKENS and len(set(expected)) > 4, expected
    got = engines[backend].generate(Encoded(tokens=tokens, images=images), max_new_tokens=NEW_TOKENS)
    assert got.tokens == expected


def test_hf_generate_used_its_cache(hf_and_folder):
    """The oracle decodes incrementally from its KV cache (the prompt's keys are all in it), so the
    comparison above is cache against cache, not against a full recompute."""
    hf, _ = hf_and_folder
    grids, images, text = CASES["one_image"]
    tokens = prompt_tokens(grids, text)
    ids = torch.tensor([tokens], device=DEVICE)
    with torch.no_grad():
        cached = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **{k: v.to(DEVICE) for k, v in hf_inputs(images).items()},
                             max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=EOS, pad_token_id=0,
                             return_dict_in_generate=True)
    assert cached.past_key_values is not None and cached.past_key_values.get_seq_length() >= len(tokens)
