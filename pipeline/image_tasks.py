"""Fooocus's image-task geometry and masks (vary, upscale, inpaint, outpaint), as pure functions of
numpy images (HxWx3 / HxW uint8) so each formula is testable on its own. The facts are those of
Fooocus's image tasks: sizes by "shape ceil" (the 64-rounded geometric mean of the sides),
Lanczos resampling, edge-padded outpainting, the inpaint "respective field" crop, the blurred
pre-fill, the latent mask and the feathered paste-back. The sampling side lives in generate.py."""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# --- sizes -------------------------------------------------------------------------------------

VARY_STRENGTHS = {"Vary (Subtle)": 0.5, "Vary (Strong)": 0.85}
UPSCALE_FACTORS = {"Upscale (1.5x)": 1.5, "Upscale (2x)": 2.0, "Upscale (Fast 2x)": 2.0}
UPSCALE_METHODS = (*UPSCALE_FACTORS, "Upscale (Custom)")
UOV_METHODS = ("Disabled", *VARY_STRENGTHS, *UPSCALE_METHODS)
UPSCALE_STRENGTH = 0.382
UPSCALE_DIRECT_ABOVE = 2800  # shape ceil above which an upscale skips diffusion
MIN_SHAPE_CEIL, MAX_VARY_SHAPE_CEIL = 1024, 2048
VAE_PIXEL_MULTIPLE = 8  # the VAE encoder's input is centre-cropped to multiples of this


def decode_b64_image(data: str) -> np.ndarray:
    """A base64 image (what the frontend puts in the task: PNG) -> HxWx3 uint8 (alpha dropped)."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return np.array(im.convert("RGB"))


def decode_b64_mask(data: str) -> np.ndarray:
    """A base64 mask image -> HxW uint8 of its first channel (white = repaint)."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        arr = np.array(im)
    return arr if arr.ndim == 2 else arr[:, :, 0]


def shape_ceil(height: float, width: float) -> int:
    """ceil(sqrt(H*W) / 64) * 64: Fooocus's size measure for image tasks."""
    return int(math.ceil(math.sqrt(height * width) / 64.0) * 64)


def lanczos(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resample to exactly width x height (a no-op at the same size)."""
    width, height = int(width), int(height)
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.array(Image.fromarray(image).resize((width, height), resample=Image.LANCZOS))


def shape_for_ceil(height: int, width: int, ceil: int) -> tuple[int, int]:
    """(H, W) that Fooocus resizes to for a target shape ceil: repeatedly scale both sides by
    target / current and round each to a multiple of 64, until the shape ceil matches (at most
    256 rounds)."""
    h, w = height, width
    for _ in range(256):
        current = shape_ceil(h, w)
        if abs(current - ceil) < 0.1:
            break
        k = ceil / current
        h = int(round(h * k / 64.0) * 64)
        w = int(round(w * k / 64.0) * 64)
    return h, w


def resize_to_shape_ceil(image: np.ndarray, ceil: int) -> np.ndarray:
    h, w = shape_for_ceil(image.shape[0], image.shape[1], ceil)
    return lanczos(image, w, h)


def center_crop_multiple(image: np.ndarray, multiple: int = VAE_PIXEL_MULTIPLE) -> np.ndarray:
    """Centre-crop each side down to a multiple (what the VAE encoder sees)."""
    h, w = image.shape[:2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    top, left = (h % multiple) // 2, (w % multiple) // 2
    return image[top:top + nh, left:left + nw]


def vary_strength(method: str, overwrite: float = -1) -> float:
    return float(overwrite) if overwrite > 0 else VARY_STRENGTHS[method]


def vary_image(image: np.ndarray) -> np.ndarray:
    """The vary input: resized to its shape ceil clamped to [1024, 2048]."""
    ceil = min(max(shape_ceil(*image.shape[:2]), MIN_SHAPE_CEIL), MAX_VARY_SHAPE_CEIL)
    return image if ceil == shape_ceil(*image.shape[:2]) else resize_to_shape_ceil(image, ceil)


def upscale_factor(method: str, upscale_value: float | None = None) -> float:
    """1.5 / 2; Custom uses `upscale_value` when 0 < value < 5 (else 2x, Fooocus's fallback)."""
    if method in UPSCALE_FACTORS:
        return UPSCALE_FACTORS[method]
    if upscale_value is not None and 0 < float(upscale_value) < 5:
        return float(upscale_value)
    return 2.0


@dataclass(frozen=True)
class UpscalePlan:
    """What an upscale does after the 4x super-resolution: resize to (width, height), then
    diffuse at `strength` unless `direct` (Fast 2x, or a result above 2800 shape ceil)."""

    width: int
    height: int
    direct: bool


def upscale_plan(height: int, width: int, method: str, upscale_value: float | None = None) -> UpscalePlan:
    f = upscale_factor(method, upscale_value)
    ceil = shape_ceil(height * f, width * f)
    if ceil < MIN_SHAPE_CEIL:  # small results go to shape ceil 1024 (64-multiples) instead
        h, w = shape_for_ceil(height * 4, width * 4, MIN_SHAPE_CEIL)
        ceil = MIN_SHAPE_CEIL
    else:
        h, w = int(height * f), int(width * f)
    return UpscalePlan(w, h, direct=method == "Upscale (Fast 2x)" or ceil > UPSCALE_DIRECT_ABOVE)


def upscale_strength(overwrite: float = -1) -> float:
    return float(overwrite) if overwrite > 0 else UPSCALE_STRENGTH


# --- masks -------------------------------------------------------------------------------------

def binary_mask(mask: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """The uploaded mask's channel 0 (resized to (width, height) with Lanczos if it differs),
    > 127 -> 255 else 0."""
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = lanczos(mask, *size)
    return np.where(mask > 127, 255, 0).astype(np.uint8)


def erode_or_dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """k > 0: dilate, k < 0: erode, |k| times with a 3x3 ones kernel."""
    if k == 0:
        return mask
    image = Image.fromarray(mask)
    f = ImageFilter.MaxFilter(3) if k > 0 else ImageFilter.MinFilter(3)
    for _ in range(abs(int(k))):
        image = image.filter(f)
    return np.array(image)


OUTPAINT_SIDES = ("Left", "Right", "Top", "Bottom")
OUTPAINT_DEFAULT_FRACTION = 0.3


def outpaint(image: np.ndarray, mask: np.ndarray, selections, distances: dict[str, int] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pad top/bottom first (each by its distance, or int(0.3 H) when the distance is <= 0), then
    with the new size left/right (int(0.3 W)). The image is edge-replicated, the mask 255 there."""
    distances = distances or {}
    sel = set(selections or [])

    def amount(side: str, extent: int) -> int:
        d = int(distances.get(side.lower()) or 0)
        return d if d > 0 else int(extent * OUTPAINT_DEFAULT_FRACTION)

    top = amount("Top", image.shape[0]) if "Top" in sel else 0
    bottom = amount("Bottom", image.shape[0]) if "Bottom" in sel else 0
    if top or bottom:
        image = np.pad(image, ((top, bottom), (0, 0), (0, 0)), mode="edge")
        mask = np.pad(mask, ((top, bottom), (0, 0)), mode="constant", constant_values=255)
    left = amount("Left", image.shape[1]) if "Left" in sel else 0
    right = amount("Right", image.shape[1]) if "Right" in sel else 0
    if left or right:
        image = np.pad(image, ((0, 0), (left, right), (0, 0)), mode="edge")
        mask = np.pad(mask, ((0, 0), (left, right)), mode="constant", constant_values=255)
    return image, mask


def _clip_box(h: int, w: int, a: int, b: int, c: int, d: int) -> tuple[int, int, int, int]:
    return max(0, min(h, a)), max(0, min(h, b)), max(0, min(w, c)), max(0, min(w, d))


def initial_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive: the square of half-size
    int(1.15 * max(half height, half width)) around the centre of the mask's bounding box
    (mask > 0), clipped to the image."""
    rows, cols = np.nonzero(mask > 0)
    a, b, c, d = rows.min(), rows.max(), cols.min(), cols.max()
    cy, hy = (a + b) // 2, (b - a) // 2
    cx, hx = (c + d) // 2, (d - c) // 2
    half = int(max(hy, hx) * 1.15)
    return _clip_box(*mask.shape[:2], cy - half, cy + half + 1, cx - half, cx + half + 1)


def respective_field_box(mask: np.ndarray, k: float) -> tuple[int, int, int, int]:
    """Fooocus's crop: k = 1 -> the whole image; otherwise grow the initial box by 1 px per side
    along its shorter dimension (the other one once a side spans the image) until its height is
    >= k H and its width >= k W."""
    h, w = mask.shape[:2]
    if k >= 1.0:
        return 0, h, 0, w
    a, b, c, d = initial_box(mask)
    while not (b - a >= h * k and d - c >= w * k):
        grow_h = (b - a) < (d - c)
        grow_w = not grow_h
        if b - a == h:
            grow_w = True
        if d - c == w:
            grow_h = True
        if grow_h:
            a, b = a - 1, b + 1
        if grow_w:
            c, d = c - 1, d + 1
        a, b, c, d = _clip_box(h, w, a, b, c, d)
    return a, b, c, d


FILL_BLURS = ((512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16))


def blurred_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pre-fill the masked region: repeated box blurs of decreasing radius, the known pixels
    (mask < 127) restored after every blur."""
    known = mask < 127
    store = image[known]
    current = image.copy()
    for radius, repeats in FILL_BLURS:
        for _ in range(repeats):
            current = np.array(Image.fromarray(current).filter(ImageFilter.BoxBlur(radius)))
            current[known] = store
    return current


FEATHER_STEPS, FEATHER_DROP = 32, 8


def feathered_mask(mask: np.ndarray) -> np.ndarray:
    """The paste-back weight (uint8, 255 = generated): 256 inside mask > 127, then 32 rounds of
    max(3x3 dilation - 8, current), clipped to 255: a linear ramp about 32 px wide outside the
    mask, exactly 0 beyond it."""
    x = np.where(mask > 127, 256, 0).astype(np.int32)
    for _ in range(FEATHER_STEPS):
        padded = np.pad(x, 1, mode="edge")
        dilated = np.max(np.stack([padded[i:i + x.shape[0], j:j + x.shape[1]]
                                   for i in range(3) for j in range(3)]), axis=0)
        x = np.maximum(dilated - FEATHER_DROP, x)
    return x.clip(0, 255).astype(np.uint8)


def blend(generated: np.ndarray, original: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """generated * w + original * (1 - w) with w = weight / 255 (exactly the original where w = 0)."""
    w = weight[:, :, None].astype(np.float32) / 255.0
    out = generated.astype(np.float32) * w + original.astype(np.float32) * (1.0 - w)
    return out.clip(0, 255).astype(np.uint8)


@dataclass
class InpaintRegion:
    """The respective-field crop of an inpaint task and how its result goes back."""

    image: np.ndarray        # the full (possibly outpainted) image
    mask: np.ndarray         # the full mask, 0/255
    box: tuple[int, int, int, int]  # (top, bottom, left, right) in the full image
    crop: np.ndarray         # the crop resized for diffusion (shape ceil 1024, 64-multiples)
    crop_mask: np.ndarray    # its mask (Lanczos-resized, > 127 -> 255)
    fill: np.ndarray         # the crop with the masked region pre-filled (or the crop itself)
    feather: np.ndarray      # paste-back weight over the full image

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """The generated crop resized back into its box, then blended with the original through
        the feathered mask."""
        a, b, c, d = self.box
        result = self.image.copy()
        result[a:b, c:d] = lanczos(generated, d - c, b - a)
        return blend(result, self.image, self.feather)


def inpaint_region(image: np.ndarray, mask: np.ndarray, respective_field: float, use_fill: bool,
                   super_resolve=None) -> InpaintRegion:
    """Crop the respective field, super-resolve a crop smaller than shape ceil 1024 with
    `super_resolve` (the 4x upscaler), resize it to shape ceil 1024 and pre-fill it."""
    a, b, c, d = respective_field_box(mask, respective_field)
    crop, crop_mask = image[a:b, c:d], mask[a:b, c:d]
    if shape_ceil(*crop.shape[:2]) < MIN_SHAPE_CEIL and super_resolve is not None:
        crop = super_resolve(crop)
    crop = resize_to_shape_ceil(crop, MIN_SHAPE_CEIL)
    crop_mask = binary_mask(crop_mask, (crop.shape[1], crop.shape[0]))
    fill = blurred_fill(crop, crop_mask) if use_fill else crop
    return InpaintRegion(image, mask, (a, b, c, d), crop, crop_mask, fill, feathered_mask(mask))


# --- latents -----------------------------------------------------------------------------------

def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int], factor: int = 8):
    """mask (HxW 0/255) -> (1, 1, h, w) float 0/1: bilinear resize to the latent size x 8, round,
    8x8 max-pool (a latent cell is masked if any of its pixels is)."""
    import torch

    h, w = latent_hw
    m = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    m = torch.nn.functional.interpolate(m, size=(h * factor, w * factor), mode="bilinear").round()
    return torch.nn.functional.max_pool2d(m, (factor, factor)).round()


def to_model_image(image: np.ndarray):
    """HxWx3 uint8 -> (1, 3, H, W) float in [-1, 1] (the VAE encoder's input)."""
    import torch

    return torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def masked_grey(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked pixels set to 0.5 grey (what the inpaint head's latent encodes), as float [0, 1]."""
    w = (mask.astype(np.float32) / 255.0).round()[:, :, None]
    return image.astype(np.float32) / 255.0 * (1 - w) + 0.5 * w


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Fooocus's tile origins along one axis of `size` (its `tiled_scale`): every `tile - overlap`,
    each pulled back to at most `size - overlap` (so a size equal to the tile leaves an
    `overlap`-wide strip for a second tile, as Fooocus does)."""
    return [max(0, min(size - overlap, start)) for start in range(0, size, tile - overlap)]


def feather(length: int, width: int):
    """Weights along one axis of a tile's output: (t + 1) / width for the t-th pixel from either
    end (t < width), 1 inside; both ramps multiply where a short tile has them overlap."""
    import torch

    i = torch.arange(length, dtype=torch.float32)
    return (torch.clamp((i + 1) / width, max=1.0) * torch.clamp((length - i) / width, max=1.0)
            if width > 0 else torch.ones(length))


def tiled_scale(fn, x, tile_hw: tuple[int, int], overlap: int, scale: float | None = None):
    """Fooocus's `tiled_scale`: apply `fn` ((1, C, h, w) -> (1, C', h*scale, w*scale)) to
    overlapping tiles of x (`tile_hw` = (height, width), origins `tile_starts`), weight each
    output by `feather` ramps `round(overlap * scale)` wide on all four sides and divide the
    weighted sum by the summed weights. `scale` None: read off the first tile's output. The result
    is on x's device (tile outputs are moved there)."""
    import torch

    _, _, h, w = x.shape
    th, tw = tile_hw
    out = weight = None
    for y in tile_starts(h, th, overlap):
        for x0 in tile_starts(w, tw, overlap):
            piece = x[:, :, y:y + th, x0:x0 + tw].contiguous()
            result = fn(piece).float().to(x.device)
            if out is None:
                scale = scale if scale is not None else result.shape[-1] / piece.shape[-1]
                out = torch.zeros(1, result.shape[1], round(h * scale), round(w * scale), device=x.device)
                weight = torch.zeros(1, 1, round(h * scale), round(w * scale), device=x.device)
            ramp = round(overlap * scale)
            mask = (feather(result.shape[-2], ramp)[:, None] * feather(result.shape[-1], ramp)[None, :]).to(x.device)
            rows = slice(round(y * scale), round(y * scale) + result.shape[-2])
            cols = slice(round(x0 * scale), round(x0 * scale) + result.shape[-1])
            out[:, :, rows, cols] += result * mask
            weight[:, :, rows, cols] += mask
    return out / weight


# Fooocus's tiled VAE: the average of three tilings (square, wide, tall).
ENCODE_TILINGS = ((512, 512), (256, 1024), (1024, 256))  # pixels (h, w)
ENCODE_OVERLAP = 64
DECODE_TILINGS = ((64, 64), (32, 128), (128, 32))  # latent cells (h, w)
DECODE_OVERLAP = 16
