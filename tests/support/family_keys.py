"""The tensor table of a Pixtral-family params.json, written from DESIGN §1 and issue 10 by hand,
independently of the model code: Mistral consolidated key -> shape. Tests compare the model's
state dict against it and count parameters from it."""
from __future__ import annotations

import json
import math
from pathlib import Path

FIXTURES = Path(__file__).parent.parent / "fixtures"
VARIANT_DIRS = {
    "mistral-small-3.1": FIXTURES / "mistral-small-3.1-2503",
    "mistral-small-3.2": FIXTURES / "mistral-small-3.2-2506",
    "pixtral-large": FIXTURES / "pixtral-large-2411",
}
# Published totals (model cards): Small 3.1/3.2 "24B", Pixtral-Large "124B".
PUBLISHED_BILLIONS = {"mistral-small-3.1": 24.0, "mistral-small-3.2": 24.0, "pixtral-large": 124.0}


def read_params(variant: str) -> dict:
    return json.loads((VARIANT_DIRS[variant] / "params.json").read_text())


def key_table(p: dict) -> dict[str, tuple[int, ...]]:
    dim, hd, nh, nkv, hid, vocab = (p["dim"], p["head_dim"], p["n_heads"], p["n_kv_heads"], p["hidden_dim"],
                                    p["vocab_size"])
    t = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(p["n_layers"]):
        q = f"layers.{i}."
        t.update({q + "attention.wq.weight": (nh * hd, dim), q + "attention.wk.weight": (nkv * hd, dim),
                  q + "attention.wv.weight": (nkv * hd, dim), q + "attention.wo.weight": (dim, nh * hd),
                  q + "feed_forward.w1.weight": (hid, dim), q + "feed_forward.w3.weight": (hid, dim),
                  q + "feed_forward.w2.weight": (dim, hid),
                  q + "attention_norm.weight": (dim,), q + "ffn_norm.weight": (dim,)})
    v = p.get("vision_encoder")
    if v is None:
        return t
    h, ps, ff = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    t.update({"vision_encoder.patch_conv.weight": (h, v.get("num_channels", 3), ps, ps),
              "vision_encoder.ln_pre.weight": (h,)})
    for j in range(v["num_hidden_layers"]):
        q = f"vision_encoder.transformer.layers.{j}."
        t.update({q + f"attention.w{x}.weight": (h, h) for x in "qkvo"})
        t.update({q + "feed_forward.w1.weight": (ff, h), q + "feed_forward.w3.weight": (ff, h),
                  q + "feed_forward.w2.weight": (h, ff),
                  q + "attention_norm.weight": (h,), q + "ffn_norm.weight": (h,)})
    if v.get("add_pre_mm_projector_layer_norm", False):
        t["pre_mm_projector_norm.weight"] = (h,)
    m = v.get("spatial_merge_size", 1)
    if v.get("mm_projector_id", "") == "patch_merge":
        t["patch_merger.merging_layer.weight"] = (h, h * m * m)
    t.update({"vision_language_adapter.w_in.weight": (dim, h), "vision_language_adapter.w_out.weight": (dim, dim)})
    if v.get("adapter_bias", True):
        t.update({"vision_language_adapter.w_in.bias": (dim,), "vision_language_adapter.w_out.bias": (dim,)})
    return t


def count(table: dict[str, tuple[int, ...]], prefixes: tuple[str, ...] = ("",)) -> int:
    return sum(math.prod(s) for k, s in table.items() if k.startswith(prefixes))


if __name__ == "__main__":  # python tests/support/family_keys.py: the counts quoted in the SOURCES.md files
    for name in VARIANT_DIRS:
        table = key_table(read_params(name))
        total = count(table)
        vision = count(table, ("vision_encoder.",))
        adapter = count(table, ("vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm."))
        print(f"{name}: total {total:,} ({total / 1e9:.2f}B; published {PUBLISHED_BILLIONS[name]}B), "
              f"text {total - vision - adapter:,}, vision {vision:,}, merger+norm+adapter {adapter:,}")
