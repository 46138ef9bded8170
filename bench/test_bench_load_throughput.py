"""Loading throughput: pixtral_fast's dense loader (weights.load_state_dict, every check included:
headers, names, shapes and dtypes against the config) against safetensors.torch.load_file on the
same consolidated checkpoint, page cache warm, both ending with every tensor in process memory
(each page of each tensor read once). Rounds alternate between the two; each side's median of
ROUNDS is recorded, and the summary table's "safetensors_load_file xN" is load_file's time over
ours: our throughput relative to load_file's (the goal: >= 0.9), also in extra_info as
throughput_vs_load_file.

A host-side measurement (the tensors stay on the CPU), so both sizes run on any machine: on the
CPU a ~70 MB checkpoint (a second to write, well under a second to time); the 0.78 GB bf16
checkpoint (Pixtral-sized vocabulary, 8 layers of dim 1024) is GPU-marked so that it runs in the
device check, not in `make test` (about 10 s to write, a few seconds to time)."""
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file

from bench.timing import OURS, RESULTS
from pixtral_fast.config import ModelArgs, TextArgs, VisionArgs
from pixtral_fast.tiny import make_tiny
from pixtral_fast.weights import CONSOLIDATED, load_state_dict

ROUNDS = 5
PAGE = 4096
PEER = "safetensors_load_file"
VISION = VisionArgs(hidden_size=128, num_channels=3, image_size=1024, patch_size=16, rope_theta=1e4,
                    intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
SIZES = {
    "70MB": ModelArgs(text=TextArgs(dim=256, n_layers=4, head_dim=64, hidden_dim=1024, n_heads=4, n_kv_heads=2,
                                    rope_theta=1e9, norm_eps=1e-5, vocab_size=131072), vision=VISION),
    "0.78GB": ModelArgs(text=TextArgs(dim=1024, n_layers=8, head_dim=128, hidden_dim=4096, n_heads=8, n_kv_heads=2,
                                      rope_theta=1e9, norm_eps=1e-5, vocab_size=131072), vision=VISION),
}
MARKS = {"70MB": (), "0.78GB": (pytest.mark.gpu,)}


def resident(state: dict[str, torch.Tensor]) -> int:
    """Reads one byte of every page of every tensor: a lazily mapped tensor is then in memory too."""
    total = 0
    for t in state.values():
        data = t.reshape(-1).view(torch.uint8)
        if data.numel():
            total += int(data[::PAGE].sum()) + int(data[-1])
    return total


def seconds(fn) -> float:
    start = time.perf_counter()
    resident(fn())
    return time.perf_counter() - start


@pytest.mark.parametrize("size", [pytest.param(s, marks=MARKS[s]) for s in SIZES])
def test_load_throughput_against_load_file(benchmark, tmp_path, size):
    args = SIZES[size]
    folder = make_tiny(tmp_path / size, args=args)
    file = str(folder / CONSOLIDATED)
    ours = lambda: load_state_dict(folder, args, "cpu", torch.bfloat16, progress=False)  # noqa: E731
    theirs = lambda: load_file(file)  # noqa: E731
    expected = theirs()
    loaded = ours()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    del loaded, expected
    peer_times, our_times = [], []
    for _ in range(ROUNDS):  # alternated, so that a busy machine slows both alike
        peer_times.append(seconds(theirs))
        our_times.append(seconds(ours))
    benchmark.group = f"load-consolidated-{size}"
    benchmark.pedantic(lambda: resident(ours()), rounds=1, warmup_rounds=0)
    peer, mine = statistics.median(peer_times), statistics.median(our_times)
    nbytes = (folder / CONSOLIDATED).stat().st_size
    benchmark.extra_info.update({
        "impl": OURS, "rounds": ROUNDS, "checkpoint_bytes": nbytes, "ours_median_ms": mine * 1e3,
        "load_file_median_ms": peer * 1e3, "ours_GB_per_s": nbytes / mine / 1e9,
        "load_file_GB_per_s": nbytes / peer / 1e9, "throughput_vs_load_file": peer / mine})
    RESULTS[benchmark.group] |= {OURS: mine, PEER: peer}
    print(f"\n{size}: load_state_dict {mine * 1e3:.1f} ms, load_file {peer * 1e3:.1f} ms, "
          f"throughput ratio {peer / mine:.2f}")
