"""`python -m service` / `vae-serve`: start the service.

By default: a supervisor process and VAE_HTTP_WORKERS HTTP worker processes (one per core); on the CPU
each worker runs the models itself, with a GPU one inference process owns the models and batches the
rows of every worker (VAE_ENGINE_PLACEMENT; service/supervisor.py). VAE_HTTP_WORKERS=0 runs everything
in one process instead.

Flags override the environment (`VAE_*`); everything else comes from the environment. On SIGTERM or
Ctrl-C the service first marks itself draining (/readyz 503, new model work refused with 503), lets
in-flight requests finish within VAE_DRAIN_TIMEOUT_S, then exits 0.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service.artifacts import ArtifactError, discover
from service.config import Settings
from service.logs import configure_logging


def parse_args(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="vae-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="bind address (VAE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (VAE_PORT, default 8000)")
    parser.add_argument("--models-dir", help="model repository (VAE_MODELS_DIR, default ./models)")
    parser.add_argument("--models", help="comma-separated name[:version] to load (VAE_MODELS, default all)")
    parser.add_argument("--runtime", choices=["onnx", "torchscript"], help="VAE_RUNTIME, default onnx")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="VAE_DEVICE, default auto")
    parser.add_argument("--http-workers", type=int,
                        help="HTTP worker processes (VAE_HTTP_WORKERS; -1 = one per core, 0 = one process)")
    parser.add_argument("--engine-placement", choices=["auto", "shared", "per-worker"],
                        help="where the models run (VAE_ENGINE_PLACEMENT, default auto: in each HTTP worker "
                             "on the CPU, one shared inference process with a GPU)")
    parser.add_argument("--log-level", help="VAE_LOG_LEVEL, default INFO")
    parser.add_argument("--json-logs", action="store_true", default=None, help="VAE_JSON_LOGS")
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vae-serve` console script."""
    overrides = parse_args(argv)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        print(f"vae-serve: invalid settings (environment variables VAE_<NAME> or flags):\n{problems}",
              file=sys.stderr)
        return 2
    try:  # the commonest mistake (no or wrong models directory) gets one line, not a traceback
        discover(settings.models_dir, settings.models, settings.serve_all_versions)
    except ArtifactError as exc:
        print(f"vae-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.json_logs)
    if settings.worker_processes == 0:
        from service.api.worker import serve_single_process

        return serve_single_process(settings)
    from service.supervisor import Supervisor

    return Supervisor(settings).run()


if __name__ == "__main__":
    sys.exit(main())
