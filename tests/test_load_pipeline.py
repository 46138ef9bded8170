"""The dense loading pipeline: tensors read as views of the memory-mapped file (what
safetensors.torch.load_file reads, at its speed: bench/bench_load_throughput.py), a rank's share
and nothing more, an HF output head tied to its embedding, and every tensor contiguous whatever
path it took (consolidated, HF with its q/k row permutation, a rank's column cut)."""
import json
from itertools import chain

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.config import ConfigError
from pixtral_fast.config_hf import ties_word_embeddings
from pixtral_fast.hf_export import convert_consolidated_to_hf
from pixtral_fast.model import load as model_load
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.parallel.plan import ShardPlan
from pixtral_fast.quant.config import QuantConfig
from pixtral_fast.quantize_checkpoint import quantize_checkpoint
from pixtral_fast.tiny import TINY_ARGS, make_tiny
from pixtral_fast.weights import CONSOLIDATED, CheckpointError, convert_hf_to_consolidated, load_state_dict

TOKENS = torch.tensor([1, 5, 900, 77, 4000, 200, 131071])  # no image tokens (10-13)
LM_HEAD = "language_model.lm_head.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny model as a consolidated folder and as the HF folder export-hf writes from it."""
    root = tmp_path_factory.mktemp("load_pipeline")
    consolidated = make_tiny(root / "consolidated", seed=3)
    return consolidated, convert_consolidated_to_hf(consolidated, root / "hf", processor=False)


def copy_hf(src, dst, drop=(), **config):
    """An HF folder `src` without the tensors `drop`, with `config` set at the top of config.json."""
    dst.mkdir()
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text()) | config))
    return dst


@pytest.fixture(scope="module")
def tied(folders, tmp_path_factory):
    """(an HF folder as transformers saves a tied model: tie_word_embeddings true, no lm_head;
    the same model untied: a consolidated folder whose output.weight is a copy of the embedding)."""
    root = tmp_path_factory.mktemp("tied")
    hf = copy_hf(folders[1], root / "hf", drop=[LM_HEAD], tie_word_embeddings=True)
    untied = root / "untied"
    untied.mkdir()
    state = load_file(str(folders[0] / CONSOLIDATED))
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    save_file(state, str(untied / CONSOLIDATED), metadata={"format": "pt"})
    (untied / "params.json").write_text((folders[0] / "params.json").read_text())
    return hf, untied


def load(folder, dtype=torch.float32):
    return pf.load_model(folder, device="cpu", dtype=dtype, backend="reference", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_loader_reads_what_load_file_reads(folders, dtype):
    state = load_state_dict(folders[0], TINY_ARGS, "cpu", dtype, progress=False)
    expected = load_file(str(folders[0] / CONSOLIDATED))
    assert state.keys() == expected.keys()
    wrong = [k for k in expected if not torch.equal(state[k], expected[k].to(dtype))]
    assert not wrong, wrong


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
def test_a_rank_holds_its_share_and_no_more(folders, fmt):
    """A split tensor's storage is the rank's share: rows are mapped as their own byte range, and a
    column cut is copied out; neither keeps the whole tensor behind a view."""
    folder = folders[0] if fmt == "consolidated" else folders[1]
    plan = ShardPlan(2, 1)
    state = load_state_dict(folder, TINY_ARGS, "cpu", torch.bfloat16, progress=False, shard=plan)
    split = [k for k in state if plan.slice_for(k, TINY_ARGS.text) is not None]
    assert len(split) == 2 + 7 * TINY_ARGS.text.n_layers  # embedding, output, wq/wk/wv/wo, w1/w2/w3
    whole = [k for k in split if state[k].untyped_storage().nbytes() != state[k].numel() * state[k].element_size()]
    assert not whole, whole


@pytest.mark.parametrize("source", ["consolidated", "hf", "hf-tied"])
def test_every_parameter_and_buffer_loads_contiguous(folders, tied, source):
    folder = {"consolidated": folders[0], "hf": folders[1], "hf-tied": tied[0]}[source]
    model = load(folder, torch.bfloat16)
    strided = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if not t.is_contiguous()]
    assert not strided, strided


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
def test_every_tensor_of_a_rank_loads_contiguous(folders, fmt):
    """The column cuts of wo and w2 are strided views of the file until copied out."""
    folder = folders[0] if fmt == "consolidated" else folders[1]
    for rank in range(2):
        state = load_state_dict(folder, TINY_ARGS, "cpu", torch.bfloat16, progress=False, shard=ShardPlan(2, rank))
        strided = [k for k, t in state.items() if not t.is_contiguous()]
        assert not strided, (rank, strided)


def test_a_tied_hf_folder_loads_with_the_embedding_as_its_output(tied):
    hf, untied = tied
    model = load(hf)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # one tensor, held once
    torch.testing.assert_close(model(TOKENS), load(untied)(TOKENS), atol=0, rtol=0)


def test_a_rank_of_a_tied_model_shares_its_embedding_rows(tied):
    hf, _ = tied
    for rank in range(2):
        state = load_state_dict(hf, TINY_ARGS, "cpu", torch.float32, progress=False, shard=ShardPlan(2, rank))
        assert state["output.weight"] is state["tok_embeddings.weight"]


def test_an_untied_hf_folder_without_lm_head_is_still_refused(folders, tmp_path):
    folder = copy_hf(folders[1], tmp_path / "hf", drop=[LM_HEAD], tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"missing \(1\): output\.weight"):
        load(folder)


def test_a_tied_config_with_its_lm_head_reads_the_lm_head(folders, tmp_path):
    """As transformers does when both are in the file: the stored head wins (it leaves them untied
    when they differ)."""
    folder = copy_hf(folders[1], tmp_path / "hf", tie_word_embeddings=True)
    model = load(folder)
    assert not torch.equal(model.output.weight, model.tok_embeddings.weight)
    torch.testing.assert_close(model(TOKENS), load(folders[0])(TOKENS), atol=0, rtol=0)


@pytest.mark.parametrize("config, tied_output", [
    ({"model_type": "llava"}, False),
    ({"model_type": "llava", "tie_word_embeddings": True}, True),
    ({"model_type": "llava", "text_config": {"tie_word_embeddings": True}}, True),  # LlavaConfig forwards it
    ({"model_type": "mistral3"}, True),  # Mistral3Config's default
    ({"model_type": "mistral3", "tie_word_embeddings": False}, False),
    ({"model_type": "mistral3", "tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}, False),
])
def test_the_tie_follows_transformers(config, tied_output):
    assert ties_word_embeddings(config) is tied_output


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_a_tie_flag_that_is_not_a_bool_is_refused(folders, tmp_path, where):
    config = json.loads((folders[1] / "config.json").read_text())
    (config if where == "top" else config["text_config"])["tie_word_embeddings"] = "yes"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"tie_word_embeddings must be true or false, got 'yes'"):
        pf.ModelArgs.from_hf_config(tmp_path)


def test_convert_and_export_keep_the_tie(folders, tied, tmp_path):
    """HF (tied) -> consolidated: params.json has no tie flag, so the output is written as an equal
    copy; consolidated -> HF: an output equal to the embedding is exported tied, as transformers
    saves a tied model (no lm_head, tie_word_embeddings true). An untied model stays untied."""
    from transformers import AutoModelForImageTextToText

    hf, _ = tied
    consolidated = convert_hf_to_consolidated(hf, tmp_path / "consolidated")
    state = load_file(str(consolidated / CONSOLIDATED))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    back = convert_consolidated_to_hf(consolidated, tmp_path / "hf", dtype=torch.float32, processor=False)
    assert LM_HEAD not in load_file(str(back / "model.safetensors"))
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is config["text_config"]["tie_word_embeddings"] is True

    peer = AutoModelForImageTextToText.from_pretrained(back, dtype=torch.float32).eval()
    assert peer.lm_head.weight.data_ptr() == peer.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        theirs = peer(input_ids=TOKENS[None]).logits[0].float()
    ours = load(back)(TOKENS)
    torch.testing.assert_close(ours, load(hf)(TOKENS), atol=0, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    assert LM_HEAD in load_file(str(folders[1] / "model.safetensors"))
    assert json.loads((folders[1] / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("fmt", ["consolidated", "fp8"])
def test_a_rank_load_runs_each_check_once(folders, tmp_path, monkeypatch, fmt):
    """pf.load_model reads the config, looks for a quantization_config and checks the split once,
    for dense and packed checkpoints alike (the packed path used to redo all three)."""
    folder = folders[0] if fmt == "consolidated" else quantize_checkpoint(folders[0], tmp_path / "q", fmt,
                                                                          progress=False)
    calls = []

    def counted(name, fn):
        return lambda *a, **k: calls.append(name) or fn(*a, **k)

    monkeypatch.setattr(model_load, "read_args", counted("read_args", model_load.read_args))
    monkeypatch.setattr(QuantConfig, "from_folder", staticmethod(counted("quantization_config",
                                                                         QuantConfig.from_folder)))
    monkeypatch.setattr(ShardPlan, "check", counted("split", ShardPlan.check))
    pf.load_model(folder, device="cpu", dtype=torch.float32, progress=False, comm=Collectives(ShardPlan(2, 0)))
    expected = ["read_args", "split"] + ([] if fmt == "consolidated" else ["quantization_config"])
    assert sorted(calls) == sorted(expected)


@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_a_tied_model_quantized_loads_with_the_embedding_as_its_output(tied, tmp_path, scheme):
    """`quantize` keeps lm_head dense and copies config.json, so a tied HF folder quantizes to a
    tied one (no lm_head): the packed loader ties it as the dense loader does, at TP=1 and on a
    rank, and it computes what the same model quantized from its untied twin computes."""
    hf, untied = tied
    folder = quantize_checkpoint(hf, tmp_path / "tied", scheme, group_size=32, progress=False)
    model = load(folder)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    twin = quantize_checkpoint(untied, tmp_path / "untied", scheme, group_size=32, progress=False)
    torch.testing.assert_close(model(TOKENS), load(twin)(TOKENS), atol=0, rtol=0)
    rank = pf.load_model(folder, device="cpu", dtype=torch.float32, progress=False, comm=Collectives(ShardPlan(2, 1)))
    assert rank.output.weight.data_ptr() == rank.tok_embeddings.weight.data_ptr()
