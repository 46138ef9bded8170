"""Split-K GEMV (kernels/gemv.py) against an fp64 oracle (x.double() @ w.double().T of the same,
already rounded, inputs); on the CPU the kernels run under Triton's interpreter with its small
tiles (16/32 x 32 x 32), so the shapes below span several N and K tiles with ragged last ones."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pixtral_fast.kernels import INTERPRETING
from pixtral_fast.kernels import gemv as gemv_module
from pixtral_fast.kernels.gemv import choose_split_k, gemv
from tests.conftest import DTYPES
from tests.tolerances import assert_close


def make(m, n, k, dtype, device, seed=0):
    """x ~ N(0, 1), w scaled by 1/sqrt(K): outputs O(1), as a model's linears give."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def check(x, w, split_k=None):
    out = gemv(x, w, split_k)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[0]) and out.device == x.device
    assert_close(out, x.double() @ w.double().T, x.dtype)
    return out


# N 40: one whole 32-row tile and a tail of 8 (clamped rows); K 136: four whole 32-tiles and a
# ragged 8; split 7 asks for more slices than the 5 K tiles (gemv gives 5).
@pytest.mark.parametrize("split_k", [1, 2, 7, None], ids=lambda s: f"split{s or 'auto'}")
@pytest.mark.parametrize("m", [1, 3, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_matches_oracle(dtype, m, split_k, device):
    check(*make(m, 40, 136, dtype, device, seed=m), split_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,split_k", [
    (3, 37, 5000, None),   # long ragged K (156 whole tiles + 8), the auto split
    (2, 70, 5000, 3),      # N tail of 6, a long slice per program
    (5, 5, 136, 2),        # N smaller than one tile
    (17, 33, 64, 2),       # one 32-row tile holding 17 rows; N tail of 1
    (33, 24, 40, 2),       # two row tiles (M > 32); K: one whole tile + 8
    (1, 16, 7, None),      # K shorter than one tile: only the masked tail runs
    (4, 9, 1, None),       # K 1
    (2, 40, 512, 16),      # 16 K tiles in 16 slices: every slice the reduction unrolls
    (2, 40, 600, 50),      # 19 K tiles, 50 asked: capped at MAX_SPLIT (10 slices of 2 tiles)
])
def test_gemv_ragged_shapes(dtype, m, n, k, split_k, device):
    check(*make(m, n, k, dtype, device, seed=n + k), split_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_row_strides(dtype, device):
    """x and w with row strides wider than K (views of wider tensors): unit stride along K suffices."""
    x_wide, w_wide = make(6, 48, 200, dtype, device, seed=3)
    x, w = x_wide[:, 8:144], w_wide[:, 16:152]
    assert x.stride() == (200, 1) and w.stride() == (200, 1)
    check(x, w, 2)


@pytest.mark.parametrize("split_k", [1, 3, None], ids=lambda s: f"split{s or 'auto'}")
def test_gemv_is_deterministic(split_k, device):
    """Two runs on the same inputs give the same bits (the reduction has a fixed order)."""
    x, w = make(7, 70, 300, torch.bfloat16, device, seed=4)
    a, b = gemv(x, w, split_k), gemv(x, w, split_k)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_split_does_not_depend_on_the_batch():
    """A row's summation order must not depend on the batch it is decoded in: choose_split_k
    ignores M."""
    for n, k in [(6144, 5120), (131072, 5120), (5120, 4096), (5120, 14336), (40, 136)]:
        splits = {choose_split_k(m, n, k, 132) for m in range(1, 33)}
        assert len(splits) == 1, (n, k, splits)


def test_choose_split_k_at_pixtral_shapes():
    """On 132 SMs, 128 x 128 tiles: the N tiles alone fill the GPU for the output head; the others
    are cut into whole-tile slices to reach two programs per SM."""
    assert choose_split_k(1, 6144, 5120, 132) == 6     # 48 N tiles x 6 = 288 programs
    assert choose_split_k(1, 131072, 5120, 132) == 1   # 1024 N tiles
    assert choose_split_k(1, 5120, 4096, 132) == 7     # 40 x 7 = 280
    assert choose_split_k(1, 5120, 14336, 132) == 7
    assert choose_split_k(1, 64, 100, 132) == 1        # K has one tile: no split
    assert choose_split_k(1, 128, 128 * 160, 132) == gemv_module.MAX_SPLIT  # 10 tiles a slice
    assert choose_split_k(1, 128, 128 * 100, 132) == 15  # 7 tiles a slice: 15 slices cover the 100
    for n, k in [(6144, 5120), (5120, 4096), (5120, 14336), (100, 1000), (1, 1)]:
        split = choose_split_k(1, n, k, 132)
        assert 1 <= split <= min(gemv_module.MAX_SPLIT, -(-k // 128))


class _AtenOps(TorchDispatchMode):
    """The aten ops run outside the Triton launches (the interpreter's own copies not counted)."""
    def __init__(self):
        super().__init__()
        self.ops = []
        self.in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("split_k,launches", [(1, 1), (3, 2)])
def test_launch_count(split_k, launches, device, monkeypatch):
    """One Triton launch without a split, two with one (GEMV + ordered reduction); torch only
    allocates (no zeroing, no sum, no cast)."""
    counted = []
    mode = _AtenOps()

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            counted.append(self.kernel)

            def launch(*args, **kwargs):
                mode.in_kernel = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    mode.in_kernel = False
            return launch

    for name in ("_gemv_kernel", "_reduce_kernel"):
        monkeypatch.setattr(gemv_module, name, Counting(getattr(gemv_module, name)))
    x, w = make(2, 40, 136, torch.float16, device)
    with mode:
        out = gemv(x, w, split_k)
    assert len(counted) == launches
    assert set(mode.ops) <= {"empty"}, mode.ops
    assert_close(out, x.double() @ w.double().T, torch.float16)


def test_empty_dimensions(device):
    for m, n, k in [(0, 8, 16), (3, 0, 16)]:
        x, w = make(m, n, k, torch.float32, device)
        assert gemv(x, w).shape == (m, n)
    x, w = make(3, 8, 0, torch.bfloat16, device)
    out = gemv(x, w)
    assert out.shape == (3, 8) and out.dtype == torch.bfloat16 and not out.any()


@pytest.mark.parametrize("make_args,match", [
    (lambda x, w: (x[0], w), "^x must be 2-D"),
    (lambda x, w: (x, w[None]), "^w must be 2-D"),
    (lambda x, w: (x, w[:, :-1]), r"^w \(8, 15\) must be \[N, K\] with x's K = 16"),
    (lambda x, w: (x.double(), w.double()), "^x has dtype torch.float64"),
    (lambda x, w: (x.to(torch.int32), w), "^x has dtype torch.int32"),
    (lambda x, w: (x, w.half()), "^w has dtype torch.float16 but x has torch.float32"),
    (lambda x, w: (x.t().contiguous().t(), w), "^x must be contiguous along K"),
    (lambda x, w: (x, w.t().contiguous().t()), "^w must be contiguous along K"),
    (lambda x, w: (x, w.to("meta")), "^w is on meta"),
    (lambda x, w: (x.tolist(), w), "^x must be a torch.Tensor"),
])
def test_validation_errors(make_args, match, device):
    x, w = make(3, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        gemv(*make_args(x, w))


@pytest.mark.parametrize("split_k", [0, -1, 2.0, True, "2"])
def test_split_k_validation(split_k, device):
    x, w = make(3, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="^split_k must be None or an int >= 1"):
        gemv(x, w, split_k)


@pytest.mark.skipif(INTERPRETING, reason="under the interpreter CPU tensors are the kernels' input")
def test_cpu_tensors_refused_without_the_interpreter():
    x, w = make(3, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="^x is on cpu: gemv needs a CUDA device"):
        gemv(x, w)


def test_compile_specs_cover_the_model_shapes():
    """The AOT specs (tests/test_kernel_compile.py, the SASS ceiling) are the launches gemv makes:
    bf16 at the four Pixtral-12B shapes, the fused QKV at batch 32 and in fp16 / fp32; the
    reduction wherever the split is > 1; N, K and the strides divisible by 16 as the JIT sees them."""
    for cap in (90, 80):
        specs = gemv_module.compile_specs(cap)
        names = [s["name"] for s in specs]
        assert len(names) == len(set(names))
        for shape in gemv_module.SHAPES:
            assert any(n.startswith(f"gemv_bf16_{shape}_m1_") for n in names), (shape, names)
        for prefix in ("gemv_bf16_qkv_m32_32x", "gemv_fp16_qkv_m1_", "gemv_fp32_qkv_m1_"):
            assert any(n.startswith(prefix) for n in names), (prefix, names)
        head = next(s for s in specs if s["name"].startswith("gemv_bf16_head_m1_"))
        assert head["name"].endswith("_split1") and head["signature"]["out_ptr"] == "*bf16"
        qkv = next(s for s in specs if s["name"].startswith("gemv_bf16_qkv_m1_"))
        assert qkv["signature"]["out_ptr"] == "*fp32" and qkv["signature"]["M"] == "i32"  # M never compiled in
        assert {"x_ptr", "w_ptr", "out_ptr", "N", "K", "stride_xm", "stride_wn", "k_per_split",
                "stride_split"} <= set(qkv["attrs"])
        reduce_names = [n for n in names if n.startswith("gemv_reduce_")]
        assert len(reduce_names) == sum(not n.endswith("_split1") for n in names if not n.startswith("gemv_reduce_"))


# ---------------------------------------------------------------------------------------------
# real model shapes (GPU only)

PIXTRAL = {"qkv": (6144, 5120), "head": (131072, 5120), "wo": (5120, 4096), "w2": (5120, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize("shape", PIXTRAL)
def test_gemv_pixtral_shapes_gpu(shape, m, device):
    n, k = PIXTRAL[shape]
    g = torch.Generator(device=device).manual_seed(m)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) * k ** -0.5).to(torch.bfloat16)
    out = gemv(x, w)
    for rows in torch.arange(n, device=device).split(16384):  # the fp64 oracle in slices of N
        assert_close(out[:, rows], x.double() @ w[rows].double().T, torch.bfloat16, msg=f"{shape} M {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_batch_invariance_gpu(dtype, device):
    """Each row comes out with the same bits whatever batch (1..32) it is decoded in: the split
    ignores M and each output's K order is the same in 16- and 32-row tiles."""
    n, k = PIXTRAL["qkv"]
    x, w = make(32, n, k, dtype, device, seed=5)
    full = gemv(x, w)
    for m in (1, 2, 7, 16, 17, 31):
        part = gemv(x[:m], w)
        assert torch.equal(part, full[:m]), f"M {m}: rows differ from the same rows in a batch of 32"
    assert torch.equal(gemv(x, w), full)
