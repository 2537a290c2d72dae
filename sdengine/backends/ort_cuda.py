"""ONNX Runtime on an NVIDIA GPU: CUDA execution provider, IO binding, device-resident state, CUDA graphs.

Per generation, everything the loop touches is uploaded once, into buffers allocated once per shape (a
captured graph keeps the addresses it was captured with): text embeddings, the step tables, the noise, the
initial latents. Each denoising step is then two ``run_with_iobinding`` calls — the UNet and the step model
(guidance + scheduler update + the next UNet input) — on buffers that never move, so with ONNX Runtime's
CUDA-graph mode each call is one graph replay and nothing comes back to the host until the final latents.

All sessions share one CUDA stream (cuda-python), so the UNet and the step model run in order with no host
synchronisation between them; the denoising time is measured with CUDA events on that stream. Without
cuda-python each run synchronises its own stream before returning (correct, with a host wait per call).

The state is ping-ponged between two buffer sets (step ``i`` reads set ``i % 2`` and writes the other), which
gives the step model two fixed bindings and so two captured graphs (``gpu_graph_id`` 1 and 2); the UNet has
one (id 1). Symbolic dimensions are pinned per shape with free-dimension overrides, so ONNX Runtime folds the
exported shape arithmetic away and the whole UNet lands on the CUDA provider, which graph capture requires.

Status: written against ONNX Runtime's documented Python API (IO binding, ``enable_cuda_graph``,
``gpu_graph_id``, ``add_free_dimension_override_by_name``); the CPU tests cover the step model it runs, the
backend selection and its errors. Its GPU numbers come from ``benchmarks/gpu_check.sh`` on a lent GPU.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import onnxruntime as ort

from sdengine.backends.base import DenoisePlan, GraphKey
from sdengine.backends.cuda_runtime import Event, Stream
from sdengine.backends.ort import OrtBackend, open_session, session_options
from sdengine.errors import BackendUnavailableError, CorruptModelError
from sdengine.model_dir import ModelDir
from sdengine.model_specs import TEXT_ENCODER, UNET, VAE_DECODER
from sdengine.step_graph import MAX_HISTORY, STEP_OUTPUTS, first_timestep, first_unet_inputs
from sdengine.timing import StageTimes

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
#: Run option selecting which captured CUDA graph a run records or replays (0 is reserved by ONNX Runtime).
GRAPH_ID = "gpu_graph_id"
#: Return from a run without waiting for the GPU; the host synchronises once, when it reads the latents.
NO_SYNC = "disable_synchronize_execution_providers"


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def require_cuda() -> None:
    if not cuda_available():
        raise BackendUnavailableError(
            "ONNX Runtime has no CUDA execution provider here: install onnxruntime-gpu on a machine with an "
            "NVIDIA GPU, or use --device cpu"
        )


def run_options(graph_id: int | None, synchronize: bool) -> ort.RunOptions:
    options = ort.RunOptions()
    if not synchronize:
        options.add_run_config_entry(NO_SYNC, "1")
    if graph_id is not None:
        options.add_run_config_entry(GRAPH_ID, str(graph_id))
    return options


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime with the CUDA (optionally TensorRT) execution provider and CUDA-graph steps."""

    name = "ort-cuda"

    def __init__(
        self,
        model_dir: ModelDir,
        *,
        device_id: int = 0,
        cuda_graphs: bool = True,
        tensorrt: bool = False,
        threads: int | None = None,
        device: str = "cuda",
    ) -> None:
        """``device="cpu"`` runs the same bound, device-state loop on the CPU provider (no graphs, no stream):
        it exists so that the binding and ping-pong logic is tested where there is no GPU."""
        self.device = device
        if device == "cuda":
            require_cuda()
        if tensorrt and TENSORRT not in ort.get_available_providers():
            raise BackendUnavailableError(
                "ONNX Runtime has no TensorRT execution provider in this installation"
            )
        self.device_id = device_id
        self.stream: Stream | None = None
        if device == "cuda":
            with contextlib.suppress(
                BackendUnavailableError
            ):  # without cuda-python each run syncs its stream
                self.stream = Stream()
        providers = self._providers(graphs=False)
        if tensorrt:
            providers.insert(0, (TENSORRT, {"device_id": str(device_id), "trt_fp16_enable": "True"}))
        super().__init__(model_dir, providers=providers, threads=threads, preload=(TEXT_ENCODER, VAE_DECODER))
        self.model_dir = model_dir
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.step_providers = self._providers(graphs=self.cuda_graphs)
        self._unet_sessions: dict[tuple, ort.InferenceSession] = {}
        self._denoisers: dict[GraphKey, DeviceDenoiser] = {}
        self.graphs_refused: str | None = None  # why the UNet runs without graphs, if it does

    def _providers(self, *, graphs: bool) -> list:
        if self.device != "cuda":
            return ["CPUExecutionProvider"]
        options = {"device_id": str(self.device_id), "enable_cuda_graph": "1" if graphs else "0"}
        if self.stream is not None:
            options["user_compute_stream"] = str(self.stream.pointer)
        return [(CUDA, options), "CPUExecutionProvider"]

    def unet_session(self, plan: DenoisePlan) -> ort.InferenceSession:
        """A UNet session for this plan's shapes (one per shape), with its symbolic dimensions pinned."""
        batch, _, height, width = plan.latents.shape
        key = (plan.copies * batch, height, width, plan.context.shape[1])
        if key not in self._unet_sessions:
            options = session_options()
            for name, value in zip(("batch", "latent_height", "latent_width", "sequence"), key, strict=True):
                options.add_free_dimension_override_by_name(name, value)
            spec = self.model_dir.arch.specs()[UNET]
            path = str(self.model_dir.onnx_path(UNET))
            try:
                session = open_session(path, spec, self._providers(graphs=self.cuda_graphs), options)
            except CorruptModelError as exc:
                if not self.cuda_graphs:
                    raise
                # ONNX Runtime refuses graph mode when any node of the model falls back to the CPU
                print(f"sdengine: warning: UNet runs without CUDA graphs ({exc})", file=sys.stderr)
                self.graphs_refused = str(exc)
                session = open_session(path, spec, self._providers(graphs=False), options)
            self._unet_sessions[key] = session
        return self._unet_sessions[key]

    def denoiser(self, plan: DenoisePlan, times: StageTimes) -> DeviceDenoiser:
        """The device state for this plan's shapes: allocated, bound (and its graphs captured) once per shape,
        refilled in place for every run, since a captured graph keeps the addresses it was captured with."""
        key = GraphKey.of(plan)
        if key not in self._denoisers:
            self._denoisers[key] = DeviceDenoiser(self, plan)
        denoiser = self._denoisers[key]
        denoiser.start(plan, times)
        return denoiser


class DeviceDenoiser:
    """Device buffers and bindings for one shape; each step is two graph replays with no host sync."""

    def __init__(self, backend: OrtCudaBackend, plan: DenoisePlan) -> None:
        dev = backend.device_id
        self.backend, self.stream = backend, backend.stream
        self.unet = backend.unet_session(plan)
        self.step_model = backend.step_session(plan)

        def empty(shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, backend.device, dev)

        tables = plan.tables
        unet_batch = plan.copies * plan.latents.shape[0]
        t_shape, t_dtype = backend.timestep_format(unet_batch)
        unet_shape = (unet_batch, *plan.latents.shape[1:])
        history = (MAX_HISTORY, *plan.latents.shape)
        self.unet_input = empty(unet_shape, np.float32)
        self.timestep = empty(t_shape, t_dtype)
        self.context = empty(plan.context.shape, np.float32)
        self.noise_pred = empty(unet_shape, np.float32)
        self.constants = {
            name: empty(getattr(tables, name).shape, np.float32)
            for name in ("coeffs", "timesteps", "input_scales", "noise")
        }
        self.constants["guidance"] = empty((), np.float32)
        # two sets of state; step i reads set i % 2 and writes the other
        self.states = [
            {
                "sample": empty(plan.latents.shape, np.float32),
                "history": empty(history, np.float32),
                "step_index": empty((), np.int64),
            }
            for _ in (0, 1)
        ]
        self.unet_binding = self.unet.io_binding()
        for name, value in (
            ("sample", self.unet_input),
            ("timestep", self.timestep),
            ("encoder_hidden_states", self.context),
        ):
            self.unet_binding.bind_ortvalue_input(name, value)
        self.unet_binding.bind_ortvalue_output(backend.specs[UNET].output_names[0], self.noise_pred)
        self.step_bindings = []
        for parity in (0, 1):
            binding = self.step_model.io_binding()
            source, target = self.states[parity], self.states[1 - parity]
            for name, value in {"noise_pred": self.noise_pred, **source, **self.constants}.items():
                binding.bind_ortvalue_input(name, value)
            outputs = [
                target["sample"],
                target["history"],
                target["step_index"],
                self.unet_input,
                self.timestep,
            ]
            for name, value in zip(STEP_OUTPUTS, outputs, strict=True):
                binding.bind_ortvalue_output(name, value)
            self.step_bindings.append(binding)
        graphs, sync = backend.cuda_graphs, self.stream is None
        self.unet_options = run_options(1 if graphs and backend.graphs_refused is None else None, sync)
        self.step_options = [
            run_options(1 if graphs else None, sync),
            run_options(2 if graphs else None, sync),
        ]
        self.events = (Event(), Event()) if self.stream is not None else None
        self.t_dtype = t_dtype

    def start(self, plan: DenoisePlan, times: StageTimes) -> None:
        """Copy one run's inputs into the bound buffers (in place: the addresses must not change)."""
        tables = plan.tables
        self.times, self.calls = times, 0
        self.unet_input.update_inplace(first_unet_inputs(tables, plan.latents, plan.copies))
        self.timestep.update_inplace(first_timestep(tables, tuple(self.timestep.shape()), self.t_dtype))
        self.context.update_inplace(np.ascontiguousarray(plan.context, dtype=np.float32))
        for name in ("coeffs", "timesteps", "input_scales", "noise"):
            self.constants[name].update_inplace(np.ascontiguousarray(getattr(tables, name)))
        self.constants["guidance"].update_inplace(np.array(plan.guidance or 1.0, np.float32))
        state = self.states[0]
        state["sample"].update_inplace(np.ascontiguousarray(plan.latents, dtype=np.float32))
        state["history"].update_inplace(np.zeros(state["history"].shape(), np.float32))
        state["step_index"].update_inplace(np.array(0, np.int64))

    def step(self) -> None:
        parity = self.calls % 2
        if self.calls == 0 and self.events:
            self.events[0].record(self.stream)
        self.unet.run_with_iobinding(self.unet_binding, self.unet_options)
        self.step_model.run_with_iobinding(self.step_bindings[parity], self.step_options[parity])
        self.calls += 1

    def latents(self) -> np.ndarray:
        if self.events:
            self.events[1].record(self.stream)
            self.times.add("denoise_gpu", int(self.events[1].elapsed_ms(self.events[0]) * 1e6))
            self.stream.synchronize()
        return self.states[self.calls % 2]["sample"].numpy()
