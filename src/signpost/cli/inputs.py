"""Finding a command's inputs: the artifact named with --data/--model/..., else the newest of this experiment (made
with its settings) or the one a model or variants were made from, each printed as the input used."""

from __future__ import annotations

import json
from pathlib import Path

from signpost.artifacts import ArtifactError, find_artifact
from signpost.config import SignpostConfig

# What each stage's artifact is to the command that reads it.
_INPUT = {"data": "data", "train": "model", "evaluate": "evaluation", "optimize": "variants", "bench": "bench"}


def given(who: str, stage: str, path: Path | str | None, option: str) -> Path | None:
    """The input artifact the user named with ``option``, printed as the one used (None when not given)."""
    if path is None:
        return None
    print(f"{who}: {_INPUT[stage]} {path} ({option})")
    return Path(path)


def latest(
    config: SignpostConfig, who: str, stage: str, option: str | None, settings: dict | None = None
) -> tuple[Path | None, list[str]]:
    """The newest ``stage`` artifact of this experiment (its manifest names it; with ``settings``, made with them),
    printed with why it was picked, and each newer look-alike passed over with the option that picks it instead."""
    found, passed_over = find_artifact(config.workdir, stage, config.name, settings)
    if found is not None:
        print(f"{who}: {_INPUT[stage]} {found} (newest for experiment {config.name})")
        for miss in passed_over:
            print(f"  passed over {miss}" + (f": pass it with {option} to use it" if option else ""))
    return found, passed_over


def newest(
    config: SignpostConfig, who: str, stage: str, command: str, option: str, settings: dict | None = None
) -> Path:
    """``latest``, required: none is an error naming what was found instead and how to use it."""
    found, passed_over = latest(config, who, stage, option, settings)
    if found is None:
        which = " made with this config's settings" if settings is not None else ""
        seen = f"; found {', '.join(passed_over)}: pass one with {option} to use it" if passed_over else ""
        raise ArtifactError(f"no {stage} artifact of experiment {config.name!r}{which} in {config.workdir}: run "
                            f"`{command}` first{seen}")
    return found


def served(model: Path | None) -> Path | None:
    """The model the prediction log names, printed as monitor's input when there is one."""
    if model is not None:
        print(f"monitor: model {model} (it made most of the window's predictions)")
    return model


def newest_data(config: SignpostConfig, who: str) -> Path:
    """The newest prepared data of this experiment made with this config's data settings: another experiment's, or
    this one's prepared with other settings, would silently train or compare on other images."""
    from signpost.stages.prepare import data_settings

    return newest(config, who, "data", "signpost prepare", "--data", data_settings(config))


def model_data(config: SignpostConfig, model: Path, who: str) -> Path:
    """The prepared data a model was trained on, as its card names it."""
    from signpost.artifacts import read_manifest
    from signpost.models.artifact import CARD

    read_manifest(model, signed=True)  # a missing, unfinished or unsigned folder is a clear error here
    card = json.loads((model / CARD).read_text(encoding="utf-8"))
    data = config.workdir / "data" / card["data_artifact"]
    print(f"{who}: data {data} (the model was trained on it, says its card)")
    return data


def optimized_data(config: SignpostConfig, optimized: Path) -> Path:
    """The prepared data the optimized model was made from, as its manifest names it."""
    from signpost.artifacts import read_manifest

    data = config.workdir / "data" / read_manifest(optimized)["inputs"]["data"]
    print(f"bench: data {data} (the variants were made from it)")
    return data
