"""The block manager under thousands of random allocate / append / free / fail sequences:
no block is ever owned twice, none is lost, the scratch block is never handed out."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixtral_fast.config import TextArgs
from pixtral_fast.runtime.kv_cache import SCRATCH_BLOCK, BlockManager, CacheFull, plan_cache


def check_invariants(bm: BlockManager) -> None:
    owned = [b for table in bm.tables.values() for b in table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not set(owned) & set(bm.free_blocks), "a block is both owned and free"
    assert sorted(owned + list(bm.free_blocks)) == [b for b in range(bm.num_blocks) if b != SCRATCH_BLOCK]
    for seq, table in bm.tables.items():
        assert len(table) == bm.blocks_for(bm.lengths[seq])


ops = st.lists(st.tuples(st.sampled_from(["allocate", "append", "free"]), st.integers(0, 7), st.integers(1, 70)),
               min_size=1, max_size=60)


@settings(max_examples=2000, deadline=None)
@given(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 4, 16]), program=ops)
def test_random_programs_keep_every_block_accounted_for(num_blocks, block_size, program):
    bm = BlockManager(num_blocks, block_size)
    slots_seen: dict[int, set[int]] = {}
    for op, seq, n in program:
        free_before = len(bm.free_blocks)
        if op == "allocate":
            if seq in bm.tables:
                with pytest.raises(ValueError):
                    bm.allocate(seq, n)
            elif bm.can_allocate(n):
                bm.allocate(seq, n)
                slots_seen[seq] = set(bm.slots(seq))
            else:
                with pytest.raises(CacheFull):
                    bm.allocate(seq, n)
                assert len(bm.free_blocks) == free_before and seq not in bm.tables
        elif op == "append" and seq in bm.tables:
            if bm.needs_block(seq) and not bm.free_blocks:
                with pytest.raises(CacheFull):
                    bm.append(seq)
            else:
                slot = bm.append(seq)
                assert slot not in slots_seen[seq] and slot // block_size in bm.tables[seq]
                slots_seen[seq].add(slot)
        elif op == "free" and seq in bm.tables:
            owned = len(bm.tables[seq])
            bm.free(seq)
            assert len(bm.free_blocks) == free_before + owned
        check_invariants(bm)
    # slots of live sequences never collide across sequences
    all_slots = [s for seq in bm.tables for s in bm.slots(seq)]
    assert len(all_slots) == len(set(all_slots))
    for seq in list(bm.tables):
        bm.free(seq)
    assert bm.usage()["used_blocks"] == 0


def test_usage_report():
    bm = BlockManager(10, 16)
    bm.allocate(1, 33)
    assert bm.usage() == {"used_blocks": 3, "free_blocks": 6, "total_blocks": 9, "fraction_used": 3 / 9,
                          "sequences": 1}


def test_cache_sizing():
    args = TextArgs(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                    rope_theta=1e9, norm_eps=1e-5, vocab_size=131072)
    shape = plan_cache(args, torch.bfloat16, "cpu", block_size=16, memory_bytes=10 << 30)
    assert shape.bytes_per_block == 16 * 160 * 1024  # DESIGN §4: 160 KiB of K+V per token
    assert shape.num_blocks == (10 << 30) // shape.bytes_per_block
    with pytest.raises(ValueError, match="at least 2"):
        plan_cache(args, torch.bfloat16, "cpu", memory_bytes=1000)
    with pytest.raises(ValueError, match="num_blocks or memory_bytes"):
        plan_cache(args, torch.bfloat16, "cpu")
