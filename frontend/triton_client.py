"""Runs one generation task on Triton's decoupled pipeline model over a gRPC stream and yields
its events. Cancelling the consumer cancels the gRPC call, which Triton turns into request
cancellation inside the pipeline (it stops at the next step)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from pipeline.interfaces import PIPELINE_MODEL


class TritonJobError(Exception):
    """The job could not run to its end on Triton; the message says why."""


@dataclass
class PipelineEvent:
    data: dict
    image: np.ndarray | None = None


class TritonPipelineClient:
    def __init__(self, url: str, model_name: str = PIPELINE_MODEL):
        self.url = url
        self.model_name = model_name
        self._client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready() and await self.client.is_model_ready(self.model_name))
        except (InferenceServerException, OSError):
            return False

    async def wait_ready(self, timeout: float) -> None:
        """Wait for Triton and the pipeline model (e.g. while the launcher restarts Triton)."""
        deadline = time.monotonic() + timeout
        while not await self.is_ready():
            if time.monotonic() > deadline:
                raise TritonJobError(f"Triton Inference Server at {self.url} is not ready (waited {timeout:.0f} s)")
            await asyncio.sleep(0.5)

    async def run(self, task: dict, request_id: str) -> AsyncIterator[PipelineEvent]:
        task_input = grpcclient.InferInput("task", [1], "BYTES")
        task_input.set_data_from_numpy(np.array([json.dumps(task).encode()], dtype=np.object_))
        done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model_name, "inputs": [task_input], "request_id": request_id,
                   "enable_empty_final_response": True}
            await done.wait()  # keep the stream open until the final response

        try:
            async for result, error in self.client.stream_infer(requests()):
                if error is not None:
                    raise TritonJobError(_message(error))
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                event = result.as_numpy("event")
                if event is not None:
                    yield PipelineEvent(json.loads(event.reshape(-1)[0]), result.as_numpy("image"))
                if final is not None and final.bool_param:
                    return
            raise TritonJobError("the pipeline's response stream ended without a final response")
        except InferenceServerException as exc:
            raise TritonJobError(f"Triton Inference Server: {_message(exc)}") from exc
        except grpc.RpcError as exc:  # the stream broke: Triton died or the connection dropped
            raise TritonJobError(f"lost the connection to Triton Inference Server "
                                 f"({exc.code().name}: {exc.details()})") from exc
        finally:
            done.set()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return text.strip() or type(error).__name__
