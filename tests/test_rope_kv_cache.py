"""The decoder's RoPE with the KV-cache write in the same launch (ops.rope_1d_kv_cache): q and k
rotate as rope_1d rotates them (checked against the closed form in test_rope_2d.py), the rotated k
and v land at their flat slots of the paged caches and nowhere else, from the strided views of
one fused QKV output; on the CPU under Triton's interpreter."""
import pytest
import torch

from pixtral_fast import ops, reference
from tests.conftest import DTYPES
from tests.test_rope_2d import closed_form_angles, rotate
from tests.tolerances import assert_close


def fused_qkv(tokens, q_heads, k_heads, head_dim, dtype, device):
    """q, k, v as the model makes them: column views of one [T, (Hq + 2 Hk) D] output."""
    out = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim).to(device=device, dtype=dtype)
    q, k, v = out.split([q_heads * head_dim, k_heads * head_dim, k_heads * head_dim], dim=-1)
    return (q.view(tokens, q_heads, head_dim), k.view(tokens, k_heads, head_dim),
            v.view(tokens, k_heads, head_dim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, q_heads, k_heads, head_dim, block_size", [
    (1, 32, 8, 128, 16), (5, 4, 2, 64, 16), (3, 12, 1, 40, 32), (9, 6, 3, 256, 16), (33, 8, 8, 64, 64)])
def test_rotates_and_writes_each_slot(tokens, q_heads, k_heads, head_dim, block_size, dtype, device):
    torch.manual_seed(tokens)
    q, k, v = fused_qkv(tokens, q_heads, k_heads, head_dim, dtype, device)
    pos = torch.randint(0, 131072, (tokens,), dtype=torch.int32, device=device)
    blocks = 4 + tokens // block_size
    k_cache = torch.full((blocks, block_size, k_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    slots = torch.randperm(blocks * block_size)[:tokens].to(device=device, dtype=torch.int64)
    q_rot, k_rot = ops.rope_1d_kv_cache(q, k, v, pos, 1e9, k_cache, v_cache, slots)
    angle = closed_form_angles(pos, head_dim, 1e9)
    assert_close(q_rot, rotate(q, angle), dtype)
    assert_close(k_rot, rotate(k, angle), dtype)
    flat_k, flat_v = k_cache.view(-1, k_heads, head_dim), v_cache.view(-1, k_heads, head_dim)
    assert torch.equal(flat_k[slots], k_rot) and torch.equal(flat_v[slots], v)
    others = torch.ones(flat_k.shape[0], dtype=torch.bool)
    others[slots.cpu()] = False
    assert flat_k[others].isnan().all() and flat_v[others].isnan().all()  # nothing else written


def test_equals_the_reference_twin(device):
    q, k, v = fused_qkv(4, 8, 2, 64, torch.bfloat16, device)
    pos = torch.tensor([0, 7, 900, 131071], dtype=torch.int32, device=device)
    caches = [torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(4)]
    slots = torch.tensor([3, 17, 0, 31], device=device)
    fast = ops.rope_1d_kv_cache(q, k, v, pos, 1e9, caches[0], caches[1], slots)
    ref = reference.rope_1d_kv_cache(q, k, v, pos, 1e9, caches[2], caches[3], slots)
    for a, b in zip(fast + tuple(caches[:2]), ref + tuple(caches[2:])):
        assert_close(a, b.double(), torch.bfloat16)


@pytest.mark.parametrize("change, message", [
    (dict(slots=torch.tensor([0, 32])), r"slot_mapping holds slots 0..32, outside the caches' 0..31"),
    (dict(slots=torch.tensor([-1, 2])), "outside the caches"),
    (dict(slots=torch.tensor([0, 1], dtype=torch.int32)), "slot_mapping must have dtype"),
    (dict(slots=torch.tensor([0])), r"slot_mapping must be a contiguous int64 \[2\]"),
    (dict(k_cache=torch.zeros(2, 16, 4, 64)), r"k_cache must be a contiguous \[blocks, block_size, 2, 64\]"),
    (dict(v_cache=torch.zeros(3, 16, 2, 64)), "v_cache .* must have k_cache's shape"),
    (dict(v=torch.zeros(2, 2, 32)), "v .* must have k's shape"),
])
def test_bad_arguments_are_named(change, message, device):
    args = dict(q=torch.randn(2, 4, 64), k=torch.randn(2, 2, 64), v=torch.randn(2, 2, 64),
                k_cache=torch.zeros(2, 16, 2, 64), v_cache=torch.zeros(2, 16, 2, 64), slots=torch.tensor([0, 5]))
    args.update(change)
    args = {name: t.to(device) for name, t in args.items()}
    pos = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=message):
        ops.rope_1d_kv_cache(args["q"], args["k"], args["v"], pos, 1e9, args["k_cache"], args["v_cache"],
                             args["slots"])


def test_opcheck(device):
    q, k, v = fused_qkv(3, 4, 2, 64, torch.float32, device)
    caches = (torch.zeros(2, 16, 2, 64, device=device), torch.zeros(2, 16, 2, 64, device=device))
    args = (q, k, v, torch.arange(3, dtype=torch.int32, device=device), 1e9, *caches,
            torch.tensor([1, 9, 30], device=device))
    torch.library.opcheck(torch.ops.pixtral_fast.rope_1d_kv_cache, args)
