"""The service's fixtures, for the attacks on it that live here (pytest finds fixtures in conftest files only)."""

from tests.serve.conftest import make_client  # noqa: F401
