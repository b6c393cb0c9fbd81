"""Operation options from request parameters, checked against the model: shared by every protocol."""

from service.api.errors import InvalidInput
from service.artifacts import Manifest
from service.config import Settings
from service.families import Options


def anomaly_options(manifest: Manifest, settings: Settings, method: str | None, alpha: float | None,
                    k: int | None, seed: int) -> Options:
    """The method, level and k to use (the caller's, else the settings', else the manifest's), or 422."""
    cal = manifest.anomaly
    if cal is None:
        raise InvalidInput(f"model {manifest.name} version {manifest.version} has no anomaly calibration; "
                           "calibrate it with `python -m training calibrate <version folder>`")
    if method is None:
        method = settings.default_anomaly_method(cal.methods, cal.default_method)
    if method not in cal.methods:
        raise InvalidInput(f"model {manifest.name} version {manifest.version} has no calibration for method "
                           f"{method!r}; it offers {sorted(cal.methods)}")
    level = alpha if alpha is not None else settings.anomaly_alpha if settings.anomaly_alpha else cal.alpha
    calibration = cal.methods[method]
    if level < calibration.min_alpha:  # a level no p-value can reach would silently never flag anything
        raise InvalidInput(
            f"alpha {level:g} is below {calibration.min_alpha:.4g} = 1/(n+1), the smallest p-value the "
            f"n = {calibration.n} calibration scores of method {method!r} of model {manifest.name} version "
            f"{manifest.version} can give, so no input could be flagged: ask for alpha >= "
            f"{calibration.min_alpha:.4g}, or re-export the model with a larger calibration split")
    return Options(k=k or min(cal.k, settings.max_k), seed=seed, method=method, alpha=level)
