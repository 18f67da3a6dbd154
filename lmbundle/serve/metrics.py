"""What `/health` and `/metrics` report: the worker's queue, the engine's batch and token counts, where the
batch scheduler's time goes, and the prefix cache, read live at each request (one registry per app, so
several servers in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.engine import Engine
from .worker import Worker


def health(name: str, engine: Engine, worker: Worker) -> dict:
    counts = engine.counts()
    cache = counts["cache"]
    return {"status": "ok", "model": name, "running": worker.running, "waiting": worker.waiting,
            "max_batch": worker.max_batch, "queue_size": worker.queue_size, "batch_size": counts["batch_size"],
            "served": worker.served, "stopped": worker.stopped, "failed": worker.failed,
            "tokens": counts["totals"],
            "prefix_cache": None if cache is None else {
                "entries": cache["entries"], "hits": cache.get("hits", 0), "lookups": cache.get("lookups", 0),
                "hit_tokens": cache.get("hit_tokens", 0), "device_bytes": cache["device_bytes"],
                "host_bytes": cache["host_bytes"], "device_budget": cache["device_budget"],
                "host_budget": cache["host_budget"]}}


class _Collector:
    def __init__(self, engine: Engine, worker: Worker):
        self.engine, self.worker = engine, worker

    def collect(self):
        worker, counts = self.worker, self.engine.counts()
        gauges = {"requests_running": ("requests being decoded", worker.running),
                  "requests_waiting": ("requests queued for a slot", worker.waiting),
                  "max_batch": ("slots (--max-batch)", worker.max_batch),
                  "queue_size": ("waiting places (--queue-size)", worker.queue_size),
                  "batch_size": ("sequences in the last decode step", counts["batch_size"])}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"lmbundle_{name}", doc, value=value)
        requests = CounterMetricFamily("lmbundle_requests", "requests ended, by outcome", labels=["outcome"])
        for outcome in ("served", "stopped", "failed"):
            requests.add_metric([outcome], getattr(worker, outcome))
        yield requests
        totals = counts["totals"]
        for name, doc in (("prompt_tokens", "prompt tokens of all requests"),
                          ("cached_tokens", "prompt tokens restored from a cached state, not prefilled"),
                          ("generated_tokens", "tokens generated")):
            yield CounterMetricFamily(f"lmbundle_{name}", doc, value=totals.get(name, 0))
        if (scheduler := counts["scheduler"]) is not None:
            yield CounterMetricFamily("lmbundle_batch_steps", "batched decode steps", value=scheduler["steps"])
            seconds = CounterMetricFamily("lmbundle_scheduler_seconds", "the batch loop thread's time by what it "
                                          "did: admit (restore cached prefixes), prefill (prompt pieces), cache "
                                          "(snapshots), decode (batched steps enqueued, tokens handed out), wait "
                                          "(for a step's tokens), idle", labels=["phase"])
            for phase, value in scheduler["seconds"].items():
                seconds.add_metric([phase], value)
            yield seconds
        cache = counts["cache"]
        if cache is None:
            return
        for name, doc in (("lookups", "prefix cache lookups"), ("hits", "prefix cache hits"),
                          ("hit_tokens", "prompt tokens served by prefix cache hits"),
                          ("inserts", "states put in the prefix cache"),
                          ("spilled", "entries moved from the device to host memory"),
                          ("evicted", "entries dropped for the byte budget"),
                          ("collisions", "digest matches whose tokens differed (never used)")):
            yield CounterMetricFamily(f"lmbundle_prefix_cache_{name}", doc, value=cache.get(name, 0))
        yield GaugeMetricFamily("lmbundle_prefix_cache_entries", "states in the prefix cache", value=cache["entries"])
        used = GaugeMetricFamily("lmbundle_prefix_cache_bytes", "bytes held by the prefix cache", labels=["tier"])
        budget = GaugeMetricFamily("lmbundle_prefix_cache_budget_bytes", "the prefix cache's byte budgets",
                                   labels=["tier"])
        for tier in ("device", "host"):
            used.add_metric([tier], cache[f"{tier}_bytes"])
            budget.add_metric([tier], cache[f"{tier}_budget"])
        yield used
        yield budget


class Metrics:
    """The Prometheus text exposition of one server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine, worker: Worker):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(engine, worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)
