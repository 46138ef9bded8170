"""[IMG_BREAK]/[IMG_END] ids of an HF folder, which HF's config.json does not carry: from the folder's
tokenizer.json when it names them, else from the vocabulary (Pixtral-Large's 32768-token
SentencePiece holds them at 14/15, Tekken at 12/13)."""
from __future__ import annotations

import json

import pytest

from pixtral_fast.config import ModelArgs
from pixtral_fast.tiny import TINY_ARGS, TINY_LARGE_ARGS, write_hf_config


@pytest.mark.parametrize("args, expected", [(TINY_ARGS, (12, 13)), (TINY_LARGE_ARGS, (14, 15))])
def test_markers_follow_the_vocabulary(tmp_path, args, expected):
    write_hf_config(tmp_path, args)
    vision = ModelArgs.from_hf_config(tmp_path).vision
    assert (vision.image_break_token_id, vision.image_end_token_id) == expected
    assert ModelArgs.from_hf_config(tmp_path).vision == args.vision


def test_markers_come_from_tokenizer_json_when_it_names_them(tmp_path):
    write_hf_config(tmp_path, TINY_ARGS)
    added = [{"id": 3, "content": "[INST]"}, {"id": 20, "content": "[IMG_BREAK]"}, {"id": 21, "content": "[IMG_END]"}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    vision = ModelArgs.from_hf_config(tmp_path).vision
    assert (vision.image_break_token_id, vision.image_end_token_id) == (20, 21)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"added_tokens": [{"id": 20,
                                                                                       "content": "[IMG_BREAK]"}]})])
def test_a_tokenizer_json_without_both_markers_is_not_trusted(tmp_path, content):
    write_hf_config(tmp_path, TINY_LARGE_ARGS)
    (tmp_path / "tokenizer.json").write_text(content)
    vision = ModelArgs.from_hf_config(tmp_path).vision
    assert (vision.image_break_token_id, vision.image_end_token_id) == (14, 15)
