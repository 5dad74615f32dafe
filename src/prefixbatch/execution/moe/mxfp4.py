"""MXFP4 weights dequantised at load (OCP Microscaling Formats (MX) v1.0 specification, 2023;
the format gpt-oss checkpoints store their experts in).

A block of 32 consecutive values along a row shares one scale: each value is an FP4 E2M1 number
(1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two per
byte with the lower nibble first; the scale is an E8M0 byte ``s``, the power of two
``2 ** (s - 127)``. A checkpoint tensor ``*_blocks`` (..., G, 16) uint8 holds G blocks per
row, ``*_scales`` (..., G) uint8 their scales; the row has G * 32 values.
"""

from __future__ import annotations

import torch

# FP4 E2M1 by its 4-bit code: sign bit 3, then exponent and mantissa
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES += tuple(-v for v in E2M1_VALUES)
E8M0_BIAS = 127


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks (..., G, 16) uint8 and scales (..., G) uint8 -> values (..., G * 32) in ``dtype``.
    Raises ValueError when the shapes do not pair up."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}"
        )
    codes = blocks.to(torch.uint8)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), dim=-1)
    exponents = scales.to(torch.int32) - E8M0_BIAS  # (..., G)
    values = torch.ldexp(values.flatten(-2), exponents[..., None])  # (..., G, 32)
    return values.flatten(-2).to(dtype)
