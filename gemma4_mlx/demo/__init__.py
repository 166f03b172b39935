"""The embedded demo model, and the choice of a default model for `gemma4-mlx chat`."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "model"
# its MTP drafter (train_drafter.py), named as the hub names drafters (`<model>-assistant`),
# so the sibling rule of `find_drafter` finds it like any other
DEMO_DRAFTER = Path(__file__).parent / "model-assistant"
DEFAULT_REPO = "google/gemma-4-E2B-it"


def default_model() -> tuple[str, str]:
    """(path or repo id, banner line): a real checkpoint when one is cached or
    reachable, otherwise the embedded demo model.  Never blocks for long offline."""
    try:
        from huggingface_hub import snapshot_download

        # Cached (and complete) already?
        path = snapshot_download(DEFAULT_REPO, local_files_only=True)
        return path, f"model: {DEFAULT_REPO} (cached)"
    except Exception:
        pass
    if not os.environ.get("HF_HUB_OFFLINE") and not os.environ.get("GEMMA4_MLX_OFFLINE"):
        try:
            from huggingface_hub import model_info

            model_info(DEFAULT_REPO, timeout=3)
            return DEFAULT_REPO, f"model: {DEFAULT_REPO} (downloading from the Hugging Face Hub)"
        except Exception:
            pass
    return str(DEMO_MODEL), ("model: embedded demo (~1M parameters; knows capitals, small sums "
                             "and a weather tool). Use --model for a real Gemma 4 checkpoint.")
