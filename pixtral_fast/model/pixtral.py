"""The whole Pixtral model. Attribute names follow Mistral's consolidated checkpoint keys, so a
state dict loads with strict=True and no renaming."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pixtral_fast.config import ModelArgs
from pixtral_fast.model.adapter import VisionLanguageAdapter
from pixtral_fast.model.common import RMSNorm, resolve_backend
from pixtral_fast.model.text import AttentionMetadata, DecoderLayer, KVCache
from pixtral_fast.model.vision import VisionEncoder

ImageLike = torch.Tensor | np.ndarray


class Pixtral(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        t, kw = args.text, dict(device=device, dtype=dtype)
        self.tok_embeddings = nn.Embedding(t.vocab_size, t.dim, **kw)
        self.layers = nn.ModuleList(DecoderLayer(t, **kw) for _ in range(t.n_layers))
        self.norm = RMSNorm(t.dim, t.norm_eps, **kw)
        self.output = nn.Linear(t.dim, t.vocab_size, bias=False, **kw)
        if args.vision is not None:
            self.vision_encoder = VisionEncoder(args.vision, **kw)
            self.vision_language_adapter = VisionLanguageAdapter(args.vision.hidden_size, t.dim, **kw)
        self.backend, self.kernels = resolve_backend("reference", "cpu")

    def set_backend(self, backend: str) -> "Pixtral":
        """'fast' (our kernels), 'reference' (plain PyTorch) or 'auto' (fast where it can run)."""
        self.backend, self.kernels = resolve_backend(backend, self.output.weight.device)
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
        """Adapter outputs for all patches of all images, packed in order: [n_patches, dim]."""
        if self.args.vision is None:
            raise ValueError("this checkpoint has no vision encoder; it cannot take images")
        images = [torch.as_tensor(img) for img in images]
        if not images:
            return torch.empty(0, self.args.text.dim, device=self.device, dtype=self.dtype)
        return self.vision_language_adapter(self.vision_encoder(images, self.kernels))

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

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        vocab = self.args.text.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"tokens must lie in [0, {vocab}); got {tokens.min().item()}..{tokens.max().item()}")

    # -- decoder ----------------------------------------------------------------------------------

    def decode_hidden(self, h: torch.Tensor, meta: AttentionMetadata,
                      kv_caches: Sequence[KVCache] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, meta, self.kernels, None if kv_caches is None else kv_caches[i])
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, images: Sequence[ImageLike] = ()) -> torch.Tensor:
        """Logits float32 [seq, vocab] for one causal sequence, no cache."""
        tokens = torch.as_tensor(tokens).to(self.device)
        self.check_tokens(tokens)
        if tokens.numel() == 0:
            raise ValueError("tokens is empty")
        features = self.encode_images(images) if len(images) else None
        h = self.embed(tokens, features)
        meta = AttentionMetadata.for_sequences([tokens.numel()], self.device)
        return self.logits(self.decode_hidden(h, meta))


def build_model(args: ModelArgs, device="meta", dtype=torch.bfloat16) -> Pixtral:
    """The model without weights (meta device: no memory) or with uninitialised ones."""
    with torch.device(device):
        return Pixtral(args, dtype=dtype)
