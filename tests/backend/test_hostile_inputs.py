"""Hostile inputs get a fast, clean 4xx that names the field (or a 2xx where the input is odd but valid), and
nothing hostile reaches a worker: a refused submit creates no job and writes no file under uploads/.

In-process (real Redis broker, SQLite, no worker): decompression bombs, truncated and 0x0 images, CMYK and 16-bit
images (accepted, converted right), too many references, a 100k-character prompt, NaN and infinities in raw JSON
and forms, wrong content types, path traversal, bodies over the gateway's cap. On a real socket, against
``echo4o serve`` as a subprocess: a body declared larger than the cap is refused before it is sent, and a client
that sends its headers and then trickles its body gets a 408 and is disconnected while others are served.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from backend.app import create_app, max_body_bytes
from backend.serving import for_serving
from echo4o.db import crud, session_scope, upgrade_to_head
from echo4o.settings import Settings, get_settings
from tests.support.gateway_proc import GatewayProcess, start_gateway

DEADLINE_S = 60.0
JSON = {"content-type": "application/json"}


# --- hostile files ---------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with a few bytes of data: a decoder that
    trusts the header allocates width*height*3 bytes."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def png16_rgb(side: int, value: int) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG of one colour."""
    row = b"\0" + struct.pack(f">{3 * side}H", *([value] * 3 * side))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(row * side)) + _chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gray16(side: int, value: int) -> bytes:
    img = Image.new("I;16", (side, side))
    img.putdata([value] * side * side)
    return encode(img, "PNG")


GOOD = encode(Image.new("RGB", (64, 64), (10, 120, 200)), "PNG")
JPEG = encode(Image.new("RGB", (256, 256), (200, 60, 30)), "JPEG")


# --- the in-process gateway ------------------------------------------------------------------------------------
@dataclass
class Gateway:
    client: TestClient
    settings: Settings

    def job_count(self) -> int:
        with session_scope(self.settings.database_url) as s:
            return crud.list_jobs(session=s, owner=None, limit=1, offset=0)[1]

    def uploads(self) -> list[Path]:
        folder = self.settings.data_dir / "uploads"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def gateway(module_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {"BROKER_URL": module_redis_url, "DATA_DIR": str(tmp_path_factory.mktemp("hostile")), "DATABASE_URL": "",
           "RATE_LIMIT_PER_MINUTE": "1000000", "MAX_QUEUED_JOBS_PER_KEY": "1000000", "AUTH": "keys",
           "MAX_UPLOAD_BYTES": str(256 * 1024), "MAX_REFERENCES": "6", "MAX_IMAGE_PIXELS": "40000000"}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(f"ECHO4O_{name}", value)
        get_settings.cache_clear()
        try:
            settings = get_settings()
            upgrade_to_head(settings.database_url)
            with session_scope() as s:
                key = crud.create_api_key(session=s, name="hostile", is_admin=True)[1]
            app = for_serving(create_app(settings), settings)  # as `echo4o serve` runs it
            with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
                yield Gateway(client, settings)
        finally:
            get_settings.cache_clear()


def refused(gw: Gateway, response: httpx.Response, status: int, code: str, param: str | None) -> dict:
    """``response`` is the error of the contract with this status, code and param, and no job or file was made."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture
def nothing_made(gateway: Gateway) -> Iterator[None]:
    """The test's refused requests leave no job row and no upload behind."""
    jobs, files = gateway.job_count(), gateway.uploads()
    yield
    assert gateway.job_count() == jobs, "a refused request created a job"
    assert gateway.uploads() == files, "a refused request left files under uploads/"


def multipart(gw: Gateway, *images: bytes, route: str = "/multiref", **fields: str) -> httpx.Response:
    part = "image" if route.startswith("/v1/") else "images"
    files = [(part, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return gw.client.post(route, files=files, data={"prompt": "combine them", "num_steps": "2", **fields})


def as_json(gw: Gateway, *images: bytes, **fields: object) -> httpx.Response:
    body = {"prompt": "combine them", "num_steps": 2, "images": [base64.b64encode(d).decode() for d in images],
            **fields}
    return gw.client.post("/multiref", json=body)


# --- images ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [20000, 8000], ids=["over-pillows-guard", "over-our-cap"])
def test_decompression_bombs_are_refused_from_their_header(gateway: Gateway, nothing_made: None, side: int) -> None:
    bomb = png_declaring(side, side)
    assert len(bomb) < 200  # tiny on the wire, side*side*3 bytes once decoded
    for response, param in ((multipart(gateway, GOOD, bomb), "images.1"), (as_json(gateway, bomb), "images.0"),
                            (multipart(gateway, bomb, route="/v1/images/edits"), "image.0")):
        err = refused(gateway, response, 413, "image_too_large", param)
        assert f"{side * side} pixels" in err["message"] and "ECHO4O_MAX_IMAGE_PIXELS" in err["message"]


def test_truncated_and_zero_size_images_are_refused(gateway: Gateway, nothing_made: None) -> None:
    err = refused(gateway, multipart(gateway, JPEG[: len(JPEG) // 2]), 422, "invalid_image", "images.0")
    assert "truncated or corrupt" in err["message"]
    err = refused(gateway, multipart(gateway, GOOD, png_declaring(0, 0)), 422, "invalid_image", "images.1")
    assert "0x0" in err["message"] and "<_io" not in err["message"]  # names the problem, not Python objects
    refused(gateway, as_json(gateway, b"\xff\xd8\xff"), 422, "invalid_image", "images.0")


@pytest.mark.parametrize(("name", "data", "rgb"), [
    ("cmyk-jpeg", encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), (255, 0, 0)),
    ("gray-16bit-png", gray16(64, 40000), (156, 156, 156)),
    ("rgb-16bit-png", png16_rgb(64, 40000), (156, 156, 156)),
])
def test_cmyk_and_16_bit_images_are_accepted_and_stored_as_8_bit_rgb(gateway: Gateway, name: str, data: bytes,
                                                                     rgb: tuple[int, int, int]) -> None:
    r = multipart(gateway, data)
    assert r.status_code == 202, r.text
    with Image.open(gateway.settings.data_dir / "uploads" / r.json()["id"] / "0.png") as stored:
        assert stored.mode == "RGB"
        got = stored.getpixel((32, 32))
        assert all(abs(a - b) <= 2 for a, b in zip(got, rgb, strict=True)), got


def test_too_many_references_are_refused_before_any_is_decoded(gateway: Gateway, nothing_made: None) -> None:
    refused(gateway, multipart(gateway, *[GOOD] * 50), 422, "invalid_value", "images")
    refused(gateway, multipart(gateway, *[GOOD] * 50, route="/v1/images/edits"), 422, "invalid_value", "image")
    err = refused(gateway, as_json(gateway, *[GOOD] * 50), 422, "invalid_value", "images")
    assert "ECHO4O_MAX_REFERENCES" in err["message"]


# --- fields ------------------------------------------------------------------------------------------------------
def test_a_100k_character_prompt_is_refused(gateway: Gateway, nothing_made: None) -> None:
    prompt = "a cat " * 17_000
    for response in (gateway.client.post("/generate", json={"prompt": prompt}),
                     gateway.client.post("/v1/images/generations", json={"prompt": prompt}),
                     as_json(gateway, GOOD, prompt=prompt), multipart(gateway, GOOD, prompt=prompt)):
        err = refused(gateway, response, 422, "invalid_value", "prompt")
        assert "ECHO4O_MAX_PROMPT_CHARS" in err["message"] and len(err["message"]) < 500


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinities_are_refused_naming_the_field(gateway: Gateway, nothing_made: None, value: str) -> None:
    image = base64.b64encode(GOOD).decode()
    raw = {  # what Python's json module (and so the gateway's parser) reads as float nan / inf
        "/generate": ('{"prompt": "x", "cfg_text_scale": %s}', "cfg_text_scale"),
        "/v1/images/generations": ('{"prompt": "x", "n": %s}', "n"),
        "/multiref": ('{"prompt": "x", "images": ["' + image + '"], "cfg_img_scale": %s}', "cfg_img_scale"),
    }
    for route, (body, param) in raw.items():
        refused(gateway, gateway.client.post(route, content=body % value, headers=JSON), 422, "invalid_value", param)
    refused(gateway, gateway.client.post("/generate", content=f'{{"prompt": "x", "seed": {value}}}', headers=JSON),
            422, "invalid_value", "seed")
    refused(gateway, multipart(gateway, GOOD, cfg_text_scale=value), 422, "invalid_value", "cfg_text_scale")
    refused(gateway, gateway.client.post(f"/generate?wait={value}", json={"prompt": "x"}), 422, "invalid_value",
            "wait")


def test_wrong_content_types_are_refused_with_415(gateway: Gateway, nothing_made: None) -> None:
    text = {"content-type": "text/plain"}
    for response in (gateway.client.post("/generate", content=json.dumps({"prompt": "x"}), headers=text),
                     gateway.client.post("/generate", data={"prompt": "x"}),
                     gateway.client.post("/v1/images/generations", content='{"prompt": "x"}', headers=text),
                     gateway.client.post("/multiref", content=b"<x/>", headers={"content-type": "application/xml"}),
                     gateway.client.post("/v1/images/edits", json={"prompt": "x"})):
        refused(gateway, response, 415, "unsupported_media_type", None)
    # the body a JSON route expects, sent as JSON but not an object: a 422, the type was right
    refused(gateway, gateway.client.post("/generate", json=["x"]), 422, "invalid_value", None)


@pytest.mark.parametrize("path", [
    "/jobs/..%2f..%2fetc%2fpasswd", "/jobs/x/images/..%2f..%2fetc%2fpasswd", "/jobs/%2e%2e/images/0",
    "/jobs/..%2f..%2fdata%2fecho4o.db/images/0", "/jobs/a.b/images/0", "/jobs/%2e%2e%2f%2e%2e/events",
    "/jobs/x/images/%2e%2e", "/admin/benchmarks/..%2f..%2fetc/images/passwd",
    "/admin/benchmarks/x/images/..%2f..%2f..%2fetc%2fpasswd", "/admin/benchmarks/%2e%2e/report",
])
def test_path_traversal_finds_nothing(gateway: Gateway, path: str) -> None:
    r = gateway.client.get(path)
    assert r.status_code in (404, 422), r.text
    assert "root:" not in r.text and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bodies_over_the_cap_are_refused(gateway: Gateway, nothing_made: None) -> None:
    cap = max_body_bytes(gateway.settings)
    for route in ("/multiref", "/generate", "/v1/images/generations", "/v1/images/edits"):
        r = gateway.client.post(route, json={"prompt": "x", "images": ["A" * (cap + 1024)]})
        assert str(cap) in refused(gateway, r, 413, "request_too_large", None)["message"]
    r = multipart(gateway, GOOD, b"\x89PNG\r\n\x1a\n" + b"\0" * (gateway.settings.max_upload_bytes + 1))
    refused(gateway, r, 413, "image_too_large", "images.1")


# --- on a real socket: echo4o serve ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(module_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("hostile-served"), module_redis_url, body_timeout_s="2",
                       max_upload_bytes=str(64 * 1024))
    try:
        yield gw
    finally:
        gw.kill()


def _request_head(gw: GatewayProcess, path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {gw.host}:{gw.port}\r\nAuthorization: Bearer {gw.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_body_declared_over_the_cap_is_refused_before_it_is_sent(served: GatewayProcess) -> None:
    with socket.create_connection((served.host, served.port), timeout=DEADLINE_S) as sock:
        sock.sendall(_request_head(served, "/multiref", 10**9))  # and not one byte of the body
        answer = _read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:500]
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_a_client_trickling_its_body_gets_408_and_others_are_served(served: GatewayProcess) -> None:
    jobs = served.job_count()
    body = json.dumps({"prompt": "a slow cube", "num_steps": 2}).encode()
    with socket.create_connection((served.host, served.port), timeout=DEADLINE_S) as sock:
        sock.sendall(_request_head(served, "/generate", len(body)))
        sock.settimeout(0.3)
        answer, sent, deadline = b"", 0, time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if sent < len(body) - 1 and not answer:  # never the last byte, and nothing once answered
                try:
                    sock.sendall(body[sent:sent + 1])
                    sent += 1
                except OSError:  # the gateway answered and closed: read what it said
                    sent = len(body)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # the gateway closed with our unread bytes in its buffer, so its kernel reset the connection;
                # what it had sent before is read first, so a reset ends the answer
                break
            except TimeoutError:
                # meanwhile the gateway serves everyone else
                assert httpx.get(f"{served.url}/healthz", timeout=DEADLINE_S).status_code == 200
                continue
            if not chunk:
                break  # closed
            answer += chunk
        else:
            pytest.fail(f"no answer to a trickling client within {DEADLINE_S:.0f} s:\n{served.tail()}")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:500]
    assert json.loads(rest)["error"]["code"] == "request_timeout"
    assert served.job_count() == jobs
    r = httpx.post(f"{served.url}/generate", json={"prompt": "a quick cube", "num_steps": 2},
                   headers=served.headers(), timeout=DEADLINE_S)
    assert r.status_code == 202, r.text
