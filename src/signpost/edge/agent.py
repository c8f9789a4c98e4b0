"""``signpost edge run``: the device agent. It classifies images with a signed edge bundle, keeps every prediction in
the local log (``signpost.edge.locallog``) and ships the log to the central server (``signpost.edge.shipper``).

Images come from a watched folder, from a loopback HTTP endpoint, or both:

- the folder is polled; a file is taken once its size and modification time held still across two polls (a camera
  that writes in place is not read half-written; one that writes a temporary name and renames is taken at the second
  poll after the rename), hidden files and ``*.tmp``/``*.part`` are left alone. A classified file is logged, then
  moved to ``done/``; the log names it (name, size, mtime) until it is moved, so a file the agent was killed on
  before moving it is moved, not classified again. A file that does not decode, is over ``MAX_BODY`` bytes or is no
  regular file (a symlink, a FIFO) goes to ``rejected/`` with the reason beside it and in the log; a file that fails
  otherwise (taken away, a full disk) is logged and left alone until the next start;
- ``POST /v1/predict`` with the image as the body answers the class, its name, the confidence and the model
  version (400 naming the problem for a bad image, 413 over the size limit; 403 for a request from a web page,
  with an ``Origin``, or for another host name than 127.0.0.1/localhost); ``GET /status`` says what the log holds,
  the records dropped past the buffer bound and the shipper's last error.

Images are decoded exactly as the server decodes an upload (``signpost.data.images``: the header checked first,
turned upright, framed to the model's side) and the record carries the server's image statistics and output summary.
The bundle is re-resolved between polls: when ``--bundle`` (the ``current`` symlink) points somewhere new, that
bundle is opened (verified) and used from then on, each record naming the model version that made it; one that
fails to open is logged and the old one keeps running. An agent started while ``signpost edge update`` is
self-testing a bundle (or after it was killed doing so: the ``.update-pending`` file is still there) runs the bundle
that was current before. It does not fall back to ``previous`` on its own: a ``current`` that fails to open at
start is an error. SIGTERM (or Ctrl-C) finishes the current image and returns within about 20 s more: a shipping
request in flight may take its 10 s timeout, then shipping gets ``SHUTDOWN_FLUSH_S`` (5 s), and a request started
just before that ends may take 5 s more.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
import torch

from signpost.data.images import CorruptImageError, decode_image, frame_pixels, full_scale_side, open_header
from signpost.data.stats import STAT_NAMES, embedding_summary, image_stats
from signpost.edge.bundle import BundleError, open_bundle
from signpost.edge.locallog import LocalLog
from signpost.edge.shipper import Shipper
from signpost.edge.update import PENDING
from signpost.monitoring.records import PredictionRecord

log = logging.getLogger(__name__)

# signpost.serve.uploads.IMAGE_FORMATS (not imported: a device has no FastAPI); a test checks the two agree.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "PPM", "BMP", "WEBP", "GIF", "TIFF"})
MAX_PIXELS = 2048 * 2048  # the server's default serve.max_image_pixels
MAX_BODY = 20 * 1024 * 1024  # bytes one POST may carry
TOP_K = 5  # classes a record lists, as the server's default serve.top_k
SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")  # still being written, by convention
SHUTDOWN_FLUSH_S = 5.0  # what SIGTERM leaves for shipping before the agent exits, s
PENDING_WARN_S = 60.0  # how often a pending update is warned about while it lasts, s (not every poll)
MAX_REQUESTS = 4  # POSTs handled at once (each may hold MAX_BODY bytes); more get a 503
REQUEST_TIMEOUT_S = 30.0  # a client that sends nothing for this long is dropped, s


class BadImage(ValueError):
    """Bytes that are not an image the model can take; the message names why."""


@dataclass(frozen=True)
class Answer:
    """One classified image: what the HTTP endpoint answers, and the record logged for it."""

    record: PredictionRecord

    def json(self) -> dict[str, Any]:
        r = self.record
        return {"class_id": r.class_id, "class_name": r.class_name, "confidence": r.confidence,
                "model_version": r.model_version, "top_k": r.top_k, "latency_ms": r.latency_ms,
                "request_id": r.request_id}


class Model:
    """The bundle the agent runs, following ``--bundle`` when an update points it at another one."""

    def __init__(self, spec: Path, threads: int | None = None) -> None:
        self.spec = Path(spec)
        self.threads = threads
        self._target = self._pending_old() or self.spec.resolve()
        self.bundle = open_bundle(self._target)
        self._predictor = self.bundle.predictor(threads)
        self._lock = threading.Lock()  # one forward pass at a time: the HTTP threads and the folder share the
        # predictor, and ExecuTorch's thread pool is one per process
        self._ids = f"{secrets.token_hex(6)}-"
        self._count = 0
        self._pending_warned = 0.0  # time.monotonic() of the last warning about a pending update

    def _pending_old(self) -> Path | None:
        """The bundle that was current before an update whose self-test has not finished (its pending file beside
        ``--bundle``), when there is one: the new bundle is untested, and the update rolls it back if it fails."""
        pending = self.spec.parent / PENDING
        if not pending.exists():
            return None
        try:
            old = json.loads(pending.read_text(encoding="utf-8"))["old"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s): running %s as it points", pending, exc, self.spec)
            return None
        if not isinstance(old, str) or not (self.spec.parent / old).is_dir():  # a relative path: from the home
            log.warning("%s names no bundle that was current before (%r): running %s, untested", pending, old,
                        self.spec)
            return None
        log.warning("an update has not finished its self-test (%s): running the bundle current before it, %s",
                    pending, old)
        return (self.spec.parent / old).resolve()

    def refresh(self) -> None:
        """Switch to the bundle ``--bundle`` points at now, if it changed; keep the old one if it fails to open.
        While ``signpost edge update`` is self-testing the new bundle (its pending file beside the link), wait: a
        bundle that fails its self-test is switched back and never answers here."""
        if (self.spec.parent / PENDING).exists():
            if time.monotonic() - self._pending_warned >= PENDING_WARN_S:  # a killed update leaves it for good
                log.warning("%s: an update is self-testing a bundle (or was killed doing so; the next `signpost "
                            "edge update` rolls it back); still running %s", self.spec.parent / PENDING,
                            self.bundle.model_version)
                self._pending_warned = time.monotonic()
            return
        target = self.spec.resolve()
        if target == self._target:
            return
        self._target = target  # tried once per change of the link, not once per poll
        try:
            bundle = open_bundle(target)
            predictor = bundle.predictor(self.threads)
        except (BundleError, OSError, ValueError, RuntimeError) as exc:
            log.error("bundle %s cannot be opened (%s); still running %s", target, exc, self.bundle.model_version)
            return
        with self._lock:
            old, self.bundle, self._predictor = self.bundle.model_version, bundle, predictor
        log.warning("switched from model %s to %s (%s)", old, bundle.model_version, target)

    def classify(self, data: bytes) -> Answer:
        """Decode ``data`` as the server decodes an upload and classify it; ``BadImage`` when it is no image."""
        started = time.perf_counter()
        with self._lock:  # the bundle and its predictor together: a switch between the two reads would mix them
            bundle, predictor = self.bundle, self._predictor
        try:  # decoded outside the lock: another thread's forward pass runs meanwhile
            decoded = decode_image(open_header(data, max_pixels=MAX_PIXELS, formats=IMAGE_FORMATS,
                                               min_side=full_scale_side(bundle.image_size)))
            pixels = frame_pixels(decoded, bundle.image_size)  # uint8 [S, S, 3]
        except CorruptImageError as exc:
            raise BadImage(str(exc)) from None
        except Exception as exc:  # as the server's decoder: Pillow raises more kinds than it documents
            raise BadImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None
        with self._lock:
            logits = predictor.from_images(torch.from_numpy(pixels[None].copy())).float()
            self._count += 1
            request_id = f"{self._ids}{self._count:x}"
        log_probs = torch.log_softmax(logits, dim=1)[0]
        entropy = float(-(log_probs.exp() * log_probs).sum())
        top = torch.topk(log_probs, min(TOP_K, log_probs.shape[0]))
        ids, probs = top.indices.tolist(), top.values.exp().tolist()
        stats = image_stats(pixels[None].transpose(0, 3, 1, 2))[0].tolist()
        summary = embedding_summary(logits.numpy())[0].tolist()
        names = bundle.class_names
        record = PredictionRecord(
            ts=time.time(), request_id=request_id, model_version=bundle.model_version,
            class_id=ids[0], class_name=names[ids[0]] if ids[0] < len(names) else str(ids[0]),
            confidence=_finite(probs[0], 0.0, 1.0), entropy=_finite(entropy, 0.0),
            top_k=[(c, round(_finite(p, 0.0, 1.0), 6)) for c, p in zip(ids, probs, strict=True)],
            latency_ms=(time.perf_counter() - started) * 1000, width=decoded.size[0], height=decoded.size[1],
            orientation=decoded.orientation,
            **{name: _finite(v) for name, v in zip(STAT_NAMES, stats, strict=True)},
            **{f"emb{i}": _finite(v) for i, v in enumerate(summary)})
        return Answer(record)


def _finite(value: float, low: float = -1e30, high: float = 1e30) -> float:
    """A float the record accepts: non-finite values (a degenerate image's statistics) as the server logs them,
    0, and rounding error kept inside the field's bounds."""
    return min(high, max(low, float(value))) if np.isfinite(value) else 0.0


class Folder:
    """The watched folder: complete new files in, ``done/`` and ``rejected/`` out."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.done = self.root / "done"
        self.rejected = self.root / "rejected"
        for folder in (self.root, self.done, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        self._last: dict[str, tuple[int, int, int]] = {}  # name -> (size, mtime ns, inode) at the previous poll

    def ready(self) -> list[tuple[Path, str, int]]:
        """Entries whose size, mtime and inode held since the last poll, oldest first, each with its log key and
        inode. Symlinks, FIFOs and other non-files are listed too, for ``read`` to refuse; folders are not."""
        now: dict[str, tuple[int, int, int]] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(SKIPPED_SUFFIXES) or entry.is_dir(
                        follow_symlinks=False):
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # taken away since the listing
                now[entry.name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        ready = [name for name, seen in now.items() if self._last.get(name) == seen]
        self._last = now
        ready.sort(key=lambda name: (now[name][1], name))
        return [(self.root / name, f"{name}:{now[name][0]}:{now[name][1]}", now[name][2]) for name in ready]

    def read(self, path: Path, inode: int) -> bytes:
        """The bytes of the regular file ``path`` that was listed with ``inode``: never through a symlink, never
        blocking on a FIFO, never more than ``MAX_BODY`` bytes. ``BadImage`` naming why otherwise;
        ``FileNotFoundError`` when it was taken away or replaced since the listing."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadImage("a symbolic link, which is not followed: write the image itself into the folder") \
                    from None
            if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, or a device without a driver
                raise BadImage("not a regular file (a socket or a device): write the image as a file") from None
            raise
        with os.fdopen(fd, "rb") as file:
            stat = os.fstat(file.fileno())
            if not S_ISREG(stat.st_mode):
                raise BadImage("not a regular file (a FIFO, a device or a socket): write the image as a file")
            if stat.st_ino != inode:
                raise FileNotFoundError(errno.ENOENT, "replaced since it was listed", str(path))
            data = file.read(MAX_BODY + 1) if stat.st_size <= MAX_BODY else b""
        if stat.st_size > MAX_BODY or len(data) > MAX_BODY:
            raise BadImage(f"over {MAX_BODY:,} bytes: write a smaller image")
        return data

    def move(self, path: Path, to: Path) -> Path:
        """Move ``path`` into ``to``, under a new name if one is taken there."""
        target = to / path.name
        n = 0
        while os.path.lexists(target):  # a link there counts as taken, wherever it points
            n += 1
            target = to / f"{path.stem}.{n}{path.suffix}"
        os.replace(path, target)
        return target


@dataclass(frozen=True)
class Status:
    """The agent's status line and ``GET /status``."""

    classified: int
    rejected: int
    unshipped: int
    shipped: int
    dropped: int
    model_version: str
    shipping_error: str
    failed: int = 0  # watched files skipped until the next start (see the agent's log for why)

    def line(self) -> str:
        failed = f", failed {self.failed} (see the log)" if self.failed else ""
        text = (f"model {self.model_version}: classified {self.classified}, rejected {self.rejected}{failed}; log: "
                f"{self.unshipped} to ship, {self.shipped} shipped, {self.dropped} dropped past --max-buffer")
        return text + (f"; shipping: {self.shipping_error}" if self.shipping_error else "")


class Agent:
    """The agent (see the module doc): ``run`` until ``stop`` is set."""

    def __init__(self, model: Model, log_: LocalLog, *, folder: Path | None = None, port: int | None = None,
                 shipper: Shipper | None = None, poll_s: float = 0.5) -> None:
        if folder is None and port is None:
            raise ValueError("give --watch DIR, --listen PORT or both: the agent needs images to classify")
        self.model = model
        self.log = log_
        self.folder = None if folder is None else Folder(folder)
        self.shipper = shipper
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.classified = 0
        self.rejected = 0
        self.failed = 0  # files that failed otherwise (taken away, a full disk): left alone until the next start
        self._skipped: set[str] = set()  # their keys
        self._counts = threading.Lock()
        self.server = None if port is None else _server(self, port)

    @property
    def port(self) -> int | None:
        return None if self.server is None else self.server.server_address[1]

    def status(self) -> Status:
        log_status = self.log.status()
        error = "" if self.shipper is None else self.shipper.status.last_error
        return Status(self.classified, self.rejected, log_status.unshipped, log_status.shipped, log_status.dropped,
                      self.model.bundle.model_version, error, self.failed)

    def classify(self, data: bytes, source: str | None = None) -> Answer:
        """Classify one image and keep its record (committed before this returns)."""
        answer = self.model.classify(data)
        self.log.add(answer.record, source)
        with self._counts:
            self.classified += 1
        return answer

    def run(self, *, on_status: Callable[[Status], None] | None = None, status_s: float = 60.0) -> None:
        """Serve and poll until ``stop``; then ship what can be shipped in ``SHUTDOWN_FLUSH_S`` and close."""
        threads = []
        if self.server is not None:
            threads.append(threading.Thread(target=self.server.serve_forever, args=(0.2,), name="edge-http",
                                            daemon=True))
        if self.shipper is not None:
            threads.append(threading.Thread(target=self.shipper.run, args=(self.stop,), name="edge-ship",
                                            daemon=True))
        for thread in threads:
            thread.start()
        next_status = time.monotonic() + status_s
        try:
            while not self.stop.is_set():
                self.model.refresh()
                if self.folder is not None:
                    self.poll()
                if on_status is not None and time.monotonic() >= next_status:
                    on_status(self.status())
                    next_status = time.monotonic() + status_s
                self.stop.wait(self.poll_s)
        finally:
            self.stop.set()
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
            for thread in threads:
                thread.join(timeout=15)
            if self.shipper is not None and not self.shipper.flush(SHUTDOWN_FLUSH_S):
                log.warning("%d records not shipped yet: they stay in %s for the next start",
                            self.log.status().unshipped, self.log.path)
            if on_status is not None:
                on_status(self.status())

    def poll(self) -> None:
        """Classify the watched folder's complete new files, one at a time, until there are none or ``stop``. A
        file that fails in a way it cannot be blamed for (taken away, a full disk, a bug) is logged and skipped
        until the next start; the agent goes on with the others."""
        assert self.folder is not None
        for path, key, inode in self.folder.ready():
            if self.stop.is_set():
                return  # the current image was finished; the rest wait for the next start
            if key in self._skipped:
                continue
            try:
                self._take(path, key, inode)
            except FileNotFoundError:
                continue  # taken away (or replaced) since the listing: a replacement is listed anew
            except Exception:
                log.exception("%s failed; left in %s until the next start", path.name, self.folder.root)
                self._skipped.add(key)
                with self._counts:
                    self.failed += 1

    def _take(self, path: Path, key: str, inode: int) -> None:
        """Classify one listed file and move it to ``done/``, or to ``rejected/`` with the reason beside it."""
        assert self.folder is not None
        if not self.log.seen(key):  # seen: classified before a kill, not moved yet
            try:
                self.classify(self.folder.read(path, inode), key)
            except (BadImage, PermissionError) as exc:  # not an image, or unreadable: out of the way, with why
                reason = str(exc) if isinstance(exc, BadImage) else f"cannot read it: {exc.strerror}"
                moved = self.folder.move(path, self.folder.rejected)
                moved.with_name(moved.name + ".reason.txt").write_text(f"{reason}\n", encoding="utf-8")
                log.warning("rejected %s: %s", path.name, reason)
                with self._counts:
                    self.rejected += 1
                return
        try:
            self.folder.move(path, self.folder.done)
        except FileNotFoundError:  # the producer took it away after it was classified: the record stands
            log.warning("%s was classified but taken away before it could be moved to done/", path.name)
        self.log.moved(key)  # out of the folder: a new file with the same name, size and time is new


def _server(agent: Agent, port: int) -> ThreadingHTTPServer:
    """The loopback endpoint (see the module doc); port 0 takes a free one (``Agent.port``).

    Loopback is not enough on its own: any web page the device's browser opens can POST to it, and a page whose name
    is rebound to 127.0.0.1 can read it. So a request that carries an ``Origin`` (browsers send one with such a
    POST) or names another host than 127.0.0.1/localhost is a 403; local programs send neither."""
    busy = threading.BoundedSemaphore(MAX_REQUESTS)

    class Handler(BaseHTTPRequestHandler):
        server_version = "signpost-edge"
        timeout = REQUEST_TIMEOUT_S  # the socket's: a client that stalls does not hold a thread for ever

        def do_POST(self) -> None:
            if self._foreign():
                return
            if self.path.split("?")[0] != "/v1/predict":
                return self._send(404, {"error": "not_found", "message": "POST an image to /v1/predict"})
            length = self.headers.get("Content-Length")
            if length is None:
                return self._send(411, {"error": "length_required", "message": "send the image with a "
                                        "Content-Length (curl --data-binary @image.png)"})
            if not (length.isascii() and length.isdigit()):
                self.close_connection = True  # the body's end is unknown: the connection cannot be reused
                return self._send(400, {"error": "bad_content_length", "message": f"Content-Length {length!r} is "
                                        "not a number of bytes: send the image's length in decimal"})
            if int(length) > MAX_BODY:
                self.close_connection = True
                return self._send(413, {"error": "payload_too_large", "message": f"the image is over "
                                        f"{MAX_BODY:,} bytes: send a smaller one"})
            if not busy.acquire(blocking=False):
                self.close_connection = True
                return self._send(503, {"error": "busy", "message": f"{MAX_REQUESTS} images are being "
                                        "classified already: send it again in a moment"})
            try:
                self._predict(int(length))
            finally:
                busy.release()

        def _predict(self, length: int) -> None:
            try:
                data = self.rfile.read(length)
            except OSError:  # timed out or reset mid-body: nobody is left to answer
                self.close_connection = True
                return
            try:
                answer = agent.classify(data)
            except BadImage as exc:
                return self._send(400, {"error": "invalid_image", "message": f"{exc}: send a JPEG, PNG, PPM, "
                                        "BMP, WebP, GIF or TIFF image as the body"})
            except Exception:  # the log's disk full, a bug: the caller gets a 500, the agent goes on
                log.exception("classifying a POSTed image failed")
                return self._send(500, {"error": "internal", "message": "the agent could not classify or log "
                                        "the image; see its log"})
            self._send(200, answer.json())

        def do_GET(self) -> None:
            if self._foreign():
                return
            path = self.path.split("?")[0]
            if path == "/status":
                return self._send(200, agent.status().__dict__)
            if path == "/healthz":
                return self._send(200, {"status": "ok"})
            self._send(404, {"error": "not_found", "message": "GET /status or /healthz; POST /v1/predict"})

        def _foreign(self) -> bool:
            """Answer 403 (and say so) to a request from a browser page or for another host name."""
            host = self.headers.get("Host", "127.0.0.1")  # HTTP/1.0 may send none; a browser always does
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # without the port
            if self.headers.get("Origin") is None and name.lower() in ("127.0.0.1", "localhost"):
                return False
            self.close_connection = True
            self._send(403, {"error": "forbidden", "message": "requests from web pages (an Origin header) or for "
                             "another host name are refused: call 127.0.0.1 from a local program"})
            return True

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise ValueError(f"--listen {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror}); choose another "
                         "port, or 0 for a free one") from None
    server.daemon_threads = True
    return server
