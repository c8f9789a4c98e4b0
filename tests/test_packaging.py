"""What each install pulls in, read from the installed package's metadata: a device's agent (`signpost[edge]`) gets
no web framework, tracking server or database layer, and a pipeline command run without them says what to install."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What a device must not install: the server's web stack, MLflow, the SQL layer and the ONNX toolchain.
SERVER_SIDE = {"fastapi", "starlette", "uvicorn", "mlflow", "mlflow-skinny", "sqlalchemy", "alembic", "onnxruntime",
               "prometheus-client", "psycopg", "matplotlib"}


def closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution ``name[extras]`` installs, following the installed packages' own requirements."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, extras)]
    while todo:
        dist_name, wanted = todo.pop()
        key = (canonicalize_name(dist_name), wanted)
        if key in seen:
            continue
        seen.add(key)
        for line in importlib.metadata.distribution(dist_name).requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in (*wanted, "")):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return {name for name, _ in seen}


def test_the_edge_install_has_no_server_side_packages() -> None:
    edge = closure("signpost", frozenset({"edge"}))
    assert "executorch" in edge and "torch" in edge and "cryptography" in edge
    assert not edge & SERVER_SIDE, f"signpost[edge] pulls in {sorted(edge & SERVER_SIDE)}"
    assert not closure("signpost") & SERVER_SIDE


def test_the_pipeline_extra_is_the_whole_tool() -> None:
    pipeline = closure("signpost", frozenset({"pipeline"}))
    assert {"fastapi", "uvicorn", "mlflow", "sqlalchemy", "alembic", "onnxruntime"} <= pipeline
    assert closure("signpost", frozenset({"dev"})) >= pipeline | closure("signpost", frozenset({"edge"}))


def test_a_pipeline_command_without_the_pipeline_extra_says_what_to_install(tmp_path) -> None:
    """`signpost serve` and `signpost rollback` on an edge-only install: uvicorn and MLflow (and the rest of the
    pipeline extra) cannot be imported, and each command ends in one line naming the extra, not a traceback."""
    blocker = textwrap.dedent("""
        import sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"mlflow", "fastapi", "sqlalchemy", "uvicorn", "onnxruntime"}:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Blocked())
        from signpost.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    for command, missing in (["serve", "--model", str(tmp_path)], "uvicorn"), (["rollback"], "mlflow"):
        done = subprocess.run([sys.executable, "-c", blocker, *command, f"workdir={tmp_path}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"needs {missing}, which is not installed: pip install 'signpost[pipeline]'" in done.stderr
        assert "Traceback" not in done.stderr
