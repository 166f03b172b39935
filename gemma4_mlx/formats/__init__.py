"""Weight formats: one codec per module, each with a numpy reference decoder.

- `sfp8`: gemma.cpp's switched 8-bit float with a per-tensor scale; LUT reference
  decoder and an MLX-native mxfp8 inference form.
- `q4_0`: ggml Q4_0 blocks, their raw byte layout, the exact mapping onto MLX affine
  (group 32, 4 bits, scale d, bias -8d) and lattice recovery for QAT checkpoints.
- `safetensors`: the header reader shared by the loader, `info` and the mapped PLE table.
- `registry`: one entry per weight format (float, affine, q4_0, sfp8, mxfp4, mxfp8,
  nvfp4): its MLX kernel, bits, group size, biases, per-tensor scale and codec.
"""

from gemma4_mlx.formats import q4_0, registry, sfp8

__all__ = ["sfp8", "q4_0", "registry"]
