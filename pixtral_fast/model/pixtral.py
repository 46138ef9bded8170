"""The whole Pixtral model. Attribute names follow Mistral's consolidated checkpoint keys, so a
state dict loads with strict=True and no renaming."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.adapter import VisionLanguageAdapter
from pixtral_fast.model.common import AttentionProjections, RMSNorm, attention_head_dims, resolve_backend
from pixtral_fast.model.patch_merger import MergePlan, PatchMerger, merged_grid
from pixtral_fast.model.text import AttentionMetadata, DecoderLayer, KVCache
from pixtral_fast.model.vision import VisionEncoder
from pixtral_fast.parallel.comm import Collectives
from pixtral_fast.parallel.layers import VocabParallelEmbedding, VocabParallelHead
from pixtral_fast.quant.linear import QuantFeedForward

ImageLike = torch.Tensor | np.ndarray


class Pixtral(nn.Module):
    """The whole model, or (comm given, comm.size > 1) one tensor-parallel rank's share of it:
    the decoder split by heads, FFN width and vocabulary (pixtral_fast/parallel/plan.py), the
    vision side whole. `args` always describe the whole model; `local_text` this rank's decoder."""

    def __init__(self, args: ModelArgs, device=None, dtype=None, comm: Collectives | None = None):
        super().__init__()
        self.args = args
        self.comm = comm if comm is not None and comm.size > 1 else None
        t, kw = args.text, dict(device=device, dtype=dtype)
        self.local_text = local = t if self.comm is None else self.comm.plan.local_text_args(t)
        reduce = None if self.comm is None else self.comm.all_reduce
        if self.comm is None:
            self.tok_embeddings = nn.Embedding(t.vocab_size, t.dim, **kw)
        else:
            self.tok_embeddings = VocabParallelEmbedding(t.vocab_size, t.dim, self.comm, **kw)
        self.layers = nn.ModuleList(DecoderLayer(local, reduce=reduce, **kw) for _ in range(t.n_layers))
        self.norm = RMSNorm(t.dim, t.norm_eps, **kw)
        if self.comm is None:
            self.output = nn.Linear(t.dim, t.vocab_size, bias=False, **kw)
        else:
            self.output = VocabParallelHead(t.dim, t.vocab_size, self.comm, **kw)
        if args.vision is not None:
            v = args.vision
            self.vision_encoder = VisionEncoder(v, **kw)
            if v.add_pre_mm_projector_layer_norm:  # eps: the decoder's, as HF's Mistral3 and vLLM take it
                self.pre_mm_projector_norm = RMSNorm(v.hidden_size, t.norm_eps, **kw)
            if v.merges_patches:
                self.patch_merger = PatchMerger(v.hidden_size, v.spatial_merge_size, **kw)
            self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, t.dim, bias=v.adapter_bias, **kw)
        self.backend, self.kernels = resolve_backend("reference", "cpu")

    def fuse_projections(self) -> int:
        """Fuses each attention's q/k/v projections into one GEMM (AttentionProjections.fuse_qkv),
        and a quantized FFN's gate and up (QuantFeedForward.fuse_gate_up); the number of
        attentions fused."""
        for m in self.modules():
            if isinstance(m, QuantFeedForward):
                m.fuse_gate_up()
        return sum(m.fuse_qkv() for m in self.modules() if isinstance(m, AttentionProjections))

    def set_backend(self, backend: str) -> "Pixtral":
        """'fast' (our kernels), 'reference' (plain PyTorch) or 'auto' (fast where it can run)."""
        device = self.output.weight.device
        self.backend, self.kernels = resolve_backend(backend, device, attention_head_dims(self.args))
        return self

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    # -- images -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Adapter outputs for all [IMG] tokens of all images, packed in order: [n_tokens, dim]
        (one per patch, or per merged window of patches)."""
        return self.image_features(images)

    def image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """encode_images with autograd left as the caller set it (training: pixtral_fast.train_demo)."""
        if self.args.vision is None:
            raise ValueError("this checkpoint has no vision encoder; it cannot take images")
        images = [torch.as_tensor(img) for img in images]
        if not images:
            return torch.empty(0, self.args.text.dim, device=self.device, dtype=self.dtype)
        v = self.args.vision
        plan = None
        if v.merges_patches:  # built on the host before the ViT runs: a bad grid fails before any work
            patch_grids = [self.vision_encoder.check_image(i, img) for i, img in enumerate(images)]
            plan = MergePlan.from_grids(patch_grids, v.spatial_merge_size, device=self.device)
        x = self.vision_encoder(images, self.kernels)
        if v.add_pre_mm_projector_layer_norm:
            x = self.pre_mm_projector_norm(x)
        if plan is not None:
            x = self.patch_merger(x, plan)
        return self.vision_language_adapter(x)

    def embed(self, tokens: torch.Tensor, image_features: torch.Tensor | None, check: bool = True) -> torch.Tensor:
        """Token embeddings with adapter outputs written, in order, at the [IMG] positions.
        check=False skips counting the [IMG] tokens (a device sync) for callers that did."""
        h = self.tok_embeddings(tokens)
        n_feat = 0 if image_features is None else image_features.shape[0]
        if check:
            n_img = 0 if self.args.vision is None else int((tokens == self.args.vision.image_token_id).sum())
            if n_img != n_feat:
                raise ValueError(f"tokens hold {n_img} [IMG] tokens but the images give {n_feat} patches")
        if n_feat:
            h[tokens == self.args.vision.image_token_id] = image_features.to(h.dtype)
        return h

    def check_request(self, tokens: Sequence[int], images: Sequence[ImageLike]) -> None:
        """Everything prefill would trip over in one request, found on the host before it joins a
        batch: ValueError naming the bad token or image. Each image must own, in order, one block
        of [IMG] rows laid out as mistral_common writes them (DESIGN §1): its patch rows, each of
        `cols` [IMG] tokens ended by [IMG_BREAK], the last ended by [IMG_END] instead."""
        ids = _token_array(tokens)
        vocab = self.args.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"token ids must lie in [0, {vocab}); got {bad}")
        if isinstance(images, (torch.Tensor, np.ndarray)) or not isinstance(images, Sequence):
            raise ValueError(f"images must be a list of [3, H, W] tensors, got {type(images).__name__}")
        if self.args.vision is None:
            if len(images):
                raise ValueError("this checkpoint has no vision encoder; it cannot take images")
            return
        check_image_layout(ids, self.image_grids(images), self.args.vision)

    def image_grids(self, images: Sequence[ImageLike]) -> list[tuple[int, int]]:
        """The (rows, cols) grid of [IMG] tokens each image makes: its patch grid, merged by
        spatial_merge_size; ValueError naming the image if its pixels cannot make one."""
        if self.args.vision is None:
            raise ValueError("this checkpoint has no vision encoder; it cannot take images")
        merge = self.args.vision.spatial_merge_size
        grids = [self.vision_encoder.check_image(i, _pixels(i, img)) for i, img in enumerate(images)]
        return grids if merge == 1 else [merged_grid(g, merge, i) for i, g in enumerate(grids)]

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        vocab = self.args.text.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"tokens must lie in [0, {vocab}); got {tokens.min().item()}..{tokens.max().item()}")

    # -- decoder ----------------------------------------------------------------------------------

    def run_decoder(self, h: torch.Tensor, meta: AttentionMetadata,
                    kv_caches: Sequence[KVCache] | None = None) -> torch.Tensor:
        """Every decoder layer, then the final norm, over the packed rows h: a prefill's prompts or
        a decode step's newest tokens alike (meta says which); kv_caches: the paged cache's layers."""
        for i, layer in enumerate(self.layers):
            h = layer(h, meta, self.kernels, None if kv_caches is None else kv_caches[i])
        return self.norm(h, self.kernels)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if type(self.output) is nn.Linear:  # the largest single read of a decode step (1.34 GB)
            return self.kernels.linear(h, self.output.weight).float()
        return self.output(h).float()  # vocabulary-parallel under tensor parallelism

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, images: Sequence[ImageLike] = ()) -> torch.Tensor:
        """Logits float32 [seq, vocab] for one causal sequence, no cache."""
        tokens = torch.as_tensor(tokens)
        self.check_tokens(tokens)
        if tokens.numel() == 0:
            raise ValueError("tokens is empty")
        self.check_request(tokens.cpu().numpy(), images)  # finite pixels, each image's [IMG] block
        tokens = tokens.to(self.device)
        features = self.encode_images(images) if len(images) else None
        h = self.embed(tokens, features)
        meta = AttentionMetadata.for_sequences([tokens.numel()], self.device)
        return self.logits(self.run_decoder(h, meta))


def _token_array(tokens: Sequence[int]) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D array of integer ids, got {tokens.shape} {tokens.dtype}")
        return tokens.astype(np.int64)
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(f"tokens must be a list of token ids, got {type(tokens).__name__}")
    # Every element an int (bools and floats refused: int64 conversion would truncate 1.5 to 1).
    for i, t in enumerate(tokens):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"tokens[{i}] must be an int token id, got {t!r} ({type(t).__name__})")
        if not -2**63 <= t < 2**63:
            raise ValueError(f"tokens[{i}] = {t} is not a token id")
    return np.asarray(tokens, dtype=np.int64).reshape(-1)  # reshape: an empty list gives shape (0,)


def _pixels(index: int, image: ImageLike) -> torch.Tensor:
    """The image as a tensor, refused unless floating point and finite (NaN/inf pixels would turn
    every patch feature, and then the whole prompt's attention, into NaN)."""
    try:
        t = torch.as_tensor(image)
    except (TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"images[{index}] is not an array of pixels ({type(image).__name__}: {e})") from None
    if not t.is_floating_point():
        raise ValueError(f"images[{index}] must hold floating-point pixels (as mistral_common returns "
                         f"them), got {t.dtype}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"images[{index}] holds non-finite pixels (NaN or inf)")
    return t


def check_image_layout(ids: np.ndarray, grids: list[tuple[int, int]], vision) -> None:
    """ValueError unless the image markers in `ids` are exactly one block per grid, in order."""
    img, brk, end = vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id
    markers = np.flatnonzero((ids == img) | (ids == brk) | (ids == end))
    at = 0  # index into markers
    for i, (rows, cols) in enumerate(grids):
        if at == len(markers):
            raise ValueError(f"images[{i}] has a {rows}x{cols} patch grid but the tokens hold no [IMG] block "
                             f"for it ({len(grids)} images, {i} [IMG] blocks)")
        start = int(markers[at])
        expected = np.full(rows * (cols + 1), img, dtype=np.int64)
        expected[cols::cols + 1] = brk
        expected[-1] = end
        found = ids[start:start + expected.size]
        if found.size != expected.size or not np.array_equal(found, expected):
            raise ValueError(f"images[{i}] has a {rows}x{cols} patch grid ({rows * cols} [IMG] tokens) but its "
                             f"[IMG] block at token {start} is {_describe_block(ids, start, img, brk, end)}")
        at += expected.size
    if at < len(markers):
        start = int(markers[at])
        raise ValueError(f"the tokens hold image tokens at position {start} beyond the [IMG] blocks of the "
                         f"{len(grids)} images given ({_describe_block(ids, start, img, brk, end)})")


def _describe_block(ids: np.ndarray, start: int, img: int, brk: int, end: int) -> str:
    """The rows of [IMG] tokens found from `start`, for an error message."""
    rows, count, pos = [], 0, start
    while pos < len(ids):
        t = int(ids[pos])
        if t == img:
            count += 1
        elif t in (brk, end):
            rows.append(count)
            count = 0
            if t == end:
                return f"{len(rows)} rows of {rows} [IMG] tokens ({sum(rows)} in all)"
        else:
            break
        pos += 1
    rows.append(count)
    return (f"rows of {rows} [IMG] tokens ({sum(rows)} in all) not ended by [IMG_END] "
            f"(token {pos} is {int(ids[pos]) if pos < len(ids) else 'the end of the prompt'})")


def build_model(args: ModelArgs, device="meta", dtype=torch.bfloat16, comm: Collectives | None = None) -> Pixtral:
    """The model without weights (meta device: no memory) or with uninitialised ones; with `comm`,
    that rank's tensor-parallel share (a Collectives without groups plans memory only)."""
    with torch.device(device):
        return Pixtral(args, dtype=dtype, comm=comm)
