"""A small client for a running Signpost server: what it serves, and its answers on image files.

Requests go to the address the user named and nowhere else: no redirect is followed and no proxy from the
environment is used, so what is measured or checked is the server named, on the path the user gave. A server that
cannot be reached is a ``ConnectionError``; one that answers as no Signpost server would, or is not ready, a
``RuntimeError`` whose message says what to do.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from signpost.data.cache import SOURCES
from signpost.models.artifact import ModelCard


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Requests go to the URL the user named and nowhere else: a redirect is answered as the error it is."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxy from the environment either: the measurement is of the server named, on the path the user gave.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def service_url(url: str) -> str:
    """``url`` without a trailing slash, once it is checked to be an http(s) address of a server."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"--served {url!r}: give the server's address, e.g. http://127.0.0.1:8000")
    return url.rstrip("/")


def served_model(url: str, card: ModelCard, model_dir: Path, timeout_s: float) -> dict[str, Any]:
    """What the server says it serves (``GET /v1/model``), once checked to be the model in ``model_dir``."""
    try:
        with _OPENER.open(f"{url}/v1/model", timeout=timeout_s) as response:
            info = json.loads(response.read())
        served_card = info["card"]
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            raise RuntimeError(f"{url} is not ready yet ({_error_message(exc)}): wait until {url}/readyz answers 200, "
                               "then measure again") from None
        raise RuntimeError(f"{url}/v1/model answered HTTP {exc.code} ({_error_message(exc)}): is it a Signpost "
                           "server?") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot reach {url} ({_reason(exc)}): is `signpost serve --model {model_dir}` "
                              "running there?") from None
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"{url}/v1/model did not answer with a model card: is it a Signpost server?") from None
    if info.get("canary"):
        raise RuntimeError(f"{url} sends {info['canary'].get('share', 0):.0%} of its requests to a canary "
                           f"({info['canary'].get('version')}) beside {info.get('version')}: the answers would come "
                           "from two models; measure a server started without --canary")
    ours = card.model_dump(mode="json", exclude={"config"})
    differ = sorted(key for key in ours.keys() | served_card.keys() if ours.get(key) != served_card.get(key))
    if differ:
        raise RuntimeError(f"{url} serves {info.get('version')}, not the model in {model_dir}: their cards differ in "
                           f"{', '.join(differ)}; pass the served model with --model, or serve this one")
    return info


def ask_server(
    url: str, files: list[tuple[Path, str]], *, concurrency: int, timeout_s: float, api_key: str | None,
    progress: bool,
) -> list[tuple[int, str] | str]:
    """Each file's answer: (class id, model version), or why the server did not classify it (its HTTP error).

    A file changed since prepare, or a server that stops answering (refused, reset, timed out), ends the whole
    measurement at once: the requests not yet sent are dropped, so a hung server costs about one ``timeout_s``.
    """
    endpoint = f"{url}/v1/predict"
    headers = {"Content-Type": "application/octet-stream"} | ({"X-API-Key": api_key} if api_key else {})
    stop = threading.Event()

    def ask(path: Path, digest: str) -> tuple[int, str] | str:
        if stop.is_set():
            return "not sent"
        body = path.read_bytes()
        if hashlib.sha256(body).hexdigest() != digest:
            raise ValueError(f"{path} changed since the data was prepared (its sha256 differs from {SOURCES}'s): "
                             "run `signpost prepare` again")
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())
            return int(answer["class_id"]), str(answer["model_version"])
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}: {_error_message(exc)}"
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"{endpoint} stopped answering ({_reason(exc)}): is the server still "
                                  "running?") from None
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"{endpoint} did not answer with a prediction: is it a Signpost server?") from None

    answers: list[tuple[int, str] | str] = []
    with (
        ThreadPoolExecutor(concurrency, thread_name_prefix="signpost-parity") as pool,
        tqdm(total=len(files), desc="served", unit="img", disable=not progress, file=sys.stderr) as bar,
    ):
        futures = [pool.submit(ask, path, digest) for path, digest in files]
        try:
            for future in futures:
                answers.append(future.result())
                bar.update(1)
        except BaseException:
            stop.set()  # the threads drop what they have not sent yet
            for future in futures:
                future.cancel()
            raise
    return answers


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of a Signpost error answer (``{"error": {"message": ...}}``), else the HTTP reason."""
    try:
        return str(json.loads(exc.read())["error"]["message"])[:300]
    except Exception:  # any body at all may come back from something that is not a Signpost server
        return str(exc.reason)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason) or type(reason).__name__
