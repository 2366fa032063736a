"""Checkpoint -> ONNX (-> TensorRT) -> Triton model repository. Not needed at serving time."""
