"""Injected failures for the crash-safety tests of the converter."""

from __future__ import annotations

import pytest

from gemma4_mlx.convert import core


def convert_fails_at_second_shard(monkeypatch, convert_call) -> list:
    """Run `convert_call()` with the converter's second shard write raising; check it
    raises and leaves neither DST nor DST.partial.  Returns the shard paths written
    (the patch stays in place until the test ends)."""
    calls, real = [], core.write_shard

    def flaky(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full (injected)")
        real(path, tensors)

    monkeypatch.setattr(core, "write_shard", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        convert_call()
    assert len(calls) == 2
    return calls
