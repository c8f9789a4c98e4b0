"""The Kubeflow TrainJob example: valid against the Trainer's CRD schema, and the commands it runs parse with
torchrun's and Signpost's own argument parsers (the c10d rendezvous across 2 nodes, the shipped config)."""

from __future__ import annotations

import copy
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from torch.distributed.run import get_args_parser

from signpost.cli import _build_parser
from tests.k8s.crd import validate_custom

EXAMPLE = Path(str(resources.files("signpost.k8s") / "examples" / "trainjob.yaml"))
SCHEMA = "trainjob-v1alpha1.json.gz"
REPO = Path(__file__).resolve().parents[2]
# What the Trainer's torch runtime gives every node (pkg/runtime/framework/plugins/torch), as node 1 sees it.
PET_ENV = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "signpost-gtsrb-node-0-0.signpost-gtsrb", "PET_MASTER_PORT": "29400"}


@pytest.fixture
def trainjob() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _commands(trainjob: dict[str, Any]) -> list[list[str]]:
    """The shell script the trainer runs, as the argument lists of its ``&&``-joined commands, variables expanded."""
    trainer = trainjob["spec"]["trainer"]
    assert trainer["command"] == ["sh", "-c"]
    (script,) = trainer["args"]
    for name, value in PET_ENV.items():
        script = script.replace(f"${name}", value)
    assert "$" not in script, f"a variable the runtime does not set: {script}"
    return [shlex.split(part) for part in script.split("&&")]


def test_the_example_validates_against_the_trainjob_crd(trainjob: dict[str, Any]) -> None:
    validate_custom(trainjob, SCHEMA)
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 1  # numProcPerNode >= 1: a CEL rule, unchecked
    assert trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"


@pytest.mark.parametrize(("path", "value", "field"), [
    (("spec", "trainer", "numNodes"), "two", "numNodes"),
    (("spec", "trainer", "nodes"), 2, "nodes"),
    (("spec", "runtimeRef"), {}, "name"),
])
def test_the_schema_refuses_a_broken_trainjob(trainjob: dict[str, Any], path: tuple, value: Any, field: str) -> None:
    broken = copy.deepcopy(trainjob)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=field):
        validate_custom(broken, SCHEMA)


def test_each_node_prepares_then_joins_a_c10d_rendezvous(trainjob: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prepare, torchrun = _commands(trainjob)
    assert prepare[:2] == ["signpost", "prepare"]
    assert torchrun[:2] == ["exec", "torchrun"]
    for name, value in PET_ENV.items():  # torchrun reads its defaults from PET_* when it builds its parser
        monkeypatch.setenv(name, value)
    args = get_args_parser().parse_args(torchrun[2:])
    assert (args.nnodes, args.nproc_per_node) == ("2", "1")
    assert args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == f"{PET_ENV['PET_MASTER_ADDR']}:{PET_ENV['PET_MASTER_PORT']}"
    assert args.module and args.training_script == "signpost.cli"

    parser = _build_parser()
    for argv in (prepare[1:], args.training_script_args):
        parsed = parser.parse_args(argv)
        config = Path(parsed.config)
        assert (REPO / config).is_file(), f"{config} is not a shipped config"
    assert args.training_script_args[0] == "train"
