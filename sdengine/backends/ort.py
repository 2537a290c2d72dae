"""ONNX Runtime backend: one inference session per model, on the CPU execution provider by default.

Loads sdengine's own exports and Optimum's: inputs are cast to whatever dtype each model declares (int32 or
int64 ids, float32 or float16 tensors) and the timestep is given the rank the UNet declares.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from sdengine.errors import CorruptModelError
from sdengine.model_dir import ModelDir
from sdengine.model_specs import REQUIRED_COMPONENTS, TEXT_ENCODER, UNET, VAE_DECODER, ModelSpec

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def open_session(
    path: str, spec: ModelSpec, providers: Sequence[str], options: ort.SessionOptions
) -> ort.InferenceSession:
    """A session for ``path``, checked against ``spec``; unreadable or foreign models: CorruptModelError."""
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=list(providers))
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


class OrtBackend:
    """Runs text encoder, UNet and VAE decoder with ONNX Runtime."""

    name = "ort"

    def __init__(
        self,
        model_dir: ModelDir,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        specs = model_dir.arch.specs()
        options = session_options(threads)
        self.specs = {c: specs[c] for c in REQUIRED_COMPONENTS}
        self.sessions = {
            c: open_session(str(model_dir.onnx_path(c)), spec, providers, options)
            for c, spec in self.specs.items()
        }
        self._inputs = {
            c: {i.name: (_ORT_DTYPES.get(i.type, np.float32), len(i.shape)) for i in s.get_inputs()}
            for c, s in self.sessions.items()
        }

    def _run(self, component: str, **arrays: np.ndarray) -> np.ndarray:
        declared = self._inputs[component]
        feed = {name: np.asarray(a, dtype=declared[name][0]) for name, a in arrays.items()}
        output = self.specs[component].output_names[0]
        result = self.sessions[component].run([output], feed)[0]
        return result if result.dtype == np.float32 else result.astype(np.float32)

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(TEXT_ENCODER, input_ids=input_ids)

    def predict_noise(self, sample: np.ndarray, timestep: float, context: np.ndarray) -> np.ndarray:
        rank = self._inputs[UNET]["timestep"][1]
        t = np.full((sample.shape[0],) if rank else (), timestep)
        return self._run(UNET, sample=sample, timestep=t, encoder_hidden_states=context)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run(VAE_DECODER, latent_sample=latents)
