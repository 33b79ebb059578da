"""KServe v2 tensors <-> numpy: datatypes, typed contents and raw little-endian bytes.

Transport-independent: the gRPC KServe servicer uses it, and so could an HTTP one.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from serving.errors import InvalidInput

# Most axes a tensor may have (numpy's own limit is 64).
MAX_DIMS = 32
# Most elements a tensor's non-zero dimensions may span.
MAX_ELEMENTS = 2**31 - 1
# KServe v2 datatype -> numpy dtype (little-endian on the wire).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# Card / ONNX Runtime dtype names -> KServe datatype.
FROM_NUMPY_NAME = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "string": "BYTES",
}
# KServe datatype -> the InferTensorContents field that carries it (FP16 travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_bytes(raw: bytes, count: int, field: str) -> list[bytes]:
    items, position = [], 0
    for index in range(count):
        if position + 4 > len(raw):
            raise InvalidInput(f"{field}: raw BYTES data ends before element {index} of {count}")
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4
        if position + length > len(raw):
            raise InvalidInput(f"{field}: raw BYTES element {index} claims {length} bytes past the end")
        items.append(raw[position : position + length])
        position += length
    if position != len(raw):
        raise InvalidInput(f"{field}: {len(raw) - position} bytes left after {count} BYTES elements")
    return items


def _objects(items: list[bytes], shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def decode_tensor(field: str, datatype: str, shape: list[int], contents, raw: bytes | None) -> np.ndarray:
    """One input tensor as a numpy array of its shape (object array of bytes for BYTES)."""
    if datatype not in DTYPES:
        raise InvalidInput(f"{field}.datatype: {datatype!r} is not a KServe v2 datatype ({', '.join(DTYPES)})")
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"{field}.shape: {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{field}.shape: {len(shape)} dimensions, limit {MAX_DIMS}")
    # Python integers: an int64 product of huge dimensions would wrap around (even to 0).
    count = math.prod(shape)
    # numpy refuses a shape whose dimensions span more than its index range even when one of
    # them is 0 ([0, 2**62]): no message could carry such a tensor anyway.
    if math.prod(dim for dim in shape if dim) > MAX_ELEMENTS:
        raise InvalidInput(f"{field}.shape: {list(shape)} spans more than {MAX_ELEMENTS} elements (limit)")
    if raw is not None:
        if datatype == "BYTES":
            return _objects(decode_bytes(raw, count, field), shape)
        dtype = DTYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"{field}: shape {list(shape)} needs {count * dtype.itemsize} bytes of {datatype}, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "FP16":
        raise InvalidInput(f"{field}: FP16 data must come in raw_input_contents")
    values = getattr(contents, CONTENTS_FIELD[datatype])
    if len(values) != count:
        raise InvalidInput(f"{field}: shape {list(shape)} needs {count} values, contents hold {len(values)}")
    if datatype == "BYTES":
        return _objects(list(values), shape)
    return np.asarray(values, dtype=DTYPES[datatype]).reshape(shape)


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    """The raw output form of an array."""
    if datatype == "BYTES":
        return encode_bytes([item if isinstance(item, bytes) else str(item).encode() for item in array.reshape(-1)])
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
