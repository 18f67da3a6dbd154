"""Timing kernels the way the benchmarks here do: calls replayed round-robin inside one CUDA graph, each on
its own copy of the weights (so the copies together outsize L2 and every call reads from memory)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch


def replayed_seconds(calls: list[Callable[[], object]], bytes_per_call: int, graph_bytes: float,
                     max_calls: int, replays: int) -> float:
    """Median seconds of one call when `calls` are replayed round-robin in a CUDA graph that reads about
    `graph_bytes` (at least 4 and at most `max_calls` calls: long enough that the events' overhead is noise),
    timed over `replays` replays."""
    for call in calls:  # compiles outside the capture
        call()
    torch.cuda.synchronize()
    wanted = max(4, min(max_calls, math.ceil(graph_bytes / max(bytes_per_call, 1))))
    rounds = math.ceil(wanted / len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / (rounds * len(calls))
