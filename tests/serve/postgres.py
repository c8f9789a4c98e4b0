"""A real PostgreSQL server for the tests: Debian's package, started in a temporary folder on a free loopback port.

initdb refuses to run as root, so as root (CI's container) the server runs as the ``postgres`` user the Debian
package makes, in a folder that user owns; as anyone else (a GitHub runner, a laptop) it runs as that user. Its
unix socket lives in the same folder, nothing listens beyond 127.0.0.1, and ``stop`` shuts it down fast.
PostgreSQL missing is a failure that says what to install, not a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

INSTALL = "PostgreSQL's server is not installed: apt-get install postgresql (`make test` installs it)"
USER = "signpost"  # the database superuser initdb makes; trust authentication, loopback only


class Postgres:
    """A running server: ``url(db)`` for a database made by ``database()``."""

    def __init__(self, folder: Path, port: int, run_as: list[str]) -> None:
        self.folder, self.port, self.run_as = folder, port, run_as

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its name."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return name


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parents[1].name))
    if not found:
        pytest.fail(INSTALL)
    return Path(found[-1]).parent  # the newest major version installed


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a fresh cluster, yield it, stop it and remove its folder."""
    bin_dir = _binaries()
    # Not pytest's tmp_path: that sits under a root-only folder that the postgres user could not enter.
    folder = Path(tempfile.mkdtemp(prefix="signpost-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"no postgres user to run PostgreSQL as (not as root): {INSTALL}")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "--no-sync",
                        "-E", "UTF8"], check=True, capture_output=True, text=True, timeout=120)
        # fsync off: a test cluster need not survive a power cut, and the tests should not wait on the disk.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=60"
        started = subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"),
                                  "-o", options, "-w", "-t", "60", "start"], capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            log = (folder / "log").read_text(errors="replace") if (folder / "log").exists() else ""
            pytest.fail(f"PostgreSQL did not start: {started.stderr.strip()} {log[-2000:]}")
        try:
            yield Postgres(folder, port, run_as)
        finally:
            subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"initdb failed: {exc.stderr.strip()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
