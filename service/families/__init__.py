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
    LatentSpace,
    Operation,
    Options,
)
from service.families.gaussian import DEFAULT_CHUNK, GaussianLatentVAE
from service.families.vqvae import VQVAE

# manifest `model.family` -> class (Manifest.family; artifacts without the field are Gaussian-latent)
FAMILIES: dict[str, type[GaussianLatentVAE] | type[VQVAE]] = {"gaussian": GaussianLatentVAE, "vqvae": VQVAE}

__all__ = [
    "DEFAULT_CHUNK",
    "FAMILIES",
    "NO_OPTIONS",
    "OPERATIONS",
    "Arrays",
    "Family",
    "FamilyError",
    "GraphRunner",
    "LatentSpace",
    "Operation",
    "Options",
    "family_class",
    "family_for",
    "latent_space",
]


def family_for(manifest: Manifest, chunk: int = DEFAULT_CHUNK) -> Family:
    """The family object of a served artifact."""
    if manifest.family not in FAMILIES:
        raise ValueError(f"{manifest.directory}: unknown model family {manifest.family!r} "
                         f"(known: {sorted(FAMILIES)})")
    return FAMILIES[manifest.family].from_manifest(manifest, chunk)


def family_class(manifest: Manifest) -> type[GaussianLatentVAE] | type[VQVAE]:
    """The family's class: what the HTTP side needs of it (latent_space, encodings) without an instance."""
    return FAMILIES[manifest.family]


def latent_space(manifest: Manifest) -> LatentSpace:
    """How the model's latents look to clients (decode's input, encode's outputs)."""
    return FAMILIES[manifest.family].latent_space(manifest)
