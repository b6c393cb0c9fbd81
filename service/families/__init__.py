"""Model families: the math of each kind of model as operations over its graphs (service/families/base.py).

Adding a family adds one module here and an entry in FAMILIES; no route and no engine code changes.
"""

from __future__ import annotations

from service.artifacts import Manifest
from service.families.base import (
    NO_OPTIONS,
    OPERATIONS,
    Arrays,
    Family,
    FamilyError,
    GraphRunner,
    Operation,
    Options,
)
from service.families.gaussian import DEFAULT_CHUNK, GaussianLatentVAE

# manifest `model.family` -> class; artifacts without the field are Gaussian-latent models
FAMILIES: dict[str, type[GaussianLatentVAE]] = {"gaussian": GaussianLatentVAE}

__all__ = [
    "DEFAULT_CHUNK",
    "FAMILIES",
    "NO_OPTIONS",
    "OPERATIONS",
    "Arrays",
    "Family",
    "FamilyError",
    "GraphRunner",
    "Operation",
    "Options",
    "family_for",
]


def family_for(manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> Family:
    """The family object of a served artifact."""
    name = (manifest.raw.get("model") or {}).get("family", "gaussian")
    if name not in FAMILIES:
        raise ValueError(f"{manifest.directory}: unknown model family {name!r} (known: {sorted(FAMILIES)})")
    return FAMILIES[name].from_manifest(manifest, chunk)
