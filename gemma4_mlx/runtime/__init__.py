"""Running a model: prefill, decode steps, sampling and the plain generation loops."""
