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

from pipeline.errors import UnsupportedFeature
from pipeline.generate import Cancelled, Pipeline
from pipeline.interfaces import PATCHES_PARAMETER, UNET, leaf_specs
from pipeline.lora import to_json
from pipeline.task import GenerationTask

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonModels:
    """The core's ModelRunner over BLS: one synchronous Triton inference per call."""

    def __init__(self, specs):
        self.output_names = {name: [t.name for t in spec.outputs] for name, spec in specs.items()}

    def __call__(self, model, inputs, patches=()):
        # A weight-patch set travels as a request parameter; the leaf merges it (pipeline.lora).
        extra = {"parameters": {PATCHES_PARAMETER: to_json(patches)}} if patches else {}
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=self.output_names[model],
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v.numpy())) for k, v in inputs.items()],
            # The core computes on the host: GPU leaves (python-torch, TensorRT) hand back host tensors.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0), **extra)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {n: torch.from_numpy(pb_utils.get_output_tensor_by_name(response, n).as_numpy().copy())
                for n in self.output_names[model]}


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
                                     inpaint_dir=params.get("inpaint_dir"))
        specs = leaf_specs(pipeline.dims)
        specs.update({leaf: specs[UNET] for leaf in pipeline.refiners.values()})  # refiner UNets
        pipeline.models = TritonModels(specs)
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
