"""Download the model behind a registry alias and print its folder, for `signpost monitor --model`.

    model="$(python tools/ci/fetch_model.py configs/demo.yaml champion)"

The registry is the experiment's (``tracking.registered_model``, default ``signpost-<config name>``) on the tracking
server named by MLFLOW_TRACKING_URI, with MLflow's own credential variables. The folder keeps its artifact name, is
checked against its manifest, and is the model the deployment serves, so the monitor's embedding, confidence and
feedback checks compare the log with that model rather than with whatever was trained last on this runner.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tools/ci/fetch_model.py CONFIG ALIAS", file=sys.stderr)
        return 2
    from signpost.config import load_config
    from signpost.registry import Registry

    config = load_config(Path(argv[0]))
    print(Registry(config.tracking, config.workdir).download(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
