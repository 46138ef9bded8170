"""The encoder cache: image embeddings (the ViT's, after the adapter and the patch merger) kept by
the image's content hash, so that an image seen again (the next turn of a chat resends it, many
users ask about one document) skips the ViT.

The key is BLAKE2b-256 of the preprocessed pixels with their shape and dtype, computed once per
image on the host (Sequence.image_keys): two different images of the same size never share an
entry. The cache is bounded in bytes; the least recently used entries are evicted when a new one
needs room, and an embedding larger than the whole budget is not kept (its image is encoded every
time, as without a cache). Each rank of a tensor-parallel engine keeps its own copy (the ViT is
replicated): the same prefills in the same order keep the copies equal."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


def image_key(image: torch.Tensor) -> bytes:
    """The content hash of one preprocessed image: its pixels, shape and dtype."""
    pixels = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{tuple(pixels.shape)}|{pixels.dtype}|".encode())
    digest.update(pixels.view(-1).view(torch.uint8).numpy() if pixels.numel() else np.zeros(0, np.uint8))
    return digest.digest()


@dataclass
class EncoderCacheStats:
    hits: int = 0        # images whose embeddings came from the cache
    misses: int = 0      # images encoded by the ViT
    evictions: int = 0   # entries dropped to make room


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.stats = EncoderCacheStats()

    def get(self, key: bytes) -> torch.Tensor | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def put(self, key: bytes, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.stats.evictions += 1
        self.entries[key] = embedding
        self.bytes += size


def encode_images(model, images: list[torch.Tensor], keys: list[bytes] | None,
                  cache: EncoderCache | None) -> torch.Tensor:
    """The packed embeddings of `images` in order (model.encode_images'), those found in `cache`
    by their keys taken from it, the others encoded in one ViT pass (an image repeated in the
    batch is encoded once) and kept."""
    if cache is None or keys is None:
        return model.encode_images(images)
    found = [cache.get(k) for k in keys]
    first_of = {}
    for i, key in enumerate(keys):
        if found[i] is None:
            first_of.setdefault(key, i)
    cache.stats.hits += sum(f is not None for f in found)
    cache.stats.misses += len(first_of)
    if first_of:
        todo = list(first_of.values())
        grids = model.image_grids([images[i] for i in todo])
        fresh = model.encode_images([images[i] for i in todo]).split([r * c for r, c in grids])
        computed = {keys[i]: embedding for i, embedding in zip(todo, fresh)}
        for key, embedding in computed.items():
            cache.put(key, embedding.clone())  # its own storage: a view would keep the whole batch's alive
        found = [f if f is not None else computed[k] for f, k in zip(found, keys)]
    return torch.cat(found)
