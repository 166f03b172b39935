"""Prometheus metrics of one server (its own registry, so several apps can live in
one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Scheduler counters read at scrape time: (metric, help, attribute of `batching.Scheduler`)
_SCHEDULER = (
    ("gemma4_decode_rounds", "Decode rounds run so far (plain or speculative)", "rounds"),
    ("gemma4_batch_rows_peak", "Most requests decoded together so far", "peak_batch"),
    ("gemma4_prefill_group_peak", "Most prompts prefilled together in one forward so far", "largest_group"),
)


class Metrics:
    def __init__(self, queue_depth, batch_rows=lambda: 0, prefix_bytes=lambda: 0, scheduler=None):
        """queue_depth: a function giving the requests waiting or running; batch_rows:
        the rows decoding now; prefix_bytes: the prefix pool's KV bytes; scheduler:
        the engine's `Scheduler`, whose counters are exported as gauges."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gemma4_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gemma4_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("gemma4_cached_prompt_tokens", "Prompt tokens from the KV cache", registry=r)
        self.completion_tokens = Counter("gemma4_completion_tokens", "Generated tokens", registry=r)
        self.queue = Gauge("gemma4_queue_depth", "Requests waiting or running", registry=r)
        self.queue.set_function(queue_depth)
        self.rows = Gauge("gemma4_batch_rows", "Requests decoding together now", registry=r)
        self.rows.set_function(batch_rows)
        self.prefix = Gauge("gemma4_prefix_cache_bytes", "KV cache bytes kept for prefix reuse", registry=r)
        self.prefix.set_function(prefix_bytes)
        for name, doc, attr in _SCHEDULER:
            Gauge(name, doc, registry=r).set_function(lambda attr=attr: getattr(scheduler, attr, 0))
        self.ttft = Histogram(
            "gemma4_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )

    def record(self, usage, ttft: float | None) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)
