"""A simulated TensorRT for the tests of the TensorRT backend's orchestration (``simulated``, a fixture of
conftest.py, installs it with the simulated CUDA runtime of fake_cuda.py; :func:`engine_pipeline` builds and
loads engines on it).

No TensorRT can be installed here, so this stands in for it: a "plan" is the path of an ONNX file and the
optimization profile it was built for, an engine runs that file with ONNX Runtime on the CPU and refuses an
input shape outside its profile, as TensorRT's ``set_input_shape`` does, device memory is host memory at the
addresses handed out, and a captured CUDA graph records each engine launch with the tensor addresses bound
at capture time, then replays exactly those. It checks what sdengine does with TensorRT — engine checks,
shared device memory, buffers and addresses set once per shape, the step engine, two ping-pong graphs per
shape replayed N times, uploads between runs, shapes within each engine's profile — not TensorRT itself,
whose calls are only written against its documented API.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fake_cuda import view

from sdengine.engine_keys import BuildEnv

ENV = BuildEnv(trt_version="10.9.0", compute_capability="8.9")
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
#: Device memory each simulated engine asks for; the VAE decoder's is the largest, as at 512x512.
ENGINE_MEMORY = {
    "text_encoder": 4096,
    "text_encoder_2": 6144,
    "unet": 8192,
    "unet_shallow": 2048,
    "vae_decoder": 16384,
    "vae_encoder": 12288,
}


class FakeEngine:
    #: a step engine asks for this much device memory per model call (a test raises it to force growth)
    step_memory_per_call = 256

    def __init__(self, trt, path: str, profile: dict | None = None) -> None:
        self.trt, self.session = trt, ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.profile = profile or {}  # input name -> [min shape, opt shape, max shape]
        self.io = {i.name: (self.trt.TensorIOMode.INPUT, i) for i in self.session.get_inputs()}
        self.io.update({o.name: (self.trt.TensorIOMode.OUTPUT, o) for o in self.session.get_outputs()})
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        component = Path(path).parent.name
        if component in ENGINE_MEMORY:
            self.device_memory_size_v2 = ENGINE_MEMORY[component]
        else:  # a step engine
            self.device_memory_size_v2 = self.step_memory_per_call * self.io["coeffs"][1].shape[0]

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return ORT_TYPES[self.io[name][1].type]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def create_execution_context(self, strategy):
        assert strategy == self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = ptr

    def set_input_shape(self, name, shape):
        if name in self.engine.profile:
            low, _, high = self.engine.profile[name]
            inside = len(shape) == len(low) and all(
                lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)
            )
            if not inside:
                return False  # outside the engine's profile, as TensorRT refuses it
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _inputs(self, addresses):
        return {
            name: view(addresses[name], self.shapes[name], self.engine.get_tensor_dtype(name)).copy()
            for name in self.shapes
        }

    def get_tensor_shape(self, name):
        feed = {n: np.zeros(s, self.engine.get_tensor_dtype(n)) for n, s in self.shapes.items()}
        return self.engine.session.run([name], feed)[0].shape

    def execute_async_v3(self, stream):
        assert self.memory is not None, "device memory must be set before running"
        cudart = sys.modules["cuda.bindings.runtime"]
        # what a launch (or a graph captured from it) depends on; the graph does not keep the context alive
        context, memory = weakref.ref(self), self.memory
        addresses, shapes = dict(self.addresses), dict(self.shapes)

        def run() -> None:
            ctx = context()
            assert ctx is not None, "a graph replayed an execution context that was freed"
            assert memory in cudart.memory, "an engine ran on device memory that was freed"
            assert (ctx.addresses, ctx.shapes, ctx.memory) == (addresses, shapes, memory), (
                "an execution context was changed under its captured graph"
            )
            outputs = [n for n in ctx.engine.names if ctx.engine.get_tensor_mode(n) != "in"]
            results = ctx.engine.session.run(outputs, ctx._inputs(addresses))
            for name, value in zip(outputs, results, strict=True):
                ctypes.memmove(addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)

        if cudart.capture is not None:
            cudart.capture.append(run)  # a graph replays the addresses bound at capture time
        else:
            run()
        return True


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = ENV.trt_version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED=2)
    trt.nptype = lambda dtype: dtype
    trt.Runtime = type(
        "Runtime",
        (),
        {
            "__init__": lambda self, logger: None,
            "deserialize_cuda_engine": lambda self, data: FakeEngine(trt, **json.loads(data)),
        },
    )
    return trt


def write_plan(onnx_path, plan_path, profile, *, optimization_level, timing_cache, progress):
    # the simulated "engine" is its ONNX file and the profile it takes
    plan = {
        "path": str(onnx_path),
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
    }
    plan_path.write_text(json.dumps(plan))


def engine_pipeline(onnx_dir: Path, engines: Path, tokenizer=None, **build):
    """A pipeline on simulated TensorRT engines built from ``onnx_dir`` into ``engines`` (``build``: the
    build's settings, such as ``height`` and ``width``), with ``tokenizer`` or the export's own."""
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    build_engines(onnx_dir, engines, env=ENV, builder=write_plan, **build)
    backend = TrtBackend.load(engines)
    tokenizer = tokenizer or ClipTokenizer.from_dir(backend.model_dir.tokenizer_dir)
    return Pipeline(backend.model_dir, backend, tokenizer)
