"""The FastAPI app on a real registered model, through Starlette's TestClient."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from facemask.data.images import decode_image
from facemask.data.transforms import (
    Preprocessing,
    build_eval_transform,
    image_to_tensor,
    preprocess_file,
)
from facemask.models.classifier import FaceMaskClassifier
from facemask.serving.app import create_app
from facemask.serving.batching import BatcherStoppedError, MicroBatcher
from facemask.serving.preprocessing import EvalPreprocessing
from facemask.serving.runtimes import TorchModel
from facemask.serving.served_model import ServedModel, load_served_model
from facemask.serving.settings import ServeSettings
from tests.conftest import TrainedModel, encode_image

# Real photos in the formats and modes of the data set: a small and a 4912-pixel-wide JPEG (the
# second one decodes through the JPEG draft path), an RGBA PNG, a palette PNG and a WEBP file
# without an image extension.
REAL_FILES = (
    "no_mask/0_0_aidai_0014.jpg",
    "mask/with_mask104.jpg",
    "mask/Screenshot (251).png",
    "mask/with_mask014.png",
    "mask/black3.jpg_1088Wx1632H",
)
IMAGE_SIZE = 64  # data.image_size of the `trained_model` fixture


@pytest.fixture(scope="module")
def bundle(trained_model: TrainedModel) -> ServedModel:
    return load_served_model(trained_model.alias_uri, trained_model.tracking_uri, runtime="torch")


@pytest.fixture(scope="module")
def reference_model(trained_model: TrainedModel) -> torch.nn.Module:
    module = FaceMaskClassifier.load_from_checkpoint(
        trained_model.best_checkpoint, pretrained=False, weights_only=True
    )
    return module.probability_model().eval()


@pytest.fixture
def make_client(
    bundle: ServedModel, trained_model: TrainedModel, tmp_path: Path
) -> Iterator[Callable[..., TestClient]]:
    """Return a factory of started TestClients; keyword arguments override ServeSettings."""
    clients: list[TestClient] = []

    def factory(model_bundle: ServedModel | None = None, **overrides: object) -> TestClient:
        values = {
            "model_uri": trained_model.alias_uri,
            "tracking_uri": trained_model.tracking_uri,
            "prediction_log": tmp_path / "predictions.jsonl",
            **overrides,
        }
        app = create_app(ServeSettings(**values), model_bundle or bundle)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def _log_lines(client: TestClient) -> list[dict]:
    path: Path = client.app.state.settings.prediction_log
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _post_file(client: TestClient, data: bytes, name: str = "upload.jpg", **kwargs):
    return client.post(
        "/predict", files={"file": (name, data, "application/octet-stream")}, **kwargs
    )


def _png_declaring(width: int, height: int) -> bytes:
    """Return a 1x1 PNG whose header is rewritten to declare `width` x `height` pixels."""
    png = bytearray(encode_image(Image.new("L", (1, 1)), "PNG"))
    ihdr_data = bytes(png[16:29])
    patched = struct.pack(">II", width, height) + ihdr_data[8:]
    png[16:29] = patched
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + patched))
    return bytes(png)


def _animated_gif() -> tuple[bytes, bytes]:
    """Return a red-then-blue animated GIF and a PNG of its red first frame."""
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    blue = Image.new("RGB", (32, 32), (0, 0, 255))
    gif = encode_image(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    return gif, encode_image(red, "PNG")


def test_health_ready_and_info(make_client, bundle: ServedModel, trained_model: TrainedModel):
    app = create_app(
        ServeSettings(model_uri="unused", tracking_uri="unused", prediction_log=Path("unused")),
        bundle,
    )
    not_started = TestClient(app)
    assert not_started.get("/health").json() == {"status": "ok"}
    assert not_started.get("/ready").status_code == 503
    assert _post_file(not_started, b"x").status_code == 503

    client = make_client()
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()
    assert info["name"] == trained_model.model_name
    assert info["version"] == trained_model.version
    assert info["alias"] == trained_model.alias
    assert info["run_id"] == trained_model.run_id
    assert info["classes"] == ["mask", "no_mask"]
    assert info["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert info["preprocessing"]["image_size"] == IMAGE_SIZE
    assert 0.0 <= info["test_metrics"]["test/acc"] <= 1.0
    assert info["face_stage"]["enabled"] is True
    assert info["face_stage"]["detector"] == "blazeface_short_range"
    assert info["face_stage"]["settings"]["margin"] == 0.25
    assert make_client(faces=False).get("/info").json()["face_stage"]["enabled"] is False
    assert client.get("/docs").status_code == 200
    assert "/predict/batch" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("switch", ["setting", "query"])
@pytest.mark.parametrize("relative_path", REAL_FILES)
def test_predict_without_faces_matches_trained_module(
    make_client,
    reference_model,
    bundle: ServedModel,
    real_data_root: Path,
    relative_path: str,
    switch: str,
):
    # With the face stage off, by setting or per request, the whole image is classified as
    # training's test stage preprocesses it.
    path = real_data_root / relative_path
    if switch == "setting":
        response = _post_file(make_client(faces=False), path.read_bytes(), name=path.name)
    else:
        params = {"faces": "false"}
        response = _post_file(make_client(), path.read_bytes(), name=path.name, params=params)

    assert response.status_code == 200, response.text
    body = response.json()
    pre = Preprocessing(image_size=IMAGE_SIZE)
    assert bundle.preprocessing.to_dict() == pre.to_dict()
    with torch.inference_mode():
        expected = reference_model(preprocess_file(path, pre).unsqueeze(0))[0]
    served = torch.tensor([body["mask"], body["no_mask"]])
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert body["mask"] + body["no_mask"] == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == ["mask", "no_mask"][int(served.argmax())]
    assert body["model_version"] == bundle.version
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert body["face_found"] is False
    assert body["face_search"] is False
    [whole] = body["faces"]
    with Image.open(path) as img:
        width, height = img.size
    assert whole["box"] == [0.0, 0.0, width, height]
    assert whole["score"] == 0.0
    assert whole["probabilities"] == {"mask": body["mask"], "no_mask": body["no_mask"]}
    assert body["counts"] == {"mask": 0, "no_mask": 0, body["label"]: 1}


def test_predict_logs_one_line(client, real_data_root: Path, bundle: ServedModel):
    path = real_data_root / REAL_FILES[0]
    response = _post_file(client, path.read_bytes())

    [line] = _log_lines(client)
    body = response.json()
    assert line["request_id"] == body["request_id"]
    assert line["model_name"] == bundle.name
    assert line["model_version"] == bundle.version
    assert line["probabilities"] == {"mask": body["mask"], "no_mask": body["no_mask"]}
    assert line["label"] == body["label"]
    assert line["face_counts"] == body["counts"]
    assert line["face_found"] == body["face_found"]
    assert line["latency_ms"] > 0
    assert line["timestamp"].endswith("+00:00")
    with Image.open(path) as img:
        assert (line["input"]["width"], line["input"]["height"]) == img.size
    assert line["input"]["format"] == "JPEG"
    assert 0.0 <= line["input"]["brightness"] <= 1.0


@pytest.mark.parametrize(
    "name",
    [
        "png_named.jpg",
        "webp_no_extension",
        "rgba.png",
        "palette_transparent.png",
        "grey.png",
        "grey16.png",
        "cmyk.jpg",
        "rotated_exif6.jpg",
    ],
)
def test_predict_unusual_images(client, odd_image_files: dict[str, bytes], name: str):
    response = _post_file(client, odd_image_files[name], name=name)

    assert response.status_code == 200, response.text
    assert response.json()["mask"] + response.json()["no_mask"] == pytest.approx(1.0, abs=1e-5)
    [line] = _log_lines(client)
    if name == "rotated_exif6.jpg":
        assert (line["input"]["width"], line["input"]["height"]) == (20, 40)
    if name == "cmyk.jpg":
        assert line["input"]["mode"] == "CMYK"
    if name == "grey16.png":
        assert line["input"]["mode"].startswith("I")


def test_predict_animated_gif_uses_first_frame(client):
    gif, first_frame = _animated_gif()

    from_gif = _post_file(client, gif, name="anim.gif").json()
    from_png = _post_file(client, first_frame, name="red.png").json()

    assert from_gif["mask"] == pytest.approx(from_png["mask"], abs=1e-6)
    assert _log_lines(client)[0]["input"]["format"] == "GIF"


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("empty.jpg", 400, "empty_file"),
        ("text.jpg", 415, "unsupported_image"),
        ("truncated.jpg", 400, "invalid_image"),
    ],
)
def test_predict_rejects_broken_files(
    client, broken_image_files: dict[str, bytes], tmp_path: Path, name, status, code
):
    response = _post_file(client, broken_image_files[name], name=name)

    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert str(tmp_path) not in error["message"]
    assert "Traceback" not in response.text
    if code != "empty_file":
        assert "JPEG, PNG, WEBP" in error["message"]
    assert _log_lines(client) == []


@pytest.mark.parametrize("side", [8_000, 30_000])
def test_predict_rejects_huge_declared_size(client, side: int):
    # 8000^2 passes Pillow's own bomb check and hits max_pixels; 30000^2 trips Pillow's check.
    response = _post_file(client, _png_declaring(side, side), name="bomb.png")

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "image_too_large"
    assert _log_lines(client) == []


def test_predict_rejects_upload_over_limit(make_client):
    client = make_client(max_upload_bytes=50_000)

    # Inside the multipart allowance, so rejected by the per-file size check.
    slightly_over = _post_file(client, b"\xff" * 50_001)
    # Over the body limit, so rejected by the declared Content-Length.
    far_over = _post_file(client, b"\xff" * 200_000)

    for response in (slightly_over, far_over):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "upload_too_large"
    assert _log_lines(client) == []


def _multipart_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"multipart/form-data; boundary=B"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def _call_asgi(app, scope: dict, chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """Send `chunks` as the body of `scope`; return status, JSON body and chunks read."""
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        chunk = next(chunks, None)
        read += 1
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), read


def test_upload_limit_checks_content_length(make_client):
    app = make_client(max_upload_bytes=10_000).app
    scope = _multipart_scope([(b"content-length", b"1000000000")])

    status, body, read = _call_asgi(app, scope, iter([b"x" * 1000] * 10))

    assert status == 413
    assert body["error"]["code"] == "upload_too_large"
    assert read == 0


def test_upload_limit_stops_reading_chunked_body(make_client):
    app = make_client(max_upload_bytes=10_000).app
    head = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    # 8 KiB chunks without Content-Length; 1,000 of them would be 8 MB.
    chunks = iter([head] + [b"x" * 8192] * 1000)

    status, body, read = _call_asgi(app, _multipart_scope([]), chunks)

    assert status == 413
    assert body["error"]["code"] == "upload_too_large"
    assert read < 10


def test_predict_requires_file_field(client):
    response = client.post("/predict", files={"image": ("a.jpg", b"abc", "image/jpeg")})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "'file'" in error["message"]


def test_predict_batch_keeps_order_and_errors(
    client, real_data_root: Path, broken_image_files: dict[str, bytes], odd_image_files
):
    photo = (real_data_root / REAL_FILES[0]).read_bytes()
    files = [
        ("files", ("photo.jpg", photo, "image/jpeg")),
        ("files", ("text.jpg", broken_image_files["text.jpg"], "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("rgba.png", odd_image_files["rgba.png"], "image/png")),
    ]

    response = client.post("/predict/batch", files=files)

    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [result["filename"] for result in results] == [name for _, (name, _, _) in files]
    assert results[0]["label"] in ("mask", "no_mask")
    assert results[1]["error"]["code"] == "unsupported_image"
    assert results[2]["error"]["code"] == "empty_file"
    assert results[3]["mask"] + results[3]["no_mask"] == pytest.approx(1.0, abs=1e-5)
    single = _post_file(client, photo).json()
    assert results[0]["mask"] == pytest.approx(single["mask"], abs=1e-5)
    lines = _log_lines(client)
    assert [line.get("batch_index") for line in lines] == [0, 3, None]
    assert {line["request_id"] for line in lines[:2]} == {body["request_id"]}


def test_predict_batch_rejects_too_many_files(make_client, odd_image_files):
    client = make_client(max_batch_files=3)
    files = [("files", (f"{i}.png", odd_image_files["grey.png"], "image/png")) for i in range(4)]

    response = client.post("/predict/batch", files=files)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_files"
    assert _log_lines(client) == []


def test_request_id_header_and_access_log(client, odd_image_files, caplog):
    caplog.set_level(logging.INFO, logger="facemask.serving")

    supplied = _post_file(client, odd_image_files["grey.png"], headers={"X-Request-ID": "abc-123"})
    forged = client.get("/health", headers={"X-Request-ID": "bad id\nstatus=200"})

    assert supplied.headers["X-Request-ID"] == "abc-123"
    assert supplied.json()["request_id"] == "abc-123"
    assert _log_lines(client)[0]["request_id"] == "abc-123"
    assert len(forged.headers["X-Request-ID"]) == 32
    access = [r.getMessage() for r in caplog.records if r.name == "facemask.serving"]
    assert any(
        "request_id=abc-123" in m and "method=POST" in m and "status=200" in m for m in access
    )


def test_metrics_count_requests_and_predictions(client, bundle: ServedModel):
    # A flat image has no face, so it is classified whole and counts as one face.
    flat = encode_image(Image.new("RGB", (64, 48), (128, 128, 128)), "PNG")
    label = _post_file(client, flat).json()["label"]
    _post_file(client, b"not an image")

    text = client.get("/metrics").text

    assert f'facemask_predictions_total{{label="{label}"}} 1.0' in text
    assert f'facemask_faces_total{{label="{label}"}} 1.0' in text
    assert "facemask_images_without_face_total 1.0" in text
    assert (
        'facemask_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0' in text
    )
    assert 'facemask_rejected_inputs_total{code="unsupported_image"} 1.0' in text
    assert f'version="{bundle.version}"' in text
    assert "facemask_http_request_duration_seconds_bucket" in text


class _SlowModel:
    """Wraps a runtime; once `slow` is set, each call signals `started` and sleeps."""

    name = "slow"

    def __init__(self, inner, delay: float):
        self.inner = inner
        self.delay = delay
        self.slow = False
        self.started = threading.Event()
        self.batch_sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        if self.slow:
            self.started.set()
            time.sleep(self.delay)
        return self.inner(batch)


def test_health_answers_while_predict_is_busy(make_client, bundle, odd_image_files):
    slow = _SlowModel(bundle.model, delay=2.0)
    client = make_client(dataclasses.replace(bundle, model=slow))
    slow.slow = True
    statuses: list[int] = []
    worker = threading.Thread(
        target=lambda: statuses.append(_post_file(client, odd_image_files["grey.png"]).status_code)
    )

    worker.start()
    assert slow.started.wait(timeout=10)
    start = time.perf_counter()
    health = client.get("/health")
    elapsed = time.perf_counter() - start
    worker.join(timeout=20)

    assert health.status_code == 200
    assert elapsed < 1.0
    assert statuses == [200]


class _FailingModel:
    name = "failing"

    def __init__(self, inner):
        self.inner = inner
        self.fail = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("simulated failure inside the model")
        return self.inner(batch)


def test_unexpected_error_is_json_500(make_client, bundle, odd_image_files, caplog):
    failing = _FailingModel(bundle.model)
    client = make_client(dataclasses.replace(bundle, model=failing))
    failing.fail = True

    response = _post_file(client, odd_image_files["grey.png"])

    assert response.status_code == 500
    request_id = response.headers["X-Request-ID"]
    assert response.json()["error"]["code"] == "internal_error"
    assert request_id in response.json()["error"]["message"]
    assert "simulated failure" not in response.text
    assert any(request_id in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_prediction_log_failure_keeps_200(make_client, tmp_path: Path, odd_image_files, caplog):
    # A directory where the log file should be makes every write fail.
    log_path = tmp_path / "log-is-a-directory"
    log_path.mkdir()
    client = make_client(prediction_log=log_path)

    response = _post_file(client, odd_image_files["grey.png"])

    assert response.status_code == 200
    request_id = response.json()["request_id"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(request_id in r.getMessage() for r in errors)
    assert "facemask_prediction_log_failures_total 1.0" in client.get("/metrics").text


def test_two_apps_in_one_process(make_client, odd_image_files):
    first, second = make_client(), make_client()

    _post_file(first, odd_image_files["grey.png"])

    assert "facemask_predictions_total" in second.get("/metrics").text
    assert 'endpoint="/predict"' not in second.get("/metrics").text


@pytest.mark.parametrize("size", [64, 224])
def test_eval_preprocessing_matches_albumentations(
    real_data_root: Path, odd_image_files: dict[str, bytes], size: int
):
    pre = Preprocessing(image_size=size)
    transform = build_eval_transform(pre)
    preprocessing = EvalPreprocessing.from_dict(pre.to_dict())
    sources = [real_data_root / name for name in REAL_FILES] + list(odd_image_files.values())

    assert preprocessing.to_dict() == pre.to_dict()
    for source in sources:
        image = decode_image(source, draft_size=pre.draft_size).image
        expected = image_to_tensor(image, transform).numpy()
        actual = preprocessing.apply(image)
        assert actual.dtype == np.float32
        np.testing.assert_array_equal(actual, expected)


def test_eval_preprocessing_rejects_invalid_metadata():
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        EvalPreprocessing.from_dict({"image_size": 64, "crop": 0.9})
    with pytest.raises(ValueError, match="resize mode"):
        EvalPreprocessing.from_dict({"image_size": 64, "resize": "pad"})
    with pytest.raises(ValueError, match="at least 16"):
        EvalPreprocessing.from_dict({"image_size": 8})


def test_torch_bfloat16_close_to_float32(bundle: ServedModel, real_data_root: Path):
    reduced = TorchModel(bundle.model.module, "bfloat16")
    batch = np.stack(
        [
            bundle.preprocessing.apply(
                decode_image(real_data_root / name, draft_size=IMAGE_SIZE).image
            )
            for name in REAL_FILES
        ]
    )

    difference = np.abs(reduced(batch) - bundle.model(batch)).max()

    assert 0 < difference < 0.02


def test_concurrent_predictions_share_batches(make_client, bundle, odd_image_files):
    slow = _SlowModel(bundle.model, delay=0.5)
    client = make_client(dataclasses.replace(bundle, model=slow), max_batch_size=16)
    slow.batch_sizes.clear()
    slow.slow = True
    statuses: list[int] = []

    def post() -> None:
        statuses.append(_post_file(client, odd_image_files["grey.png"]).status_code)

    first = threading.Thread(target=post)
    first.start()
    assert slow.started.wait(timeout=10)
    # These arrive while the first call sleeps, so they queue up for the next call.
    others = [threading.Thread(target=post) for _ in range(7)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=30)

    assert statuses == [200] * 8
    assert slow.batch_sizes == [1, 7]
    metrics = client.get("/metrics").text
    assert "facemask_inference_batch_size_count 2.0" in metrics
    assert "facemask_inference_batch_size_sum 8.0" in metrics
    assert 'facemask_inference_batch_size_bucket{le="1.0"} 1.0' in metrics


def test_batch_request_respects_max_batch_size(make_client, bundle, odd_image_files):
    counting = _SlowModel(bundle.model, delay=0.0)
    client = make_client(dataclasses.replace(bundle, model=counting), max_batch_size=3)
    counting.batch_sizes.clear()
    files = [("files", (f"{i}.png", odd_image_files["grey.png"], "image/png")) for i in range(7)]

    response = client.post("/predict/batch", files=files)

    assert response.status_code == 200
    assert len(response.json()["results"]) == 7
    assert counting.batch_sizes == [3, 3, 1]


def _run_batcher(scenario: Callable[[MicroBatcher], Any], run_batch, **options) -> Any:
    async def main() -> Any:
        batcher = MicroBatcher(run_batch, **{"max_batch_size": 16, "max_wait_s": 0.0, **options})
        batcher.start()
        try:
            with anyio.fail_after(20):
                return await scenario(batcher)
        finally:
            await batcher.stop()

    return anyio.run(main)


def test_batcher_lone_item_does_not_wait():
    async def scenario(batcher: MicroBatcher) -> float:
        start = time.perf_counter()
        assert await batcher.submit([3]) == [6]
        return time.perf_counter() - start

    # A 10 s maximum wait applies only while other items are being prepared.
    elapsed = _run_batcher(scenario, lambda items: [2 * x for x in items], max_wait_s=10.0)

    assert elapsed < 2.0


def test_batcher_waits_for_items_being_prepared():
    sizes: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    async def scenario(batcher: MicroBatcher) -> list[list[int]]:
        async def late() -> list[int]:
            with batcher.preparing(1) as reservation:
                await anyio.sleep(0.2)
                return await batcher.submit([2], reservation)

        async with anyio.create_task_group() as group:
            results: list[list[int]] = []

            async def early() -> None:
                await anyio.sleep(0.05)
                results.append(await batcher.submit([1]))

            async def delayed() -> None:
                results.append(await late())

            group.start_soon(delayed)
            group.start_soon(early)
        return results

    results = _run_batcher(scenario, run_batch, max_wait_s=5.0)

    assert sorted(results) == [[1], [2]]
    assert sizes == [2]


def test_batcher_error_reaches_every_item():
    def run_batch(items: list[int]) -> list[int]:
        raise RuntimeError("model failed")

    async def scenario(batcher: MicroBatcher) -> None:
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.submit([1, 2, 3])

    _run_batcher(scenario, run_batch)


def test_batcher_stop_fails_queued_items():
    release = threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        release.wait(timeout=10)
        return items

    async def main() -> tuple[list[int], BaseException | None]:
        batcher = MicroBatcher(run_batch, max_batch_size=1, max_wait_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([1]))
        await anyio.sleep(0.1)
        second = asyncio.ensure_future(batcher.submit([2]))
        await anyio.sleep(0.1)
        stopping = asyncio.ensure_future(batcher.stop())
        await anyio.sleep(0.1)
        release.set()
        await stopping
        result = await first
        failure = (await asyncio.gather(second, return_exceptions=True))[0]
        return result, failure

    result, failure = asyncio.run(main())

    assert result == [1]
    assert isinstance(failure, BatcherStoppedError)


@pytest.mark.parametrize(("faces", "draft_size"), [(False, IMAGE_SIZE), (True, 512)])
def test_prepare_decodes_jpeg_in_draft_mode(
    bundle: ServedModel, real_data_root: Path, monkeypatch, faces: bool, draft_size: int
):
    import facemask.serving.predictor as predictor_module

    calls: list[int | None] = []
    real_decode = predictor_module.decode_image

    def recording_decode(data, *, draft_size, max_pixels):
        calls.append(draft_size)
        return real_decode(data, draft_size=draft_size, max_pixels=max_pixels)

    monkeypatch.setattr(predictor_module, "decode_image", recording_decode)
    predictor = predictor_module.Predictor(bundle, max_pixels=50_000_000)
    # 4912x3264 pixels: draft mode decodes it at 1/8 scale (614x408) for the 64-px model, and
    # at 1/4 scale (1228x816) for the face stage, whose decode_side is 512 by default.
    prepared = predictor.prepare((real_data_root / "mask/with_mask104.jpg").read_bytes(), faces)

    assert calls == [draft_size]
    assert prepared.properties["width"] == 4912
    assert (prepared.width, prepared.height) == (4912, 3264)
    decoded_width = 1228 if faces else 614
    assert prepared.search.width == decoded_width
    assert prepared.face_search is faces
    assert len(prepared.arrays) == len(prepared.search.regions)
    for array in prepared.arrays:
        assert array.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
