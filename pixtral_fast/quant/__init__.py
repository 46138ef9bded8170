"""Quantized weights in the compressed-tensors format: config parsing (config.py), the packed
tensor formats and round-to-nearest quantizers (formats.py), and the dequantize-then-matmul
oracles (reference.py); describe_scheme says which scheme and kernels a model runs. The
kernels that read these formats live in pixtral_fast.kernels (w4a16_linear, fp8_linear)."""
from pixtral_fast.quant.config import (  # noqa: F401
    ACT_FP8_DYNAMIC_TOKEN,
    ACT_NONE,
    QuantConfig,
    QuantConfigError,
    QuantGroup,
    WeightScheme,
    parse_quantization_config,
)
from pixtral_fast.quant.describe import describe_scheme  # noqa: F401
from pixtral_fast.quant.formats import (  # noqa: F401
    FP8_DTYPE,
    FP8_MAX,
    pack_int4,
    packed_words,
    quantize_fp8,
    quantize_w4a16,
    unpack_int4,
)
