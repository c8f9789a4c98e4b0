"""Typed contracts for files one stage writes and others read, beside their file names.

A reader gets a validated model or an ``ArtifactError`` that names the file and the field: never a ``KeyError`` from
a dict, and never a value a hand-edit slipped past the artifact's manifest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from signpost.artifacts import ArtifactError, read_manifest, verify_artifact

CANDIDATE = "candidate.json"  # written by the bench stage: the variant and runtime to deploy

Runtime = Literal["eager", "compile", "aoti", "onnxruntime"]
Math = Literal["default", "bf16", "no-onednn"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a variant or artifact folder name: no separators, no ".."


class SmallBatch(BaseModel):
    """The runtime that answered the smallest measured batch faster than the candidate's own, and from which batch
    size on the candidate's runtime wins."""

    model_config = ConfigDict(extra="forbid")

    runtime: Runtime
    math: Math
    below: int = Field(ge=1)
    reason: str


class Candidate(BaseModel):
    """``candidate.json``: the bench's deployable choice, one cell of its table."""

    model_config = ConfigDict(extra="forbid")

    variant: str = Field(description="the optimize variant's folder name, e.g. int8 or pruned")
    runtime: Runtime
    math: Math
    threads: int = Field(ge=1)
    batch: int = Field(ge=1)
    folder: str = Field(description="where the variant was when it was measured: <workdir>/optimize/<run>/<variant>")
    images_per_s: float = Field(ge=0)
    top1: float = Field(ge=0, le=1)
    reason: str
    small_batch: SmallBatch | None = None
    stable: bool | None = Field(
        None, description="false: chosen from a timing that never settled (no stable cell was left); None: a file "
        "written before the bench recorded it"
    )

    @field_validator("variant")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a variant folder name")
        return value


def read_candidate(bench_folder: Path) -> Candidate:
    """The bench folder's candidate, hash-checked against the bench manifest and validated."""
    bench_folder = Path(bench_folder)
    verify_artifact(bench_folder, [CANDIDATE], signed=True)
    path = bench_folder / CANDIDATE
    try:
        return Candidate.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()[:3])
        raise ArtifactError(f"{path}: not a valid candidate file ({problems})") from None


def candidate_variant(bench_folder: Path, candidate: Candidate, workdir: Path) -> Path:
    """The variant folder the candidate names: in the optimize run the bench measured (its manifest's inputs name it
    and its key), found beside the bench folder or in ``workdir``, never at a path the file alone chooses."""
    bench_folder = Path(bench_folder)
    inputs = read_manifest(bench_folder, signed=True).get("inputs", {})
    run, run_key = inputs.get("optimize"), inputs.get("optimize_key")
    if not isinstance(run, str) or not _NAME.fullmatch(run) or not run_key:
        raise ArtifactError(f"{bench_folder}: its manifest does not name the optimize run it measured")
    if Path(candidate.folder).parts[-2:] != (run, candidate.variant):
        raise ArtifactError(f"{bench_folder / CANDIDATE}: folder {candidate.folder!r} is not variant "
                            f"{candidate.variant!r} of the measured optimize run {run!r}")
    places = [bench_folder.resolve().parent.parent / "optimize" / run, Path(workdir) / "optimize" / run]
    for optimize_dir in places:
        if (optimize_dir / candidate.variant).is_dir():
            if read_manifest(optimize_dir, signed=True).get("key") != run_key:
                raise ArtifactError(f"{optimize_dir} is not the optimize run the bench measured (its key differs)")
            return optimize_dir / candidate.variant
    raise ArtifactError(f"{bench_folder}: variant {candidate.variant!r} of optimize run {run!r} not found in "
                        f"{' or '.join(str(p) for p in places)}")
