"""Textual inversion embeddings: new prompt tokens whose text-encoder input rows are learned vectors.

Loaded as diffusers' ``load_textual_inversion`` loads them: a token of n vectors becomes the tokens ``tok``,
``tok_1`` ... ``tok_{n-1}``, each added to the tokenizer with the next free id and given its row of the text
encoder's token-embedding table, and a prompt naming ``tok`` is read as ``tok tok_1 ... tok_{n-1}``. The
runtime reads safetensors files (diffusers' ``{token: vectors}`` and A1111's ``emb_params``) without torch;
pickled ``.bin``/``.pt`` files are read only where torch is installed. SDXL's embeddings hold a set of vectors
for each text encoder, ``clip_l`` (the first's) and ``clip_g`` (the second's), as diffusers' documentation
loads them into each encoder with its tokenizer (:func:`read_xl_embedding`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.safetensors_io import read_safetensors

#: An SDXL embedding's vectors for its first and its second text encoder.
XL_KEYS = ("clip_l", "clip_g")


def read_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[str, np.ndarray]:
    """(token, vectors (n, hidden) float32) from an embedding file; ``token`` overrides the file's own."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"embedding file {path} does not exist")
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path, "embedding")[0]
        if set(XL_KEYS) <= set(tensors):
            raise InvalidArgumentError(
                f"{path} is an SDXL embedding (clip_l and clip_g); load it into an SDXL model"
            )
        if "emb_params" in tensors:  # A1111's safetensors: the token is the file's name
            loaded, vectors = path.stem, tensors["emb_params"]
        elif len(tensors) == 1:  # diffusers: {token: vectors}
            loaded, vectors = next(iter(tensors.items()))
        else:
            keys = ", ".join(sorted(tensors))
            raise InvalidArgumentError(f"{path} is not a textual inversion embedding (its tensors: {keys})")
    else:
        loaded, vectors = _read_pickled(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not len(vectors):
        raise InvalidArgumentError(f"{path}: expected embedding vectors (n, hidden), got {vectors.shape}")
    return token or loaded, vectors


def read_xl_embedding(
    path: str | os.PathLike, token: str | None = None
) -> tuple[str, np.ndarray, np.ndarray]:
    """(token, first encoder's vectors (n, hidden), second's (n, hidden 2)) from an SDXL embedding file
    (safetensors with ``clip_l`` and ``clip_g``); the token is the file's name unless ``token`` is given."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"embedding file {path} does not exist")
    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"{path}: SDXL embeddings are read as .safetensors only")
    tensors = read_safetensors(path, "embedding")[0]
    if not set(XL_KEYS) <= set(tensors):
        raise InvalidArgumentError(
            f"{path} is not an SDXL embedding: an SDXL model needs vectors for both text encoders "
            "(clip_l and clip_g)"
        )
    first, second = (np.asarray(tensors[key], dtype=np.float32) for key in XL_KEYS)
    if first.ndim != 2 or second.ndim != 2 or len(first) != len(second) or not len(first):
        raise InvalidArgumentError(
            f"{path}: expected as many clip_l as clip_g vectors, got {first.shape} and {second.shape}"
        )
    return token or path.stem, first, second


def _read_pickled(path: Path) -> tuple[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise InvalidArgumentError(
            f"{path} is a pickled embedding, which needs torch to read; use its .safetensors version"
        ) from None
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "string_to_param" in data:  # A1111
        return str(data.get("name", path.stem)), data["string_to_param"]["*"].float().numpy()
    if isinstance(data, dict) and len(data) == 1:  # diffusers
        token, vectors = next(iter(data.items()))
        return str(token), vectors.float().numpy()
    raise InvalidArgumentError(f"{path} is not a textual inversion embedding")


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens a ``count``-vector embedding adds: ``token``, ``token_1``, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def grown_token_table(
    model: onnx.ModelProto, folder: str, rows: dict[int, np.ndarray]
) -> tuple[str, np.ndarray]:
    """The text encoder's token-embedding table (the largest 2-D initializer a Gather reads; its data read
    from ``folder`` where it is stored outside the model) with ``rows`` at their ids, grown where an id lies
    past its end: (initializer name, table)."""
    initializers = {t.name: t for t in model.graph.initializer}
    gathered = [initializers.get(node.input[0]) for node in model.graph.node if node.op_type == "Gather"]
    tables = [t for t in gathered if t is not None and len(t.dims) == 2]
    if not tables:
        raise UnsupportedConfigError("the text encoder has no token-embedding table to add tokens to")
    table_proto = max(tables, key=lambda t: t.dims[0])
    if external_data_helper.uses_external_data(table_proto):
        external_data_helper.load_external_data_for_tensor(table_proto, folder)
    table = numpy_helper.to_array(table_proto)
    size = max(table.shape[0], max(rows) + 1)
    grown = np.zeros((size, table.shape[1]), table.dtype)
    grown[: table.shape[0]] = table
    for token_id, vector in rows.items():
        if vector.shape != (table.shape[1],):
            raise InvalidArgumentError(
                f"an embedding vector of size {vector.shape[-1]} for a text encoder of width {table.shape[1]}"
            )
        grown[token_id] = vector.astype(table.dtype)
    return table_proto.name, grown
