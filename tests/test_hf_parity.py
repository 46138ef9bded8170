"""Parity with HF transformers (LlavaForConditionalGeneration + PixtralVisionModel + Mistral), an
implementation nobody here wrote: fp32 logits within 1e-4, loaded from the HF folder and from the
same weights converted to Mistral's consolidated format."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.weights import convert_hf_to_consolidated
from tests.support.hf_peer import IMAGE_CASES as CASES
from tests.support.hf_peer import hf_logits, prompt, save_tiny_hf, tiny_hf_model
from tests.tolerances import MODEL_FP32_ATOL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf_dir = save_tiny_hf(tmp_path_factory.mktemp("hf"), seed=0)
    cons_dir = convert_hf_to_consolidated(hf_dir, tmp_path_factory.mktemp("consolidated"), dtype=torch.float32)
    hf = tiny_hf_model(seed=0)
    ours = {
        "hf_folder": pf.load_model(hf_dir, device="cpu", dtype=torch.float32, backend="reference", progress=False),
        "consolidated": pf.load_model(cons_dir, device="cpu", dtype=torch.float32, backend="reference",
                                      progress=False),
    }
    return hf, ours


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", ["hf_folder", "consolidated"])
def test_logits_match_hf(models, case, source):
    hf, ours = models
    grids, images = CASES[case]
    tokens = prompt(*grids)
    expected = hf_logits(hf, tokens, images)
    actual = ours[source](tokens, images)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert expected.std() > 0.5, "logits too small for the comparison to mean anything"
    err = (actual - expected).abs().max().item()
    assert err <= MODEL_FP32_ATOL, f"max abs error {err:.2e} vs HF"
