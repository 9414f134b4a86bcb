"""Inference runtimes: a batch of normalised NCHW float32 images in, class probabilities out.

`OnnxModel` runs an ONNX export with ONNX Runtime and never imports torch. `TorchModel` runs
the logged PyTorch model, in float32 or with bfloat16 autocast, and is the only user of torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

RUNTIMES = ("auto", "onnx", "torch")
TORCH_DTYPES = ("float32", "bfloat16")


class InferenceRuntime(Protocol):
    """A model that maps a (N, 3, H, W) float32 batch to (N, classes) float32 probabilities.

    Calls block, so run them in a worker thread.
    """

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxModel:
    """An ONNX model in an ONNX Runtime CPU session.

    Args:
        path: The `.onnx` file, with one input (the image batch) and one output.
        threads: Intra-op threads of the session.
    """

    name = "onnx"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads spin for a while by default, which takes CPU time from the
        # threads that decode the next uploads and from other processes. On 2 shared cores,
        # spinning doubled the batch-1 latency while another process was busy.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; expected one each"
            )
        self.input_name = inputs[0].name
        self.threads = threads

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        [probabilities] = self.session.run(None, {self.input_name: batch})
        return np.asarray(probabilities, dtype=np.float32)


class TorchModel:
    """A PyTorch module run under `torch.inference_mode`.

    Args:
        module: Maps normalised NCHW float32 images to class probabilities.
        dtype: `float32`, or `bfloat16` to run under CPU autocast with channels-last inputs.
            bfloat16 is faster on CPUs with AVX512-BF16 or AMX, and its probabilities differ
            from float32 by up to 0.005 on the development set's photos (docs/benchmarks.md).
    """

    name = "torch"

    def __init__(self, module: torch.nn.Module, dtype: str = "float32"):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype={dtype!r} is invalid; use one of {TORCH_DTYPES}")
        self.module = module
        self.dtype = dtype

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        images = torch.from_numpy(batch)
        with torch.inference_mode():
            if self.dtype == "bfloat16":
                images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    output = self.module(images)
            else:
                output = self.module(images)
        return output.float().cpu().numpy()


def release_free_memory() -> None:
    """Return freed heap pages to the operating system (glibc's `malloc_trim`), if available.

    Loading a model frees most of what parsing and graph optimisation allocated, but glibc
    keeps those pages in the process: about 95 MiB after creating the ONNX Runtime session of
    a ResNet18 (measured with ONNX Runtime 1.32 on Linux). Elsewhere this does nothing.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def describe(runtime: Any) -> str:
    """Return the runtime's name, with the dtype for torch, for logs and `/info`."""
    if isinstance(runtime, TorchModel):
        return f"torch ({runtime.dtype})"
    return str(getattr(runtime, "name", type(runtime).__name__))
