"""The AUTOMATIC1111 web UI's extra-network tags in prompts: ``<lora:NAME:WEIGHT>`` fuses the LoRA file
``NAME.safetensors`` of a LoRA directory at ``WEIGHT`` (default 1) for that generation.

As the web UI reads them: every ``<TYPE:ARGS>`` tag of the prompt is taken out of its text (the text
encoder never sees it); a LoRA's weight applies to its text encoder and UNet layers alike (a third argument,
a separate UNet weight, is accepted where it is the same); ``NAME`` is a file's name without its suffix,
anywhere under the directory. Other network types (hypernetworks, LyCORIS' own) are refused.

What a picture records of them is the web UI's too: its prompt keeps the tags, and its infotext gains
``Lora hashes: "NAME: HASH, ..."`` (:func:`lora_hashes`), the hash by which image-sharing sites and the web
UI itself find the file again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sdengine.errors import InvalidArgumentError

#: The web UI's tag pattern (``modules/extra_networks.py``).
TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its extra-network tags, and its LoRA tags in order (the same name twice: the
    weights add up, as two fusions would). InvalidArgumentError for a tag sdengine cannot honour."""
    tags: dict[str, float] = {}
    for kind, args in TAG.findall(prompt):
        if kind not in ("lora", "lyco"):
            raise InvalidArgumentError(f"<{kind}:{args}>: extra networks of type {kind!r} are not supported")
        name, *weights = [a.strip() for a in args.split(":") if "=" not in a]  # named arguments: dropped
        values = []
        for w in weights:
            try:
                values.append(float(w))
            except ValueError:
                raise InvalidArgumentError(f"<{kind}:{args}>: the weight {w!r} is not a number") from None
        if len(values) > 2 or len(set(values)) > 1 or not all(math.isfinite(v) for v in values):
            raise InvalidArgumentError(
                f"<{kind}:{args}>: one finite weight for the text encoder and UNet alike is supported"
            )
        tags[name] = tags.get(name, 0.0) + (values[0] if values else 1.0)
    return TAG.sub("", prompt), [LoraTag(n, w) for n, w in tags.items()]


def lora_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Every LoRA file under ``directory`` by the name a tag gives it (its name without ``.safetensors``;
    the first found, in sorted order, where two share one)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(directory).rglob("*.safetensors")):
        found.setdefault(path.stem, path)
    return found


def resolve_loras(tags: list[LoraTag], directory: str | os.PathLike | None) -> list[tuple[Path, float]]:
    """Each tag's file and weight; InvalidArgumentError for a tag with no directory to look in, or a name
    with no file there."""
    if not tags:
        return []
    if directory is None:
        raise InvalidArgumentError(
            f"<lora:{tags[0].name}>: LoRA tags need a LoRA directory (sdengine serve --lora-dir DIR)"
        )
    files = lora_files(directory)
    missing = [t.name for t in tags if t.name not in files]
    if missing:
        raise InvalidArgumentError(f"no LoRA named {', '.join(missing)} in {directory}")
    return [(files[t.name], t.weight) for t in tags]


def lora_hash(path: str | os.PathLike) -> str:
    """The web UI's hash of a LoRA file: its metadata's ``sshs_model_hash`` where it has one, else the
    sha256 of everything after the safetensors header (kohya's "addnet" hash, which a change of metadata
    leaves as it is), in hex. InvalidArgumentError for a file that is no safetensors file. Read once per
    file and modification (a served LoRA is named by request after request)."""
    stat = os.stat(path)
    return _lora_hash(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _lora_hash(path: str, mtime_ns: int, size: int) -> str:
    """:func:`lora_hash` of the resolved ``path``; ``mtime_ns`` and ``size`` key the cache, so a file
    written again is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        start = f.read(8)
        size = int.from_bytes(start, "little") if len(start) == 8 else -1
        header = f.read(size) if 0 < size < os.fstat(f.fileno()).st_size else b""
        try:
            metadata = json.loads(header).get("__metadata__") or {}
        except (ValueError, AttributeError):
            raise InvalidArgumentError(f"{path} is not a safetensors file") from None
        if metadata.get("sshs_model_hash"):
            return str(metadata["sshs_model_hash"])
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hashes(tags: list[LoraTag], loras: list[tuple[Path, float]]) -> str:
    """The infotext's ``Lora hashes`` value for ``tags`` and their files (:func:`resolve_loras`): each tag's
    name, less any ``:`` or ``,``, and the first 12 hex digits of its file's :func:`lora_hash`."""
    names = [tag.name.replace(":", "").replace(",", "") for tag in tags]
    return ", ".join(f"{name}: {lora_hash(path)[:12]}" for name, (path, _) in zip(names, loras, strict=True))
