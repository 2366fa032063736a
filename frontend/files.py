"""Output files: `<root>/<YYYY-MM-DD>/<stem>-<index>.<ext>` served at `<base_url>/files/<date>/<name>`.

Images are written in the requested format (png, jpg/jpeg, webp) with the generation metadata
embedded the way Fooocus 2.5.5 does it (modules/private_logger.py, meta_parser.get_exif), so that
Fooocus's own metadata reader accepts our files:
  * PNG: text chunks `parameters` (the metadata) and `fooocus_scheme` (fooocus | a1111);
  * JPEG / WEBP: EXIF in IFD0, 0x9286 UserComment = metadata, 0x0131 Software = the Fooocus
    version, 0x927C MakerNote = scheme. Pillow writes str tags as ASCII, replacing other
    characters with '?': the fooocus scheme is ASCII-escaped JSON and survives; a1111 text loses
    non-ASCII characters exactly as it does in Fooocus.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable
from urllib.parse import quote, unquote, urlsplit

import numpy as np
from PIL import Image, PngImagePlugin

from pipeline.metadata import FOOOCUS_VERSION

log = logging.getLogger(__name__)

MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = tuple(MEDIA_TYPES)
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# Fooocus's encoder settings per format.
_SAVE_OPTIONS = {
    "PNG": {},
    "JPEG": {"quality": 95, "optimize": True, "progressive": True},
    "WEBP": {"quality": 95, "lossless": False},
}
# /files re-encoding: the Accept values Fooocus-API honours, and the extension each one means.
_ACCEPT_EXT = {"image/png": "png", "image/jpg": "jpg", "image/jpeg": "jpeg", "image/webp": "webp"}

_TAG_USER_COMMENT, _TAG_SOFTWARE, _TAG_MAKER_NOTE = 0x9286, 0x0131, 0x927C
# A JPEG APP1 segment holds at most 65533 bytes of EXIF (Pillow refuses more).
_JPEG_EXIF_MAX_BYTES = 65533

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*\.(png|jpg|jpeg|webp)$")
_STEM_DROP = re.compile(r"[^A-Za-z0-9._ -]")
MAX_STEM_CHARS = 100


def media_type(ext: str) -> str:
    """The MIME type of an extension: image/jpeg for both jpg and jpeg."""
    return MEDIA_TYPES[ext.lower()]


def data_uri(data: bytes, ext: str = "png") -> str:
    """Fooocus-API 0.5's `base64` field: a data URI. It writes `image/<ext>` (and crashes on jpg);
    we write the proper MIME type."""
    return f"data:{media_type(ext)};base64,{base64.b64encode(data).decode()}"


def safe_stem(save_name: str | None, job_id: str) -> str:
    """The file stem for a job: `save_name` reduced to [A-Za-z0-9._ -] (no path separators survive),
    runs of dots collapsed (no '..'), starting with a letter or digit (no hidden files; /files
    serves only such names), at most MAX_STEM_CHARS; empty after that -> job_id."""
    stem = _STEM_DROP.sub("", save_name or "")
    stem = re.sub(r"\.{2,}", ".", stem).lstrip("._ -")
    stem = stem[:MAX_STEM_CHARS].rstrip(" ")
    return stem or job_id


# Encoding


def _exif(metadata: str, scheme: str) -> Image.Exif:
    # IFD0, not the Exif sub-IFD: Fooocus writes and reads these tags there.
    exif = Image.Exif()
    exif[_TAG_USER_COMMENT] = metadata
    exif[_TAG_SOFTWARE] = FOOOCUS_VERSION
    exif[_TAG_MAKER_NOTE] = scheme
    return exif


def _metadata_options(fmt: str, metadata: str | None, scheme: str) -> dict:
    """The Pillow save() arguments that embed the metadata in `fmt`."""
    if metadata is None:
        return {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", metadata)  # Pillow switches to iTXt for non-Latin-1 text
        info.add_text("fooocus_scheme", scheme)
        return {"pnginfo": info}
    exif = _exif(metadata, scheme)
    if fmt == "JPEG" and len(exif.tobytes()) > _JPEG_EXIF_MAX_BYTES:
        # A huge prompt must not fail the job: the image is what the user asked for.
        log.warning("metadata (%d characters) does not fit in JPEG EXIF; saving without it", len(metadata))
        return {}
    return {"exif": exif}


def encode_image(image: np.ndarray | Image.Image, ext: str = "png", metadata: str | None = None,
                 scheme: str = "fooocus") -> bytes:
    """The image (HxWx3 uint8 array or PIL image) encoded as `ext`, metadata embedded when given."""
    fmt = _PIL_FORMATS[ext.lower()]
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if fmt == "JPEG" and img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **_SAVE_OPTIONS[fmt], **_metadata_options(fmt, metadata, scheme))
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    return encode_image(image, "png")


def read_metadata(img: Image.Image) -> tuple[str, str] | None:
    """(parameters, scheme) embedded in an opened image, from PNG text or EXIF; None if absent."""
    params = img.info.get("parameters")
    if isinstance(params, str):
        return params, str(img.info.get("fooocus_scheme", "fooocus"))
    exif = img.getexif()
    params = exif.get(_TAG_USER_COMMENT)
    if isinstance(params, bytes):
        params = params.decode("utf-8", "replace")
    if not params:
        return None
    scheme = exif.get(_TAG_MAKER_NOTE, "fooocus")
    return params, scheme.decode("ascii", "replace") if isinstance(scheme, bytes) else str(scheme)


def _accepted_ext(accept: str | None) -> str | None:
    """The extension a single image media range asks for (parameters such as q= ignored); None
    for anything else, including lists of several types."""
    if not accept or "," in accept:
        return None
    return _ACCEPT_EXT.get(accept.split(";")[0].strip().lower())


def reencode(path: Path, accept: str | None) -> tuple[bytes, str]:
    """The body and media type for GET /files (contract §3.9): an Accept of exactly one of
    image/png, image/jpg, image/jpeg, image/webp gets the file in that format (metadata carried
    over); any other Accept (*/*, browser lists, none) gets the file as it is."""
    wanted = _accepted_ext(accept)
    own_ext = path.suffix[1:].lower()
    data = path.read_bytes()
    if wanted is None or _PIL_FORMATS[wanted] == _PIL_FORMATS[own_ext]:
        return data, media_type(wanted or own_ext)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        embedded = read_metadata(img)
        metadata, scheme = embedded if embedded else (None, "fooocus")
        return encode_image(img, wanted, metadata, scheme), media_type(wanted)


# The output folder


@dataclass(frozen=True)
class SavedImage:
    path: Path
    url: str
    data: bytes  # the file's bytes, for the `base64` field
    ext: str


class OutputFiles:
    safe_stem = staticmethod(safe_stem)
    reencode = staticmethod(reencode)

    def __init__(self, root: Path, base_url: str):
        self.root = Path(root).resolve()
        self.base_url = base_url.rstrip("/")

    def url(self, date: str, name: str) -> str:
        return f"{self.base_url}/files/{date}/{quote(name)}"

    def save(self, image: np.ndarray, stem: str, index: int, ext: str = "png", metadata: str | None = None,
             scheme: str = "fooocus") -> SavedImage:
        """Write `<root>/<today>/<stem>-<index>.<ext>`. `stem` must come from safe_stem(). A file of
        the same name is replaced (Fooocus-API: save_name may collide and overwrite)."""
        ext = ext.lower()
        if ext not in MEDIA_TYPES:
            raise ValueError(f"save_extension must be one of {EXTENSIONS}, got {ext!r}")
        name = f"{stem}-{index}.{ext}"
        if not _NAME.match(name):
            raise ValueError(f"unsafe output file name {name!r}")
        date = datetime.now().strftime("%Y-%m-%d")  # server local date, as Fooocus-API
        folder = self.root / date
        folder.mkdir(parents=True, exist_ok=True)
        data = encode_image(image, ext, metadata, scheme)
        _write_atomically(folder / name, data)
        return SavedImage(folder / name, self.url(date, name), data, ext)

    def lookup(self, date: str, name: str) -> Path | None:
        """The file for a /files URL, or None; names that could leave the output folder never match."""
        if not _DATE.match(date) or not _NAME.match(name):
            return None
        path = (self.root / date / name).resolve()
        if path.parent.parent != self.root or not path.is_file():
            return None
        return path

    def delete_results(self, results: Iterable[dict | str | None]) -> int:
        """Remove the files of a job's results (dicts with a `url`, or URLs): used when a job is
        deleted, fails, or leaves the trimmed history. Only files lookup() accepts, so nothing
        outside the output folder. Returns how many were removed."""
        removed = 0
        for result in results or ():
            url = result.get("url") if isinstance(result, dict) else result
            path = self._path_for_url(url) if url else None
            if path is not None:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _path_for_url(self, url: str) -> Path | None:
        # Only the last two segments matter, so URLs written under another --base-url still match.
        parts = unquote(urlsplit(url).path).split("/")
        if len(parts) < 3 or parts[-3] != "files":
            return None
        return self.lookup(parts[-2], parts[-1])


def _write_atomically(target: Path, data: bytes) -> None:
    """Readers never see a partial file: write a hidden temp file (unique, so concurrent saves of
    one name don't clash; /files never serves dot-files) and rename it over the target."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
