"""HF transformers as the end-to-end peer of `pixtral-fast bench`: the same full-size Pixtral
(LlavaForConditionalGeneration, random bf16 weights made on the GPU), time to first token for one
image and greedy decode tokens/s per batch size. Prints JSON; with --out, also writes it there after
each measurement, so that a run cut short keeps what it measured. Run by bench/device_check.sh."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pixtral_fast.benchmark import image_prompt
from pixtral_fast.config import ModelArgs


def hf_model(args: ModelArgs, device):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    t, v = args.text, args.vision
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                          num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                          head_dim=v.head_dim, image_size=v.image_size, patch_size=v.patch_size,
                                          rope_theta=v.rope_theta, hidden_act="silu"),
        text_config=MistralConfig(hidden_size=t.dim, intermediate_size=t.hidden_dim, num_hidden_layers=t.n_layers,
                                  num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads, head_dim=t.head_dim,
                                  vocab_size=t.vocab_size, rope_theta=t.rope_theta, rms_norm_eps=t.norm_eps,
                                  max_position_embeddings=t.max_seq_len, sliding_window=None, tie_word_embeddings=False),
        image_token_index=v.image_token_id, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True)
    with torch.device(device):  # HF's own initialisation, run on the GPU: seconds for 12B
        try:
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = LlavaForConditionalGeneration._from_config(config, torch_dtype=torch.bfloat16)
    return model.eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="also write the report here, refreshed as it goes")
    a = ap.parse_args()
    args = ModelArgs.from_params_json(a.params)
    model = hf_model(args, a.device)
    prompt = image_prompt(a.image_size, args.vision.patch_size)
    ids = torch.tensor([prompt.tokens], device=a.device)
    pixels = prompt.images[0][None].to(a.device, torch.bfloat16)
    sizes = torch.tensor([[a.image_size, a.image_size]], device=a.device)
    report = {"peer": "transformers", "prompt_tokens": len(prompt.tokens)}

    def emit(key, value):
        report[key] = value
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2) + "\n")

    emit("stage", "model built")
    model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, logits_to_keep=1)  # warm-up
    sync()
    t0 = time.perf_counter()
    model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, logits_to_keep=1)
    sync()
    emit("ttft_ms", 1e3 * (time.perf_counter() - t0))
    emit("decode", [])
    for b in a.batch:
        text = torch.randint(1000, args.text.vocab_size, (b, len(prompt.tokens)), device=a.device)
        mask = torch.ones_like(text)
        model.generate(input_ids=text, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids=text, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(input_ids=text, attention_mask=mask, max_new_tokens=a.decode_steps + 1, min_new_tokens=a.decode_steps + 1,
                             do_sample=False)
        sync()
        step = (time.perf_counter() - t0 - prefill) / a.decode_steps
        assert out.shape[1] == text.shape[1] + a.decode_steps + 1
        emit("decode", report["decode"] + [{"batch": b, "context": text.shape[1], "step_ms": 1e3 * step,
                                            "tok_per_s": b / step}])
    emit("stage", "done")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
