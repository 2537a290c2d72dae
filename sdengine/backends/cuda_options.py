"""Options for ONNX Runtime's CUDA execution provider, given by the user (``--cuda-option KEY=VALUE``).

They go to every session the ONNX Runtime CUDA backend opens, beside the options the backend sets itself
(which GPU, its CUDA stream, ONNX Runtime's graph mode), which they may not change. Which keys exist and what
they do is ONNX Runtime's to say: its CUDA provider documentation lists them (``prefer_nhwc``,
``cudnn_conv_algo_search``, ``gpu_mem_limit``, ``sdpa_kernel``, ...), and ONNX Runtime refuses an unknown
one when the first session opens. This module only reads them and keeps the backend's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sdengine.errors import InvalidArgumentError

#: the options the backend sets itself: which GPU, its own CUDA stream, ONNX Runtime's graph mode
BACKEND_OWNED = frozenset(
    {"device_id", "user_compute_stream", "has_user_compute_stream", "enable_cuda_graph"}
)


def parse_cuda_options(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (the command line's) as a checked mapping; a key given twice keeps its last."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidArgumentError(f"--cuda-option {item!r}: expected KEY=VALUE, such as prefer_nhwc=1")
        options[key.strip()] = value.strip()
    return checked_cuda_options(options)


def checked_cuda_options(options: Mapping[str, object]) -> dict[str, str]:
    """``options`` as ONNX Runtime takes them (strings), refusing the keys the backend sets itself."""
    owned = sorted(BACKEND_OWNED.intersection(options))
    if owned:
        raise InvalidArgumentError(
            f"CUDA provider option {', '.join(owned)} is set by sdengine itself (the GPU, its stream, "
            "--graphs); leave it out"
        )
    return {str(key): _text(value) for key, value in options.items()}


def _text(value: object) -> str:
    """ONNX Runtime reads every option as a string; a Python bool becomes its ``1``/``0``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
