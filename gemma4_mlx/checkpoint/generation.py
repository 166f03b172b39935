"""A checkpoint's recommended sampling: `generation_config.json` (transformers' file,
copied by `convert`).  The server uses it for the fields a request leaves out, as
other OpenAI-compatible servers do (docs/serving.md §5.4); the CLI and the Python API
stay greedy unless asked.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """None: the file does not say (the API's own default then applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


# field -> (is an integer, lowest, highest): what the samplers accept
_RANGES = {
    "temperature": (False, 0.0, 2.0),
    "top_p": (False, 0.0, 1.0),
    "top_k": (True, 0, None),
    "min_p": (False, 0.0, 1.0),
    "repetition_penalty": (False, 1e-6, None),
}


def _valid(name: str, value) -> bool:
    integral, lo, hi = _RANGES[name]
    if isinstance(value, bool) or not isinstance(value, Integral if integral else Real):
        return False
    return math.isfinite(value) and value >= lo and (hi is None or value <= hi)


def read_generation_defaults(folder: Path) -> GenerationDefaults:
    """The folder's sampling defaults; none without the file.  A field of the wrong
    type or out of range is left out with a warning (the model still loads);
    `do_sample: false` makes the default greedy."""
    path = Path(folder) / FILE
    if not path.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        log.warning("%s: not read (%s); no sampling defaults", path, str(e).splitlines()[0] if str(e) else e)
        return GenerationDefaults()
    if not isinstance(raw, dict):
        log.warning("%s: not a JSON object; no sampling defaults", path)
        return GenerationDefaults()
    found = {}
    for name in _RANGES:
        if name in raw and raw[name] is not None:
            if _valid(name, raw[name]):
                found[name] = raw[name]
            else:
                log.warning("%s: %s %r left out (expected a number in the sampler's range)", path, name, raw[name])
    if raw.get("do_sample") is False:
        found["temperature"] = 0.0
    return GenerationDefaults(**found)
