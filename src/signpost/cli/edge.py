"""``signpost edge``: the device agent's commands (``signpost.edge``). Only what a device installs is imported here
(``pip install 'signpost[edge]'``: no FastAPI, MLflow or training code), and only when a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_edge_parser(sub: argparse._SubParsersAction) -> None:
    """``signpost edge run`` and ``signpost edge update``."""
    group = sub.add_parser("edge", help="run a signed edge bundle on a device, and update it (README \"On devices\")",
                           description="run a signed edge bundle on a device, and update it")
    actions = group.add_subparsers(title="actions", metavar="ACTION", required=True)
    _add_run(actions)
    _add_update(actions)


# --- signpost edge run (the agent: signpost.edge.agent) ---------------------------------------------------------------

def _add_run(actions: argparse._SubParsersAction) -> None:
    run = actions.add_parser("run", help="classify images from a watched folder or a loopback HTTP endpoint",
                             description="classify images from a watched folder or a loopback HTTP endpoint, "
                             "log every prediction locally and ship the log to the central server")
    run.add_argument("--bundle", type=Path, required=True, help="a bundle folder, or the current symlink that "
                     "signpost edge update moves (followed between polls)")
    run.add_argument("--device-id", required=True, help="this device's id, as the server's device keys name it")
    run.add_argument("--watch", type=Path, help="classify the images written into this folder (moved to done/ or "
                     "rejected/ after)")
    run.add_argument("--listen", type=int, metavar="PORT", help="answer POST /v1/predict on 127.0.0.1:PORT (0: a "
                     "free port, printed)")
    run.add_argument("--log", type=Path, required=True, metavar="FILE.sqlite", help="the local prediction log")
    run.add_argument("--server", help="the central server's base URL (http://host:port); without it nothing ships")
    run.add_argument("--key-file", type=Path, help="file holding this device's API key (with --server)")
    run.add_argument("--batch-size", type=int, default=500, help="records per shipped batch (default %(default)s)")
    run.add_argument("--flush-seconds", type=float, default=10.0,
                     help="ship a smaller batch once its oldest record is this old, s (default %(default)s)")
    run.add_argument("--max-buffer", type=int, default=100_000, help="unshipped records kept at most; past it the "
                     "oldest are dropped and counted (default %(default)s)")
    run.add_argument("--keep-shipped", type=int, default=100_000, metavar="N", help="shipped records kept in the "
                     "log as a local history; past it the oldest are deleted (default %(default)s)")
    run.add_argument("--retry-max-seconds", type=float, default=60.0,
                     help="the longest wait between shipping tries, s (default %(default)s)")
    run.add_argument("--public-key", type=Path, action="append", default=[], metavar="PEM",
                     help="a public key bundles must be signed with (repeatable; or SIGNPOST_PUBLIC_KEYS)")
    run.add_argument("--allow-unsigned", action="store_true",
                     help="run a bundle whose signature cannot be checked (local tests only)")
    run.add_argument("--threads", type=int, help="ExecuTorch's thread pool size (default: its own choice)")
    run.add_argument("--poll-seconds", type=float, default=0.5, help="how often the folder is read, s "
                     "(default %(default)s)")
    run.add_argument("--status-seconds", type=float, default=60.0, help="how often the status line is printed, s "
                     "(default %(default)s)")
    run.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    """Start the agent, print where it listens and a status line now and then; SIGTERM ends it with exit 0."""
    import re
    import signal

    from signpost import signing
    from signpost.config import DEVICE_ID_PATTERN
    from signpost.edge.agent import Agent, Model
    from signpost.edge.locallog import LocalLog
    from signpost.edge.shipper import Shipper

    if not re.fullmatch(DEVICE_ID_PATTERN, args.device_id):
        return _usage(f"--device-id {args.device_id!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    if args.watch is None and args.listen is None:
        return _usage("give --watch DIR, --listen PORT or both: the agent needs images to classify")
    if (args.server is None) != (args.key_file is None):
        return _usage("--server and --key-file go together: the device's key signs every batch it ships")
    if args.listen is not None and not 0 <= args.listen <= 65535:
        return _usage(f"--listen {args.listen}: give a port 0-65535")
    if args.batch_size < 1 or args.max_buffer < args.batch_size:
        return _usage(f"--max-buffer {args.max_buffer} must hold at least one batch (--batch-size "
                      f"{args.batch_size} >= 1)")
    if args.keep_shipped < 0:
        return _usage(f"--keep-shipped {args.keep_shipped}: give a number of shipped records to keep, 0 or more")
    if args.watch is not None and args.log.resolve().is_relative_to(args.watch.resolve()):
        return _usage(f"--log {args.log} is inside --watch {args.watch}: the agent would take the log's own files "
                      "for images; put the log outside the watched folder")
    signing.configure(signing.policy_from(None, args.public_key, args.allow_unsigned))
    local_log = LocalLog(args.log, args.device_id, args.max_buffer, args.keep_shipped)
    try:
        shipper = None
        if args.server is not None:
            shipper = Shipper(local_log, args.server, args.key_file, batch_size=args.batch_size,
                              flush_s=args.flush_seconds, cap_s=max(1.0, args.retry_max_seconds))
        agent = Agent(Model(args.bundle, args.threads), local_log, folder=args.watch, port=args.listen,
                      shipper=shipper, poll_s=args.poll_seconds)
        signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
        signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
        where = [f"watching {args.watch}"] if args.watch is not None else []
        where += [f"listening on http://127.0.0.1:{agent.port}"] if agent.port is not None else []
        print(f"signpost edge: {args.device_id} running {agent.model.bundle.model_version}, {', '.join(where)}; "
              f"log {args.log}", flush=True)
        agent.run(on_status=lambda status: print(status.line(), flush=True), status_s=args.status_seconds)
    finally:
        local_log.close()
    return 0


def _usage(message: str) -> int:
    import sys

    from signpost.cli.common import EXIT_USAGE

    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- signpost edge update (signpost.edge.update) ----------------------------------------------------------------------

def _add_update(actions: argparse._SubParsersAction) -> None:
    update = actions.add_parser("update", help="fetch, verify and swap in a newer bundle; roll back if it fails",
                                description="fetch, verify and swap in a newer bundle; roll back if it fails")
    update.add_argument("--home", type=Path, required=True, metavar="DIR",
                        help="the device's bundle folder: bundles/, and the current and previous links")
    update.add_argument("--source", required=True, metavar="TARBALL|URL",
                        help="the bundle's tarball: a path, or an http(s) URL (`signpost package --target edge`)")
    update.add_argument("--key-file", type=Path, metavar="FILE", help="a file holding the key sent as "
                        "'Authorization: Bearer KEY' to an http(s) source")
    update.add_argument("--public-key", type=Path, action="append", default=[], metavar="PEM",
                        help="a public key the bundle must be signed with (repeatable; or SIGNPOST_PUBLIC_KEYS)")
    update.add_argument("--allow-unsigned", action="store_true",
                        help="install a bundle whose signature cannot be checked (local tests only)")
    update.set_defaults(handler=_update_command)


def _update_command(args: argparse.Namespace) -> int:
    """Install the bundle; exit 0 when it is current (new or already), non-zero when refused or rolled back."""
    from signpost import signing
    from signpost.edge.update import update

    signing.configure(signing.policy_from(None, args.public_key, args.allow_unsigned))
    key = None
    if args.key_file is not None:
        try:
            key = args.key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return _usage(f"--key-file {args.key_file}: cannot read it ({exc.strerror or exc})")
        if not key or "\n" in key:  # shipper.read_key's check; the key itself is never printed
            return _usage(f"--key-file {args.key_file}: expected the key on one line")
    result = update(args.home, args.source, key=key)
    if result.outcome == "already current":
        print(f"signpost edge: {result.model_version} ({result.bundle.name}) is already current; nothing to do")
    else:
        print(f"signpost edge: {result.model_version} installed and self-tested; current -> {result.bundle.name}"
              + (f", previous -> {result.previous.name}" if result.previous is not None else ""))
    return 0
