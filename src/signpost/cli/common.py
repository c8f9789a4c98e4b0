"""What every command shares: the exit codes, and the config and progress setting read from its arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from signpost.config import SignpostConfig, load_config

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3  # the model was evaluated and failed the gate
EXIT_REGRESSION = 4  # bench --compare found B slower than A beyond the threshold
EXIT_DRIFT = 5  # monitor: the window drifted; retraining is needed
EXIT_PARITY = 6  # evaluate --served: the server's top-1 differs from evaluate's by more than evaluate.max_served_gap
EXIT_CANARY_WAIT = 7  # deploy --promote-canary: the canary has not answered deploy.canary.min_requests yet
EXIT_INTERRUPTED = 130


def progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: in CI logs every redraw would become a line."""
    return not args.no_progress and sys.stderr.isatty()


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> SignpostConfig:
    """The config with its overrides, and this process's signing policy set from it (``signpost.signing``)."""
    from signpost import signing

    unsigned = ["security.allow_unsigned=true"] if getattr(args, "allow_unsigned", False) else []
    config = load_config(args.config, [*args.overrides, *extra, *unsigned])
    policy = signing.configure_from(config.security)
    if policy.enforced and config.security.allow_unsigned:
        print("warning: --allow-unsigned: unsigned models will be loaded although public keys are configured; "
              "for local experiments only", file=sys.stderr)
    return config
