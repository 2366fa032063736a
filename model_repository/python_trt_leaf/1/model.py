"""A leaf model of the `tensorrt` target for the leaves that take weight patches (text encoders,
UNet, refiner UNets): runs `<version>/model.plan` with TensorRT on this instance's GPU and applies
a request's weight-patch set (request parameter `PATCHES_PARAMETER`: LoRAs, the inpaint patch and
head) by refitting a copy of the engine (`pipeline.trt_runtime.RefittedEngines`, LRU-cached:
config parameter `patched_sessions` or env FOOOCUS_PATCHED_SESSIONS, default 2 besides the base).

Parameters: `leaf` (the role of a leaf whose name is not its role: a refiner's UNet is a `unet`),
`patched_sessions`. Tensors cross the python backend boundary by DLPack (FORCE_CPU_ONLY_INPUT_TENSORS
off: GPU inputs stay on the GPU). Counters: `fooocus_patched_session_lookups_total{model,
result=base|hit|miss}` on Triton's metrics port.

Triton's dynamic batcher may hand one `execute` the requests of several jobs: those that run on
the same engine with the same non-batch shapes are concatenated and run as one call
(`pipeline.batching.run_grouped`); a request whose patch set cannot be applied fails alone."""
import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils

from pipeline.batching import PatchSetError, leaf_responses
from pipeline.interfaces import PATCHES_PARAMETER
from pipeline.lora import from_json
from pipeline.trt_runtime import RefittedEngines


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        self.engines = RefittedEngines(version / "model.plan", version / "model.onnx",
                                       params.get("leaf", config["name"]), params.get("patched_sessions"),
                                       device=f"cuda:{int(args.get('model_instance_device_id') or 0)}")
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        # The family must outlive its metrics (Triton's python backend): keep it on the model.
        self.lookup_family = family = pb_utils.MetricFamily(name="fooocus_patched_session_lookups_total",
                                       description="Leaf engines asked for by patch set: base, cache hit, or "
                                                   "miss (a copy refitted)",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.lookups = {r: family.Metric(labels={"model": config["name"], "result": r}) for r in ("base", "hit", "miss")}

    def execute(self, requests):
        # Triton's dynamic batcher may hand one `execute` several jobs' requests: those on the same
        # engine (patch set) with the same non-batch shapes run as one call (pipeline.batching).
        items = [self._item(request) for request in requests]  # (engine, inputs) or the request's error
        return leaf_responses(pb_utils, items, self._run, self.output_names, _dlpack_tensor)

    def _item(self, request):
        try:
            patches = from_json(json.loads(request.parameters() or "{}").get(PATCHES_PARAMETER))
            engine = self.engines.engine(patches)
        except Exception as exc:  # a broken patch file fails this request, not the model
            return PatchSetError.wrapping(exc)
        self.lookups[self.engines.last].increment(1)
        return engine, {n: torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, n).to_dlpack())
                        for n in self.input_names}

    def _run(self, engine, inputs):
        return engine(inputs)  # e.g. a shape outside the plan's profile fails this group only


def _dlpack_tensor(name, value):
    return pb_utils.Tensor.from_dlpack(name, value.contiguous())
