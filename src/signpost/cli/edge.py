"""``signpost edge``: the device agent's commands (``signpost.edge``). Only what a device installs is imported here
(``pip install 'signpost[edge]'``: no FastAPI, MLflow or training code), and only when a command runs."""

from __future__ import annotations

import argparse


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
                             description="classify images from a watched folder or a loopback HTTP endpoint")
    run.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    raise NotImplementedError("signpost edge run")


# --- signpost edge update (signpost.edge.update) ----------------------------------------------------------------------

def _add_update(actions: argparse._SubParsersAction) -> None:
    update = actions.add_parser("update", help="fetch, verify and swap in a newer bundle; roll back if it fails",
                                description="fetch, verify and swap in a newer bundle; roll back if it fails")
    update.set_defaults(handler=_update_command)


def _update_command(args: argparse.Namespace) -> int:
    raise NotImplementedError("signpost edge update")
