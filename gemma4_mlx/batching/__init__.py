"""Continuous batching: requests join a running batch after their prompt is
prefilled (in chunks, between decode rounds) and leave it when they finish, each
with its own sampler, penalties and stop tokens; rounds are plain decode steps or
speculative rounds with an MTP drafter (docs/serving.md)."""

from gemma4_mlx.batching.job import Job, Progress
from gemma4_mlx.batching.scheduler import Scheduler

__all__ = ["Job", "Progress", "Scheduler"]
