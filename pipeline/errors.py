class UnsupportedFeature(Exception):
    """A request asked for a Fooocus feature this server does not implement (yet); the job ends
    as ERROR with this message."""


class TensorRTUnavailable(RuntimeError):
    """Raised where TensorRT or a CUDA GPU is missing: engines are built, refitted and run only on
    the GPU that serves them (`export.tensorrt` builds them, `pipeline.trt_runtime` runs them)."""
