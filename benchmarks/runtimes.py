"""The deployment runtimes as providers of the model benchmark: ONNX Runtime and OpenVINO.

Each variant is exported once (``torch.onnx.export(..., dynamo=True)`` of the BN-folded
reference model, dynamic batch, into a temporary folder); each setting then opens a session
with its thread count. ONNX Runtime: CPU execution provider, all graph optimisations, one
inter-op thread and ``threads`` intra-op threads. OpenVINO: the CPU plugin with
``INFERENCE_NUM_THREADS = threads``, one stream, the latency hint, and an explicit
``INFERENCE_PRECISION_HINT`` (``f32``, or ``bf16``, OpenVINO's own default on CPUs with bf16
hardware). Both take the float32 image and return float32 logits.
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Callable

import torch


def available() -> list[str]:
    """The runtimes installed here (``pip install "shvit-kernels[onnx]"``)."""
    if importlib.util.find_spec("onnxscript") is None:
        return []
    return [name for name, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"))
            if importlib.util.find_spec(module) is not None]


def export(model: torch.nn.Module, x: torch.Tensor, path: pathlib.Path) -> pathlib.Path:
    """``model`` (eval mode, BN folded) as an ONNX file with a dynamic batch (exported with an
    example batch of 2: torch.export fixes dimensions of size 1)."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    x = x[:1].expand(2, *x.shape[1:]).contiguous()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(path))
    return path


def session(runtime: str, path: pathlib.Path, threads: int, precision: str = "f32") -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running the ONNX model at ``path`` on a float32 CPU tensor."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        if precision != "f32":
            raise ValueError("the ONNX Runtime provider runs float32 only")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    if runtime == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
        })
        request = compiled.create_infer_request()
        return lambda x: torch.from_numpy(request.infer([x.numpy()])[0].copy())
    raise ValueError(f"unknown runtime {runtime!r}")
