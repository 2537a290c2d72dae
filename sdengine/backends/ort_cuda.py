"""ONNX Runtime on an NVIDIA GPU: CUDA execution provider, IO binding, device-resident state, CUDA graphs.

Per generation, everything the loop touches is uploaded once, into buffers allocated once per shape (a
captured graph keeps the addresses it was captured with): text embeddings, the step tables, the noise, the
initial latents. Each denoising step is two ``run_with_iobinding`` calls — the UNet and the step model
(guidance + scheduler update + the next UNet input) — on buffers that never move, and nothing comes back to
the host until the final latents. The state is ping-ponged between two buffer sets (step ``i`` reads set
``i % 2`` and writes the other), so each parity has fixed bindings. All sessions share one CUDA stream
(cuda-python) and run with ``disable_synchronize_execution_providers``, so the runs stay in order on it with
no host wait, and the denoising time is measured with CUDA events on that stream.

Graph modes (:data:`GRAPH_MODES`):

- ``step`` (the default): after two warm-up rounds, each parity's whole step — both runs — is captured on
  our stream into one CUDA graph (ONNX Runtime's own graph mode off), as the TensorRT backend does; the loop
  launches one graph per step and the host waits once, for the final latents. This is stream capture around
  ONNX Runtime's runs, the same mechanism as its own graph mode, without its per-replay synchronisation.
- ``ort``: ONNX Runtime's CUDA-graph mode, a graph per run (``gpu_graph_id`` 1 and 2 for the step model's
  parities; a UNet session serves every plan of its shapes, so each denoiser takes an id of its own there).
  Its CUDA provider waits for the GPU after every replay.
- ``none``: plain runs.

With DeepCache (:mod:`sdengine.deepcache`) the shallow UNet's session is bound to the same buffers and the
cached feature's, which the whole UNet writes: ``step`` mode captures its two steps too, and the loop launches
each call's kind from a table fixed before the run.

A denoiser's graphs are made when it is created, on that plan's inputs, and (``step``) replayed once against
the plain runs they were captured from; if any is refused (as the session opens, in a capture, or by that
check), the backend says so once and goes on in the next mode of :data:`FALLBACK`. Symbolic dimensions are
pinned per shape with free-dimension overrides, so ONNX Runtime folds the exported shape arithmetic away and
the whole UNet lands on the CUDA provider, which graph capture requires.

Status: written against ONNX Runtime's documented Python API (IO binding, ``enable_cuda_graph``,
``gpu_graph_id``, ``add_free_dimension_override_by_name``), its behaviour read from the 1.31 sources. The CPU
tests run this same bound loop on the CPU provider in all three modes (``step`` against a simulated CUDA
runtime, ``ort`` with graph ids the CPU provider ignores). Neither graph mode has run on a GPU yet:
``benchmarks/gpu_check.sh`` checks both against plain runs and times them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from sdengine.backends.base import DenoisePlan, GraphKey
from sdengine.backends.cuda_options import checked_cuda_options
from sdengine.backends.cuda_runtime import (
    Event,
    Stream,
    capture_steps,
    cudart,
    destroy_graphs,
    launch_step,
)
from sdengine.backends.ort import OrtBackend, open_session, session_inputs, session_options
from sdengine.errors import (
    BackendUnavailableError,
    CorruptModelError,
    InvalidArgumentError,
    SDEngineError,
)
from sdengine.model_dir import ModelDir
from sdengine.model_specs import DEEPCACHE_FEATURE, UNET, UNET_SHALLOW
from sdengine.step_graph import CALL_INPUTS, MAX_HISTORY, first_timestep, first_unet_inputs
from sdengine.timing import StageTimes

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
#: Run option selecting which captured CUDA graph a run records or replays (0 is reserved by ONNX Runtime).
GRAPH_ID = "gpu_graph_id"
#: Return from a run without waiting for the GPU; the host synchronises once, when it reads the latents.
NO_SYNC = "disable_synchronize_execution_providers"
#: The step model's graph ids in its per-shape session: one per state parity.
STEP_GRAPH_IDS = (1, 2)
#: ``step``: each whole step (UNet + step model) captured on our stream as one CUDA graph, replayed with no
#: host wait; ``ort``: ONNX Runtime's own CUDA-graph mode, one graph per session run, each replay followed by
#: a wait for the GPU (its CUDA provider synchronises there); ``none``: plain runs.
GRAPH_MODES = ("step", "ort", "none")
#: Where a refused graph mode falls back to: ONNX Runtime's own mode tolerates CPU-placed shape nodes, which a
#: whole-step capture refuses (a CPU node reading a bound input would bake its capture-time value in).
FALLBACK = {"step": "ort", "ort": "none"}
#: Session option making session creation fail if any node lands on the CPU provider (``step`` mode on CUDA).
CUDA_ONLY = "session.disable_cpu_ep_fallback"
#: UNet sessions kept at once (one per shape, each with its own copy of the weights on the GPU): the least
#: recently used one goes, with its denoisers and graphs, when another shape needs a session.
MAX_UNET_SHAPES = 4


def refused_graph(exc: Exception) -> bool:
    """Whether ``exc``, raised while a denoiser was made, may come from its graph mode: ONNX Runtime refusing
    a session or a run (its own error types, or CorruptModelError from :func:`open_session`), or the CUDA
    runtime a capture (BackendUnavailableError). sdengine's other errors (bad input, unsupported models) are
    the same in every mode, so they are not."""
    if isinstance(exc, SDEngineError):
        return isinstance(exc, (CorruptModelError, BackendUnavailableError))
    return True


def require_cuda() -> None:
    """Load the CUDA libraries ONNX Runtime needs (from the nvidia-* wheels, where present) or refuse."""
    if CUDA not in ort.get_available_providers():  # the build's list, not proof that CUDA works
        raise BackendUnavailableError(
            "ONNX Runtime has no CUDA execution provider here: install onnxruntime-gpu on a machine with an "
            "NVIDIA GPU, or use --device cpu"
        )
    if hasattr(ort, "preload_dlls"):  # its CUDA provider has no RUNPATH to cuBLAS and cuDNN
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ort.preload_dlls()


def require_provider(session: ort.InferenceSession, provider: str, what: str) -> None:
    """ONNX Runtime falls back to the CPU, silently, when a provider's libraries fail to load."""
    if session.get_providers()[0] != provider:
        raise BackendUnavailableError(
            f"ONNX Runtime could not start {provider} for the {what} (missing CUDA or cuDNN libraries?); "
            "use --device cpu"
        )


def output_dtype(session: ort.InferenceSession, name: str) -> type:
    """The numpy dtype of a session's output ``name``."""
    kind = next(o.type for o in session.get_outputs() if o.name == name)
    return {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(kind, np.float32)


def run_options(graph_id: int | None, synchronize: bool) -> ort.RunOptions:
    options = ort.RunOptions()
    if not synchronize:
        options.add_run_config_entry(NO_SYNC, "1")
    if graph_id is not None:
        options.add_run_config_entry(GRAPH_ID, str(graph_id))
    return options


class DeviceTensor:
    """An OrtValue of fixed shape and dtype on the backend's device, refilled in place (a captured graph
    keeps its address). ``update_inplace`` checks only the element count, so the dtype is enforced here."""

    def __init__(self, shape: tuple[int, ...], dtype: type, device: str, device_id: int) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.value = ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype.type, device, device_id)

    def fill(self, array: np.ndarray) -> None:
        host = np.asarray(array, dtype=self.dtype, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if host.shape != self.shape:
            raise ValueError(f"expected shape {self.shape}, got {host.shape}")
        self.value.update_inplace(host)

    def numpy(self) -> np.ndarray:
        """A host copy (on the CPU provider ``OrtValue.numpy`` is a view, which the next run overwrites)."""
        return np.array(self.value.numpy(), copy=True)


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime with the CUDA (optionally TensorRT) execution provider and CUDA-graph steps."""

    name = "ort-cuda"

    def __init__(
        self,
        model_dir: ModelDir,
        *,
        device_id: int = 0,
        graphs: str = "step",
        tensorrt: bool = False,
        threads: int | None = None,
        device: str = "cuda",
        stream: Stream | None = None,
        cuda_options: Mapping[str, object] | None = None,
    ) -> None:
        """``graphs``: one of :data:`GRAPH_MODES` (see the module docs); ``step`` needs cuda-python, and
        without it becomes ``ort``. ``tensorrt`` puts ONNX Runtime's TensorRT provider first (it builds its
        own engines, in its own cache); steps then run without graphs. ``cuda_options``: more CUDA provider
        options for every session (:mod:`sdengine.backends.cuda_options`).

        ``device="cpu"`` runs the same bound, device-state loop on the CPU provider, with ``stream`` if one is
        given (ONNX Runtime's graph ids are passed but the CPU provider ignores them): it exists so that the
        binding, ping-pong and capture logic is tested where there is no GPU."""
        if graphs not in GRAPH_MODES:
            raise InvalidArgumentError(
                f"unknown graph mode {graphs!r}; choose one of {', '.join(GRAPH_MODES)}"
            )
        self.device, self.device_id = device, device_id
        if device == "cuda":
            require_cuda()
        if tensorrt and TENSORRT not in ort.get_available_providers():
            raise BackendUnavailableError(
                "ONNX Runtime has no TensorRT execution provider in this installation"
            )
        self.tensorrt = tensorrt
        self.cuda_options = checked_cuda_options(cuda_options or {})
        self.stream = stream
        if device == "cuda" and stream is None:
            # without cuda-python there is no stream of ours: each run then waits for its own
            with contextlib.suppress(BackendUnavailableError):
                self.stream = Stream(device_id)
        # the text encoder(s) and VAE decoder now; the UNet per shape
        preload = [c for c in model_dir.arch.required_components() if c not in (UNET, UNET_SHALLOW)]
        super().__init__(model_dir, providers=self._providers(), threads=threads, preload=preload)
        if device == "cuda":
            for component in preload:
                require_provider(self.sessions[component], self.providers[0][0], component)
        self.model_dir = model_dir
        if tensorrt:
            graphs = "none"
        elif graphs == "step" and self.stream is None:
            graphs = "ort"  # capturing a whole step needs a stream of our own (cuda-python)
        self._set_graph_mode(graphs)
        self._unet_sessions: dict[tuple, ort.InferenceSession] = {}
        self._unet_graph_ids: dict[tuple, itertools.count] = {}
        self._denoisers: dict[GraphKey, DeviceDenoiser] = {}
        self.graphs_refused: str | None = None  # why steps run without graphs, if they do

    def unet_io_dtypes(self) -> tuple[type, type, type]:
        """The UNet's own ``sample`` input, noise output and ``encoder_hidden_states`` dtypes: the device loop
        binds them as they are (float16 in exports that keep fp16 inputs and outputs, such as some of
        Optimum's)."""
        if not hasattr(self, "_unet_io_dtypes"):  # read once, from the model file (its weights not loaded)
            graph = onnx.load(str(self.model_dir.onnx_path(UNET)), load_external_data=False).graph
            output = next(o for o in graph.output if o.name == self.specs[UNET].output_names[0])
            noise = helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type).type
            inputs = self._inputs[UNET]
            self._unet_io_dtypes = (inputs["sample"][0], noise, inputs["encoder_hidden_states"][0])
        return self._unet_io_dtypes

    def _set_graph_mode(self, mode: str) -> None:
        """The providers and session options the UNet and step sessions get in graph mode ``mode``."""
        self.graph_mode = mode
        self.step_providers = self._providers(ort_graphs=mode == "ort", step=True, cuda_only=self._cuda_only)
        self.step_session_options = self._graph_session_options(session_options(self.threads))

    def _graph_session_options(self, options: ort.SessionOptions) -> ort.SessionOptions:
        if self._cuda_only:
            options.add_session_config_entry(CUDA_ONLY, "1")
        return options

    @property
    def _cuda_only(self) -> bool:
        """A whole-step capture needs every node on the CUDA provider (no CPU node may read a bound input)."""
        return self.graph_mode == "step" and self.device == "cuda"

    def _providers(self, *, ort_graphs: bool = False, step: bool = False, cuda_only: bool = False) -> list:
        """``cuda_only``: no CPU provider in the list (ONNX Runtime refuses one together with CUDA_ONLY)."""
        if self.device != "cuda":
            return ["CPUExecutionProvider"]
        options = {**self.cuda_options, "device_id": str(self.device_id)}
        options["enable_cuda_graph"] = "1" if ort_graphs else "0"
        if self.stream is not None:
            options["user_compute_stream"] = str(self.stream.pointer)
        providers: list = [(CUDA, options)] if cuda_only else [(CUDA, options), "CPUExecutionProvider"]
        if self.tensorrt and not step:  # the step model is small and runs on CUDA
            trt_options = {"device_id": str(self.device_id), "trt_fp16_enable": "True"}
            if self.stream is not None:
                trt_options["user_compute_stream"] = str(self.stream.pointer)
            providers.insert(0, (TENSORRT, trt_options))
        return providers

    def unet_session(self, plan: DenoisePlan, component: str = UNET) -> tuple[ort.InferenceSession, int]:
        """A UNet session for this plan's shapes (one per shape, its symbolic dimensions pinned), and a graph
        id in it that no other denoiser uses; ``component``: the UNet, or DeepCache's shallow one."""
        batch, _, height, width = plan.latents.shape
        key = (component, plan.copies * batch, height, width, plan.context.shape[1])
        if key in self._unet_sessions:
            self._unet_sessions[key] = self._unet_sessions.pop(key)  # most recently used last
        else:
            while len(self._unet_sessions) >= MAX_UNET_SHAPES:
                self._drop_unet_session(next(iter(self._unet_sessions)))
            options = self._graph_session_options(session_options(self.threads))
            factor = self.model_dir.arch.vae_scale_factor
            pinned = {"batch": key[1], "latent_height": height, "latent_width": width, "sequence": key[4]}
            pinned |= {"height": height * factor, "width": width * factor}  # a ControlNet's image
            sizes = self.model_dir.arch.sizes(key[1], height * factor, width * factor)
            pinned |= {name: sizes[name] for name in ("feature_height", "feature_width")}  # DeepCache's
            for name, value in pinned.items():
                options.add_free_dimension_override_by_name(name, value)
            spec = self.model_dir.arch.specs()[component]
            path = str(self.model_dir.onnx_path(component))
            providers = self._providers(ort_graphs=self.graph_mode == "ort", cuda_only=self._cuda_only)
            session = open_session(path, spec, providers, options, self.replaced_weights(component))
            if self.device == "cuda":
                require_provider(session, self.providers[0][0], component)
            self._unet_sessions[key] = session
            self._unet_graph_ids[key] = itertools.count(1)
        return self._unet_sessions[key], next(self._unet_graph_ids[key])

    def _reopen(self, component: str, undo: Callable[[], None]) -> None:
        """As the host backend's; the UNets' sessions, opened per shape, are dropped, to open on next use."""
        if component not in (UNET, UNET_SHALLOW):
            return super()._reopen(component, undo)
        for key in list(self._unet_sessions):
            self._drop_unet_session(key)

    def _drop_unet_session(self, key: tuple) -> None:
        """Free a UNet session and everything that runs it: its denoisers, their graphs and step sessions."""
        if self.stream is not None:
            self.stream.synchronize()
        session = self._unet_sessions.pop(key)
        del self._unet_graph_ids[key]
        for graph_key in [k for k, d in self._denoisers.items() if session in (d.unet, d.shallow)]:
            del self._denoisers[graph_key]
            self._step_sessions.pop(graph_key, None)

    def denoiser(self, plan: DenoisePlan, times: StageTimes) -> DeviceDenoiser:
        """The device state for this plan's shapes: allocated, bound (and its graphs captured) once per shape,
        refilled in place for every run, since a captured graph keeps the addresses it was captured with."""
        key = GraphKey.of(plan)
        while key not in self._denoisers:
            try:
                self._denoisers[key] = DeviceDenoiser(self, plan)
            except Exception as exc:  # ONNX Runtime's own error types have no stable importable names
                if self.graph_mode == "none" or not refused_graph(exc):
                    raise
                self._fall_back(exc)
        denoiser = self._denoisers[key]
        denoiser.start(plan, times)
        return denoiser

    def _fall_back(self, exc: BaseException) -> None:
        """A graph mode was refused (by ONNX Runtime as a session opened, or in a capture): say so once, and
        reopen every step session in the next mode of :data:`FALLBACK`."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        mode = FALLBACK[self.graph_mode]
        instead = "in ONNX Runtime's own graph mode" if mode == "ort" else "without CUDA graphs"
        print(
            f"sdengine: warning: {self.graph_mode} graphs refused ({reason}); steps run {instead}",
            file=sys.stderr,
        )
        self.graphs_refused = self.graphs_refused or reason
        if self.stream is not None:
            self.stream.synchronize()  # nothing of the dropped graphs may still be running
        for cache in (self._unet_sessions, self._unet_graph_ids, self._step_sessions, self._denoisers):
            cache.clear()
        self._set_graph_mode(mode)


class DeviceDenoiser:
    """Device buffers and bindings for one shape, and (``step`` mode) its two captured whole-step graphs."""

    def __init__(self, backend: OrtCudaBackend, plan: DenoisePlan) -> None:
        self.backend, self.stream = backend, backend.stream
        self.unet, self.unet_graph_id = backend.unet_session(plan)
        self.step_model = backend.step_session(plan)

        def empty(shape: tuple[int, ...], dtype: type) -> DeviceTensor:
            return DeviceTensor(shape, dtype, backend.device, backend.device_id)

        declared = session_inputs(self.unet)
        unet_output = self.unet.get_outputs()[0]
        sample_dtype, noise_dtype, _ = backend.unet_io_dtypes()  # what the step model was built for
        tables = plan.tables
        unet_batch = plan.copies * plan.latents.shape[0]
        t_shape, t_dtype = backend.timestep_format(unet_batch)
        self.unet_input = empty(plan.unet_input_shape, sample_dtype)
        self.timestep = empty(t_shape, t_dtype)
        # the UNet's other inputs: the text embeddings, ControlNet's; the step model writes the next call's of
        # those that change from call to call (CALL_INPUTS), as it writes the timestep
        self.unet_inputs = {
            name: empty(array.shape, declared[name][0]) for name, array in plan.first_unet_inputs().items()
        }
        self.noise_pred = empty((unet_batch, *plan.latents.shape[1:]), noise_dtype)
        self.constants = {name: empty(a.shape, a.dtype.type) for name, a in tables.inputs().items()}
        self.constants["guidance"] = empty((), np.float32)
        # two sets of state; step i reads set i % 2 and writes the other
        history = (MAX_HISTORY, *plan.latents.shape)
        self.states = [
            {
                "sample": empty(plan.latents.shape, np.float32),
                "history": empty(history, np.float32),
                "step_index": empty((), np.int64),
            }
            for _ in (0, 1)
        ]
        self.unet_binding = self.unet.io_binding()
        for name, tensor in (
            ("sample", self.unet_input),
            ("timestep", self.timestep),
            *self.unet_inputs.items(),
        ):
            self.unet_binding.bind_ortvalue_input(name, tensor.value)
        self.unet_binding.bind_ortvalue_output(unet_output.name, self.noise_pred.value)
        self._bind_deepcache(plan, unet_batch, empty)
        self.step_bindings = []
        for parity in (0, 1):
            binding = self.step_model.io_binding()
            source, target = self.states[parity], self.states[1 - parity]
            for name, tensor in {"noise_pred": self.noise_pred, **source, **self.constants}.items():
                binding.bind_ortvalue_input(name, tensor.value)
            outputs = [
                target["sample"],
                target["history"],
                target["step_index"],
                self.unet_input,
                self.timestep,
            ]
            outputs += [self.unet_inputs[CALL_INPUTS[name]] for name in tables.outputs()[len(outputs) :]]
            for name, tensor in zip(tables.outputs(), outputs, strict=True):
                binding.bind_ortvalue_output(name, tensor.value)
            self.step_bindings.append(binding)
        ort_graphs, sync = backend.graph_mode == "ort", self.stream is None
        self.unet_options = run_options(self.unet_graph_id if ort_graphs else None, sync)
        if self.shallow is not None:
            self.shallow_options = run_options(self.shallow_graph_id if ort_graphs else None, sync)
        self.step_options = [run_options(i if ort_graphs else None, sync) for i in STEP_GRAPH_IDS]
        self.events = (Event(), Event()) if self.stream is not None else None
        self.times, self.calls, self.num_calls = StageTimes(), 0, tables.num_calls
        # plain runs that never wait would keep every pinned staging buffer ONNX Runtime made for them: the
        # last step of a run waits, which frees them (graph modes must keep theirs: their graphs read them)
        self.final_options = run_options(None, True) if backend.graph_mode == "none" and not sync else None
        # "step" mode: one captured graph per state parity, each a whole step; with DeepCache's shallow UNet,
        # two more, its steps
        self.graphs: list[Any] = []
        self.whole_calls: tuple[bool, ...] | None = None  # DeepCache: which calls run the whole UNet
        self._rt = cudart() if backend.graph_mode == "step" else None
        if backend.graph_mode != "none":
            self.capture(plan, whole_steps=backend.graph_mode == "step")

    def _bind_deepcache(self, plan: DenoisePlan, unet_batch: int, empty: Callable) -> None:
        """DeepCache: the cached feature's buffer, the whole UNet's second output (bound whenever the UNet
        gives it, so that no run allocates it), and, for runs that call the shallow UNet, that UNet's session
        and binding: the whole UNet's inputs (those it reads) and the feature, its output the same noise."""
        arch = self.backend.model_dir.arch
        self.shallow: ort.InferenceSession | None = None
        if not arch.deepcache:
            return
        shape = arch.deepcache_feature_shape(unet_batch, *plan.latents.shape[2:])
        self.feature = empty(shape, output_dtype(self.unet, DEEPCACHE_FEATURE))
        self.unet_binding.bind_ortvalue_output(DEEPCACHE_FEATURE, self.feature.value)
        if plan.deepcache_interval == 1:
            return
        self.shallow, self.shallow_graph_id = self.backend.unet_session(plan, UNET_SHALLOW)
        declared = session_inputs(self.shallow)
        self.shallow_binding = self.shallow.io_binding()
        for name, tensor in (
            ("sample", self.unet_input),
            ("timestep", self.timestep),
            *self.unet_inputs.items(),
            (DEEPCACHE_FEATURE, self.feature),
        ):
            if name in declared:
                self.shallow_binding.bind_ortvalue_input(name, tensor.value)
        self.shallow_binding.bind_ortvalue_output(self.shallow.get_outputs()[0].name, self.noise_pred.value)

    def capture(self, plan: DenoisePlan, *, whole_steps: bool) -> None:
        """Run both parities' steps on this plan's inputs, so that a refused graph shows here, not mid-run:
        ONNX Runtime warms up, captures and replays each graph id in its first run (``ort``); or two warm-up
        rounds, then each whole step captured on our stream (``step``)."""
        self.start(plan, StageTimes())
        kinds = (True, False) if self.shallow is not None else (True,)  # the whole UNet fills the cache first
        for _ in range(2 if whole_steps else 1):
            for whole in kinds:
                for parity in (0, 1):
                    self.states[parity]["step_index"].fill(np.array(0))  # in range, even for one call
                    self._eager_step(parity, whole=whole)
        self.synchronize()
        if whole_steps:
            eager = lambda parity, whole: self._eager_step(parity, whole=whole)  # noqa: E731
            self.graphs = capture_steps(self.stream, kinds, eager, lambda step: self._two_steps(plan, step))

    def _two_steps(self, plan: DenoisePlan, step: Callable[[int], None]) -> list[np.ndarray]:
        """Both parities' steps from this plan's start, each from step index 0; their samples on the host."""
        self.start(plan, StageTimes())
        samples = []
        for parity in (0, 1):
            self.states[parity]["step_index"].fill(np.array(0))
            step(parity)
            self.synchronize()
            samples.append(self.states[1 - parity]["sample"].numpy())
        return samples

    def _eager_step(
        self,
        parity: int,
        options: tuple[ort.RunOptions, ort.RunOptions] | None = None,
        whole: bool = True,
    ) -> None:
        """One whole step as two ONNX Runtime runs on the bound buffers (what a ``step`` graph captures);
        ``whole`` False: DeepCache's shallow UNet in the whole one's place."""
        unet, binding, unet_options = (
            (self.unet, self.unet_binding, self.unet_options)
            if whole
            else (self.shallow, self.shallow_binding, self.shallow_options)
        )
        unet_options, step_options = options or (unet_options, self.step_options[parity])
        unet.run_with_iobinding(binding, unet_options)
        self.step_model.run_with_iobinding(self.step_bindings[parity], step_options)

    def __del__(self) -> None:
        if getattr(self, "graphs", None):  # (every run ends with a wait: none is still running)
            destroy_graphs(self.graphs, self._rt)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def start(self, plan: DenoisePlan, times: StageTimes) -> None:
        """Copy one run's inputs into the bound buffers (in place: the addresses must not change). The copies
        go through the default stream, so queued work on ours must be done first."""
        self.synchronize()
        tables = plan.tables
        self.times, self.calls, self.whole_calls = times, 0, plan.whole_calls
        self.unet_input.fill(first_unet_inputs(tables, plan.latents, plan.copies))
        self.timestep.fill(first_timestep(tables, self.timestep.shape, self.timestep.dtype))
        for name, array in plan.first_unet_inputs().items():
            self.unet_inputs[name].fill(array)
        for name, array in tables.inputs().items():
            self.constants[name].fill(array)
        self.constants["guidance"].fill(np.array(plan.guidance or 1.0))
        state = self.states[0]
        state["sample"].fill(plan.latents)
        state["history"].fill(np.zeros(state["history"].shape))
        state["step_index"].fill(np.array(0))
        if self.events:
            self.events[0].record(self.stream)

    def step(self) -> None:
        call, self.calls = self.calls, self.calls + 1
        parity, whole = call % 2, self.whole_calls is None or self.whole_calls[call]
        if self.graphs:
            launch_step(self.graphs, self.stream, parity, whole, self._rt)
        elif self.final_options is not None and self.calls == self.num_calls:
            self._eager_step(parity, (self.final_options, self.final_options), whole)
        else:
            self._eager_step(parity, whole=whole)

    def latents(self, final: bool = True) -> np.ndarray:
        if self.events and final:
            self.events[1].record(self.stream)
            self.times.add("denoise_gpu", int(self.events[1].elapsed_ms(self.events[0]) * 1e6))
        self.synchronize()
        return self.states[self.calls % 2]["sample"].numpy()
