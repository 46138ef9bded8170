"""The collectives of pixtral_fast/parallel/comm.py across real gloo process groups (one process per
rank): step messages of every size around the one-broadcast buffer, gathers, the MIN agreement,
the vocabulary gather with padding, and the all-reduce."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import pickle, sys, torch
    from pixtral_fast.parallel.comm import join_group, MESSAGE_BYTES
    from pixtral_fast.parallel.plan import ShardPlan
    rank, size, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    comm = join_group(ShardPlan(size, rank), torch.device("cpu"), init, 60.0)
    head = MESSAGE_BYTES - 8
    def message(i, n):
        return ("step", i, bytes((i * 7 + j) % 251 for j in range(n)))

    def content_for(i, pickled):  # the content size whose message pickles to exactly `pickled` bytes
        return next(n for n in range(max(0, pickled - 200), pickled + 1)
                    if len(pickle.dumps(message(i, n), protocol=pickle.HIGHEST_PROTOCOL)) == pickled)

    # Messages that pickle to one byte under, exactly, and one byte over the one-broadcast size.
    for i, pickled in enumerate([head - 1, head, head + 1]):
        expected = message(i, content_for(i, pickled))
        assert len(pickle.dumps(expected, protocol=pickle.HIGHEST_PROTOCOL)) == pickled
        assert comm.broadcast(expected if rank == 0 else None) == expected, (rank, pickled)
    # Tiny and large ones, tensors included.
    for i, n in enumerate([0, 1, 3 * MESSAGE_BYTES + 5, 17]):
        expected = message(i, n) + (torch.arange(i + 3) * 0.5,)
        got = comm.broadcast(expected if rank == 0 else None)
        assert got[:3] == expected[:3] and torch.equal(got[3], expected[3]), (rank, n)
    gathered = comm.gather({"rank": rank})
    assert gathered == ([{"rank": r} for r in range(size)] if rank == 0 else None)
    assert comm.min_int(100 - rank) == 100 - (size - 1)
    x = torch.full((3, 4), float(rank + 1))
    assert torch.equal(comm.all_reduce(x), torch.full((3, 4), float(sum(range(1, size + 1)))))
    width = 4 * size - 1  # the last rank's columns are padding, cut away
    local = torch.arange(4, dtype=torch.float32).repeat(2, 1) + 4 * rank
    assert torch.equal(comm.gather_columns(local, width), torch.arange(width, dtype=torch.float32).repeat(2, 1))
    comm.destroy()
    print("ok", rank)
""")


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_across_gloo_ranks(tmp_path, size):
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), str(size), init], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(size)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (code, out, err) in enumerate(outs):
        assert code == 0 and out.strip() == f"ok {rank}", f"rank {rank} exited {code}: {err[-2000:]}"
