"""Triton kernels of pixtral_fast, one file per kernel family (shipped as pixtral_fast.kernels).

Each module holds @triton.jit code, its launcher, and `compile_specs()`: every config it ships,
as arguments for an ahead-of-time `triton.compile` (tests compile them for sm_90 and sm_80).
This file holds only what they share.

Found as a top-level `kernels` (a process that put the repository root on sys.path), it defines
nothing and hands the name over to Hugging Face's package of that name: see _not_top_level.py."""
if __name__ != "pixtral_fast.kernels":
    from ._not_top_level import hand_over

    hand_over(__name__, __path__[0])
else:
    import functools
    import os

    import torch

    # Whether @triton.jit made interpreter functions: decided when the kernels were imported, as
    # Triton itself decides, so later changes of the variable cannot disagree with the kernels.
    INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
    if INTERPRETING:  # the interpreter computes bf16 wrongly; see _interpreter's docstring
        from pixtral_fast.kernels import _interpreter

        _interpreter.install()

    LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * LOG2E)
    TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

    @functools.lru_cache(maxsize=None)
    def _device_properties(index: int):
        return torch.cuda.get_device_properties(index)

    def arch(device: torch.device) -> int:
        """90 for Hopper and newer, else 80: the two config families we ship."""
        return 90 if _device_properties(device.index or 0).major >= 9 else 80

    def sm_count(device: torch.device) -> int:
        return _device_properties(device.index or 0).multi_processor_count
