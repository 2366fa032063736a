"""A leaf model of the `python-torch` target: the torch module of one SDXL component, on CUDA in
fp16 when a GPU is there (FP32 at the interface), else on the CPU in fp32.

Tensors cross the Python backend boundary by DLPack, so with FORCE_CPU_ONLY_INPUT_TENSORS off a
GPU input arrives on the GPU and the output leaves from it without a host copy. Parameters:
`checkpoint` (diffusers folder), `device` (cuda|cpu|auto), `dtype` (float16|float32), `compile`
(torch.compile with CUDA graphs: true|false), `patched_sessions` (merged weight-patch sets kept,
default 2: pipeline.lora.TorchPatcher).

Triton's dynamic batcher may hand one `execute` the requests of several jobs: those with the same
patch set (this leaf's part of it) and the same non-batch shapes are concatenated and run as one
forward (`pipeline.batching.run_grouped`), each patch set merged once; a request whose patch set
cannot be read or applied fails alone (with its group, when others share that same set)."""
import json

import torch
import triton_python_backend_utils as pb_utils

from pipeline.batching import PatchSetError, leaf_responses
from pipeline.interfaces import PATCHES_PARAMETER
from pipeline.lora import TorchPatcher, for_leaf, from_json
from pipeline.torch_leaves import load_leaf


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        want = params.get("device", "auto")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            self.device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
        else:
            self.device = torch.device("cpu")
        fp16 = params.get("dtype", "float16") == "float16" and self.device.type == "cuda"
        self.dtype = torch.float16 if fp16 else torch.float32
        module = load_leaf(config["name"], params["checkpoint"]).to(self.device, self.dtype)
        # Weight patches (LoRAs, inpaint patch/head) are merged into the parameters in place.
        self.patcher = TorchPatcher(module, config["name"], params.get("patched_sessions"))
        # The family must outlive its metrics (Triton's python backend): keep it on the model.
        self.lookup_family = family = pb_utils.MetricFamily(name="fooocus_patched_session_lookups_total",
                                       description="Leaf weight sets asked for by patch set: base, current, "
                                                   "cache hit, or miss (weights merged)",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.lookups = {r: family.Metric(labels={"model": config["name"], "result": r})
                        for r in ("base", "current", "hit", "miss")}
        if params.get("compile", "false") == "true" and self.device.type == "cuda":
            module = torch.compile(module, mode="reduce-overhead", dynamic=False)
        self.module = module
        self.role = config["name"]
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def _input(self, request, name):
        tensor = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def execute(self, requests):
        items = [self._item(request) for request in requests]  # (patch set, inputs) or the request's error
        return leaf_responses(pb_utils, items, self._run, self.output_names, _dlpack_tensor)

    def _item(self, request):
        try:
            # This leaf's part of the set is the group key: sets that differ elsewhere run together.
            patches = for_leaf(self.role, from_json(json.loads(request.parameters() or "{}").get(PATCHES_PARAMETER)))
        except Exception as exc:  # an unreadable patch parameter fails this request, not the model
            return PatchSetError.wrapping(exc)
        return patches, {n: self._input(request, n) for n in self.input_names}

    def _run(self, patches, inputs):
        try:
            self.lookups[self.patcher.apply(patches)].increment(1)
        except Exception as exc:  # a broken patch file fails the requests with this set, not the model
            raise PatchSetError.wrapping(exc) from exc
        with torch.inference_mode():
            out = self.module(*[inputs[n] for n in self.input_names])
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float() for n, t in zip(self.output_names, out)}


def _dlpack_tensor(name, value):
    return pb_utils.Tensor.from_dlpack(name, value.contiguous())
