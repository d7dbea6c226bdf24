"""Prometheus metrics of one server (its own registry, so several servers in one process never mix)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW_S = 10.0  # tokens/s is measured over this window


class Metrics:
    """Requests, errors by type, queue depth, batch size, tokens/s, time to first token, latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prefix = "imagebind_llm_"
        self.requests = Counter(prefix + "requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter(prefix + "errors", "Error responses by OpenAI error type and code", ["type", "code"],
                              registry=self.registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generated_tokens = Counter(prefix + "generated_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(prefix + "time_to_first_token_seconds", "From request arrival to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.latency = Histogram(prefix + "request_latency_seconds", "From request arrival to the last token",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue_depth = Gauge(prefix + "queue_depth", "Requests waiting for a row", registry=self.registry)
        self.batch_size = Gauge(prefix + "batch_size", "Rows being decoded", registry=self.registry)
        self.tokens_per_second = Gauge(prefix + "tokens_per_second",
                                       f"Tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
                                       registry=self.registry)
        self.tokens_per_second.set_function(self._rate)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def watch(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        """Read queue depth and batch size from the engine at scrape time."""
        self.queue_depth.set_function(waiting)
        self.batch_size.set_function(running)

    def tokens(self, n: int = 1) -> None:
        self.generated_tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
