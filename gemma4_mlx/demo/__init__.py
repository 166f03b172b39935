"""The embedded demo model, and the choice of a default model for `gemma4-mlx chat`."""

from __future__ import annotations

import os
from pathlib import Path

from gemma4_mlx.checkpoint.store import converted_from

DEMO_MODEL = Path(__file__).parent / "gemma-4-demo"
# its MTP drafter (train_drafter.py), named as the hub names drafters (`<model>-assistant`),
# so the sibling rule of `find_drafter` finds it like any other
DEMO_DRAFTER = Path(__file__).parent / "gemma-4-demo-assistant"
DEFAULT_REPO = "google/gemma-4-E2B-it"
DEFAULT_SHORT = "e2b-it"  # its short name (`checkpoint.hub.SHORT_NAMES`)
# What the demo answers reliably.  Not sums: asked "What is x plus y?" for x, y up to 20
# it answers wrong about half the time (it still claims it can add when greeted).
DEMO_KNOWS = "capitals, greetings and a get_weather tool"


def _offline_setting() -> str | None:
    for var in ("HF_HUB_OFFLINE", "GEMMA4_MLX_OFFLINE"):
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return var
    return None


def demo_banner(why: str) -> str:
    return (
        f"model: embedded demo (~1M parameters; knows only {DEMO_KNOWS}): {why}. "
        f"For the real model: gemma4-mlx pull {DEFAULT_SHORT} (or --model PATH)."
    )


def default_model() -> tuple[str, str]:
    """(path or repo id, banner line): a real checkpoint when one is pulled, cached or
    reachable, otherwise the embedded demo model, with the reason.  Never blocks for
    long offline."""
    pulled = converted_from(DEFAULT_REPO)  # `gemma4-mlx pull e2b-it --quant ...`
    if pulled:
        return str(pulled[0]), f"model: {pulled[0].name} (converted from {DEFAULT_REPO})"
    try:
        from huggingface_hub import snapshot_download

        # Cached (and complete) already?
        path = snapshot_download(DEFAULT_REPO, local_files_only=True)
        return path, f"model: {DEFAULT_REPO} (cached)"
    except Exception:
        pass
    offline = _offline_setting()
    if offline:
        return str(DEMO_MODEL), demo_banner(f"{DEFAULT_REPO} is not on this machine and {offline} is set")
    try:
        from huggingface_hub import model_info

        model_info(DEFAULT_REPO, timeout=3)
        return DEFAULT_REPO, f"model: {DEFAULT_REPO} (downloading from the Hugging Face Hub)"
    except Exception as e:
        why = f"{DEFAULT_REPO} is not on this machine and the Hugging Face Hub did not answer ({type(e).__name__})"
    return str(DEMO_MODEL), demo_banner(why)
