"""A leaf model of the `python-ort` target: runs `<version>/model.onnx` with ONNX Runtime.

The same file serves every leaf (text encoders, UNet, VAE); its tensor names come from the ONNX
file, which the exporter wrote from `pipeline.interfaces`. A request may carry a weight-patch set
(request parameter `PATCHES_PARAMETER`: LoRAs, the inpaint patch and head); it runs on a session
with those weights merged (`pipeline.models.PatchedSessions`, LRU-cached: config parameter
`patched_sessions` or env FOOOCUS_PATCHED_SESSIONS, default 2 besides the base). Counters:
`fooocus_patched_session_lookups_total{model, result=base|hit|miss}` on Triton's metrics port.

Triton's dynamic batcher may hand one `execute` the requests of several jobs: those that run on
the same session with the same non-batch shapes are concatenated and run as one call
(`pipeline.batching.run_grouped`); a request whose patch set cannot be applied fails alone."""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from pipeline.batching import PatchSetError, leaf_responses
from pipeline.interfaces import PATCHES_PARAMETER
from pipeline.lora import from_json
from pipeline.models import PatchedSessions


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # `leaf`: the role of a leaf whose name is not its role (a refiner's UNet is a `unet`).
        self.sessions = PatchedSessions(path, params.get("leaf", config["name"]), int(params.get("intra_op_threads", "0")),
                                        params.get("patched_sessions"))
        self.input_names = [i.name for i in self.sessions.base.get_inputs()]
        self.output_names = [o.name for o in self.sessions.base.get_outputs()]
        # The family must outlive its metrics (Triton's python backend): keep it on the model.
        self.lookup_family = family = pb_utils.MetricFamily(name="fooocus_patched_session_lookups_total",
                                       description="Leaf sessions asked for by patch set: base, cache hit, or "
                                                   "miss (weights merged)",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.lookups = {r: family.Metric(labels={"model": config["name"], "result": r}) for r in ("base", "hit", "miss")}

    def execute(self, requests):
        items = [self._item(request) for request in requests]  # (session, inputs) or the request's error
        return leaf_responses(pb_utils, items, self._run, self.output_names, pb_utils.Tensor)

    def _item(self, request):
        try:
            patches = from_json(json.loads(request.parameters() or "{}").get(PATCHES_PARAMETER))
            session = self.sessions.session(patches)
        except Exception as exc:  # a broken patch file fails this request, not the model
            return PatchSetError.wrapping(exc)
        self.lookups[self.sessions.last].increment(1)
        return session, {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}

    def _run(self, session, feeds):
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))

