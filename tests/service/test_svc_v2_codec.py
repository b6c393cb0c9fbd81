"""The V2 (Open Inference Protocol) REST codec against the real client libraries.

Requests are built by tritonclient.http and kserve exactly as they would send them and decoded by
`service.api.v2_codec`; responses are encoded by the codec and parsed by the clients' own response
readers. Triton's ModelConfig JSON is checked against its protobuf schema, loaded by file path because
importing the `tritonclient.grpc` package beside kserve registers the `inference.*` protos twice.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient
import tritonclient.http as th
from kserve.protocol.infer_type import InferInput as KInferInput
from kserve.protocol.infer_type import InferRequest as KInferRequest
from kserve.protocol.infer_type import InferResponse as KInferResponse
from kserve.protocol.infer_type import RequestedOutput as KRequestedOutput

from service.api import v2_codec
from service.api.v2_codec import (
    TensorSpec,
    V2CodecError,
    decode_infer_request,
    encode_infer_response,
    error_body,
    match_inputs,
    model_metadata,
    parse_header_length,
    server_metadata,
    triton_model_config,
)

MAX = 100_000

# One sample array per datatype: shapes of rank 0..3, edge values of each range.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([[0, 65535]], dtype=np.uint16),
    "UINT32": np.array([1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 0, 127], dtype=np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    "INT32": np.arange(-6, 6, dtype=np.int32).reshape(2, 3, 2),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([0.5, -1.25, 65504.0], dtype=np.float16),
    "FP32": np.random.default_rng(0).standard_normal((2, 1, 3, 4)).astype(np.float32),
    "FP64": np.array([[np.pi, -1e-300, 1e300]]),
    "BYTES": np.array([[b"zero", b""], [b"caf\xc3\xa9", b'x,y"z']], dtype=object),
}
BINARY_ONLY_BYTES = np.array([b"\xff\x00\x01", b"ok"], dtype=object)  # not UTF-8: JSON cannot carry it


def triton_body(
    arrays: dict[str, np.ndarray], binary: bool | dict[str, bool], **kwargs: Any
) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient.http would POST it."""
    inputs = []
    for name, array in arrays.items():
        item = th.InferInput(name, list(array.shape), th.np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=binary if isinstance(binary, bool) else binary[name])
        inputs.append(item)
    return th.InferenceServerClient.generate_request_body(inputs, **kwargs)


def kserve_body(arrays: dict[str, np.ndarray], binary: bool, **kwargs: Any) -> tuple[bytes, int | None]:
    """A request body as kserve's REST client sends it (`InferRequest.to_rest`, JSON via orjson)."""
    inputs = []
    for name, array in arrays.items():
        item = KInferInput(name, list(array.shape), th.np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    rest, json_length = KInferRequest(model_name="m", infer_inputs=inputs, **kwargs).to_rest()
    if json_length is None:
        return orjson.dumps(rest), None
    return rest, json_length


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, shape and dtype (BYTES: object arrays of equal elements)."""
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


def header(doc: dict[str, Any], binary: bytes = b"") -> tuple[bytes, int | None]:
    """A hand-made body: JSON header plus optional binary section."""
    head = orjson.dumps(doc)
    return (head + binary, len(head)) if binary else (head, None)


def one_input(**fields: Any) -> dict[str, Any]:
    """A request with one input; fields override name/datatype/shape/data defaults."""
    item = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    item.update(fields)
    return {"inputs": [item]}


def refuse(body: bytes, header_length: int | None = None, match: str = "", **kwargs: Any) -> str:
    """Decode must fail with V2CodecError whose message matches `match`; returns the message."""
    kwargs.setdefault("max_elements", MAX)
    with pytest.raises(V2CodecError, match=match) as info:
        decode_infer_request(body, header_length, **kwargs)
    return info.value.message


# ----------------------------------------------------------------------------------------------------
# Requests from tritonclient.http
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_triton_request_each_datatype(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    body, header_length = triton_body({"t": array}, binary)
    assert (header_length is not None) == binary
    request = decode_infer_request(body, header_length, max_elements=MAX)
    (item,) = request.inputs
    assert (item.name, item.datatype, item.shape) == ("t", datatype, array.shape)
    assert_same(item.array, array)
    assert item.array.flags.c_contiguous and item.array.flags.writeable and item.array.flags.aligned


def test_triton_request_mixed_inputs_outputs_and_parameters() -> None:
    arrays = {
        "images": SAMPLES["FP32"],
        "labels": SAMPLES["INT64"],
        "mask": SAMPLES["BOOL"],
        "blob": BINARY_ONLY_BYTES,
        "text": SAMPLES["BYTES"],
    }
    binary = {"images": True, "labels": False, "mask": True, "blob": True, "text": False}
    outputs = [
        th.InferRequestedOutput("mean", binary_data=True),
        th.InferRequestedOutput("var", binary_data=False),
    ]
    body, header_length = triton_body(
        arrays, binary, outputs=outputs, request_id="req-7", parameters={"seed": 11, "k": 64}
    )
    request = decode_infer_request(body, header_length, max_elements=MAX)
    assert request.id == "req-7"
    assert [i.name for i in request.inputs] == list(arrays)
    for name, array in arrays.items():
        assert_same(request.input(name).array, array)
    assert request.parameters == {"seed": 11, "k": 64}
    assert [(o.name, o.binary_data) for o in request.outputs] == [("mean", True), ("var", False)]
    assert request.output_names(["mean", "var", "logvar"]) == ["mean", "var"]
    assert request.binary_outputs(["mean", "var"]) == {"mean"}


def test_triton_request_without_outputs_asks_all_binary() -> None:
    body, header_length = triton_body({"t": SAMPLES["FP32"]}, False)
    request = decode_infer_request(body, header_length, max_elements=MAX)
    # tritonclient sets binary_data_output when it names no outputs: all outputs, all binary.
    assert request.outputs is None and request.binary_data_output
    assert request.output_names(["a", "b"]) == ["a", "b"]
    assert request.binary_outputs(["a", "b"]) == {"a", "b"}


def test_per_output_binary_data_overrides_request_default() -> None:
    doc = one_input()
    doc["parameters"] = {"binary_data_output": True}
    doc["outputs"] = [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}]
    request = decode_infer_request(*header(doc), max_elements=MAX)
    assert request.binary_outputs(["a", "b"]) == {"b"}
    with pytest.raises(V2CodecError, match="unknown output 'b'"):
        request.output_names(["a"])


def test_empty_tensor_round_trips() -> None:
    array = np.zeros((0, 4), dtype=np.float32)
    for binary in (True, False):
        request = decode_infer_request(*triton_body({"t": array}, binary), max_elements=MAX)
        assert_same(request.inputs[0].array, array)


def test_nested_json_data_is_accepted_in_the_natural_shape() -> None:
    request = decode_infer_request(
        *header(one_input(datatype="INT32", shape=[2, 2], data=[[1, 2], [3, 4]])), max_elements=MAX
    )
    assert_same(request.inputs[0].array, np.array([[1, 2], [3, 4]], dtype=np.int32))
    request = decode_infer_request(
        *header(one_input(datatype="BYTES", shape=[2, 1], data=[["a"], ["b"]])), max_elements=MAX
    )
    assert request.inputs[0].array.tolist() == [[b"a"], [b"b"]]


# ----------------------------------------------------------------------------------------------------
# Requests from kserve
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64", "BOOL", "BYTES", "UINT8", "INT32"])
def test_kserve_request(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    outputs = [KRequestedOutput("mean", parameters={"binary_data": True})]
    body, header_length = kserve_body(
        {"t": array},
        binary,
        request_id="k1",
        parameters={"binary_data_output": False},
        request_outputs=outputs,
    )
    request = decode_infer_request(body, header_length, max_elements=MAX)
    assert request.id == "k1"
    assert_same(request.inputs[0].array, array)
    assert request.outputs[0].binary_data is True and request.binary_data_output is False


# ----------------------------------------------------------------------------------------------------
# Responses parsed by tritonclient.http and kserve
# ----------------------------------------------------------------------------------------------------


def response_outputs() -> list[tuple[str, np.ndarray]]:
    """Outputs of every datatype, plus layouts the encoder must normalise."""
    outputs = [(dt.lower(), array) for dt, array in SAMPLES.items()]
    outputs.append(("transposed", np.arange(12, dtype=np.float32).reshape(3, 4).T))  # F-ordered view
    outputs.append(("big_endian", np.array([1.5, -2.0, 3.25], dtype=">f8")))
    outputs.append(("scalar", np.array(7, dtype=np.int64)))
    outputs.append(("empty", np.zeros((0, 4), dtype=np.float32)))
    return outputs


@pytest.mark.parametrize("mode", ["all-json", "all-binary", "mixed"])
def test_triton_parses_response(mode: str) -> None:
    outputs = response_outputs()
    names = [name for name, _ in outputs]
    binary = {"all-json": False, "all-binary": True, "mixed": set(names[::2])}[mode]
    body, header_length = encode_infer_response("vae", "3", "r-1", outputs, binary=binary)
    assert (header_length is None) == (mode == "all-json")
    result = th.InferenceServerClient.parse_response_body(body, header_length=header_length)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("vae", "3", "r-1")
    for name, array in outputs:
        got = result.as_numpy(name)
        want = np.asarray(array)
        if want.dtype == object:  # tritonclient returns JSON BYTES as str, binary BYTES as bytes
            in_json = "data" in result.get_output(name)
            want = np.array([b.decode() for b in want.ravel()] if in_json else want.ravel().tolist(), object)
            want = want.reshape(array.shape)
        assert_same(got, want.astype(want.dtype.newbyteorder("=")))


def test_triton_parses_binary_only_bytes_and_refuses_json() -> None:
    body, header_length = encode_infer_response("vae", None, None, [("b", BINARY_ONLY_BYTES)], binary=True)
    result = th.InferenceServerClient.parse_response_body(body, header_length=header_length)
    assert_same(result.as_numpy("b"), BINARY_ONLY_BYTES)
    assert "model_version" not in result.get_response() and "id" not in result.get_response()
    with pytest.raises(ValueError, match="non-UTF-8"):
        encode_infer_response("vae", None, None, [("b", BINARY_ONLY_BYTES)])


@pytest.mark.parametrize("mode", ["all-json", "all-binary", "mixed"])
def test_kserve_parses_response(mode: str) -> None:
    outputs = [(dt.lower(), SAMPLES[dt]) for dt in ("FP32", "FP64", "INT64", "BOOL", "BYTES", "UINT8")]
    names = [name for name, _ in outputs]
    binary = {"all-json": False, "all-binary": True, "mixed": {"fp32", "bool", "bytes"}}[mode]
    body, header_length = encode_infer_response("vae", "1", "k-2", outputs, binary=binary)
    parsed = KInferResponse.from_bytes(body, header_length if header_length is not None else len(body))
    assert (parsed.model_name, parsed.id) == ("vae", "k-2")
    assert [o.name for o in parsed.outputs] == names
    for name, array in outputs:
        got = parsed.get_output_by_name(name).as_numpy()
        if array.dtype == object:  # kserve hands BYTES back as str in both encodings
            array = np.array([b.decode() for b in array.ravel()], dtype=object).reshape(array.shape)
        assert_same(got, array)
    if header_length is None:  # an all-JSON body is also a plain REST dict for kserve
        rest = KInferResponse.from_rest(orjson.loads(body))
        assert_same(rest.get_output_by_name("int64").as_numpy(), SAMPLES["INT64"])


def test_response_parameters_and_encoder_misuse() -> None:
    body, _ = encode_infer_response("m", "1", "i", [("a", SAMPLES["FP32"])], parameters={"seed": 3})
    assert orjson.loads(body)["parameters"] == {"seed": 3}
    with pytest.raises(ValueError, match="not among the outputs"):
        encode_infer_response("m", "1", "i", [("a", SAMPLES["FP32"])], binary={"b"})
    with pytest.raises(ValueError, match="duplicate"):
        encode_infer_response("m", "1", "i", [("a", SAMPLES["FP32"]), ("a", SAMPLES["FP32"])])
    with pytest.raises(ValueError, match="no V2 datatype"):
        encode_infer_response("m", "1", "i", [("c", np.array([1j]))])


def test_non_finite_outputs_are_exact_only_in_binary() -> None:
    """JSON has no NaN/Inf: orjson writes null, read back as NaN (documented); binary is exact."""
    array = np.array([1.0, np.nan, -np.inf], dtype=np.float32)
    body, header_length = encode_infer_response("m", "1", None, [("a", array)])
    assert orjson.loads(body)["outputs"][0]["data"] == [1.0, None, None]
    got = th.InferenceServerClient.parse_response_body(body, header_length=header_length).as_numpy("a")
    np.testing.assert_array_equal(got, [1.0, np.nan, np.nan])
    body, header_length = encode_infer_response("m", "1", None, [("a", array)], binary=True)
    got = th.InferenceServerClient.parse_response_body(body, header_length=header_length).as_numpy("a")
    np.testing.assert_array_equal(got, array)


def test_error_body() -> None:
    assert orjson.loads(error_body('bad "x"')) == {"error": 'bad "x"'}


# ----------------------------------------------------------------------------------------------------
# Refusals: one V2CodecError with a helpful message each
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'inputs' must be a non-empty array"),
        (b'{"inputs": []}', "'inputs' must be a non-empty array"),
        (b'{"inputs": [1]}', r"inputs\[0\] must be a JSON object"),
        (b'{"id": 5, "inputs": [{}]}', "'id' must be a string"),
        (b'{"inputs": [{"datatype": "FP32"}]}', "non-empty string 'name'"),
    ],
)
def test_refuses_malformed_documents(body: bytes, match: str) -> None:
    refuse(body, match=match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"datatype": "FP8"}, "unsupported datatype 'FP8'.*supported: BOOL"),
        ({"datatype": "BF16"}, "BF16 has no numpy dtype"),
        ({"datatype": "fp32"}, "unsupported datatype 'fp32'"),
        ({"datatype": ["FP32"]}, "unsupported datatype"),
        ({"name": ["x"]}, "non-empty string 'name'"),
        ({"shape": [-1]}, "must contain only non-negative integers"),
        ({"shape": [2.0]}, "must contain only non-negative integers"),
        ({"shape": [True, 2]}, "must contain only non-negative integers"),
        ({"shape": 2}, "'shape' must be an array"),
        ({"shape": [1] * 33}, "at most 32"),
        ({"shape": [3]}, "has 3 elements but 'data' has 2"),
        ({"shape": [1]}, "has 1 elements but 'data' has more"),
        ({"data": 1.0, "shape": [1]}, "'data' must be a JSON array"),
        ({"shape": [2, 1], "data": [[1.0], 2.0]}, "mixes arrays and values"),
        ({"data": [[1.0], [2.0]]}, "nested deeper or wider than the shape"),
        ({"shape": [2, 2], "data": [[1, 2, 3], [4]]}, "ragged"),
        ({"shape": [2, 3], "data": [[1, 2], [3, 4], [5, 6]]}, r"nested deeper or wider|nested as \[3, 2\]"),
        ({"shape": [3, 2], "data": [[1, 2, 3], [4, 5, 6]]}, r"nested as \[2, 3\]; send it flat"),
        ({"data": ["1", "2"]}, "FP32 data must be numbers"),
        ({"data": [None, 2.0]}, "FP32 data must be numbers"),
        ({"data": [True, False]}, "FP32 data must be numbers"),
        ({"datatype": "INT32", "data": [1.5, 2]}, "INT32 data must be integers"),
        ({"datatype": "INT8", "data": [1, 300]}, r"INT8 data must lie in \[-128, 127\]"),
        ({"datatype": "UINT8", "data": [-1, 3]}, r"UINT8 data must lie in \[0, 255\]"),
        ({"datatype": "INT64", "data": [-1, 2**63]}, r"INT64 data must lie in \[-9223372036854775808, "),
        ({"datatype": "UINT64", "data": [0.5, 2**63]}, "UINT64 data must be integers"),
        ({"datatype": "BOOL", "data": [1, 0]}, "BOOL data must be true or false"),
        ({"datatype": "BYTES", "data": ["a", 2]}, "BYTES data must be strings"),
        ({"datatype": "BYTES", "shape": [2, 1], "data": [["a", "b"]]}, "BYTES data must be strings"),
        ({"data": [1e39, 0.0]}, "NaN or infinite"),  # overflows FP32
        ({"parameters": {"shared_memory_region": "r"}}, "shared-memory extension is not supported"),
        ({"parameters": {"nested": {"a": 1}}}, "must be a string, number or boolean"),
    ],
)
def test_refuses_bad_json_inputs(fields: dict[str, Any], match: str) -> None:
    refuse(*header(one_input(**fields)), match=match)


def test_refuses_more_elements_than_allowed_before_reading_data() -> None:
    refuse(*header(one_input(shape=[101])), match="at most 100 more elements", max_elements=100)
    doc = one_input(shape=[60], data=[0.0] * 60)
    doc["inputs"].append({"name": "y", "datatype": "FP32", "shape": [60], "data": [0.0] * 60})
    refuse(*header(doc), match="input 'y'.*at most 40 more", max_elements=100)  # the budget is per request
    refuse(*header(one_input(shape=[0, 1000])), match="too large", max_elements=100)  # no dim over the budget
    # orjson reads integers beyond 64 bits as floats: refused for integer inputs, not rounded.
    body = b'{"inputs":[{"name":"x","datatype":"UINT64","shape":[2],"data":[18446744073709551616,1]}]}'
    refuse(body, match="UINT64 data must be integers")


def test_refuses_duplicates_and_bad_outputs() -> None:
    doc = one_input()
    doc["inputs"].append(dict(doc["inputs"][0]))
    refuse(*header(doc), match="input 'x' appears more than once")
    for outputs, match in [
        ([{"name": "a"}, {"name": "a"}], "output 'a' is requested more than once"),
        ([{"name": ""}], r"outputs\[0\] must be an object with a non-empty 'name'"),
        ({"name": "a"}, "'outputs' must be an array"),
        ([{"name": "a", "parameters": {"binary_data": "yes"}}], "binary_data of output 'a' must be true"),
        ([{"name": "a", "parameters": {"classification": 3}}], "classification extension"),
        ([{"name": "a", "parameters": {"shared_memory_region": "r"}}], "shared-memory"),
    ]:
        refuse(*header({**one_input(), "outputs": outputs}), match=match)
    refuse(*header({**one_input(), "parameters": {"binary_data_output": 1}}), match="binary_data_output")
    refuse(*header({**one_input(), "parameters": [1]}), match="'parameters' of the request")


def binary_doc(datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    """A header with one binary input."""
    return {
        "inputs": [
            {"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}
        ]
    }


def test_refuses_inconsistent_binary_sections() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    refuse(*header(binary_doc("FP32", [4], 15), data), match="needs 16 bytes but binary_data_size is 15")
    refuse(
        *header(binary_doc("FP32", [4], 16), data + b"\0"), match="binary section has 17 bytes.*add up to 16"
    )
    head = orjson.dumps(binary_doc("FP32", [4], 16))
    refuse(head + data[:8], len(head), match="needs 16 bytes but binary_data_size is 16|binary section has 8")
    refuse(head + data, len(head) + 100, match="body has")
    refuse(head + data, 0, match="raw binary requests")
    refuse(head, None, match="no binary section.*Inference-Header-Content-Length")
    refuse(head + data, len(head) - 3, match="not valid JSON")
    both = binary_doc("FP32", [4], 16)
    both["inputs"][0]["data"] = [0, 1, 2, 3]
    refuse(*header(both, data), match="both 'data' and parameters.binary_data_size")
    refuse(*header({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}), match="has no 'data'")
    refuse(*header(binary_doc("FP32", [4], -16), data), match="binary_data_size must be a non-negative")
    refuse(*header(binary_doc("BOOL", [2], 2), b"\x01\x02"), match="BOOL bytes must be 0 or 1")


def test_refuses_bad_binary_bytes() -> None:
    good = b"\x02\x00\x00\x00ab\x00\x00\x00\x00"  # ["ab", ""]
    request = decode_infer_request(*header(binary_doc("BYTES", [2], len(good)), good), max_elements=MAX)
    assert request.inputs[0].array.tolist() == [b"ab", b""]
    refuse(*header(binary_doc("BYTES", [3], len(good)), good), match="3 BYTES elements need at least 12")
    long = b"\x09\x00\x00\x00ab\x00\x00\x00\x00"
    refuse(*header(binary_doc("BYTES", [2], len(long)), long), match="element 0 declares 9 bytes past")
    extra = good + b"zz"
    refuse(*header(binary_doc("BYTES", [2], len(extra)), extra), match="2 bytes left over")
    cut = b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x00\x00"
    refuse(*header(binary_doc("BYTES", [3], len(cut)), cut), match="ends inside the length of element 2")


def test_non_finite_binary_floats() -> None:
    array = np.array([1.0, np.nan, np.inf], dtype=np.float32)
    body, header_length = triton_body({"x": array}, True)
    refuse(body, header_length, match="input 'x' contains NaN or infinite values")
    request = decode_infer_request(body, header_length, max_elements=MAX, allow_non_finite=True)
    np.testing.assert_array_equal(request.inputs[0].array, array)


class _NoAllocNumpy:
    """Stands in for numpy inside the codec: any call that would build a tensor fails the test."""

    def __getattr__(self, name: str) -> Any:
        if name in {"array", "frombuffer", "empty", "asarray", "isfinite"}:
            raise AssertionError(f"np.{name} called before the request was refused")
        return getattr(np, name)


def test_ten_megabyte_misshaped_bodies_are_refused_before_building_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refusal cost is bounded by the header or the declared shape, never by what the body holds.

    Nothing is timed; instead the codec's numpy is swapped for one that fails on any tensor allocation,
    and orjson.loads for one that fails on any body over 1 MB, so these refusals provably come from the
    header checks and the C-speed value count, before a tensor or a 10 MB JSON document is built.
    """
    monkeypatch.setattr(v2_codec, "np", _NoAllocNumpy())
    real_loads = orjson.loads

    def small_loads(data: Any) -> Any:
        assert len(data) < 2**20, "a 10 MB JSON document was parsed before being refused"
        return real_loads(data)

    monkeypatch.setattr(v2_codec.orjson, "loads", small_loads)
    ten_mb = 10 * 1024 * 1024
    blob = bytes(ten_mb)
    # Binary: a shape far over the limit, and a small shape in front of 10 MB of data.
    refuse(*header(binary_doc("FP32", [ten_mb // 4], ten_mb), blob), match="too large", max_elements=64 * 784)
    refuse(*header(binary_doc("FP32", [1, 784], 3136), blob), match="binary section has")
    # JSON: 10 MB of numbers behind a small shape, flat, as millions of one-element rows, as strings.
    start = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,784],"data":['
    for data in (
        b"0," * (ten_mb // 2) + b"0",
        b"[0]," * (ten_mb // 4) + b"[0]",
        b'"",' * (ten_mb // 3) + b"0",
    ):
        refuse(
            start + data + b"]}]}",
            None,
            match="more JSON values than the 50176 tensor elements",
            max_elements=64 * 784,
        )


def test_value_count_ignores_commas_inside_strings() -> None:
    """The pre-parse count must not refuse BYTES text full of commas (escaped quotes included)."""
    for text in ("a," * 300_000, 'say \\"a,b\\", ' * 50_000 + "\\\\"):
        body = orjson.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": [text]}]})
        assert body.count(b",") > 100_000
        request = decode_infer_request(body, None, max_elements=10)
        assert request.inputs[0].array.tolist() == [text.encode()]


def test_parse_header_length() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(" 120 ") == 120
    for bad in ("", "-1", "1e3", "abc", "\u00b2", "9" * 30):
        with pytest.raises(V2CodecError, match="Inference-Header-Content-Length"):
            parse_header_length(bad)


# ----------------------------------------------------------------------------------------------------
# Specs and metadata documents
# ----------------------------------------------------------------------------------------------------

IMAGES = TensorSpec("images", "FP32", (-1, 1, 28, 28))
SEED = TensorSpec("seed", "INT64", (-1,))
MEAN = TensorSpec("mean", "FP32", (-1, 16))
LABEL = TensorSpec("label", "BYTES", (-1, 1))


def test_match_inputs_against_specs() -> None:
    arrays = {"images": np.zeros((3, 1, 28, 28), np.float32), "seed": np.array([1, 2, 3])}
    request = decode_infer_request(*triton_body(arrays, True), max_elements=MAX)
    matched = match_inputs(request, [IMAGES, SEED])
    assert list(matched) == ["images", "seed"] and matched["images"].shape == (3, 1, 28, 28)
    with pytest.raises(V2CodecError, match=r"missing input\(s\): seed"):
        match_inputs(
            decode_infer_request(*triton_body({"images": arrays["images"]}, True), max_elements=MAX),
            [IMAGES, SEED],
        )
    with pytest.raises(V2CodecError, match="unknown input 'seed'; this model takes: images"):
        match_inputs(request, [IMAGES])
    wrong = decode_infer_request(
        *triton_body({"images": np.zeros((3, 28, 28), np.float32)}, True), max_elements=MAX
    )
    with pytest.raises(V2CodecError, match=r"shape \[3, 28, 28\]; this model expects \[-1, 1, 28, 28\]"):
        match_inputs(wrong, [IMAGES])
    as_fp64 = decode_infer_request(*triton_body({"seed": np.array([1.0])}, True), max_elements=MAX)
    with pytest.raises(V2CodecError, match="input 'seed' must be INT64, got FP64"):
        match_inputs(as_fp64, [SEED])
    with pytest.raises(ValueError, match="unknown datatype"):
        TensorSpec("x", "FLOAT", (1,))


def test_server_and_model_metadata() -> None:
    assert server_metadata("vae-serve", "0.3.0", ["binary_tensor_data", "model_configuration"]) == {
        "name": "vae-serve",
        "version": "0.3.0",
        "extensions": ["binary_tensor_data", "model_configuration"],
    }
    meta = model_metadata("mnist-vae", ["1"], "onnxruntime_onnx", [IMAGES], [MEAN, LABEL])
    assert meta == {
        "name": "mnist-vae",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "mean", "datatype": "FP32", "shape": [-1, 16]},
            {"name": "label", "datatype": "BYTES", "shape": [-1, 1]},
        ],
    }
    assert orjson.loads(orjson.dumps(meta)) == meta


BATCHING = {
    "max_queue_delay_microseconds": 2000,
    "preferred_batch_size": [64],
    "default_queue_policy": {"max_queue_size": 1024, "default_timeout_microseconds": 30_000_000},
}


def test_triton_model_config_json_form() -> None:
    config = triton_model_config("mnist-vae", 64, [IMAGES, SEED], [MEAN], BATCHING)
    # The fields Triton's own HTTP clients read (qa/L0_perf_pyclients, image_client.py parse_model).
    assert config["name"] == "mnist-vae" and config["max_batch_size"] == 64
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    images, seed = config["input"]
    assert images == {
        "name": "images",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [1, 28, 28],  # no batch dim when max_batch_size > 0
        "is_shape_tensor": False,
        "allow_ragged_batch": False,
        "optional": False,
    }
    assert (seed["dims"], seed["reshape"]) == ([1], {"shape": []})  # Triton's per-item scalar
    assert config["output"][0]["dims"] == [16] and config["output"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [64],
        "max_queue_delay_microseconds": 2000,
        "preserve_ordering": False,
        "priority_levels": 0,
        "default_priority_level": 0,
        "priority_queue_policy": {},
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": 30_000_000,
            "allow_timeout_override": False,
            "max_queue_size": 1024,
        },
    }
    assert orjson.loads(orjson.dumps(config)) == config  # plain JSON: numbers stay numbers
    unbatched = triton_model_config(
        "m", 0, [TensorSpec("x", "BYTES", (3,))], [TensorSpec("y", "BOOL", (3,))], None
    )
    assert unbatched["input"][0]["dims"] == [3] and unbatched["input"][0]["data_type"] == "TYPE_STRING"
    assert "dynamic_batching" not in unbatched and unbatched["output"][0]["data_type"] == "TYPE_BOOL"
    with pytest.raises(ValueError, match="first dim must be the batch dim -1"):
        triton_model_config("m", 8, [TensorSpec("x", "FP32", (3,))], [], None)
    with pytest.raises(ValueError, match="unknown dynamic_batching fields"):
        triton_model_config("m", 8, [IMAGES], [MEAN], {"max_queue_delay_us": 5})
    with pytest.raises(ValueError, match="unknown default_queue_policy fields"):
        triton_model_config("m", 8, [IMAGES], [MEAN], {"default_queue_policy": {"size": 5}})


def _triton_model_config_pb2() -> ModuleType:
    """Triton's model_config_pb2, loaded by path: importing tritonclient.grpc beside kserve fails."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_model_config_parses_into_triton_protobuf() -> None:
    from google.protobuf import json_format

    pb2 = _triton_model_config_pb2()
    specs_in = [IMAGES, SEED, TensorSpec("tag", "BYTES", (-1, 2))]
    config = triton_model_config("mnist-vae", 64, specs_in, [MEAN, LABEL], BATCHING)
    message = json_format.ParseDict(config, pb2.ModelConfig())  # unknown fields or bad enums would raise
    assert message.max_batch_size == 64 and message.backend == "onnxruntime"
    assert [i.data_type for i in message.input] == [pb2.TYPE_FP32, pb2.TYPE_INT64, pb2.TYPE_STRING]
    assert list(message.input[0].dims) == [1, 28, 28] and list(message.input[1].reshape.shape) == []
    assert message.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(message.dynamic_batching.preferred_batch_size) == [64]
    policy = message.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.timeout_action) == (1024, pb2.ModelQueuePolicy.REJECT)
    # And back: every field we emit survives the schema (defaults included).
    back = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert back["output"][1]["data_type"] == "TYPE_STRING"
    assert int(back["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"]) == 30_000_000
