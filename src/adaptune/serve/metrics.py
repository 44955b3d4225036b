"""The server's Prometheus metrics (``prometheus_client``), in a registry of the server's own: nothing
is registered in the library's process-wide default registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests and their latency (per endpoint, task and status), rows per task, batch sizes,
    queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "adaptune_requests", "HTTP requests answered", ["endpoint", "task", "status"], registry=r
        )
        self.latency = Histogram(
            "adaptune_request_seconds",
            "time from a request's arrival to its answer",
            ["endpoint", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("adaptune_rows", "inputs predicted", ["task"], registry=r)
        self.batch_rows = Histogram(
            "adaptune_batch_rows", "rows in each forward pass of the batcher", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue = Gauge("adaptune_queue_depth", "requests waiting for the batcher", registry=r)
        self.queue.set_function(queue_depth)

    def on_batch(self, rows: int, tasks: list[str]) -> None:
        self.batch_rows.observe(rows)
        for task in set(tasks):
            self.rows.labels(task=task).inc(tasks.count(task))

    def on_request(self, endpoint: str, task: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, task=task, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, task=task).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
