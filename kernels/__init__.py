"""Triton kernels of pixtral_fast, one file per kernel family (shipped as pixtral_fast.kernels).

Each module holds @triton.jit code, its launcher, and `compile_specs()`: every config it ships,
as arguments for an ahead-of-time `triton.compile` (tests compile them for sm_90 and sm_80)."""
