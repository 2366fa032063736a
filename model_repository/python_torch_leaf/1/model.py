"""A leaf model of the `python-torch` target: the torch module of one SDXL component, on CUDA in
fp16 when a GPU is there (FP32 at the interface), else on the CPU in fp32.

Tensors cross the Python backend boundary by DLPack, so with FORCE_CPU_ONLY_INPUT_TENSORS off a
GPU input arrives on the GPU and the output leaves from it without a host copy. Parameters:
`checkpoint` (diffusers folder), `device` (cuda|cpu|auto), `dtype` (float16|float32), `compile`
(torch.compile with CUDA graphs: true|false)."""
import json

import torch
import triton_python_backend_utils as pb_utils

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
        if params.get("compile", "false") == "true" and self.device.type == "cuda":
            module = torch.compile(module, mode="reduce-overhead", dynamic=False)
        self.module = module
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def _input(self, request, name):
        tensor = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
        tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def execute(self, requests):
        responses = []
        with torch.inference_mode():
            for request in requests:
                out = self.module(*[self._input(request, n) for n in self.input_names])
                out = out if isinstance(out, tuple) else (out,)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack(n, t.float().contiguous()) for n, t in zip(self.output_names, out)]))
        return responses
