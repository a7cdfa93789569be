"""GET /metrics: the service in the Prometheus text format, through prometheus-client.

Names follow vLLM's where one exists (its `vllm:` prefix becomes `streamer:`), so dashboards and
alerts written for vLLM read ours: time_to_first_token_seconds, inter_token_latency_seconds,
e2e_request_latency_seconds, request_queue_time_seconds, num_requests_running / _waiting,
generation_tokens_total, prompt_tokens_total. What only a streaming memory has (sessions, memory
tokens, ingest lag, dropped frames, chunk times, the executor's batch sizes and step times, chunks ingested together) gets
names of its own. Latencies and counters are recorded as they happen (the executor, the sessions);
gauges are read from the service when scraped. Each service has its own registry: several
services in one process (tests, Ray replicas in one worker) never share numbers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, service=None):
        """service: the StreamService whose sessions and executor the gauges read (None: no gauges)."""
        self.registry = registry = CollectorRegistry()

        def histogram(name, text, buckets=LATENCY_BUCKETS):
            return Histogram(f"streamer:{name}", text, buckets=buckets, registry=registry)

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "From a question's arrival to its first answer token.")
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Between consecutive tokens of an answer.", STEP_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "From a question's arrival to its last token.")
        self.queue_time = histogram("request_queue_time_seconds",
                                    "From a question's arrival until the model thread starts on it.")
        self.batch_size = histogram("batch_size", "Answers in each executor step.", BATCH_BUCKETS)
        self.step_seconds = histogram("step_seconds", "Duration of each executor step.", STEP_BUCKETS)
        self.chunk_seconds = histogram("chunk_seconds", "Model time of each ingested chunk "
                                       "(preprocess, vision, prefill, memory policy; ingested together with other "
                                       "sessions' chunks: less the time it waited for theirs).")
        self.ingest_together = histogram("ingest_together", "Chunks of different sessions ingested together, "
                                         "their probe forwards packed (runs of two or more).", BATCH_BUCKETS)
        self.generation_tokens = Counter("streamer:generation_tokens", "Answer tokens generated.", registry=registry)
        self.prompt_tokens = Counter("streamer:prompt_tokens", "Question tokens prefilled.", registry=registry)
        self.frames_ingested = Counter("streamer:frames_ingested", "Frames ingested into memories.",
                                       registry=registry)
        self.frames_dropped = Counter("streamer:frames_dropped", "Frames dropped or thinned because ingestion "
                                      "was behind a live source.", registry=registry)
        if service is not None:
            registry.register(_ServiceGauges(service))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceGauges:
    """Gauges read from the service at scrape time (on the event loop, like every session change)."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []  # collected on scrape only: nothing to check at registration

    def collect(self):
        service = self.service
        executor = service.shared.executor
        sessions = list(service.sessions.values())

        def gauge(name, text, value):
            return GaugeMetricFamily(f"streamer:{name}", text, value=value)

        yield gauge("sessions", "Sessions open.", len(sessions))
        yield gauge("num_requests_running", "Answers being generated (in the executor's batch).",
                    executor.generating())
        yield gauge("num_requests_waiting", "Jobs waiting for the model thread (questions not started, chunks).",
                    executor.waiting())
        memory = [(s.id, s.memory.mean_tokens()) for s in sessions if s.memory is not None]
        yield gauge("memory_tokens_total", "Memory tokens per layer, summed over sessions.",
                    sum(tokens for _, tokens in memory))
        per_session = GaugeMetricFamily("streamer:memory_tokens", "Memory tokens per layer, per session.",
                                        labels=["session"])
        lag_frames = GaugeMetricFamily("streamer:ingest_lag_frames", "Frames received but not in the memory yet.",
                                       labels=["session"])
        lag_seconds = GaugeMetricFamily("streamer:ingest_lag_seconds", "Stream seconds between the newest frame "
                                        "received and the newest frame in the memory.", labels=["session"])
        for s in sessions:
            if s.memory is None:
                continue
            per_session.add_metric([s.id], s.memory.mean_tokens())
            frames, seconds = s.lag()
            lag_frames.add_metric([s.id], frames)
            lag_seconds.add_metric([s.id], seconds)
        yield per_session
        yield lag_frames
        yield lag_seconds
