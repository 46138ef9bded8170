"""Compile specs as Triton's JIT specializes a kernel at its launch: what the ahead-of-time builds
(tests/test_kernel_compile.py, tests/test_quant_compile.py, the SASS ceilings) must compile, so
that they check the variant that runs."""
from __future__ import annotations


def _unspecialized(fn) -> tuple[set, set]:
    """Names of fn's arguments marked do_not_specialize / do_not_specialize_on_alignment (a
    JITFunction's params carry the marks; an InterpretedFunction keeps them in its kwargs)."""
    names = list(fn.arg_names)
    params = getattr(fn, "params", None)
    if params is not None:
        return ({p.name for p in params if p.do_not_specialize},
                {p.name for p in params if p.do_not_specialize_on_alignment})
    kwargs = getattr(fn, "kwargs", {}) or {}
    return tuple({names[a] if isinstance(a, int) else a for a in (kwargs.get(key) or ())}
                 for key in ("do_not_specialize", "do_not_specialize_on_alignment"))


def jit_specialized(fn, signature: dict, constexprs: dict, values: dict) -> dict:
    """A compile spec's "signature", "constexprs" and "attrs" as Triton's JIT specializes `fn`
    when launched with these argument values, so that the ahead-of-time build (tests/
    test_kernel_compile.py) is the variant that runs. The rule is Triton 3.9's (native_specialize_impl,
    BaseBackend.get_int_specialization / get_tensor_specialization; tests/support/sass.py keeps a
    copy that a test checks against Triton's own):
    - pointers: 16-byte aligned -> tt.divisibility 16. Torch's caching allocator hands out
      512-byte aligned blocks and our launchers pass whole tensors, or views whose offsets are
      whole rows (multiples of 16 bytes at the shapes compiled). values[ptr], where given, is a
      byte address: marked only if divisible by 16.
    - ints: equal to 1 -> a constexpr (the JIT compiles the 1 in: signature "constexpr");
      otherwise divisible by 16 (0 included) -> tt.divisibility 16; else nothing.
    - floats and constexprs: never specialized; arguments marked do_not_specialize(_on_alignment)
      are left alone, as the JIT leaves them.
    values: every int argument of the signature (a KeyError names what is missing or unknown)."""
    dns, dns_align = _unspecialized(fn)
    runtime = {a for a, ty in signature.items() if ty != "constexpr"}
    unknown = set(values) - runtime
    if unknown:
        raise KeyError(f"{fn.__name__}: values for arguments that are not runtime arguments: {sorted(unknown)}")
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for arg, ty in list(signature.items()):
        if ty == "constexpr" or ty.startswith(("fp", "bf")):
            continue
        if ty.startswith("*"):
            aligned = values.get(arg, 0) % 16 == 0
            if aligned and arg not in dns and arg not in dns_align:
                attrs[arg] = [["tt.divisibility", 16]]
            continue
        if arg not in values:
            raise KeyError(f"{fn.__name__}: no value for the int argument {arg}")
        value = values[arg]
        bits = int(ty.lstrip("iu"))
        if not -2 ** (bits - 1) <= value < 2 ** (bits - 1):
            raise ValueError(f"{fn.__name__}: {arg} = {value} does not fit the signature's {ty} (the JIT would widen it)")
        if arg in dns:
            continue
        if value == 1:
            signature[arg], constexprs[arg] = "constexpr", 1
        elif value % 16 == 0 and arg not in dns_align:
            attrs[arg] = [["tt.divisibility", 16]]
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs}
