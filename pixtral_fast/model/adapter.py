"""The vision-language adapter: ViT features (1024) -> decoder embeddings (5120). Pixtral-12B's has
biases; Mistral-Small-3.x's and Pixtral-Large's (adapter_bias false) do not."""
import torch
import torch.nn.functional as F
from torch import nn


class VisionLanguageAdapter(nn.Module):
    """w_out(gelu_erf(w_in x + b_in)) + b_out (the biases only with bias=True)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.w_in = nn.Linear(in_dim, dim, bias=bias, device=device, dtype=dtype)
        self.w_out = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))
