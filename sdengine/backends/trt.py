"""TensorRT backend: engines deserialized once, one CUDA stream, whole denoising steps as CUDA-graph replays.

- Engines (text encoder, UNet, VAE decoder; the VAE encoder for image to image) come from ``sdengine build``;
  each is checked against the engine manifest before use (stale ONNX, other TensorRT, other GPU: refused with
  the fix, never silently run).
- The step model (:mod:`sdengine.step_graph`: guidance, scheduler update, next UNet input) is built into a
  small static engine per shape on first use and cached in the engine directory, so the GPU runs the very
  step the CPU tests verify.
- One device-memory block, sized for the largest engine, is shared by every execution context (they run one
  after another on one stream), and device buffers are allocated once per shape, their addresses set once.
- Per (batch, latent height, latent width, calls, guidance) two CUDA graphs are captured, each holding one
  whole step (UNet then step model) on ping-pong state buffers, and checked once against the plain enqueues
  they were captured from; the loop launches N graphs and the host waits once, before the VAE. Each graph
  runs execution contexts of its own (the engines' weights are shared), so no context's shapes, addresses or
  device memory ever change under a captured graph. With DeepCache (:mod:`sdengine.deepcache`) two more are
  captured, the shallow UNet's steps, which read the feature the whole UNet's engine writes into a buffer of
  its own; the loop launches each call's kind from a table fixed before the run.

Status: written against the documented TensorRT 10/11 and cuda-python runtime APIs; TensorRT cannot be
installed where this project is developed and tested, so none of this module has been run. Everything around
it (engine keys, manifests, profiles, the step model, graph keys) is tested on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.backends.base import DenoisePlan, GraphKey, skipped_layers, xl_layer
from sdengine.backends.cuda_runtime import (
    Event,
    Stream,
    capture_steps,
    check,
    cudart,
    destroy_graphs,
    launch_step,
)
from sdengine.engine_keys import (
    TIMING_CACHE_NAME,
    EngineManifest,
    batch_runs,
    check_engine,
    check_unet_fits,
    resolve_engine,
)
from sdengine.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    ModelDirectoryError,
    UnsupportedConfigError,
)
from sdengine.model_dir import ModelDir, open_onnx_dir
from sdengine.model_specs import (
    DEEPCACHE_FEATURE,
    HIDDEN_STATES,
    IMAGE_ENCODER,
    LAYER_STATES,
    PREVIEW_DECODER,
    SAFETY_CHECKER,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)
from sdengine.step_graph import (
    CALL_INPUTS,
    MAX_HISTORY,
    first_timestep,
    first_unet_inputs,
    timestep_shape,
)
from sdengine.timing import StageTimes


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed: pip install 'sdengine[trt]' on a machine with an NVIDIA GPU"
        ) from None
    return tensorrt


class DeviceArray:
    """A device buffer of fixed shape and dtype (cudaMalloc), with host copies in and out."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._rt = cudart()  # kept: freeing must not depend on imports still working (interpreter exit)
        self.ptr = int(check(self._rt.cudaMalloc(max(self.nbytes, 1))))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        host = np.ascontiguousarray(array, dtype=self.dtype)
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(self.ptr, host.ctypes.data, self.nbytes, kind, stream.handle))
        stream.synchronize()  # the host array may be freed as soon as this returns

    def download(self, stream: Stream) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(host.ctypes.data, self.ptr, self.nbytes, kind, stream.handle))
        stream.synchronize()
        return host

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            self._rt.cudaFree(self.ptr)


class Engine:
    """One deserialized engine with its execution context, running in the shared device-memory block."""

    def __init__(self, trt: Any, runtime: Any, plan: Path) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ModelDirectoryError(f"TensorRT could not deserialize {plan}; rebuild it: sdengine build")
        self.context = self._new_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _new_context(self) -> Any:
        # no device memory of its own: the backend hands every context the one shared block
        return self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def with_own_context(self) -> Engine:
        """The same engine (weights shared) with a fresh execution context, for a captured graph: a graph is
        valid only while its context's shapes, addresses and device memory stay as they were at capture."""
        clone = copy.copy(self)
        clone.context = self._new_context()
        return clone

    @property
    def device_memory_size(self) -> int:
        # ``device_memory_size_v2`` from TensorRT 10.1 on (the only one in 11); ``device_memory_size`` in 10.0
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def use_memory(self, ptr: int, size: int) -> None:
        if hasattr(self.context, "set_device_memory"):  # TensorRT 10.1+
            self.context.set_device_memory(ptr, size)
        else:
            self.context.device_memory = ptr

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise BackendUnavailableError(
                f"TensorRT refused shape {tuple(shape)} for {name!r}: outside the engine's profile "
                "(build engines for this size, or with --dynamic)"
            )

    def bind(self, buffers: dict[str, DeviceArray]) -> None:
        """Set every input shape and every tensor address (once per shape)."""
        for name in self.inputs:
            self.set_shape(name, buffers[name].shape)
        for name in (*self.inputs, *self.outputs):
            if not self.context.set_tensor_address(name, buffers[name].ptr):
                raise BackendUnavailableError(f"TensorRT refused the device address of {name!r}")

    def run(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(stream.pointer):
            raise BackendUnavailableError("TensorRT failed to enqueue an engine (see its log above)")


class TrtBackend:
    """Text encoder, UNet and VAE decoder as TensorRT engines; CUDA-graph steps."""

    name = "trt"

    def __init__(self, engine_dir: Path, model_dir: ModelDir, *, graphs: str = "step") -> None:
        """``graphs``: ``step`` (each whole step one captured CUDA graph) or ``none`` (engines enqueued one by
        one, for debugging or comparison)."""
        if graphs not in ("step", "none"):
            raise InvalidArgumentError(
                f"the TensorRT backend's graph modes are step and none, not {graphs!r}"
            )
        self.graph_mode = graphs
        self.trt = import_tensorrt()
        self.engine_dir, self.model_dir = engine_dir, model_dir
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        from export.trt_build import detect_build_env

        self.stream = Stream()
        self.env = detect_build_env()
        entries = {
            c: check_engine(engine_dir, c, model_dir.root, env=self.env)
            for c in model_dir.arch.required_components()
        }
        #: each text encoder's (min, opt, max) input shape: the batches it takes (see :meth:`_run_texts`)
        self.text_profiles = {
            c: e.shapes["input_ids"] for c, e in entries.items() if c in (TEXT_ENCODER, TEXT_ENCODER_2)
        }
        self.unet_entry = entries[UNET]  # its profile: which runs fit (:meth:`denoiser`)
        self.engines = {c: Engine(self.trt, self.runtime, engine_dir / e.file) for c, e in entries.items()}
        self._memory: DeviceArray | None = None
        self._graphs: dict[GraphKey, GraphSteps] = {}
        self._host_buffers: dict[tuple, dict[str, DeviceArray]] = {}
        self.graphs_refused: str | None = None  # why steps run without CUDA graphs, if they do
        self._ort_sessions: dict[str, Any] = {}  # ONNX Runtime's, for the models built as no engine
        self.shared_memory(list(self.engines.values()))  # sized once, for the largest engine

    @classmethod
    def load(cls, engine_dir: str | os.PathLike, *, graphs: str = "step") -> TrtBackend:
        manifest = EngineManifest.read(engine_dir)
        if manifest is None:
            raise ModelDirectoryError(f"{engine_dir} has no engine manifest; build it: sdengine build")
        return cls(Path(engine_dir), open_onnx_dir(manifest.onnx_dir), graphs=graphs)

    def shared_memory(self, engines: list[Engine]) -> None:
        """Give these contexts the one device-memory block (they all run one after another on one stream).

        The block is sized at load for the largest engine. Should a step engine need more, a larger block
        replaces it: every context is moved to the new one, and the captured graphs, which hold the old
        block's address, are dropped (captured again on next use) before the old block is freed.
        """
        need = max(e.device_memory_size for e in engines)
        if self._memory is None or self._memory.nbytes < need:
            self._graphs.clear()
            self._memory = DeviceArray((need,), np.uint8)
            engines = [*self.engines.values(), *engines]
        for engine in engines:
            engine.use_memory(self._memory.ptr, self._memory.nbytes)

    def timestep_format(self, unet_batch: int) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype the UNet engine declares for its timestep."""
        unet = self.engines[UNET]
        rank = len(tuple(unet.engine.get_tensor_shape("timestep")))
        return timestep_shape(rank, unet_batch), unet.dtype("timestep")

    def unet_io_dtypes(self) -> tuple[np.dtype, np.dtype, np.dtype]:
        """The UNet engine's ``sample`` input, noise output and ``encoder_hidden_states`` dtypes, which the
        step engine exchanges."""
        unet = self.engines[UNET]
        return unet.dtype("sample"), unet.dtype(unet.outputs[0]), unet.dtype("encoder_hidden_states")

    def step_engine(self, key: GraphKey) -> Engine:
        """The step model for ``key`` as a static engine, built once and cached in the engine directory."""
        from export.trt_build import build_serialized_engine  # the builder, only when an engine is missing

        model = key.step_model(self.timestep_format(key.copies * key.batch), self.unet_io_dtypes())
        data = model.SerializeToString()
        built_for = f"{self.env.trt_version} sm{self.env.compute_capability}".encode()
        digest = hashlib.sha256(data + built_for).hexdigest()[:16]
        onnx_path = self.engine_dir / f"step.{digest}.onnx"
        plan_path = self.engine_dir / f"step.{digest}.plan"
        if not plan_path.is_file():
            onnx_path.write_bytes(data)
            build_serialized_engine(
                onnx_path,
                plan_path,
                {},
                optimization_level=3,
                timing_cache=self.engine_dir / TIMING_CACHE_NAME,
                progress=False,
            )
        return Engine(self.trt, self.runtime, plan_path)

    def _run_host(
        self, component: str, inputs: dict[str, np.ndarray], output: str | None = None
    ) -> np.ndarray:
        """One engine call on host arrays (text encoder, VAE): upload, run, download its first output (or
        ``output``)."""
        return self._run_host_outputs(component, inputs, [output] if output else None)[0]

    def _run_host_outputs(
        self, component: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> list[np.ndarray]:
        """One engine call on host arrays: upload, run, download the ``outputs`` named (default: the first),
        as float32. Device buffers are allocated once per component and input shapes."""
        engine = self.engines[component]
        key = (component, *((name, array.shape) for name, array in inputs.items()))
        if key not in self._host_buffers:
            buffers = {}
            for name, array in inputs.items():
                buffers[name] = DeviceArray(array.shape, engine.dtype(name))
                engine.set_shape(name, array.shape)
            for name in engine.outputs:
                buffers[name] = DeviceArray(tuple(engine.context.get_tensor_shape(name)), engine.dtype(name))
            self._host_buffers[key] = buffers
        buffers = self._host_buffers[key]
        for name, array in inputs.items():
            buffers[name].upload(array, self.stream)
        engine.bind(buffers)
        engine.run(self.stream)
        names = outputs or engine.outputs[:1]
        return [buffers[name].download(self.stream).astype(np.float32) for name in names]

    def _run_texts(
        self, component: str, input_ids: np.ndarray, outputs: list[str] | None = None
    ) -> list[np.ndarray]:
        """A text encoder on any number of texts: in runs its engine's batch range allows (the last padded
        with copies of its last text, whose outputs are dropped), joined (:func:`batch_runs`)."""
        (low, *_), _, (high, *_) = self.text_profiles[component]
        results = []
        for start, stop, size in batch_runs(len(input_ids), low, high):
            ids = input_ids[start:stop]
            padded = np.concatenate([ids, np.repeat(ids[-1:], size - len(ids), axis=0)])
            results.append(
                [out[: len(ids)] for out in self._run_host_outputs(component, {"input_ids": padded}, outputs)]
            )
        return [np.concatenate(parts) for parts in zip(*results, strict=True)]

    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> np.ndarray:
        if self.model_dir.arch.xl:
            self._require_states(TEXT_ENCODER)
            states = self._run_texts(TEXT_ENCODER, input_ids, [HIDDEN_STATES])[0]
            return xl_layer(states, clip_skip)
        if not clip_skip:
            return self._run_texts(TEXT_ENCODER, input_ids)[0]
        if LAYER_STATES not in self.engines[TEXT_ENCODER].outputs:
            raise ModelDirectoryError(
                f"{self.engine_dir}: its text encoder engine gives only its last layer, and clip_skip needs "
                "every layer's; export the checkpoint again with sdengine export, then sdengine build"
            )
        states = self._run_texts(TEXT_ENCODER, input_ids, [LAYER_STATES])[0]
        return skipped_layers(states, clip_skip)

    def _require_states(self, component: str) -> None:
        """SDXL reads every layer's states, stacked (:data:`HIDDEN_STATES`): sdengine's exports give them."""
        if HIDDEN_STATES not in self.engines[component].outputs:
            raise ModelDirectoryError(
                f"{self.engine_dir}: its {component} engine does not give {HIDDEN_STATES} (every layer's "
                "states, stacked), which SDXL reads; export the checkpoint with sdengine export, then build"
            )

    def encode_text_2(self, input_ids: np.ndarray, clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self._require_states(TEXT_ENCODER_2)
        pooled, states = self._run_texts(TEXT_ENCODER_2, input_ids, [TEXT_EMBEDS, HIDDEN_STATES])
        return xl_layer(states, clip_skip), pooled

    def set_token_embeddings(self, rows: dict[int, np.ndarray], component: str = TEXT_ENCODER) -> None:
        raise UnsupportedConfigError(
            "textual inversion needs the ONNX Runtime backend: a TensorRT engine holds its weights"
        )

    def set_weights(self, component: str, weights: dict[str, np.ndarray]) -> None:
        raise UnsupportedConfigError(
            "LoRA at run time needs the ONNX Runtime backend: a TensorRT engine holds its weights; fuse the "
            "LoRA at export (sdengine export --lora FILE[:SCALE]) and build the engines from that export"
        )

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if VAE_ENCODER not in self.engines:  # loaded on first use: text to image never needs it
            plan = resolve_engine(self.engine_dir, VAE_ENCODER, self.model_dir.root, env=self.env)
            self.engines[VAE_ENCODER] = Engine(self.trt, self.runtime, plan)
            self.shared_memory([self.engines[VAE_ENCODER]])
        return self._run_host(VAE_ENCODER, {"sample": pixels})

    def denoiser(self, plan: DenoisePlan, times: StageTimes) -> GraphSteps:
        key = GraphKey.of(plan)
        if key.sequence != self.model_dir.arch.text_max_length:
            raise UnsupportedConfigError(
                f"a long prompt ({key.sequence} tokens of text embeddings) needs the ONNX Runtime backend: "
                f"TensorRT engines are built for the text encoder's {self.model_dir.arch.text_max_length}"
            )
        if key not in self._graphs:  # the engine's fit, buffers, addresses and graphs: once per shape
            factor = self.model_dir.arch.vae_scale_factor
            check_unet_fits(
                self.unet_entry,
                self.engine_dir,
                self.model_dir.root,
                self.model_dir.arch,
                batch=key.batch,
                height=key.latent_height * factor,
                width=key.latent_width * factor,
                copies=key.copies,
                parts=key.parts,
            )
            self._graphs[key] = GraphSteps(self, key, plan)
        steps = self._graphs[key]
        steps.start(plan, times)
        return steps

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run_host(VAE_DECODER, {"latent_sample": latents})

    def decode_preview(self, latents: np.ndarray) -> np.ndarray:
        """With ONNX Runtime (on CUDA where it has it): previews' tiny decoder is not built as an engine."""
        from sdengine.backends.ort import session_inputs

        session = self._ort_session(PREVIEW_DECODER)
        dtype = session_inputs(session)["latent_sample"][0]
        return session.run(None, {"latent_sample": latents.astype(dtype)})[0].astype(np.float32)

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """With ONNX Runtime (on CUDA where it has it): the safety checker is not built as an engine."""
        from sdengine.backends.ort import run_safety_checker

        return run_safety_checker(self._ort_session(SAFETY_CHECKER), clip_input, images)

    def encode_image_prompt(self, pixels: np.ndarray) -> np.ndarray:
        """With ONNX Runtime (on CUDA where it has it): an IP-Adapter's image encoder runs once a generation,
        and is not built as an engine."""
        session = self._ort_session(IMAGE_ENCODER)
        return session.run(None, {"pixel_values": pixels.astype(np.float32)})[0].astype(np.float32)

    def _ort_session(self, component: str) -> Any:
        """ONNX Runtime's session for ``component`` (on CUDA where it has it), opened on first use."""
        import onnxruntime as ort

        from sdengine.backends.ort import open_session, session_options

        if component not in self._ort_sessions:
            providers = [
                p
                for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                if p in ort.get_available_providers()
            ]
            path = self.model_dir.onnx_path(component)
            spec = self.model_dir.arch.specs()[component]
            self._ort_sessions[component] = open_session(str(path), spec, providers, session_options())
        return self._ort_sessions[component]


class GraphSteps:
    """Device state and the two captured step graphs for one shape; reused by every run of that shape."""

    def __init__(self, backend: TrtBackend, key: GraphKey, plan: DenoisePlan) -> None:
        self.backend, self.stream = backend, backend.stream
        # a context of its own for the UNet and for each graph's step: bound once, never changed under a graph
        unet = backend.engines[UNET].with_own_context()
        step = backend.step_engine(key)
        steps = (step, step.with_own_context())
        # DeepCache's shallow UNet, for runs that call it between the whole UNet's calls
        self.shallow = backend.engines[UNET_SHALLOW].with_own_context() if key.deepcache else None
        backend.shared_memory([unet, *steps, *([self.shallow] if self.shallow else [])])
        self.engines = (unet, *steps)  # kept alive as long as the graphs that run them
        tables = plan.tables
        unet_batch = plan.copies * plan.latents.shape[0]
        t_shape, t_dtype = backend.timestep_format(unet_batch)
        latent, history = plan.latents.shape, (MAX_HISTORY, *plan.latents.shape)
        f32 = np.dtype(np.float32)
        self.shared = {
            "unet_input": DeviceArray(plan.unet_input_shape, unet.dtype("sample")),
            "timestep": DeviceArray(t_shape, t_dtype),
            "noise_pred": DeviceArray((unet_batch, *latent[1:]), unet.dtype(unet.outputs[0])),
            **{name: DeviceArray(array.shape, array.dtype) for name, array in tables.inputs().items()},
            "guidance": DeviceArray((), f32),
        }
        #: the UNet's other inputs (text embeddings, ControlNet's): not the step engine's inputs; it writes
        #: the next call's of those that change from call to call (CALL_INPUTS), as it writes the timestep
        self.unet_inputs = {
            name: DeviceArray(array.shape, unet.dtype(name))
            for name, array in plan.first_unet_inputs().items()
        }
        self.states = [
            {
                "sample": DeviceArray(latent, f32),
                "history": DeviceArray(history, f32),
                "step_index": DeviceArray((), np.dtype(np.int64)),
            }
            for _ in (0, 1)
        ]
        unet_buffers = {
            "sample": self.shared["unet_input"],
            "timestep": self.shared["timestep"],
            **self.unet_inputs,
            unet.outputs[0]: self.shared["noise_pred"],
        }
        arch = backend.model_dir.arch
        if arch.deepcache:  # the cached feature: the whole UNet's second output, the shallow one's input
            shape = arch.deepcache_feature_shape(unet_batch, *latent[2:])
            unet_buffers[DEEPCACHE_FEATURE] = DeviceArray(shape, unet.dtype(DEEPCACHE_FEATURE))
        unet.bind(unet_buffers)
        if self.shallow is not None:  # the same buffers, those of them its branch reads
            self.shallow.bind({**unet_buffers, self.shallow.outputs[0]: self.shared["noise_pred"]})
        self.unet_buffers = unet_buffers  # kept alive with the addresses bound
        self.events = (Event(), Event())
        self.start(plan, StageTimes())  # valid inputs in state set 0; the first warm-up step writes set 1
        for parity, step in enumerate(steps):
            source, target = self.states[parity], self.states[1 - parity]
            outputs = (target["sample"], target["history"], target["step_index"])
            outputs += (self.shared["unet_input"], self.shared["timestep"])
            outputs += tuple(self.unet_inputs[CALL_INPUTS[name]] for name in tables.outputs()[len(outputs) :])
            step.bind(
                {
                    "noise_pred": self.shared["noise_pred"],
                    **source,
                    **self.shared,
                    **dict(zip(tables.outputs(), outputs, strict=True)),
                }
            )
        kinds = (True, False) if self.shallow is not None else (True,)  # the whole UNet fills the cache first
        for whole in kinds:  # each context runs once outside capture, as TensorRT asks before capturing it
            for parity in (0, 1):
                self.states[parity]["step_index"].upload(np.array(0), self.stream)  # in range, even for 1
                self._eager_step(parity, whole)
        self.stream.synchronize()
        self.graphs: list[Any] = []  # per parity a whole step's; with the shallow UNet, per parity its step's
        self._rt = cudart()  # kept for __del__, which may run at interpreter exit
        try:
            if backend.graph_mode == "step":
                two_steps = lambda step: self._two_steps(plan, step)  # noqa: E731
                self.graphs = capture_steps(self.stream, kinds, self._eager_step, two_steps)
        except BackendUnavailableError as exc:
            if backend.graphs_refused is None:
                print(f"sdengine: warning: denoising steps run without CUDA graphs ({exc})", file=sys.stderr)
            backend.graphs_refused = str(exc)
        self.calls, self.whole_calls = 0, None

    def _eager_step(self, parity: int, whole: bool = True) -> None:
        """One whole step enqueued engine by engine: what each graph captures, and the path without graphs;
        ``whole`` False: DeepCache's shallow UNet in the whole one's place."""
        unet, *steps = self.engines
        (unet if whole else self.shallow).run(self.stream)
        steps[parity].run(self.stream)

    def _two_steps(self, plan: DenoisePlan, step: Callable[[int], None]) -> list[np.ndarray]:
        """Both parities' steps from this plan's start, each from step index 0; their samples on the host."""
        self.start(plan, StageTimes())
        samples = []
        for parity in (0, 1):
            self.states[parity]["step_index"].upload(np.array(0), self.stream)
            step(parity)
            samples.append(self.states[1 - parity]["sample"].download(self.stream))
        return samples

    def __del__(self) -> None:
        if getattr(self, "graphs", None):
            destroy_graphs(self.graphs, self._rt)

    def start(self, plan: DenoisePlan, times: StageTimes) -> None:
        """Upload one run's inputs into the fixed buffers (the graphs read them in place)."""
        tables, s = plan.tables, self.stream
        self.times, self.calls, self.whole_calls = times, 0, plan.whole_calls
        unet_input = first_unet_inputs(tables, plan.latents, plan.copies)
        self.shared["unet_input"].upload(unet_input, s)
        timestep = self.shared["timestep"]
        timestep.upload(first_timestep(tables, timestep.shape, timestep.dtype), s)
        for name, array in plan.first_unet_inputs().items():
            self.unet_inputs[name].upload(array, s)
        for name, array in tables.inputs().items():
            self.shared[name].upload(array, s)
        self.shared["guidance"].upload(np.array(plan.guidance or 1.0), s)
        self.states[0]["sample"].upload(plan.latents, s)
        self.states[0]["history"].upload(np.zeros(self.states[0]["history"].shape), s)
        self.states[0]["step_index"].upload(np.array(0), s)
        self.events[0].record(s)

    def step(self) -> None:
        whole = self.whole_calls is None or self.whole_calls[self.calls]
        if self.graphs:
            launch_step(self.graphs, self.stream, self.calls % 2, whole, self._rt)
        else:
            self._eager_step(self.calls % 2, whole)
        self.calls += 1

    def latents(self, final: bool = True) -> np.ndarray:
        if final:
            self.events[1].record(self.stream)
            self.times.add("denoise_gpu", int(self.events[1].elapsed_ms(self.events[0]) * 1e6))
        return self.states[self.calls % 2]["sample"].download(self.stream)
