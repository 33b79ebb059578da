"""Reading ONNX files from a model folder without ever reading outside it.

ONNX Runtime gets the graph as bytes, never a path: a graph that keeps tensors in external
data files has them read here first, after checking that every location is relative, stays
inside the version folder, and names a regular file with one hard link reached through no
symbolic link. Truncated or non-ONNX bytes are refused with a clear error.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from serving.errors import ModelLoadError


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: initializers, sparse initializers, constants and attributes,
    subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def check_relative_location(location: str) -> str:
    """The normalised relative path of an external-data location, or ModelLoadError."""
    if not location or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ModelLoadError(f"external data location {location!r} is absolute")
    normalised = posixpath.normpath(location.replace("\\", "/"))
    if normalised == ".." or normalised.startswith("../") or normalised == ".":
        raise ModelLoadError(f"external data location {location!r} leaves the model folder")
    return normalised


def _read_external(folder: Path, location: str, offset: int, length: int | None) -> bytes:
    relative = check_relative_location(location)
    path = folder
    for part in relative.split("/"):
        path = path / part
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise ModelLoadError(f"external data file {location!r} is missing") from None
        except (OSError, ValueError) as error:  # a NUL byte, a name too long, a file where a folder should be
            reason = getattr(error, "strerror", None) or str(error)
            raise ModelLoadError(f"external data location {location!r} cannot be used: {reason}") from None
        if stat.S_ISLNK(info.st_mode):
            raise ModelLoadError(f"external data {location!r} goes through a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"external data {location!r} is not a regular file")
    if info.st_nlink > 1:
        raise ModelLoadError(f"external data file {location!r} has more than one hard link")
    # Checked before reading: a declared length far beyond the file must not allocate it.
    if offset > info.st_size or (length is not None and offset + length > info.st_size):
        raise ModelLoadError(
            f"external data {location!r} is shorter than declared: offset {offset}, length {length}, "
            f"the file holds {info.st_size} bytes"
        )
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read() if length is None else handle.read(length)
    if length is not None and len(data) != length:
        raise ModelLoadError(f"external data {location!r} is shorter than declared")
    return data


def self_contained(model_bytes: bytes, folder: Path, label: str) -> bytes:
    """The model as bytes with every external tensor read in (or the bytes unchanged when it
    has none); refuses non-ONNX input and external data outside `folder`."""
    try:
        model = onnx.load_model_from_string(model_bytes)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{label}: not an ONNX model ({error.__class__.__name__}: {error})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
    external = [t for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return model_bytes
    for tensor in external:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ModelLoadError(f"{label}: tensor {tensor.name!r} has a malformed external data entry") from None
        if offset < 0 or (length is not None and length < 0):
            raise ModelLoadError(
                f"{label}: tensor {tensor.name!r}: external data offset {offset} / length {length} is negative"
            )
        try:
            data = _read_external(folder, entries.get("location", ""), offset, length)
        except ModelLoadError as error:
            raise ModelLoadError(f"{label}: tensor {tensor.name!r}: {error}") from None
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return model.SerializeToString()
