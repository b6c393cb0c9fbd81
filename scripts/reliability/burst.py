"""Long burst test: measure capacity, send 10x that open-loop, print the figures and write JSON.

    .venv/bin/python scripts/reliability/burst.py [--models-dir DIR] [--burst-s 10] [--delay 0.2]
        [--out reliability-results/burst.json]

Without --models-dir the small `tiny` test model is trained and exported into a temporary folder
(about 30 s). Traffic goes to 127.0.0.1 only; the server is a real `python -m service` process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, help="must hold a model named tiny (8x8 grey)")
    parser.add_argument("--burst-s", type=float, default=10.0)
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--delay", type=float, action="append",
                        help="simulated device seconds per batch (repeatable; default 0.2 and 0.05)")
    parser.add_argument("--out", type=Path, default=Path("reliability-results/burst.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or harness.build_test_models(Path(tmp))
        results = []
        for delay in args.delay or [0.2, 0.05]:
            harness.BURST_DELAY_S = delay
            with harness.start_server(models_dir, Path(tmp) / f"server-{delay}.log", env=harness.BURST_ENV,
                                      batch_delay_s=delay) as server:
                figures = harness.burst_scenario(server, capacity_s=args.capacity_s, burst_s=args.burst_s,
                                                 factor=args.factor)
            results.append(figures)
            print(json.dumps(figures, indent=2))
    harness.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
