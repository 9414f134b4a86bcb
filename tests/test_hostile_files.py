"""Hostile image files against a real server on 127.0.0.1: a 4xx or a correct prediction.

The corpus is made here: real photos truncated at many offsets, wrong magic bytes, headers that
declare huge or zero sizes, 16-bit, CMYK and animated images, and archives renamed `.png`.
Every file must get a 4xx with a JSON error body or a 200 whose probabilities equal those of
the same model called in this process. The server must stay up, with the same process, and
log one prediction line per 200.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from facemask.data.images import InvalidImageError
from facemask.serving.predictor import Predictor
from facemask.serving.served_model import ServedModel, load_served_model
from tests.conftest import TrainedModel, encode_image, noise_image
from tests.test_serve_cli import Server, run_server

REAL_JPEG = "no_mask/0_0_aidai_0014.jpg"
REAL_PNG = "mask/with_mask014.png"
MAX_UPLOAD_BYTES = 2_000_000
MAX_PIXELS = 50_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """Return a PNG whose IHDR declares `width` x `height` over one row of real pixel data."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    rows = zlib.compress(b"\x00" + b"\x80" * 3 * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Return `jpeg` with the size in its first SOF0/SOF2 segment replaced."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        index = data.find(marker)
        if index >= 0:
            data[index + 5 : index + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise AssertionError("no SOF segment in the JPEG")


def _gif_with_screen(width: int, height: int) -> bytes:
    gif = bytearray(encode_image(noise_image((8, 8), 11, "L").convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def _bmp_with_size(width: int, height: int) -> bytes:
    bmp = bytearray(encode_image(noise_image((4, 4), 12), "BMP"))
    bmp[18:26] = struct.pack("<ii", width, height)
    return bytes(bmp)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _animated(file_format: str, **params: object) -> bytes:
    frames = [Image.new("RGB", (24, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return encode_image(frames[0], file_format, save_all=True, append_images=frames[1:], **params)


def hostile_files(real_data_root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Return the corpus, keyed by a name that says what each file is, and the names that may
    decode although they are damaged.

    A PNG cut inside its final IEND chunk and a GIF without its trailer byte still contain every
    pixel, and a GIF frame that declares its own size decodes under a 0x0 logical screen.
    """
    jpeg = (real_data_root / REAL_JPEG).read_bytes()
    png = (real_data_root / REAL_PNG).read_bytes()
    small = noise_image((40, 30), 13)
    formats = {
        "jpeg": jpeg,
        "png": png,
        "gif": encode_image(small.convert("P"), "GIF"),
        "webp": encode_image(small, "WEBP", quality=80),
        "tiff": encode_image(small, "TIFF", compression="tiff_lzw"),
        "bmp": encode_image(small, "BMP"),
    }
    files: dict[str, bytes] = {}
    may_decode = {
        f"truncated_png_at_{len(png) - 1}.png",
        f"truncated_gif_at_{len(formats['gif']) - 1}.gif",
        "gif_screen_0x0.gif",
    }
    for name, data in formats.items():
        # The first bytes (magic and header fields) one by one, then offsets spread over the file.
        offsets = sorted({*range(1, 24), *np.linspace(24, len(data) - 1, 25, dtype=int).tolist()})
        for offset in offsets:
            files[f"truncated_{name}_at_{offset}.{name}"] = data[:offset]

    body = jpeg[2:]
    files |= {
        "png_magic_jpeg_body.png": b"\x89PNG\r\n\x1a\n" + body,
        "jpeg_magic_png_body.jpg": b"\xff\xd8\xff\xe0" + png[8:],
        "gif_magic_garbage.gif": b"GIF89a" + bytes(range(256)) * 4,
        "webp_magic_garbage.webp": b"RIFF\x00\x10\x00\x00WEBPVP8 " + bytes(range(256)) * 4,
        "bmp_magic_garbage.bmp": b"BM" + bytes(range(256)) * 4,
        "tiff_magic_garbage.tif": b"II*\x00" + struct.pack("<I", 8) + b"\xff" * 1024,
        "zeros.png": bytes(4096),
        "random_bytes.jpg": np.random.default_rng(14).bytes(8192),
        "svg_named.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "pdf_named.jpg": b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n",
        "ico_unsupported.png": encode_image(small, "ICO"),
        "over_upload_limit.jpg": jpeg + bytes(MAX_UPLOAD_BYTES),
        # Huge declared sizes: rejected from the header, before any pixel is decoded.
        "png_100000x100000.png": _png_with_header(100_000, 100_000),
        "png_2147483647_wide.png": _png_with_header(2**31 - 1, 1),
        "jpeg_65535x65535.jpg": _jpeg_with_size(jpeg, 65_535, 65_535),
        "gif_screen_65535x65535.gif": _gif_with_screen(65_535, 65_535),
        "bmp_2147483647_wide.bmp": _bmp_with_size(2**31 - 1, 1),
        "bmp_negative_height.bmp": _bmp_with_size(4, -(2**31)),
        # Zero-sized dimensions.
        "png_0x0.png": _png_with_header(0, 0),
        "png_0_wide.png": _png_with_header(0, 16),
        "jpeg_0_high.jpg": _jpeg_with_size(jpeg, 32, 0),
        "jpeg_0_wide.jpg": _jpeg_with_size(jpeg, 0, 32),
        "gif_screen_0x0.gif": _gif_with_screen(0, 0),
        "bmp_0x0.bmp": _bmp_with_size(0, 0),
        # Archives renamed `.png`, one nested in another, and a gzip of a real PNG.
        "zip_of_png.png": _zip({"face.png": png}),
        "zip_in_zip.png": _zip({"inner.zip": _zip({"face.png": png})}),
        "zip_of_zeros.png": _zip({"zeros.bin": bytes(MAX_UPLOAD_BYTES * 4)}),
        "gzip_of_png.png": gzip.compress(png),
        "tar_of_png.png": _tar({"face.png": png}),
    }
    # Decodable files in unusual depths, colour models and frame counts: each gets a prediction.
    files |= {
        "grey16.png": encode_image(Image.new("I;16", (20, 16), 40_000), "PNG"),
        "grey16.tif": encode_image(Image.new("I;16", (20, 16), 12_345), "TIFF"),
        "grey32.tif": encode_image(Image.new("I", (20, 16), 70_000), "TIFF"),
        "float.tif": encode_image(Image.new("F", (20, 16), 0.5), "TIFF"),
        "cmyk.jpg": encode_image(small.convert("CMYK"), "JPEG"),
        "cmyk.tif": encode_image(small.convert("CMYK"), "TIFF"),
        "bilevel.png": encode_image(small.convert("1"), "PNG"),
        "animated.gif": _animated("GIF", duration=50, loop=0),
        "animated.png": _animated("PNG", duration=50),
        "animated.webp": _animated("WEBP", duration=50, lossless=True),
        "multipage.tif": _animated("TIFF"),
        "png_then_zip.png": png + _zip({"face.png": png}),
        "one_pixel.png": encode_image(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "one_pixel_row.png": encode_image(Image.new("RGB", (3000, 1), (9, 9, 9)), "PNG"),
        "highly_compressed_4000x4000.png": encode_image(Image.new("L", (4000, 4000)), "PNG"),
    }
    return files, may_decode


# Files that are valid images; every one must be classified.
DECODABLE = {
    "grey16.png",
    "grey16.tif",
    "grey32.tif",
    "float.tif",
    "cmyk.jpg",
    "cmyk.tif",
    "bilevel.png",
    "animated.gif",
    "animated.png",
    "animated.webp",
    "multipage.tif",
    "png_then_zip.png",
    "one_pixel.png",
    "one_pixel_row.png",
    "highly_compressed_4000x4000.png",
}


@pytest.fixture(scope="module")
def corpus_and_exceptions(real_data_root: Path) -> tuple[dict[str, bytes], set[str]]:
    return hostile_files(real_data_root)


@pytest.fixture(scope="module")
def corpus(corpus_and_exceptions) -> dict[str, bytes]:
    return corpus_and_exceptions[0]


@pytest.fixture(scope="module")
def may_decode(corpus_and_exceptions) -> set[str]:
    return corpus_and_exceptions[1]


@pytest.fixture(scope="module")
def local_predictor(trained_model: TrainedModel) -> Predictor:
    model: ServedModel = load_served_model(
        trained_model.alias_uri, trained_model.tracking_uri, runtime="torch"
    )
    return Predictor(model, MAX_PIXELS)


@pytest.fixture(scope="module")
def hostile_server(trained_model: TrainedModel, tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("hostile")
    overrides = (f"max_upload_bytes={MAX_UPLOAD_BYTES}", f"max_pixels={MAX_PIXELS}")
    with run_server(base, trained_model.alias_uri, trained_model.tracking_uri, overrides) as server:
        yield server


def _check_error_body(name: str, response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    error = response.json()["error"]
    assert set(error) == {"code", "message"}, name
    assert "Traceback" not in error["message"], name
    assert "/" not in error["message"].replace("N/A", ""), f"{name}: {error['message']}"


def test_hostile_files_get_4xx_or_prediction(
    hostile_server: Server,
    corpus: dict[str, bytes],
    may_decode: set[str],
    local_predictor: Predictor,
):
    pid = hostile_server.process.pid
    outcomes: dict[str, int] = {}
    accepted: list[str] = []
    with httpx.Client(base_url=hostile_server.base_url, timeout=60) as client:
        for name, data in corpus.items():
            response = client.post("/predict", files={"file": (name, data, "image/png")})
            outcomes[name] = response.status_code
            assert hostile_server.process.poll() is None, f"the server exited on {name}"
            if response.status_code != 200:
                _check_error_body(name, response)
                continue
            accepted.append(response.json()["request_id"])
            expected = local_predictor.predict(data)
            body = response.json()
            assert body["label"] == expected.label, name
            for label, probability in expected.probabilities.items():
                assert body[label] == pytest.approx(probability, abs=1e-5), name
        health = client.get("/health")

    print(
        f"\nHostile files tried: {len(corpus)}; accepted {len(accepted)}, "
        f"rejected {len(corpus) - len(accepted)}"
    )
    assert health.status_code == 200
    assert hostile_server.process.pid == pid
    assert hostile_server.process.poll() is None
    rejected_decodable = sorted(name for name in DECODABLE if outcomes[name] != 200)
    assert rejected_decodable == []
    accepted_names = sorted(name for name, status in outcomes.items() if status == 200)
    assert sorted(set(accepted_names) - DECODABLE - may_decode) == []
    logged = [json.loads(line)["request_id"] for line in hostile_server.prediction_log.open()]
    assert sorted(logged) == sorted(accepted)


def test_hostile_files_in_batches(
    hostile_server: Server, corpus: dict[str, bytes], may_decode: set[str]
):
    names = [name for name in corpus if name != "over_upload_limit.jpg"]
    with httpx.Client(base_url=hostile_server.base_url, timeout=120) as client:
        for start in range(0, len(names), 32):
            chunk = names[start : start + 32]
            files = [("files", (name, corpus[name], "image/png")) for name in chunk]
            response = client.post("/predict/batch", files=files)

            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [result["filename"] for result in results] == chunk
            for name, result in zip(chunk, results, strict=True):
                if name in may_decode:
                    continue
                assert ("label" in result) == (name in DECODABLE), f"{name}: {result}"
                assert ("error" in result) == (name not in DECODABLE), f"{name}: {result}"
    assert hostile_server.process.poll() is None


def test_local_decoder_rejects_damaged_files(
    corpus: dict[str, bytes], may_decode: set[str], local_predictor: Predictor
):
    for name in sorted(set(corpus) - DECODABLE - may_decode - {"over_upload_limit.jpg"}):
        with pytest.raises(InvalidImageError):
            local_predictor.prepare(corpus[name])
