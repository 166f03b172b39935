"""The installed package is the one in the repository: every subpackage is listed
for setuptools (an editable install hides a missing one; a wheel would drop it)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gemma4_mlx").rglob("__init__.py")} | {
        "gemma4_mlx.convert"
    }  # convert/ installs under the package (package-dir)
    assert listed == on_disk
