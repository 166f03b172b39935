"""HF -> MLX checkpoint conversion (installed as `gemma4_mlx.convert`)."""
