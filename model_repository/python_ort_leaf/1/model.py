"""A leaf model of the `python-ort` target: runs `<version>/model.onnx` with ONNX Runtime.

The same file serves every leaf (text encoders, UNet, VAE); its tensor names come from the ONNX
file, which the exporter wrote from `pipeline.interfaces`. A request may carry a weight-patch set
(request parameter `PATCHES_PARAMETER`: LoRAs, the inpaint patch and head); it runs on a session
with those weights merged (`pipeline.models.PatchedSessions`, LRU-cached: config parameter
`patched_sessions` or env FOOOCUS_PATCHED_SESSIONS, default 2 besides the base). Counters:
`fooocus_patched_session_lookups_total{model, result=base|hit|miss}` on Triton's metrics port."""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

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
        responses = []
        for request in requests:
            try:
                patches = from_json(json.loads(request.parameters() or "{}").get(PATCHES_PARAMETER))
                session = self.sessions.session(patches)
            except Exception as exc:  # a broken patch file fails this request, not the model
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"weight patches: {type(exc).__name__}: {exc}")))
                continue
            self.lookups[self.sessions.last].increment(1)
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
            outputs = session.run(self.output_names, feeds)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs)]))
        return responses
