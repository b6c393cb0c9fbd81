"""Open Inference Protocol (KServe V2) REST codec, with Triton's binary tensor data extension.

Pure functions over bytes, dicts and numpy arrays: no web framework here, so the /v2 routes stay thin
and this module is tested against the real client libraries (tritonclient.http, kserve).

Wire format (specification/protocol/inference_rest.md of kserve/open-inference-protocol, and
docs/protocol/extension_binary_data.md of triton-inference-server/server):

- A request body is a JSON object, or, when the `Inference-Header-Content-Length` header is given, that
  many bytes of JSON followed by the binary tensor data of the inputs whose
  `parameters.binary_data_size` is set, in input order, little-endian, row-major, no padding.
  BOOL is one byte (0 or 1); BYTES is, per element, a 4-byte little-endian length and the bytes.
- JSON tensor data is a flat or naturally nested array, row-major; BYTES elements are strings.
- A response's outputs go in JSON, or in the binary section when the request asks for it: an output's
  own `parameters.binary_data` wins, else the request's `parameters.binary_data_output`, else JSON.

Validation order in `decode_infer_request` is chosen so that refusing a bad request costs little: the
JSON values in the header are counted with C-speed bytes operations before it is parsed (a JSON body
with far more values than `max_elements` is refused without building its lists), then every input's
name, datatype, shape, element count (against `max_elements`, summed over the inputs) and binary size
are checked from the parsed header alone, and only then is any tensor materialised. Every refusal
raises `V2CodecError`, which the routes answer with HTTP 400 and `error_body(message)`.

Not supported (refused with a clear message): the raw binary request (`Inference-Header-Content-Length:
0`), BF16 (numpy has no such dtype), shared-memory parameters and Triton's classification extension.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

__all__ = [
    "BINARY_CONTENT_TYPE",
    "DATATYPES",
    "HEADER_LENGTH_HEADER",
    "JSON_CONTENT_TYPE",
    "InferInput",
    "InferRequest",
    "RequestedOutput",
    "TensorSpec",
    "V2CodecError",
    "datatype_of",
    "decode_infer_request",
    "encode_infer_response",
    "error_body",
    "match_inputs",
    "model_metadata",
    "parse_header_length",
    "server_metadata",
    "triton_model_config",
]

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
# Triton answers a response with a binary section as octet-stream (extension_binary_data.md).
BINARY_CONTENT_TYPE = "application/octet-stream"

# V2 datatype -> little-endian numpy dtype of its wire form (None: BYTES, variable size).
_WIRE_DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": None,
}
DATATYPES: tuple[str, ...] = tuple(_WIRE_DTYPES)
_SUPPORTED = ", ".join(DATATYPES)

# Triton's ModelConfig enum names (model_config.proto DataType); BYTES is TYPE_STRING there.
_TRITON_TYPES = {dt: ("TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}") for dt in DATATYPES}

# numpy dtype kind -> V2 datatype for the variable-size kinds (object, bytes, str all travel as BYTES).
_BYTES_KINDS = frozenset("OSU")

# Numpy allows at most 64 dimensions; real tensors have few. A hard cap keeps shape checks O(1).
_MAX_RANK = 32
_LEN = struct.Struct("<I")
# JSON values allowed in a request beyond its tensor elements: names, shapes, parameters, outputs.
_STRUCTURAL_VALUES = 65_536


class V2CodecError(ValueError):
    """A request the protocol (or this server's limits) refuses; the routes answer 400 {"error": msg}."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ----------------------------------------------------------------------------------------------------
# Typed views of a decoded request
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferInput:
    """One decoded input tensor.

    `array` has the declared shape and the datatype's native numpy dtype (BYTES: an object array of
    `bytes`). It is always a fresh, aligned, writable C-contiguous array, never a view of the body.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One entry of the request's `outputs`: a name and `parameters.binary_data` (None: not given)."""

    name: str
    binary_data: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded V2 inference request.

    `outputs` is None when the request names no outputs (the protocol then means "all outputs").
    `parameters` is the request-level parameters object as sent (e.g. binary_data_output, or
    server-specific keys the routes may read).
    """

    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...] | None
    parameters: dict[str, Any]

    @property
    def binary_data_output(self) -> bool:
        """The request-level default for output encoding (`parameters.binary_data_output`)."""
        return bool(self.parameters.get("binary_data_output", False))

    def input(self, name: str) -> InferInput | None:
        """The input called `name`, or None."""
        for item in self.inputs:
            if item.name == name:
                return item
        return None

    def output_names(self, available: Sequence[str]) -> list[str]:
        """Names of the outputs to return: the requested ones in request order, else all `available`.

        Raises V2CodecError naming the unknown output when the request asks for one the model lacks.
        """
        if self.outputs is None:
            return list(available)
        known = set(available)
        for out in self.outputs:
            if out.name not in known:
                raise V2CodecError(
                    f"unknown output '{out.name}'; this model has: {', '.join(available) or 'none'}"
                )
        return [out.name for out in self.outputs]

    def binary_outputs(self, names: Iterable[str]) -> set[str]:
        """Which of `names` go in the binary section: per-output binary_data, else binary_data_output."""
        per_output = {o.name: o.binary_data for o in self.outputs or () if o.binary_data is not None}
        default = self.binary_data_output
        return {n for n in names if per_output.get(n, default)}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model tensor as the V2 metadata describes it; -1 marks a dynamic dimension (e.g. batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in _WIRE_DTYPES:
            raise ValueError(f"TensorSpec {self.name!r}: unknown datatype {self.datatype!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < -1 for d in self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: dims must be >= -1, got {list(self.shape)}")

    def to_dict(self) -> dict[str, Any]:
        """The V2 `$metadata_tensor` object."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts(self, shape: Sequence[int]) -> bool:
        """True when a concrete `shape` fits this spec (same rank, equal dims except -1)."""
        return len(shape) == len(self.shape) and all(
            s in (-1, d) for s, d in zip(self.shape, shape, strict=True)
        )


# ----------------------------------------------------------------------------------------------------
# Request decoding
# ----------------------------------------------------------------------------------------------------


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int (None when absent), or V2CodecError."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise V2CodecError(f"{HEADER_LENGTH_HEADER} must be a non-negative integer, got {value!r}")
    return int(text)


@dataclass(slots=True)
class _Plan:
    """What pass 1 learned about one input from the header alone (nothing materialised yet)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    parameters: dict[str, Any]
    data: Any = None  # the JSON `data` value, when the input is sent as JSON
    offset: int = -1  # start in the binary section, when the input is sent as binary
    size: int = 0  # binary_data_size


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    *,
    max_elements: int,
    allow_non_finite: bool = False,
) -> InferRequest:
    """Decode a V2 REST inference request body into numpy arrays, refusing anything malformed.

    Args:
        body: the whole HTTP body.
        header_length: the `Inference-Header-Content-Length` value (see `parse_header_length`), or None
            when the body is all JSON.
        max_elements: the most tensor elements accepted, summed over all inputs. A JSON header with
            many more values is refused before parsing; declared shapes are checked before any tensor
            is built, so an oversized or mis-shaped request costs about one pass over its bytes.
        allow_non_finite: accept NaN/Inf in FP16/FP32/FP64 inputs (they can only arrive in the binary
            section or by overflowing the datatype; default: refused).

    Returns:
        InferRequest with one InferInput per input, in request order.

    Raises:
        V2CodecError: with a message naming the input and what is wrong with it.
    """
    view = memoryview(body)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    total = len(view)
    has_header = header_length is not None
    if header_length is None:
        header_length = total
    else:
        if isinstance(header_length, bool) or not isinstance(header_length, int):
            raise V2CodecError(f"{HEADER_LENGTH_HEADER} must be an integer, got {header_length!r}")
        if header_length == 0:
            raise V2CodecError(
                f"raw binary requests ({HEADER_LENGTH_HEADER}: 0) are not supported; "
                "send a JSON inference header before the binary data"
            )
        if header_length < 0 or header_length > total:
            raise V2CodecError(f"{HEADER_LENGTH_HEADER} is {header_length} but the body has {total} bytes")
    binary = view[header_length:]  # shape: (total - header_length,) bytes, zero-copy
    head = body if isinstance(body, bytes) and header_length == total else bytes(view[:header_length])
    _check_json_values(head, max_elements)

    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise V2CodecError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise V2CodecError("the inference request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2CodecError("'id' must be a string")
    parameters = _parameters(doc.get("parameters"), "the request")
    if "binary_data_output" in parameters and not isinstance(parameters["binary_data_output"], bool):
        raise V2CodecError("parameters.binary_data_output must be true or false")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise V2CodecError("'inputs' must be a non-empty array of input tensors")
    outputs = _requested_outputs(doc.get("outputs"))

    # Pass 1: everything checkable from the header, cheapest first, so nothing large is built for a
    # request that will be refused.
    plans: list[_Plan] = []
    seen: set[str] = set()
    budget = max_elements
    binary_used = 0
    for index, raw in enumerate(raw_inputs):
        plan = _plan_input(raw, index, budget)
        if plan.name in seen:
            raise V2CodecError(f"input '{plan.name}' appears more than once")
        seen.add(plan.name)
        budget -= plan.count
        has_data = "data" in raw
        size = plan.parameters.get("binary_data_size")
        if has_data and size is not None:
            raise V2CodecError(f"input '{plan.name}' has both 'data' and parameters.binary_data_size")
        if size is not None:
            if not has_header:
                raise V2CodecError(
                    f"input '{plan.name}' declares parameters.binary_data_size but the request has no "
                    f"binary section (send the {HEADER_LENGTH_HEADER} header)"
                )
            plan.size = _binary_size(plan, size)
            plan.offset = binary_used
            binary_used += plan.size
        elif has_data:
            plan.data = raw["data"]
        else:
            raise V2CodecError(f"input '{plan.name}' has no 'data' and no parameters.binary_data_size")
        plans.append(plan)
    if binary_used != len(binary):
        raise V2CodecError(
            f"the binary section has {len(binary)} bytes but the inputs' binary_data_size add up to "
            f"{binary_used}"
        )

    # Pass 2: materialise, each input bounded by its (already accepted) element count.
    inputs = []
    for plan in plans:
        if plan.offset >= 0:
            array = _from_binary(plan, binary[plan.offset : plan.offset + plan.size])
        else:
            array = _from_json(plan)
        if not allow_non_finite and array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
            raise V2CodecError(f"input '{plan.name}' contains NaN or infinite values")
        inputs.append(InferInput(plan.name, plan.datatype, plan.shape, array, plan.parameters))
    return InferRequest(request_id, tuple(inputs), outputs, parameters)


def _check_json_values(head: bytes, max_elements: int) -> None:
    """Refuse a JSON header with far more values than `max_elements` before parsing it.

    Parsing costs about one Python object per JSON value (a 10 MB array of small numbers takes hundreds
    of milliseconds and hundreds of MB; as one-element rows, seconds), so values are counted first
    with C-speed bytes operations. A well-formed request has at most one comma outside strings per
    tensor element plus a few per input, output and parameter (`_STRUCTURAL_VALUES`), and every string
    is one value. Commas inside strings (BYTES data) are not counted, so text with commas passes.
    """
    limit = max_elements + _STRUCTURAL_VALUES
    if head.count(b",") <= limit:  # the common case: one pass, nothing copied
        return
    text = head
    if b"\\" in text:
        # Drop escape pairs (\\ first, then \") so that every remaining quote opens or closes a string.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    too_many = (
        text.count(b'"') // 2 > limit or sum(part.count(b",") for part in text.split(b'"')[::2]) > limit
    )
    if too_many:
        raise V2CodecError(
            f"the request holds more JSON values than the {max_elements} tensor elements it may carry"
        )


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    """A `$parameters` object (absent: empty); values must be strings, numbers or booleans."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise V2CodecError(f"'parameters' of {where} must be a JSON object")
    for key, value in raw.items():
        if not isinstance(value, str | int | float | bool):
            raise V2CodecError(f"parameter '{key}' of {where} must be a string, number or boolean")
    return raw


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    """The request's `outputs` array; None when absent (meaning: all outputs)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise V2CodecError("'outputs' must be an array")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise V2CodecError(f"outputs[{index}] must be an object with a non-empty 'name'")
        name = item["name"]
        if name in seen:
            raise V2CodecError(f"output '{name}' is requested more than once")
        seen.add(name)
        params = _parameters(item.get("parameters"), f"output '{name}'")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise V2CodecError(f"parameters.binary_data of output '{name}' must be true or false")
        if "classification" in params:
            raise V2CodecError("the classification extension is not supported")
        if any(key.startswith("shared_memory") for key in params):
            raise V2CodecError("the shared-memory extension is not supported")
        result.append(RequestedOutput(name, binary, params))
    return tuple(result)


def _plan_input(raw: Any, index: int, budget: int) -> _Plan:
    """Check one input's header fields; the element count must fit what is left of the budget."""
    if not isinstance(raw, dict):
        raise V2CodecError(f"inputs[{index}] must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise V2CodecError(f"inputs[{index}] needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in _WIRE_DTYPES:
        hint = " (BF16 has no numpy dtype; send FP32)" if datatype == "BF16" else ""
        raise V2CodecError(
            f"input '{name}': unsupported datatype {datatype!r}{hint}; supported: {_SUPPORTED}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list):
        raise V2CodecError(f"input '{name}': 'shape' must be an array of non-negative integers")
    if len(shape) > _MAX_RANK:
        raise V2CodecError(f"input '{name}': shape has {len(shape)} dimensions, at most {_MAX_RANK}")
    count = 1
    too_large = False
    for dim in shape:
        # bool is an int in Python but not a dimension; -1 is metadata-only, never in a request.
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise V2CodecError(f"input '{name}': shape {shape} must contain only non-negative integers")
        # One dimension beyond the budget is refused even when another is 0: no real tensor needs it,
        # and it keeps every dimension small enough for numpy.
        too_large = too_large or dim > budget
        count *= dim
    if too_large or count > budget:
        raise V2CodecError(
            f"input '{name}': shape {shape} is too large; this request may hold at most "
            f"{max(budget, 0)} more elements"
        )
    parameters = _parameters(raw.get("parameters"), f"input '{name}'")
    if any(key.startswith("shared_memory") for key in parameters):
        raise V2CodecError(f"input '{name}': the shared-memory extension is not supported")
    return _Plan(name, datatype, tuple(shape), count, parameters)


def _binary_size(plan: _Plan, size: Any) -> int:
    """Check `binary_data_size` against what the shape and datatype need (exact for fixed-size types)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise V2CodecError(f"input '{plan.name}': binary_data_size must be a non-negative integer")
    wire = _WIRE_DTYPES[plan.datatype]
    if wire is not None:
        need = plan.count * wire.itemsize
        if size != need:
            raise V2CodecError(
                f"input '{plan.name}': shape {list(plan.shape)} of {plan.datatype} needs {need} bytes "
                f"but binary_data_size is {size}"
            )
    elif size < 4 * plan.count:
        # Every BYTES element carries a 4-byte length, so this is refused before parsing anything.
        raise V2CodecError(
            f"input '{plan.name}': {plan.count} BYTES elements need at least {4 * plan.count} bytes "
            f"but binary_data_size is {size}"
        )
    return size


def _from_binary(plan: _Plan, chunk: memoryview) -> np.ndarray:
    """Build the input array from its slice of the binary section (length already checked)."""
    wire = _WIRE_DTYPES[plan.datatype]
    if wire is None:
        return _bytes_elements(plan, chunk).reshape(plan.shape)
    if plan.datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise V2CodecError(f"input '{plan.name}': BOOL bytes must be 0 or 1")
        return raw.astype(np.bool_).reshape(plan.shape)
    # astype copies: the result is aligned (the section may start at any offset), native-endian and
    # writable, and does not pin the request body in memory.
    return np.frombuffer(chunk, dtype=wire).astype(wire.newbyteorder("=")).reshape(plan.shape)


def _bytes_elements(plan: _Plan, chunk: memoryview) -> np.ndarray:
    """Parse `count` length-prefixed BYTES elements that must fill `chunk` exactly; shape (count,)."""
    out = np.empty(plan.count, dtype=object)
    offset, end = 0, len(chunk)
    for i in range(plan.count):
        if offset + 4 > end:
            raise V2CodecError(f"input '{plan.name}': BYTES data ends inside the length of element {i}")
        (length,) = _LEN.unpack_from(chunk, offset)
        offset += 4
        if offset + length > end:
            raise V2CodecError(
                f"input '{plan.name}': BYTES element {i} declares {length} bytes past the end of its data"
            )
        out[i] = bytes(chunk[offset : offset + length])
        offset += length
    if offset != end:
        raise V2CodecError(
            f"input '{plan.name}': {end - offset} bytes left over after {plan.count} BYTES elements"
        )
    return out


def _check_json_count(plan: _Plan) -> None:
    """Count the elements of a (nested) JSON `data` array without building anything.

    Only the arrays are visited, and at most as many as a correctly nested `data` has, so a body much
    larger than its declared shape is refused after a number of steps bounded by the shape, not the body.
    """
    shape, name = plan.shape, plan.name
    # Arrays in `data` nested exactly as the shape: 1 + s0 + s0*s1 + ... (flat data is 1 array).
    max_arrays, prefix = 1, 1
    for dim in shape[:-1]:
        prefix *= dim
        max_arrays += prefix
    count, arrays = 0, 1
    stack: list[Any] = [plan.data]
    while stack:
        node = stack.pop()
        if not isinstance(node, list):
            raise V2CodecError(f"input '{name}': 'data' mixes arrays and values")
        if node and isinstance(node[0], list):
            arrays += len(node)
            if arrays > max_arrays:
                raise V2CodecError(
                    f"input '{name}': 'data' is nested deeper or wider than the shape {list(shape)}"
                )
            stack.extend(node)
        else:
            count += len(node)
            if count > plan.count:
                raise V2CodecError(
                    f"input '{name}': shape {list(shape)} has {plan.count} elements but 'data' has more"
                )
    if count != plan.count:
        raise V2CodecError(
            f"input '{name}': shape {list(shape)} has {plan.count} elements but 'data' has {count}"
        )


def _from_json(plan: _Plan) -> np.ndarray:
    """Build the input array from its JSON `data` (flat, or nested exactly as the shape)."""
    data, name = plan.data, plan.name
    if not isinstance(data, list):
        raise V2CodecError(f"input '{name}': 'data' must be a JSON array")
    _check_json_count(plan)
    if plan.datatype == "BYTES":
        return _json_bytes(plan)
    target = _WIRE_DTYPES[plan.datatype].newbyteorder("=")
    if plan.count == 0:
        return np.empty(plan.shape, dtype=target)
    try:
        values = np.array(data)  # numpy infers the kind; the count is already bounded
    except (ValueError, TypeError):
        raise V2CodecError(f"input '{name}': 'data' is ragged or mixes arrays and values") from None
    if values.ndim != 1 and values.shape != plan.shape:
        raise V2CodecError(
            f"input '{name}': 'data' is nested as {list(values.shape)}; send it flat or nested as the "
            f"shape {list(plan.shape)}"
        )
    kind = values.dtype.kind
    if plan.datatype == "BOOL":
        if kind != "b":
            raise V2CodecError(f"input '{name}': BOOL data must be true or false")
    elif target.kind in "iu":
        if kind not in "iu":
            # numpy infers float64 (or object) when ints straddle int64 and uint64, e.g. [0, 2**64 - 1]
            # for UINT64; only all-integer data may take the exact path, floats and strings are refused.
            return _json_exact_integers(plan, target)
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise V2CodecError(f"input '{name}': {plan.datatype} data must lie in [{info.min}, {info.max}]")
    elif kind not in "iuf":  # floats accept JSON integers too, but not strings, booleans or null
        raise V2CodecError(f"input '{name}': {plan.datatype} data must be numbers")
    with np.errstate(over="ignore"):  # overflow to inf is reported by the finiteness check
        return values.astype(target).reshape(plan.shape)


def _json_exact_integers(plan: _Plan, target: np.dtype) -> np.ndarray:
    """Integer data that numpy could not infer as int64/uint64: convert exactly, or refuse."""
    stack: list[Any] = [plan.data]
    while stack:  # the count is bounded already; bool is an int subclass but not an integer here
        for item in stack.pop():
            if isinstance(item, list):
                stack.append(item)
            elif type(item) is not int:
                raise V2CodecError(f"input '{plan.name}': {plan.datatype} data must be integers")
    try:
        values = np.array(plan.data, dtype=target)
    except OverflowError:
        info = np.iinfo(target)
        raise V2CodecError(
            f"input '{plan.name}': {plan.datatype} data must lie in [{info.min}, {info.max}]"
        ) from None
    if values.ndim != 1 and values.shape != plan.shape:  # already checked by the caller's inference
        raise V2CodecError(f"input '{plan.name}': 'data' must be flat or nested as the shape")
    return values.reshape(plan.shape)


def _json_bytes(plan: _Plan) -> np.ndarray:
    """BYTES from JSON strings (stored UTF-8 encoded), flat or nested exactly as the shape."""
    shape, flat = plan.shape, []
    bad = V2CodecError(
        f"input '{plan.name}': BYTES data must be strings, flat or nested as the shape {list(shape)}"
    )

    def walk(node: list, depth: int) -> None:
        # `node` is an array at nesting `depth`; its items are strings at the last dimension.
        if depth == len(shape) - 1:
            for item in node:
                if not isinstance(item, str):
                    raise bad
                flat.append(item.encode("utf-8"))
            return
        for item in node:
            if not isinstance(item, list) or len(item) != shape[depth + 1]:
                raise bad
            walk(item, depth + 1)

    data = plan.data
    if data and isinstance(data[0], list):
        if not shape or len(data) != shape[0]:
            raise bad
        walk(data, 0)
    else:
        walk(data, len(shape) - 1)  # flat: every item is a string
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


def match_inputs(request: InferRequest, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Check a decoded request against the model's input specs; returns {name: array}.

    Every spec'd input must be present with its datatype and a shape the spec accepts; inputs the
    model does not have are refused. Value-level checks (ranges, pixel values) stay with the caller.
    """
    by_name = {spec.name: spec for spec in specs}
    for item in request.inputs:
        spec = by_name.get(item.name)
        if spec is None:
            raise V2CodecError(
                f"unknown input '{item.name}'; this model takes: {', '.join(by_name) or 'none'}"
            )
        if item.datatype != spec.datatype:
            raise V2CodecError(f"input '{item.name}' must be {spec.datatype}, got {item.datatype}")
        if not spec.accepts(item.shape):
            raise V2CodecError(
                f"input '{item.name}' has shape {list(item.shape)}; this model expects {list(spec.shape)} "
                "(-1: any size)"
            )
    missing = [name for name in by_name if request.input(name) is None]
    if missing:
        raise V2CodecError(f"missing input(s): {', '.join(missing)}")
    return {item.name: item.array for item in request.inputs}


# ----------------------------------------------------------------------------------------------------
# Response encoding
# ----------------------------------------------------------------------------------------------------


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array (bool -> BOOL, float32 -> FP32, object/bytes/str -> BYTES ...)."""
    dtype = array.dtype
    if dtype.kind in _BYTES_KINDS:
        return "BYTES"
    for name, wire in _WIRE_DTYPES.items():
        if wire is not None and dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return name
    raise ValueError(f"no V2 datatype for numpy dtype {dtype}")


def _bytes_items(array: np.ndarray, name: str) -> list[bytes]:
    """Elements of a BYTES output as bytes, row-major (str is UTF-8 encoded)."""
    items = []
    for value in array.reshape(-1).tolist():  # reshape(-1) walks in C order even for views
        if isinstance(value, bytes):
            items.append(value)
        elif isinstance(value, str):
            items.append(value.encode("utf-8"))
        else:
            raise ValueError(f"output '{name}': BYTES elements must be bytes or str, got {type(value)}")
    return items


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray]],
    *,
    binary: bool | Collection[str] = False,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a V2 inference response.

    Args:
        model_name, model_version: echoed in the response (model_version None: omitted).
        request_id: the request's `id` (None: omitted, as the protocol allows).
        outputs: (name, array) in the order to send; BYTES arrays hold bytes or str.
        binary: True (all outputs), False (none), or the names going in the binary section
            (typically `request.binary_outputs(names)`).
        parameters: response-level `parameters`, if any.

    Returns:
        (body, header_length): header_length is the JSON header's size for the
        `Inference-Header-Content-Length` header when a binary section follows, else None.

    Raises:
        ValueError: the server handed in something unencodable (unknown binary name, duplicate name,
        unsupported dtype, non-UTF-8 BYTES bound for JSON). That is a server bug, not a 400.

    JSON numbers cannot hold NaN or infinities; orjson writes them as null, which clients read back as
    NaN. Ask for binary outputs when non-finite values must round-trip exactly.
    """
    names = [name for name, _ in outputs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate output names in {names}")
    if binary is True:
        in_binary = set(names)
    elif binary is False:
        in_binary = set()
    else:
        in_binary = set(binary)
        unknown = in_binary - set(names)
        if unknown:
            raise ValueError(f"binary outputs {sorted(unknown)} are not among the outputs {names}")

    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs:
        array = np.asarray(array)
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        wire = _WIRE_DTYPES[datatype]
        if name in in_binary:
            if wire is None:
                items = _bytes_items(array, name)
                chunk = b"".join(part for item in items for part in (_LEN.pack(len(item)), item))
            else:
                # Little-endian, C order, as the extension requires, whatever the array's layout.
                chunk = np.ascontiguousarray(array, dtype=wire).tobytes(order="C")
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        elif wire is None:
            try:
                entry["data"] = [item.decode("utf-8") for item in _bytes_items(array, name)]
            except UnicodeDecodeError:
                raise ValueError(
                    f"output '{name}' holds non-UTF-8 bytes, which JSON cannot carry; send it binary"
                ) from None
        else:
            # orjson serialises native-endian C-contiguous arrays directly; flat, row-major data.
            entry["data"] = np.ascontiguousarray(array, dtype=wire.newbyteorder("=")).reshape(-1)
        entries.append(entry)

    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = str(model_version)
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def error_body(message: str) -> bytes:
    """The V2 error object `{"error": message}` as bytes."""
    return orjson.dumps({"error": message})


# ----------------------------------------------------------------------------------------------------
# Metadata documents
# ----------------------------------------------------------------------------------------------------


def server_metadata(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The `GET /v2` server metadata response (e.g. extensions ["binary_tensor_data", ...])."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> dict[str, Any]:
    """The `GET /v2/models/{name}` model metadata response; shapes include the batch dim (-1)."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
    }


_BATCHING_KEYS = frozenset(
    {
        "preferred_batch_size",
        "max_queue_delay_microseconds",
        "preserve_ordering",
        "priority_levels",
        "default_priority_level",
        "default_queue_policy",
        "priority_queue_policy",
    }
)
_QUEUE_POLICY_KEYS = frozenset(
    {"timeout_action", "default_timeout_microseconds", "allow_timeout_override", "max_queue_size"}
)


def _config_tensor(spec: TensorSpec, batched: bool, is_input: bool) -> dict[str, Any]:
    """One ModelInput / ModelOutput in Triton's JSON form; dims drop the batch dim when batched."""
    dims = list(spec.shape)
    if batched:
        if not dims or dims[0] != -1:
            raise ValueError(
                f"tensor {spec.name!r}: with max_batch_size > 0 the first dim must be the batch dim -1, "
                f"got {dims}"
            )
        dims = dims[1:]
    entry: dict[str, Any] = {"name": spec.name, "data_type": _TRITON_TYPES[spec.datatype]}
    if is_input:
        entry["format"] = "FORMAT_NONE"
    if dims:
        entry["dims"] = dims
    else:
        # Triton needs at least one dim: a per-item scalar is dims [1] reshaped to [] (its own convention).
        entry["dims"] = [1]
        entry["reshape"] = {"shape": []}
    entry["is_shape_tensor"] = False
    if is_input:
        entry["allow_ragged_batch"] = False
        entry["optional"] = False
    else:
        entry["label_filename"] = ""
    return entry


def triton_model_config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    dynamic_batching: Mapping[str, Any] | None,
    *,
    platform: str = "onnxruntime_onnx",
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """Triton's ModelConfig in its JSON form, as `GET /v2/models/{name}/config` returns it.

    `inputs`/`outputs` are the metadata specs (with the -1 batch dim when max_batch_size > 0; the
    config's dims leave it out, as Triton's do). `dynamic_batching` uses Triton's field names
    (max_queue_delay_microseconds, preferred_batch_size, default_queue_policy{max_queue_size,
    default_timeout_microseconds, timeout_action, allow_timeout_override}, ...); None omits the
    section. Integers are plain JSON numbers, as Triton writes them. Unknown keys raise ValueError.
    """
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    batched = max_batch_size > 0
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "backend": backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": int(max_batch_size),
        "input": [_config_tensor(spec, batched, True) for spec in inputs],
        "output": [_config_tensor(spec, batched, False) for spec in outputs],
    }
    if dynamic_batching is not None:
        unknown = set(dynamic_batching) - _BATCHING_KEYS
        if unknown:
            raise ValueError(f"unknown dynamic_batching fields {sorted(unknown)}")
        batching: dict[str, Any] = {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": 0,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "priority_queue_policy": {},
        }
        batching.update(dynamic_batching)
        policy = batching.get("default_queue_policy")
        if policy is not None:
            unknown = set(policy) - _QUEUE_POLICY_KEYS
            if unknown:
                raise ValueError(f"unknown default_queue_policy fields {sorted(unknown)}")
            batching["default_queue_policy"] = {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 0,
                "allow_timeout_override": False,
                "max_queue_size": 0,
                **policy,
            }
        batching["preferred_batch_size"] = [int(b) for b in batching["preferred_batch_size"]]
        config["dynamic_batching"] = batching
    return config
