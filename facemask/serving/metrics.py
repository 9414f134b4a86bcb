"""Prometheus metrics of one app, kept in the app's own registry."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from facemask.serving.served_model import ServedModel

# Seconds; spans a cached small image (a few ms) to a slow batch on a busy CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Model inputs per call; powers of two up to the largest useful micro-batch.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """Request, prediction and model metrics.

    A registry per instance keeps apps created in one process (tests, reloads) from
    registering the same metric names twice in prometheus_client's global registry.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, bundle: ServedModel):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "facemask_http_requests",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "facemask_http_request_duration_seconds",
            "Time from receiving a request to sending the end of its response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "facemask_predictions",
            "Images classified, by predicted image-level class.",
            ["label"],
            registry=self.registry,
        )
        self.faces = Counter(
            "facemask_faces",
            "Faces classified, by predicted class; an image without a face found counts once.",
            ["label"],
            registry=self.registry,
        )
        self.images_without_face = Counter(
            "facemask_images_without_face",
            "Images in which the face stage found no face, so the whole image was classified.",
            registry=self.registry,
        )
        self.rejected_inputs = Counter(
            "facemask_rejected_inputs",
            "Uploads rejected before prediction, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.prediction_log_failures = Counter(
            "facemask_prediction_log_failures",
            "Prediction log lines that could not be written.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "facemask_inference_batch_size",
            "Model inputs (face crops or whole images) per model call of the micro-batcher.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "facemask_inference_batch_duration_seconds",
            "Duration of one model call, from its start in a worker thread to its results.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "facemask_model_info",
            "The served model; the value is always 1.",
            ["name", "version", "alias", "run_id", "uri", "runtime"],
            registry=self.registry,
        )
        self.model_info.labels(
            name=bundle.name or "",
            version=bundle.version or "",
            alias=bundle.alias or "",
            run_id=bundle.run_id or "",
            uri=bundle.uri,
            runtime=bundle.runtime,
        ).set(1)
        for label in bundle.class_names:
            self.predictions.labels(label=label)
            self.faces.labels(label=label)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and record its latency."""
        self.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_prediction(self, label: str, face_counts: Mapping[str, int]) -> None:
        """Count one classified image and its faces per class."""
        self.predictions.labels(label=label).inc()
        for face_label, count in face_counts.items():
            if count:
                self.faces.labels(label=face_label).inc(count)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record the size and duration of one model call."""
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
