"""TensorRT, two ways: `tensorrt` (ONNX through the TensorRT builder to a serialized engine) and
`torch-tensorrt` (torch_tensorrt.dynamo on the captured program).

Written against the TensorRT 10 Python API and type-checked with tensorrt-stubs; the library is
not installable on Kiln's machines, so every part that does not need it (profiles, options,
precision flags, the engine's manifest facts, shape checks, error mapping) is plain Python,
tested here. profile.py is shared by both; builder.py builds; engine.py and torch_trt.py are the
two backends.
"""

from .engine import TensorRTBackend
from .torch_trt import TorchTensorRTBackend

__all__ = ["TensorRTBackend", "TorchTensorRTBackend"]
