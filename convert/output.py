"""What every conversion writes, shared by the HF converter (`core`) and the GGUF
importer (`gguf`): the `Report`, output shards, the shard index, the progress bar."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

INDEX = "model.safetensors.index.json"


@dataclass
class Report:
    dst: Path
    recipe: str
    tensors: dict = field(default_factory=dict)  # module path -> entry (as in config.json)
    skipped: dict = field(default_factory=dict)  # what was left out, with counts
    converted: list = field(default_factory=list)  # "text", "vision", "audio" (or "drafter")
    processor_config: str | None = None  # what the converter changed in processor_config.json
    bytes_in: int = 0
    bytes_out: int = 0
    largest_shard: int = 0  # bytes of the largest source shard
    peak_mlx: int = 0  # MLX allocator high-water mark over the run, above what was in use before, bytes
    peak_rss: int = 0  # process max RSS after the run, bytes (includes everything before)

    def lattice_fraction(self) -> float | None:
        """Fraction of Q4_0 blocks recovered exactly, over all q4_0 tensors."""
        v = [e["lattice_exact"] for e in self.tensors.values() if "lattice_exact" in e]
        return sum(v) / len(v) if v else None


def write_shard(path: Path, tensors: dict[str, mx.array]) -> None:
    """Write one output shard (a module-level name, so tests can inject failures)."""
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json for a sharded output: tensor name -> shard file."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class Progress:
    """A rich progress bar over source bytes on stderr; `with Progress(...) as advance:`
    gives `advance(n_bytes)` (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        # rich is imported only when a bar is shown (the library API and the tests never need it)
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("converting"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task("convert", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
        return False
