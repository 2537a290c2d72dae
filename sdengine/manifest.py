"""The manifest an export writes beside its models: what was exported, from what, and how."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdengine.errors import CorruptModelError

MANIFEST_NAME = "sdengine_manifest.json"
MANIFEST_FORMAT = 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed so multi-GB weight files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: what an export is for (:attr:`Manifest.target`)
TARGETS = ("portable", "cuda")


@dataclass(frozen=True)
class ComponentRecord:
    """One exported model file and how it was made."""

    name: str
    path: str
    sha256: str
    external_data: str | None
    size_bytes: int
    export_seconds: float
    peak_rss_bytes: int
    inputs: dict[str, list[str | int]]
    outputs: dict[str, list[str | int]]
    #: the check of its outputs against the PyTorch module's (export.verify), or None where none was made
    verification: dict[str, Any] | None = None
    #: ONNX Runtime's CUDA operators fused into it, by count (``export.cuda_fusion``), or None
    fused_operators: dict[str, int] | None = None


@dataclass(frozen=True)
class Manifest:
    source_checkpoint: str
    source_hash: str
    precision: str
    opset: int
    tool_versions: dict[str, str]
    components: dict[str, ComponentRecord] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    #: LoRA files fused into the weights at export ({file, sha256, scale} each)
    loras: list[dict[str, Any]] = field(default_factory=list)
    #: ControlNets traced into the UNet ({dir, sha256} each; see sdengine.controlnet)
    controlnets: list[dict[str, Any]] = field(default_factory=list)
    #: one of TARGETS: ``portable`` (any ONNX Runtime provider, TensorRT) or ``cuda`` (the UNet fused for
    #: ONNX Runtime's CUDA provider alone: ``export.cuda_fusion``)
    target: str = "portable"
    #: the UNet's and VAE's convolutions wrap around the image's edges: every image tiles (export.seamless)
    seamless: bool = False

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest | None:
        """The manifest in ``directory``, or None for a directory exported by another tool."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            components = {k: ComponentRecord(**v) for k, v in data.pop("components").items()}
            return cls(components=components, **data)
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptModelError(
                f"{path} is not a valid sdengine manifest ({exc}); re-run the export"
            ) from exc
