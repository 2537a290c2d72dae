"""ONNX Runtime backend: one inference session per model, on the CPU execution provider by default.

Loads sdengine's own exports and Optimum's: inputs are cast to whatever dtype each model declares (int32 or
int64 ids, float32 or float16 tensors) and the timestep is given the rank the UNet declares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper

from sdengine.backends.base import DenoisePlan, GraphKey, skipped_layers, xl_layer
from sdengine.backends.ort_cache import optimized_model
from sdengine.errors import (
    BackendUnavailableError,
    CorruptModelError,
    ModelDirectoryError,
    UnsupportedConfigError,
)
from sdengine.model_dir import ModelDir
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
    ModelSpec,
)
from sdengine.step_graph import (
    CALL_INPUTS,
    MAX_HISTORY,
    STEP_OUTPUTS,
    first_timestep,
    first_unet_inputs,
    timestep_shape,
)
from sdengine.textual_inversion import grown_token_table
from sdengine.timing import StageTimes


def session_inputs(session: ort.InferenceSession) -> dict[str, tuple[type, int]]:
    """Each input's numpy dtype and rank, as the session declares them."""
    types = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int32)": np.int32,
        "tensor(int64)": np.int64,
        "tensor(double)": np.float64,
    }
    return {i.name: (types.get(i.type, np.float32), len(i.shape)) for i in session.get_inputs()}


def declared_inputs(path: str | os.PathLike) -> dict[str, tuple[type, int]]:
    """Each graph input's numpy dtype and rank, read from the model file (weights not loaded)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and OSError alike: not a readable ONNX file
        raise CorruptModelError(
            f"cannot load {path}: {str(exc).strip()[:200] or type(exc).__name__}"
        ) from None
    initializers = {t.name for t in graph.initializer}
    return {
        i.name: (
            helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).type,
            len(i.type.tensor_type.shape.dim),
        )
        for i in graph.input
        if i.name not in initializers
    }


#: ONNX Runtime's session option that lets a session's worker threads spin, waiting for work, after its run.
ALLOW_SPINNING = "session.intra_op.allow_spinning"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Every session's options. Spinning is off: each session has its own thread pool, and its threads,
    spinning on after its run, took the cores from the next session's (the step model after the UNet, or
    DeepCache's shallow UNet after the whole one). Measured on the 2-core CPU, SD 1.5 at 256x256, 10 steps:
    the shallow UNet's calls 125 ms instead of 170-230, the whole UNet's 1.83-1.85 s instead of 2.03-2.13."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


#: ONNX Runtime's session option for where a model given as bytes finds its external-data file.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def model_with_initializers(path: str | os.PathLike, replaced: dict[str, np.ndarray]) -> tuple[bytes, bool]:
    """The model at ``path`` with these initializers (name -> array) in place of its own, serialised, and
    whether its other weights stay in its external-data file. Replaced in the model itself, not with
    ONNX Runtime's initializer overrides: those apply after graph optimisation, which may already have
    folded the file's values into fused weights (as its fp16 CPU fusions do)."""
    model = onnx.load(str(path), load_external_data=False)
    external = False
    for tensor in model.graph.initializer:
        if tensor.name in replaced:
            tensor.CopyFrom(numpy_helper.from_array(replaced[tensor.name], tensor.name))
        else:
            external |= external_data_helper.uses_external_data(tensor)
    try:
        return model.SerializeToString(), external
    except ValueError:  # protobuf's 2 GB limit
        raise UnsupportedConfigError(
            f"{path}: with its replaced weights inside, the model passes protobuf's 2 GB limit; fuse the "
            "LoRA at export instead (sdengine export --lora)"
        ) from None


def open_session(
    path: str,
    spec: ModelSpec,
    providers: Sequence[str],
    options: ort.SessionOptions,
    replaced: dict[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """A session for ``path``, checked against ``spec``; unreadable or foreign models: CorruptModelError.
    ``replaced``: initializers (name -> array) to run with in place of the file's; then ``options`` must be
    the session's own (it gets the external-data folder)."""
    source: str | bytes = path
    if replaced:
        source, external = model_with_initializers(path, replaced)
        if external:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(Path(path).parent))
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types, not importable by a stable name
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptModelError(f"cannot load {path}: {reason[:300]}") from None
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    missing = [n for n in spec.input_names if n not in have_in]
    missing += [n for n in spec.output_names[:1] if n not in have_out]
    if missing:
        raise CorruptModelError(
            f"{path} is not a Stable Diffusion {spec.name}: it lacks {', '.join(missing)}"
        )
    return session


def provider_names(providers: Sequence[str | tuple[str, dict]]) -> list[str]:
    """The execution providers' names, from names or (name, options) pairs as ONNX Runtime takes them."""
    return [p if isinstance(p, str) else p[0] for p in providers]


class OrtBackend:
    """Runs text encoder, UNet, the step model and VAE decoder with ONNX Runtime, on host arrays."""

    name = "ort"

    def __init__(
        self,
        model_dir: ModelDir,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        preload: Sequence[str] | None = None,
        optimized_cache: bool = False,
    ) -> None:
        """``preload``: the models to open sessions for now (default: those text to image needs; a GPU
        backend opens its UNet per shape). ``optimized_cache``: keep ONNX Runtime's optimised CPU graphs per
        machine (see ``ort_cache``)."""
        self.model_dir = model_dir
        self.providers = list(providers)
        if model_dir.cuda_fused and "CUDAExecutionProvider" not in provider_names(self.providers):
            raise BackendUnavailableError(
                f"{model_dir.root}'s UNet is fused for ONNX Runtime's CUDA provider (export --target cuda), "
                "which alone runs it: use --device cuda, or a portable export on the CPU"
            )
        self.threads, self.optimized_cache = threads, optimized_cache
        self.options = session_options(threads)
        self.specs = model_dir.arch.specs()
        self._weights: dict[str, dict[str, np.ndarray]] = {}  # LoRA-fused weights, by component
        # textual inversion: each text encoder's rows, by token id, and its token table with those rows
        self._token_rows: dict[str, dict[int, np.ndarray]] = {}
        self._token_tables: dict[str, dict[str, np.ndarray]] = {}
        required = model_dir.arch.required_components()
        self.sessions = {c: self._open(c) for c in (required if preload is None else preload)}
        self._inputs = {
            c: session_inputs(self.sessions[c])
            if c in self.sessions
            else declared_inputs(model_dir.onnx_path(c))
            for c in required
        }
        self.step_providers = self.providers
        self.step_session_options = self.options
        self._step_sessions: dict[GraphKey, ort.InferenceSession] = {}

    def _open(self, component: str) -> ort.InferenceSession:
        path, spec = self.model_dir.onnx_path(component), self.specs[component]
        if not path.is_file():  # only the optional VAE encoder gets here; the directory check covers the rest
            raise ModelDirectoryError(
                f"{self.model_dir.root} has no {component} model, which image to image needs; export it "
                "(sdengine export writes every component unless --components says otherwise)"
            )
        cpu_only = all(p == "CPUExecutionProvider" for p in self.providers)
        replaced = self.replaced_weights(component)
        if self.optimized_cache and cpu_only and not replaced:
            opener = lambda p, o: open_session(p, spec, self.providers, o)  # noqa: E731
            return optimized_model(path, lambda: session_options(self.threads), opener)
        options = session_options(self.threads) if replaced else self.options  # see open_session
        return open_session(str(path), spec, self.providers, options, replaced)

    def replaced_weights(self, component: str) -> dict[str, np.ndarray]:
        """The initializers ``component`` runs with in place of its file's: LoRA's fused weights
        (:meth:`set_weights`) and, for the text encoder, the token table with textual inversion's rows."""
        return {
            **self._weights.get(component, {}),
            **self._token_tables.get(component, {}),
        }

    def set_weights(self, component: str, weights: dict[str, np.ndarray]) -> None:
        """LoRA: run ``component`` with these initializers (name -> array) in place of its file's, and its
        file's own for the rest; an empty dict restores the file's. Reopens its session."""
        previous = self._weights.get(component, {})
        self._weights[component] = dict(weights)
        self._reopen(component, undo=lambda: self._weights.update({component: previous}))
        if component == UNET and self.model_dir.arch.deepcache:  # its layers are the UNet's (a subset)
            self.set_weights(UNET_SHALLOW, weights)

    def _reopen(self, component: str, undo: Callable[[], None]) -> None:
        """Reopen ``component``'s session after a change of what it runs with; where that fails, ``undo`` the
        change and reopen it as it was. The old session is freed first: two SD 1.5 UNet sessions side by
        side would double the peak memory."""
        if self.sessions.pop(component, None) is None:
            return  # not open yet: it opens with the change on first use
        try:
            self.sessions[component] = self._open(component)
        except BaseException:
            undo()
            self.sessions[component] = self._open(component)
            raise

    def _run(self, component: str, output: str | None = None, **arrays: np.ndarray) -> np.ndarray:
        """One model run on host arrays: its first output (or ``output``), as float32."""
        return self._run_outputs(component, [output or self.specs[component].output_names[0]], **arrays)[0]

    def _run_outputs(self, component: str, outputs: list[str], **arrays: np.ndarray) -> list[np.ndarray]:
        """One model run on host arrays: the ``outputs`` named, as float32."""
        declared = self._inputs[component]
        feed = {name: np.asarray(a, dtype=declared[name][0]) for name, a in arrays.items()}
        results = self.sessions[component].run(outputs, feed)
        return [r if r.dtype == np.float32 else r.astype(np.float32) for r in results]

    def timestep_format(self, unet_batch: int) -> tuple[tuple[int, ...], type]:
        """The shape and dtype the UNet declares for its timestep: a scalar, or one per batch item."""
        dtype, rank = self._inputs[UNET]["timestep"]
        return timestep_shape(rank, unet_batch), dtype

    def unet_io_dtypes(self) -> tuple[type, type, type]:
        """The (sample, noise, text embeddings) dtypes the step model exchanges with the UNet: float32 here,
        where the UNet's inputs and output are converted on the host (a device loop binds the UNet's own, see
        ort_cuda)."""
        return np.float32, np.float32, np.float32

    def step_session(self, plan: DenoisePlan) -> ort.InferenceSession:
        """The step model for this plan's shapes, built and loaded once per shape."""
        key = GraphKey.of(plan)
        if key not in self._step_sessions:
            model = key.step_model(self.timestep_format(key.copies * key.batch), self.unet_io_dtypes())
            self._step_sessions[key] = ort.InferenceSession(
                model.SerializeToString(), self.step_session_options, providers=self.step_providers
            )
        return self._step_sessions[key]

    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> np.ndarray:
        if self.model_dir.arch.xl:
            self._require_states(TEXT_ENCODER)
            return xl_layer(self._run(TEXT_ENCODER, HIDDEN_STATES, input_ids=input_ids), clip_skip)
        if not clip_skip:
            return self._run(TEXT_ENCODER, input_ids=input_ids)
        if LAYER_STATES not in {o.name for o in self.sessions[TEXT_ENCODER].get_outputs()}:
            raise ModelDirectoryError(
                f"{self.model_dir.root}: its text encoder gives only its last layer, and clip_skip needs "
                "every layer's; export the checkpoint again with sdengine export"
            )
        return skipped_layers(self._run(TEXT_ENCODER, LAYER_STATES, input_ids=input_ids), clip_skip)

    def _require_states(self, component: str) -> None:
        """SDXL reads every layer's states, stacked (:data:`HIDDEN_STATES`): sdengine's exports give them."""
        if HIDDEN_STATES not in {o.name for o in self.sessions[component].get_outputs()}:
            raise ModelDirectoryError(
                f"{self.model_dir.root}: its {component} does not give {HIDDEN_STATES} (every layer's "
                "states, stacked), which SDXL reads; export the checkpoint with sdengine export"
            )

    def encode_text_2(self, input_ids: np.ndarray, clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        self._require_states(TEXT_ENCODER_2)
        pooled, states = self._run_outputs(TEXT_ENCODER_2, [TEXT_EMBEDS, HIDDEN_STATES], input_ids=input_ids)
        return xl_layer(states, clip_skip), pooled

    def set_token_embeddings(self, rows: dict[int, np.ndarray], component: str = TEXT_ENCODER) -> None:
        """The text encoder's session again, from its model with every row given so far (the grown table is
        made here, once, not at every reopening of the session: LoRA reopens it too)."""
        all_rows = {**self._token_rows.get(component, {}), **rows}
        path = self.model_dir.onnx_path(component)
        model = onnx.load(str(path), load_external_data=False)
        name, table = grown_token_table(
            model, str(path.parent), all_rows
        )  # refuses a bad row, changing nothing
        previous = self._token_rows.get(component, {}), self._token_tables.get(component, {})
        self._token_rows[component], self._token_tables[component] = all_rows, {name: table}

        def undo() -> None:
            self._token_rows[component], self._token_tables[component] = previous

        self._reopen(component, undo=undo)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if VAE_ENCODER not in self.sessions:  # opened on first use: text to image never needs it
            self.sessions[VAE_ENCODER] = self._open(VAE_ENCODER)
            self._inputs[VAE_ENCODER] = session_inputs(self.sessions[VAE_ENCODER])
        return self._run(VAE_ENCODER, sample=pixels)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, **inputs: np.ndarray) -> np.ndarray:
        """The UNet; ``inputs``: its others by name (``encoder_hidden_states``, ControlNet's)."""
        return self._run(UNET, sample=sample, timestep=timestep, **inputs)

    def predict_noise_caching(
        self, sample: np.ndarray, timestep: np.ndarray, **inputs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """DeepCache's whole UNet: its output and the feature it caches (``sdengine.deepcache``)."""
        outputs = ["out_sample", DEEPCACHE_FEATURE]
        noise, feature = self._run_outputs(UNET, outputs, sample=sample, timestep=timestep, **inputs)
        return noise, feature

    def predict_noise_shallow(
        self, sample: np.ndarray, timestep: np.ndarray, feature: np.ndarray, **inputs: np.ndarray
    ) -> np.ndarray:
        """DeepCache's shallow UNet on the cached ``feature``. It takes the UNet's inputs but those its
        branch never reads (the tracer leaves them out: a perturbed layer it skips reads ``pag_rows``)."""
        if UNET_SHALLOW not in self.sessions:  # opened on first use: a run with DeepCache
            self.sessions[UNET_SHALLOW] = self._open(UNET_SHALLOW)
            self._inputs[UNET_SHALLOW] = session_inputs(self.sessions[UNET_SHALLOW])
        declared = self._inputs[UNET_SHALLOW]
        used = {name: a for name, a in inputs.items() if name in declared}
        return self._run(UNET_SHALLOW, sample=sample, timestep=timestep, deepcache_feature=feature, **used)

    def denoiser(self, plan: DenoisePlan, times: StageTimes) -> HostDenoiser:
        return HostDenoiser(self, plan, times)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run(VAE_DECODER, latent_sample=latents)

    def decode_preview(self, latents: np.ndarray) -> np.ndarray:
        if PREVIEW_DECODER not in self.sessions:  # opened on first use: a run with tiny previews
            self.sessions[PREVIEW_DECODER] = self._open(PREVIEW_DECODER)
            self._inputs[PREVIEW_DECODER] = session_inputs(self.sessions[PREVIEW_DECODER])
        return self._run(PREVIEW_DECODER, latent_sample=latents)

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if SAFETY_CHECKER not in self.sessions:  # opened on first use, where the export has one
            self.sessions[SAFETY_CHECKER] = self._open(SAFETY_CHECKER)
        return run_safety_checker(self.sessions[SAFETY_CHECKER], clip_input, images)

    def encode_image_prompt(self, pixels: np.ndarray) -> np.ndarray:
        if IMAGE_ENCODER not in self.sessions:  # opened on first use: a run with an image prompt
            self.sessions[IMAGE_ENCODER] = self._open(IMAGE_ENCODER)
            self._inputs[IMAGE_ENCODER] = session_inputs(self.sessions[IMAGE_ENCODER])
        return self._run(IMAGE_ENCODER, pixel_values=pixels)


def run_safety_checker(
    session: ort.InferenceSession, clip_input: np.ndarray, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One run of an exported safety checker (with the inputs and outputs diffusers' ONNX pipeline uses)."""
    out, flags = session.run(
        ["out_images", "has_nsfw_concepts"],
        {"clip_input": clip_input.astype(np.float32), "images": images.astype(np.float32)},
    )
    return out.astype(np.float32), flags.astype(bool)


class HostDenoiser:
    """A denoising run whose state lives in host memory: per step, the UNet then the step model."""

    def __init__(self, backend: OrtBackend, plan: DenoisePlan, times: StageTimes) -> None:
        self.backend, self.times = backend, times
        self.session = backend.step_session(plan)
        tables = plan.tables
        t_shape, t_dtype = backend.timestep_format(plan.copies * plan.latents.shape[0])
        self.constants = {**tables.inputs(), "guidance": np.array(plan.guidance or 1.0, np.float32)}
        self.outputs = tables.outputs()
        # the UNet's inputs besides its sample and timestep; the step model gives each next call's of those
        # that change from call to call (CALL_INPUTS)
        self.unet_inputs = plan.first_unet_inputs()
        self.state = {
            "sample": plan.latents,
            "history": np.zeros((MAX_HISTORY, *plan.latents.shape), np.float32),
            "step_index": np.array(0, np.int64),
        }
        self.unet_input = first_unet_inputs(tables, plan.latents, plan.copies)
        self.timestep = first_timestep(tables, t_shape, t_dtype)
        self.whole_calls, self.calls = plan.whole_calls, 0  # DeepCache's, and where the run is
        self.feature: np.ndarray | None = None

    def _predict_noise(self) -> np.ndarray:
        """The UNet's call: the whole UNet, or (DeepCache) the shallow one between its whole calls."""
        backend, call, self.calls = self.backend, self.calls, self.calls + 1
        if self.whole_calls is None:
            return backend.predict_noise(self.unet_input, self.timestep, **self.unet_inputs)
        if self.whole_calls[call]:
            noise_pred, self.feature = backend.predict_noise_caching(
                self.unet_input, self.timestep, **self.unet_inputs
            )
            return noise_pred
        return backend.predict_noise_shallow(self.unet_input, self.timestep, self.feature, **self.unet_inputs)

    def step(self) -> None:
        with self.times.time("unet"):
            noise_pred = self._predict_noise()
        with self.times.time("step"):
            out = self.session.run(self.outputs, {"noise_pred": noise_pred, **self.state, **self.constants})
        sample, history, index, self.unet_input, self.timestep, *per_call = out
        for name, value in zip(self.outputs[len(STEP_OUTPUTS) :], per_call, strict=True):
            self.unet_inputs[CALL_INPUTS[name]] = value
        self.state = {"sample": sample, "history": history, "step_index": index}

    def latents(self, final: bool = True) -> np.ndarray:
        return self.state["sample"]
