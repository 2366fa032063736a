"""Image inputs (frontend.images) and the SSRF guard (frontend.netguard).

No test touches the network: URLs are IP literals that are refused before any connection, or a local
HTTP server on 127.0.0.1. Names are never resolved through DNS; where a test needs a name, it
replaces the resolver."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile
from starlette.datastructures import UploadFile

from frontend import images, netguard
from frontend.images import ImageInputError, ImageLimits

from .conftest import FIXTURE_IMAGES  # noqa: E402

FIXTURES = FIXTURE_IMAGES
BEAR = (FIXTURES / "bear.jpg").read_bytes()
BEAR_PIXELS = np.asarray(Image.open(io.BytesIO(BEAR)).convert("RGB"))
FIELD = "image_prompts.0.cn_img"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width x height (the CRC is fixed up to match)."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    struct.pack_into(">II", data, 16, width, height)  # 8 signature + 4 length + 4 "IHDR"
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # CRC of type + 13 data bytes
    return bytes(data)


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(value, limits: ImageLimits | None = None, field: str = FIELD):
    return asyncio.run(images.load_image_input(value, field, limits or ImageLimits()))


def load_error(value, limits: ImageLimits | None = None, field: str = FIELD) -> ImageInputError:
    with pytest.raises(ImageInputError) as caught:
        load(value, limits, field)
    assert caught.value.field == field and str(caught.value).startswith(field)
    return caught.value


# -- a local HTTP server ---------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /bear.jpg, /hop/N (N redirects, then the bear), /loop, /redirect?to=URL, /missing,
    /stream-large (no Content-Length), /declared-large, /slow, /host (echoes the Host header)."""

    requests: list[str] = []

    def do_GET(self):
        Handler.requests.append(self.path)
        path = urlsplit(self.path).path
        if path == "/bear.jpg" or path == "/hop/0":
            self.reply(200, BEAR)
        elif path.startswith("/hop/"):
            self.redirect(f"/hop/{int(path[5:]) - 1}")
        elif path == "/loop":
            self.redirect("/loop")
        elif path == "/redirect":
            self.redirect(parse_qs(urlsplit(self.path).query)["to"][0])
        elif path == "/stream-large":
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"x" * 1000)
        elif path == "/declared-large":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            time.sleep(1.5)
        elif path == "/host":
            self.reply(200, self.headers["Host"].encode())
        else:
            self.reply(404, b"not here")

    def reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (size cap, timeout)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def seen(server):
    Handler.requests.clear()
    return Handler.requests


PRIVATE_OK = ImageLimits(allow_private_urls=True)


# -- absent values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "", "None", "none", "null", "string", "  "])
def test_placeholders_mean_no_image(value):
    assert images.is_absent(value)
    assert load(value) is None
    assert asyncio.run(images.load_upload(value, "cn_img1", ImageLimits())) is None


def test_empty_upload_means_no_image():
    upload = UploadFile(io.BytesIO(b""), filename="")
    assert asyncio.run(images.load_upload(upload, "input_mask", ImageLimits())) is None


# -- happy paths -----------------------------------------------------------------------------------

@pytest.mark.parametrize("encode", [
    pytest.param(lambda d: b64(d), id="raw-base64"),
    pytest.param(lambda d: "data:image/jpeg;base64," + b64(d), id="data-uri"),
    pytest.param(lambda d: "DATA:image/png;base64," + b64(d), id="data-uri-other-type-and-case"),
    pytest.param(lambda d: b64(d).rstrip("="), id="missing-padding"),
    pytest.param(lambda d: base64.encodebytes(d).decode(), id="newlines"),
    pytest.param(lambda d: base64.urlsafe_b64encode(d).decode(), id="urlsafe-alphabet"),
    pytest.param(lambda d: "  " + b64(d) + "\n", id="surrounding-whitespace"),
])
def test_base64_forms_decode_to_the_fixture(encode):
    assert len(BEAR) % 3 != 0, "the missing-padding case needs a length that pads"
    image = load(encode(BEAR))
    assert image.mode == "RGB" and image.size == (600, 600)
    assert np.array_equal(np.asarray(image), BEAR_PIXELS)


def test_upload_decodes_the_fixture():
    upload = UploadFile(io.BytesIO(BEAR), filename="bear.jpg")
    image = asyncio.run(images.load_upload(upload, "input_image", ImageLimits()))
    assert np.array_equal(np.asarray(image), BEAR_PIXELS)


def test_grayscale_becomes_three_channels():
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)), mode="L")
    image = load(b64(png_bytes(gray)))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (32, 64, 3)
    assert all(np.array_equal(pixels[..., c], np.asarray(gray)) for c in range(3))


def test_16_bit_grayscale_keeps_its_range():
    deep = Image.fromarray((np.arange(64 * 8, dtype=np.uint16) * 128).reshape(8, 64))
    pixels = np.asarray(load(b64(png_bytes(deep))))
    assert pixels[..., 0].min() == 0 and pixels[..., 0].max() == (64 * 8 - 1) * 128 >> 8


def test_rgba_mask_keeps_channel_0():
    data = (FIXTURES / "inpaint_mask.png").read_bytes()
    original = np.asarray(Image.open(io.BytesIO(data)))
    image = load(b64(data), field="input_mask")
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image)[..., 0], original[..., 0])


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), "red").save(buffer, format="JPEG", exif=exif.tobytes())
    assert load(b64(buffer.getvalue())).size == (20, 40)


def test_png_b64_round_trip():
    image = load(b64(BEAR))
    encoded = images.image_to_png_b64(image)
    assert not encoded.startswith("data:")
    decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), BEAR_PIXELS)


# -- refusals: garbage, size, bombs ---------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("not base64!!", "base64"),
    ("abcde", "base64"),
    ("ümlaut", "base64"),
    ("data:image/png,rawbytes", "data URI must be base64"),
    (b64(b"hello, this is not an image"), "not an image PIL can read"),
    (b64(BEAR[: len(BEAR) // 2]), "not an image PIL can read"),
    (42, "must be a base64 string"),
])
def test_garbage_is_422_naming_the_field(value, message):
    error = load_error(value)
    assert error.status == 422 and message in error.message


@pytest.mark.parametrize("encode", [b64, lambda d: "data:image/jpeg;base64," + b64(d)])
def test_too_many_bytes_is_413(encode):
    error = load_error(encode(BEAR), ImageLimits(max_bytes=len(BEAR) - 1))
    assert error.status == 413 and "bytes" in error.message
    assert load(encode(BEAR), ImageLimits(max_bytes=len(BEAR))).size == (600, 600)


def test_too_large_upload_is_413_and_read_no_further():
    reads = []

    class Upload(UploadFile):
        async def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return await super().read(size)

    with pytest.raises(ImageInputError) as caught:
        asyncio.run(images.load_upload(Upload(io.BytesIO(BEAR)), "input_image", ImageLimits(max_bytes=1000)))
    assert caught.value.status == 413 and caught.value.field == "input_image"
    assert reads == [1001]


@pytest.mark.parametrize("side, message", [
    (8_000, "8000x8000, more than the 40000000 pixels"),  # our limit, read from the header
    (20_000, "too many pixels"),  # PIL refuses this one while reading the header already
])
def test_bomb_is_413_before_decoding(monkeypatch, side, message):
    def never(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    error = load_error(b64(png_claiming(side, side)), field="input_image")
    assert error.status == 413 and message in error.message


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["pil-warns", "pil-refuses"])
def test_pil_bomb_limits_are_413_too(side):
    # With our own limit out of the way, PIL's check (a warning, then an error) must still stop it.
    limits = ImageLimits(max_pixels=10**12)
    with pytest.raises(ImageInputError) as caught:
        images.decode_image_bytes(png_claiming(side, side), "input_image", limits)
    assert caught.value.status == 413 and "too many pixels" in caught.value.message


# -- URLs ------------------------------------------------------------------------------------------

def test_url_is_fetched_when_private_urls_are_allowed(server, seen):
    image = load(f"{server}/bear.jpg", PRIVATE_OK)
    assert np.array_equal(np.asarray(image), BEAR_PIXELS) and seen == ["/bear.jpg"]


def test_loopback_url_is_422_by_default_without_a_request(server, seen):
    error = load_error(f"{server}/bear.jpg", field="input_image")
    assert error.status == 422 and "loopback" in error.message and seen == []


def test_five_redirects_are_followed(server, seen):
    assert load(f"{server}/hop/5", PRIVATE_OK).size == (600, 600)
    assert seen == [f"/hop/{n}" for n in range(5, -1, -1)]


@pytest.mark.parametrize("path, status, message", [
    ("/hop/6", 422, "redirected more than 5"),
    ("/loop", 422, "redirected more than 5"),
    ("/missing", 422, "HTTP 404"),
    ("/stream-large", 413, "more than the 2000 bytes"),
    ("/declared-large", 413, "1000000000 bytes"),
])
def test_fetch_failures(server, path, status, message):
    error = load_error(f"{server}{path}", ImageLimits(max_bytes=2000, allow_private_urls=True))
    assert error.status == status and message in error.message


def test_fetch_has_an_overall_timeout(server):
    started = time.monotonic()
    with pytest.raises(netguard.FetchError, match="longer than 0.3 s") as caught:
        asyncio.run(netguard.fetch(f"{server}/slow", allow_private=True, max_bytes=100, timeout_s=0.3))
    assert caught.value.status == 422 and time.monotonic() - started < 1.5


def test_refused_connection_is_422():
    closed = free_port()
    error = load_error(f"http://127.0.0.1:{closed}/x.png", PRIVATE_OK)
    assert error.status == 422 and "could not connect" in error.message


@pytest.mark.parametrize("target, reason", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://10.0.0.1/image.png", "private"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("file:///etc/passwd", "only http and https"),
])
def test_every_redirect_hop_is_checked(server, seen, monkeypatch, target, reason):
    # The first hop must pass with allow_private off, so the check treats 127.0.0.1 as public here;
    # the hop it redirects to must still be refused, before any connection to it.
    real_refusal = netguard._refusal
    loopback = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(netguard, "_refusal", lambda a: None if a == loopback else real_refusal(a))
    error = load_error(f"{server}/redirect?to={target}", field="input_image")
    assert error.status == 422 and "URL refused" in error.message and reason in error.message
    assert len(seen) == 1 and seen[0].startswith("/redirect")


def test_fetch_connects_to_the_checked_address(server, monkeypatch):
    # DNS rebinding: a second lookup could answer differently, so the request goes to the address
    # that was checked, while the Host header still names the host.
    port = urlsplit(server).port

    async def resolve(host, port):
        assert host == "images.example"
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(netguard, "_resolve_async", resolve)
    body = asyncio.run(netguard.fetch(f"http://images.example:{port}/host", allow_private=True, max_bytes=100))
    assert body == f"images.example:{port}".encode()


# -- check_url -------------------------------------------------------------------------------------

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.8.9.10:8080/x", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://192.168.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://100.100.100.200/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://[::1]/", "loopback"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[::ffff:a9fe:a9fe]/", "cloud metadata"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://100.64.0.1/", "shared"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://192.0.2.1/", "private"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
    ("http://METADATA.google.internal./", "cloud metadata host"),
    ("http://metadata/", "cloud metadata host"),
    ("file:///etc/passwd", "only http and https"),
    ("ftp://x/", "only http and https"),
    ("gopher://127.0.0.1:25/", "only http and https"),
    ("//example.com/a.png", "only http and https"),
    ("http:///a.png", "no host"),
    ("http://[::1/", "not a valid URL"),
]
ALLOWED = ["http://93.184.216.34/", "https://8.8.8.8/image.png", "http://1.1.1.1:8080/x",
           "http://[2606:4700:4700::1111]/"]


def check_both(url: str, allow_private: bool = False) -> None:
    """check_url and check_url_async must agree; raises what they raise."""
    errors = []
    for check in (lambda: netguard.check_url(url, allow_private),
                  lambda: asyncio.run(netguard.check_url_async(url, allow_private))):
        try:
            check()
        except netguard.UnsafeURL as exc:
            errors.append(str(exc))
    assert len(errors) in (0, 2), errors
    if errors:
        assert errors[0] == errors[1]
        raise netguard.UnsafeURL(errors[0])


@pytest.mark.parametrize("url, reason", REFUSED)
def test_check_url_refuses(url, reason):
    with pytest.raises(netguard.UnsafeURL, match=reason):
        check_both(url)


@pytest.mark.parametrize("url", ALLOWED)
def test_check_url_allows_public_addresses(url):
    check_both(url)


@pytest.mark.parametrize("url, reason", [(u, r) for u, r in REFUSED if "metadata host" not in r])
def test_allow_private_allows_every_address_but_not_other_schemes(url, reason):
    # (Metadata host names are left out: allowed, they would be looked up in DNS.)
    if reason in ("only http and https", "no host", "not a valid URL"):
        with pytest.raises(netguard.UnsafeURL, match=reason):
            check_both(url, allow_private=True)
    else:
        check_both(url, allow_private=True)


def test_unresolvable_names_are_refused(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no such host")

    monkeypatch.setattr(netguard.socket, "getaddrinfo", fail)
    with pytest.raises(netguard.UnsafeURL, match="cannot resolve host"):
        netguard.check_url("http://images.example/a.png", allow_private=True)


def test_one_private_address_among_public_ones_is_enough(monkeypatch):
    # The client may connect to any address of the host, so all of them must be public.
    infos = [(2, 1, 6, "", ("8.8.8.8", 80)), (2, 1, 6, "", ("10.0.0.7", 80))]
    monkeypatch.setattr(netguard.socket, "getaddrinfo", lambda *a, **k: infos)
    with pytest.raises(netguard.UnsafeURL, match="images.example resolves to 10.0.0.7"):
        netguard.check_url("http://images.example/a.png")
