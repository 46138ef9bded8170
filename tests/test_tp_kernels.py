"""Tensor parallelism with the kernels running (issue 17, item 6). A rank's column cut of wo and w2,
read from a checkpoint already in the engine's dtype, came back from the loader as a strided view
of the whole tensor's rows (no dtype conversion made a copy), and the kernels' contiguity checks
stopped rank 1 at the first prefill ("w_down must be contiguous"). The reference backend never
noticed. So: every tensor of every rank's shard is contiguous, from both checkpoint formats (the HF
one sharded with an index) in bf16 and fp32, and a 2-way engine on the Triton kernels (the
interpreter on the CPU) gives the same greedy tokens and logits as one process on the same kernels."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pixtral_fast as pf
from pixtral_fast.config import ModelArgs
from pixtral_fast.hf_export import convert_consolidated_to_hf
from pixtral_fast.parallel import ShardPlan
from pixtral_fast.tiny import VARIANTS, random_state_dict, write_tokenizer
from pixtral_fast.weights import CONSOLIDATED, hf_files, load_state_dict, save_consolidated
from tests.support.tp import TOKENIZER_FILES, chat
from tests.tolerances import assert_close

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sharded_hf(consolidated, dst, dtype: torch.dtype):
    """The consolidated checkpoint as an HF folder in `dtype`, its tensors dealt over two files listed
    in model.safetensors.index.json (as tests/support/tp.py's write_sharded_hf does, but in any dtype)."""
    convert_consolidated_to_hf(consolidated, dst, dtype=dtype)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = [f"model-{k + 1:05d}-of-00002.safetensors" for k in range(2)]
    weight_map = {key: names[i % 2] for i, key in enumerate(sorted(tensors))}
    for name in names:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == name}, str(dst / name),
                  metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (consolidated / name).is_file():
            shutil.copyfile(consolidated / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(variant, dtype name, hf) -> a tiny checkpoint stored in that dtype, made once."""
    made = {}

    def get(variant: str, dtype: str, hf: bool):
        if (variant, dtype, False) not in made:
            args = VARIANTS[variant]
            folder = tmp_path_factory.mktemp(f"{variant}-{dtype}")
            save_consolidated(random_state_dict(args, seed=0), args, folder, dtype=DTYPES[dtype])
            write_tokenizer(folder, args)
            made[variant, dtype, False] = folder
        if hf and (variant, dtype, True) not in made:
            made[variant, dtype, True] = sharded_hf(made[variant, dtype, False],
                                                    tmp_path_factory.mktemp(f"{variant}-{dtype}-hf"), DTYPES[dtype])
        return made[variant, dtype, hf]

    return get


# -- the loader ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["consolidated", "hf-sharded"])
@pytest.mark.parametrize("variant, size", [("pixtral-12b", 2), ("pixtral-large", 3)])
def test_every_tensor_of_every_rank_is_contiguous(checkpoints, variant, size, fmt, dtype):
    """Loaded in the checkpoint's own dtype (no conversion to copy a strided cut). pixtral-large at 3
    ranks also replicates its one KV head and pads the last rank's vocabulary share."""
    folder = checkpoints(variant, dtype, fmt != "consolidated")
    if fmt == "consolidated":
        assert (folder / CONSOLIDATED).is_file()
    else:
        assert not (folder / CONSOLIDATED).exists() and len(hf_files(folder)) == 2
    args = VARIANTS[variant]
    assert ModelArgs.from_params_json(checkpoints(variant, dtype, False) / "params.json") == args
    ShardPlan(size, 0).check(args.text)
    for rank in range(size):
        plan = ShardPlan(size, rank)
        state = load_state_dict(folder, args, "cpu", DTYPES[dtype], progress=False, shard=plan)
        column_cuts = [n for n in state if (plan.slice_for(n, args.text) or (0,))[0] == 1]
        assert column_cuts, "wo and w2 are cut by columns"
        strided = {n: tuple(t.stride()) for n, t in state.items() if not t.is_contiguous()}
        assert not strided, f"rank {rank} of {size}: strided tensors {strided}"
        assert {t.dtype for t in state.values()} == {DTYPES[dtype]}


# -- end to end, on the kernels -----------------------------------------------------------------------

NEW_TOKENS = 3


def greedy(folder, size: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    """(NEW_TOKENS greedy tokens, the prompt logits of prompt + those tokens but the last, from the
    last prompt position on: the logits each greedy choice was made from) on the fast backend."""
    message = chat("Hi there, who are you?")
    with pf.Engine.from_pretrained(folder, tensor_parallel_size=size, device="cpu", dtype=dtype, backend="fast",
                                   progress=False, num_blocks=8) as eng:
        assert eng.model.backend == "fast" and eng.model.dtype == dtype
        prompt = eng.tokenizer.encode(message).tokens
        tokens = eng.generate(message, max_new_tokens=NEW_TOKENS).tokens
        assert len(tokens) == NEW_TOKENS
        logits = eng.prompt_logits(prompt + tokens[:-1])[len(prompt) - 1:]
    return tokens, logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_ranks_on_the_kernels_equal_one_process(checkpoints, dtype):
    """A checkpoint in the engine's own dtype, split 2 ways, prefill and decode on the Triton kernels."""
    folder = checkpoints("pixtral-12b", dtype, False)
    want_tokens, want = greedy(folder, 1, DTYPES[dtype])
    got_tokens, got = greedy(folder, 2, DTYPES[dtype])
    assert got_tokens == want_tokens
    if dtype == "fp32":
        assert_close(got, want, torch.float32, msg="fp32 logits, 2 ranks vs one process")
        return
    # bf16: the split GEMMs round their partial sums to bf16 before the all-reduce, so the logits
    # drift from one process's by more than one op's bf16 bound (tests/tolerances.py) after a few
    # layers. The greedy tokens are the check, and they are no coin flip: at every choice the
    # leader's margin over the runner-up exceeds twice the largest logit difference of that row,
    # so no difference this size can swap them.
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    top2 = want.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    drift = (got - want).abs().amax(-1)
    assert (margin > 2 * drift).all(), f"margins {margin.tolist()} vs differences {drift.tolist()}"
