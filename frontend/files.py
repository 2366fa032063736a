"""Output files: `<output_dir>/<YYYY-MM-DD>/<name>-<i>.<ext>` served at `<base_url>/files/<date>/<file>`."""
from __future__ import annotations

import base64
import io
import re
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(png|jpg|jpeg|webp)$")


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class OutputFiles:
    def __init__(self, root: Path, base_url: str):
        self.root = Path(root).resolve()
        self.base_url = base_url.rstrip("/")

    def save_png(self, image: np.ndarray, stem: str, index: int) -> tuple[Path, str, bytes]:
        """Write the image; returns (path, url, png bytes)."""
        date = datetime.now().strftime("%Y-%m-%d")
        folder = self.root / date
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{stem}-{index}.png"
        data = encode_png(image)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)  # readers never see a partial file
        return folder / name, f"{self.base_url}/files/{date}/{name}", data

    def lookup(self, date: str, name: str) -> Path | None:
        """The file for a /files URL, or None; names that could leave the output folder never match."""
        if not _DATE.match(date) or not _NAME.match(name):
            return None
        path = (self.root / date / name).resolve()
        if path.parent.parent != self.root or not path.is_file():
            return None
        return path


def data_uri(data: bytes, ext: str = "png") -> str:
    return f"data:image/{ext};base64,{base64.b64encode(data).decode()}"
