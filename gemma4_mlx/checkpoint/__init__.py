"""Checkpoints on disk: finding, reading, mapping keys, quantized modules, loading, `info`."""
