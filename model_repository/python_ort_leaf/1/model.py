"""A leaf model of the `python-ort` target: runs `<version>/model.onnx` with ONNX Runtime.

The same file serves every leaf (text encoders, UNet, VAE); its tensor names come from the ONNX
file, which the exporter wrote from `pipeline.interfaces`."""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from pipeline.models import ort_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0"))
        self.session = ort_session(Path(args["model_repository"]) / args["model_version"] / "model.onnx", threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
            outputs = self.session.run(self.output_names, feeds)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs)]))
        return responses
