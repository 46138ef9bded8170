"""The checkpoint's tokenizer must lay images out as its model reads them: a mismatch is one clear
error when the engine starts, not wrong token counts request by request."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import VARIANTS, make_tiny
from pixtral_fast.tokenizer import Tokenizer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_ships_a_matching_tokenizer(tmp_path, variant):
    folder = make_tiny(tmp_path / variant, seed=0, variant=variant)
    engine = pf.Engine.from_pretrained(folder, device="cpu", dtype=torch.float32, backend="reference",
                                       progress=False, num_blocks=8)
    assert engine.tokenizer is not None


@pytest.mark.parametrize("field,value", [("image_break_token_id", 14), ("image_end_token_id", 15),
                                         ("patch_size", 14), ("spatial_merge_size", 2)])
def test_a_mismatch_names_the_field_and_both_values(field, value):
    fields = ("image_token_id", "image_break_token_id", "image_end_token_id", "patch_size", "spatial_merge_size")
    tiny = VARIANTS["pixtral-12b"].vision  # its ids and sizes are the default Tekken's
    vision = SimpleNamespace(**{f: getattr(tiny, f) for f in fields} | {field: value})
    ours = getattr(tiny, field)
    with pytest.raises(pf.CheckpointError, match=f"{field}: tokenizer {ours}, model {value}"):
        Tokenizer.default().check_matches(vision)
