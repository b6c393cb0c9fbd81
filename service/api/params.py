"""Every request parameter of the model operations, defined once: name, type, bounds and description.

/v1 builds its FastAPI query parameters from these definitions (so the OpenAPI schema shows exactly the
enforced limits), the fast path parses query strings with them, and V2 checks its `parameters` object
with them. One definition, one set of bounds, one error message per violation, on every protocol.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Query

from service.anomaly import METHODS
from service.api.errors import InvalidInput
from service.config import Settings

MAX_SEED = 2**63 - 1
# Built from the one list of methods (service/anomaly.py), so the OpenAPI text cannot fall behind it.
METHOD_DESCRIPTION = (f"anomaly score, one of {', '.join(METHODS)}, as the model's calibration offers "
                      "(GET /v1/models/{model}: anomaly.methods); default: the model's own "
                      "(anomaly.default_method), or VAE_ANOMALY_METHOD when the model offers it")
_INT = re.compile(r"[+]?[0-9]{1,19}")
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


@dataclass(frozen=True)
class Param:
    """One request parameter. Bounds are inclusive unless `open_bounds` (then low < v < high)."""

    name: str
    kind: type  # int, float or str
    description: str
    low: float | None = None
    high: float | None = None
    open_bounds: bool = False
    max_length: int | None = None
    choices: tuple[str, ...] | None = None  # str parameters with a fixed set of values

    def query(self, optional: bool = True) -> Any:
        """The FastAPI query annotation of this parameter (bounds in the OpenAPI schema)."""
        bounds: dict[str, Any] = {}
        if self.choices is not None:
            kind = Literal[self.choices]  # type: ignore[valid-type]
            return Annotated[kind | None if optional else kind, Query(description=self.description)]
        if self.kind is str:
            bounds["max_length"] = self.max_length
        elif self.open_bounds:
            bounds.update(gt=self.low, lt=self.high)
        else:
            bounds.update(ge=self.low, le=self.high)
        if self.kind is float:
            bounds["allow_inf_nan"] = False
        kind = self.kind | None if optional else self.kind
        return Annotated[kind, Query(description=self.description, **bounds)]

    def check(self, value: Any) -> Any:
        """A JSON value (V2 parameters) -> the checked value, or InvalidInput naming the rule."""
        if value is None:
            return None
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidInput(f"parameter '{self.name}' must be an integer, got {value!r}")
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidInput(f"parameter '{self.name}' must be a number, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise InvalidInput(f"parameter '{self.name}' must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise InvalidInput(f"parameter '{self.name}' must be one of {list(self.choices)}, "
                                   f"got {value!r}")
            if self.max_length is not None and not 0 < len(value) <= self.max_length:
                raise InvalidInput(f"parameter '{self.name}' must have 1 to {self.max_length} characters")
            return value
        if self.kind is float and not math.isfinite(value):
            raise InvalidInput(f"parameter '{self.name}' must be finite, got {value!r}")
        if not self._within(value):
            interval = f"({self.low}, {self.high})" if self.open_bounds else f"[{self.low}, {self.high}]"
            raise InvalidInput(f"parameter '{self.name}' must be in {interval}, got {value!r}")
        return self.kind(value)

    def parse(self, text: str) -> Any:
        """A query-string value -> the checked value, or InvalidInput (the fast path's parser)."""
        if self.kind is int:
            if not _INT.fullmatch(text):
                raise InvalidInput(f"parameter '{self.name}' must be an integer, got {text!r}")
            return self.check(int(text))
        if self.kind is float:
            if not _NUMBER.fullmatch(text):
                raise InvalidInput(f"parameter '{self.name}' must be a number, got {text!r}")
            return self.check(float(text))
        return self.check(text)

    def _within(self, value: float) -> bool:
        if self.open_bounds:
            return (self.low is None or value > self.low) and (self.high is None or value < self.high)
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class Params:
    """The parameters of every operation under one service's settings."""

    k: Param
    seed: Param
    label: Param
    method: Param
    alpha: Param
    n: Param
    temperature: Param
    format: Param  # how images come back: base64 PNG or arrays
    include_input: Param  # reconstruct: also return the input as the model sees it
    include: Param  # encode: an optional output of the family (families/base.py LatentSpace)

    @classmethod
    def from_settings(cls, settings: Settings) -> Params:
        return cls(
            k=Param("k", int, "importance samples per image", 1, settings.max_k),
            seed=Param("seed", int, "random if omitted; echoed back", 0, MAX_SEED),
            label=Param("label", str, "class name or index for every item (conditional models)",
                        max_length=64),
            method=Param("method", str, METHOD_DESCRIPTION, max_length=32),
            alpha=Param("alpha", float, "level: is_anomaly when the conformal p-value <= alpha (default: the "
                                        "model's)", 0.0, 1.0, open_bounds=True),
            n=Param("n", int, "number of samples", 1, settings.max_n),
            temperature=Param("temperature", float, "z = temperature * eps", 0.0, 100.0),
            format=Param("format", str, "png: base64 PNG; array: C x H x W floats", choices=("png", "array")),
            include_input=Param("include_input", str, "true: also return each input as the model sees it "
                                "(converted, resized, in [0, 1]), the image the errors are measured against",
                                choices=("false", "true")),
            include=Param("include", str, "encode: an optional output of the model's family; VQ-VAE: "
                          "pre_quantization, the encoder's vectors before quantization (D x h x w)",
                          choices=("pre_quantization",)),
        )

    def get(self, name: str) -> Param:
        return getattr(self, name)
