"""The model on our kernels (backend="fast": Triton under the interpreter on the CPU) against the
same model on the plain-PyTorch reference: ViT, full forward, and engine decoding."""
import pytest
import torch

import pixtral_fast as pf
from pixtral_fast.tiny import make_tiny
from pixtral_fast.tokenizer import Encoded
from tests.conftest import DEVICE
from tests.support.hf_peer import image_tokens
from tests.support.recompute import greedy_by_recompute
from tests.tolerances import MODEL_FP32_ATOL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    load = lambda backend: pf.load_model(folder, device=DEVICE, dtype=torch.float32, backend=backend,  # noqa: E731
                                         progress=False)
    return load("fast"), load("reference")


def images():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 48, 80, generator=g), torch.randn(3, 16, 16, generator=g), torch.randn(3, 64, 32, generator=g)]


def test_backends(models):
    fast, ref = models
    assert (fast.backend, ref.backend) == ("fast", "reference")


def test_fast_vit_equals_reference(models):
    fast, ref = models
    a, b = fast.encode_images(images()), ref.encode_images(images())
    assert a.shape == b.shape == (15 + 1 + 8, 64)
    torch.testing.assert_close(a, b, atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_logits_equal_reference(models):
    fast, ref = models
    tokens = [1, 3] + image_tokens(3, 5) + image_tokens(1, 1) + image_tokens(4, 2) + [2000, 2001, 2002, 4]
    a = fast(torch.tensor(tokens), images())
    b = ref(torch.tensor(tokens), images())
    torch.testing.assert_close(a, b, atol=MODEL_FP32_ATOL, rtol=0)


def test_fast_engine_equals_full_recompute(models):
    """The engine on our kernels (paged prefill through causal varlen attention and RoPE-1D,
    Triton decode attention, the fused FFN) gives, token for token, greedy full recomputation
    on the reference."""
    fast, ref = models
    prompt = Encoded(tokens=[1, 3] + image_tokens(3, 5) + [2000, 2001, 4], images=images()[:1])
    got = pf.Engine.from_model(fast, num_blocks=32, progress=False).generate(prompt, max_new_tokens=40)
    assert got.tokens == greedy_by_recompute(ref, prompt.tokens, prompt.images, 40)


# ---------------------------------------------------------------------------------------------
# bf16: our kernels (on a GPU: the CUDA decode extension, with and without CUDA graphs) against an
# independent fp32 recompute. The bound is the error that plain PyTorch makes in bf16 on the same
# model (the reference backend), times BF16_SLACK, plus one bf16 ulp of the largest logit: our
# kernels accumulate in fp32 as the reference does, so they may round differently, not worse.

BF16_SLACK = 2.0
STEPS = 8


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny_bf16"), seed=0)
    load = lambda backend, dtype: pf.load_model(folder, device=DEVICE, dtype=dtype, backend=backend,  # noqa: E731
                                                progress=False)
    return {"fast": load("fast", torch.bfloat16), "reference_bf16": load("reference", torch.bfloat16),
            "fp32": load("reference", torch.float32)}


def bf16_bound(bf16_models, tokens, images, rows) -> float:
    """What plain PyTorch loses in bf16 at these rows of one forward, with the slack and an ulp."""
    exact = bf16_models["fp32"](torch.tensor(tokens), images)[rows]
    plain = bf16_models["reference_bf16"](torch.tensor(tokens), images)[rows]
    return BF16_SLACK * float((plain - exact).abs().max()) + float(exact.abs().max()) * 2.0 ** -8


def test_fast_bf16_logits_track_fp32(bf16_models):
    tokens = [1, 3] + image_tokens(3, 5) + image_tokens(1, 1) + [2000, 2001, 2002, 4]
    imgs = [images()[0], images()[1]]
    rows = list(range(len(tokens)))
    exact = bf16_models["fp32"](torch.tensor(tokens), imgs)
    got = bf16_models["fast"](torch.tensor(tokens), imgs)
    err = float((got - exact).abs().max())
    bound = bf16_bound(bf16_models, tokens, imgs, rows)
    assert err <= bound, f"fast bf16 logits differ from fp32 by {err:.3g} > {bound:.3g}"


def record_logits(model):
    """Makes model.logits also copy its result into a fixed buffer (a copy that CUDA graphs
    capture, so replays refresh it too): row 0 is the one sequence's logits of the last step."""
    store = torch.full((64, model.args.text.vocab_size), float("nan"), device=model.device)
    compute = type(model).logits.__get__(model)

    def logits(h):
        out = compute(h)
        store[: out.shape[0]].copy_(out)
        return out

    model.logits = logits
    return store


@pytest.mark.parametrize("graphs", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["eager", "cuda_graphs"])
def test_fast_engine_bf16_logits_track_fp32_recompute(bf16_models, graphs):
    """Every step's logits (prefill, then decode over the paged cache: on a GPU the CUDA decode
    extension, replayed from CUDA graphs or eager) against an fp32 full recompute of the same
    tokens. Greedy picks then follow the engine's own tokens, so near-ties cannot derail it."""
    from pixtral_fast.runtime.sampling import SamplingParams

    model = bf16_models["fast"]
    store = record_logits(model)
    try:
        engine = pf.Engine.from_model(model, num_blocks=32, max_batch_size=4, progress=False,
                                      use_cuda_graphs=graphs)
        prompt = Encoded(tokens=[1, 3] + image_tokens(3, 5) + [2000, 2001, 4], images=images()[:1])
        seq = engine.add_request(prompt, SamplingParams(max_new_tokens=STEPS, stop_token_ids=(2,)))
        per_step = {}  # index of the new token -> the logits it was picked from
        while engine.has_unfinished():
            before = len(seq.generated)
            engine.step()
            if len(seq.generated) > before:  # the step's last logits call made its last token
                per_step[len(seq.generated) - 1] = store[0].clone()
    finally:
        del model.logits  # back to the class's method
    generated = list(seq.generated)
    # A step may prefill and decode the same sequence: all steps but the first are decode steps.
    assert len(per_step) >= len(generated) - 1 >= 4, (sorted(per_step), generated)
    worst = []
    for i, got in sorted(per_step.items()):
        context = prompt.tokens + generated[:i]
        exact = bf16_models["fp32"](torch.tensor(context), prompt.images)[-1]
        assert int(got.argmax()) == generated[i]  # the recorded row is the step's own
        worst.append(float((got - exact).abs().max()))
    full = prompt.tokens + generated[:-1]
    rows = list(range(len(prompt.tokens) - 1, len(full)))
    bound = bf16_bound(bf16_models, full, prompt.images, rows)
    assert max(worst) <= bound, f"per-step errors {[f'{w:.3g}' for w in worst]} exceed {bound:.3g}"
