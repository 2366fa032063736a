"""The decoupled BLS pipeline model: binds the generation core's model interface to Triton BLS
calls and streams its events (progress per step, one result per image) back to the caller.

Each request runs on a worker thread, so several jobs run at once and share the leaf models."""
import json
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from pipeline.batching import BatchLimitedRunner
from pipeline.errors import UnsupportedFeature
from pipeline.generate import Cancelled, Pipeline
from pipeline.interfaces import PATCHES_PARAMETER, UNET, leaf_specs
from pipeline.lora import to_json
from pipeline.task import GenerationTask

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonModels:
    """The core's ModelRunner over BLS: one synchronous Triton inference per call. Outputs come
    back on the device of the call's inputs: with the pipeline on a GPU, device tensors cross to
    GPU leaves by DLPack and their outputs stay on the GPU (no host round trip); CPU inputs (token
    ids, upscaler tiles) get host outputs."""

    def __init__(self, specs):
        self.output_names = {name: [t.name for t in spec.outputs] for name, spec in specs.items()}

    def __call__(self, model, inputs, patches=()):
        # A weight-patch set travels as a request parameter; the leaf merges it (pipeline.lora).
        extra = {"parameters": {PATCHES_PARAMETER: to_json(patches)}} if patches else {}
        device = next(iter(inputs.values())).device
        if device.type == "cuda":
            memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
        else:
            memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=self.output_names[model],
            inputs=[_tensor(k, v) for k, v in inputs.items()], preferred_memory=memory, **extra)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {n: _torch(pb_utils.get_output_tensor_by_name(response, n), device) for n in self.output_names[model]}


def _tensor(name, value):
    if value.device.type == "cuda":
        return pb_utils.Tensor.from_dlpack(name, value.contiguous())
    return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))


def _torch(tensor, device):
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy().copy()).to(device)
    return torch.from_dlpack(tensor.to_dlpack()).to(device)


def _device(args, params):
    """Where the core keeps its tensors: `device` parameter cuda|cpu|auto (auto: this instance's
    GPU when the instance is KIND_GPU and torch sees CUDA)."""
    want = params.get("device", "auto")
    if want == "auto":
        want = "cuda" if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available() else "cpu"
    if want == "cuda":
        index = int(args.get("model_instance_device_id", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _event(event):
    return pb_utils.Tensor("event", np.array([json.dumps(event).encode()], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        pipeline = Pipeline.from_dir(version_dir, models=None, styles_dir=params.get("styles_dir"),
                                     wildcards_dir=params.get("wildcards_dir"), loras_dir=params.get("loras_dir"),
                                     inpaint_dir=params.get("inpaint_dir"), device=_device(args, params))
        specs = leaf_specs(pipeline.dims)
        specs.update({leaf: specs[UNET] for leaf in pipeline.refiners.values()})  # refiner UNets
        pipeline.models = BatchLimitedRunner.for_specs(TritonModels(specs), specs)  # calls <= each leaf's max batch
        self.pipeline = pipeline
        self.executor = ThreadPoolExecutor(max_workers=int(params.get("max_concurrent_jobs", "4")),
                                           thread_name_prefix="job")

    def execute(self, requests):
        for request in requests:
            self.executor.submit(self._run, request)
        return None

    def _run(self, request):
        sender = request.get_response_sender()
        try:
            raw = pb_utils.get_input_tensor_by_name(request, "task").as_numpy().reshape(-1)[0]
            task = GenerationTask.from_dict(json.loads(raw))

            def emit(event, image):
                outputs = [_event(event)]
                if image is not None:
                    outputs.append(pb_utils.Tensor("image", image))
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs))

            self.pipeline.run(task, emit, is_cancelled=sender.is_cancelled)
            sender.send(pb_utils.InferenceResponse(output_tensors=[_event({"type": "finished"})]), flags=FINAL)
        except Cancelled:
            sender.send(flags=FINAL)
        except (UnsupportedFeature, ValueError, TypeError, KeyError) as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")),
                        flags=FINAL)
        except Exception as exc:  # a failed job must still end: report it, never leave the stream open
            self.logger.log_error(f"job failed: {traceback.format_exc()}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")),
                        flags=FINAL)

    def finalize(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
