"""Reading uploads, alone: ``uploads.read_images`` on a bare ASGI request, with no app, model or server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
from starlette.requests import Request

from signpost.serve import uploads

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def request(receive: Receive, content_type: str = "image/png", length: int | str | None = None) -> Request:
    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}, receive)


def chunks(*parts: bytes, then: str = "end") -> Receive:
    """A client sending ``parts``, then ending the body, leaving (``then="leave"``) or going quiet (``"stall"``)."""
    queue = list(parts)

    async def receive() -> MutableMapping[str, Any]:
        if queue:
            return {"type": "http.request", "body": queue.pop(0), "more_body": bool(queue) or then != "end"}
        if then == "leave":
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # "stall": nothing more ever arrives
        raise AssertionError("unreachable")

    return receive


def read(req: Request, **limits: Any) -> list[bytes]:
    return asyncio.run(uploads.read_images(req, **{"limit": 100, "max_images": 2, "timeout_s": 5.0, **limits}))


def multipart(*files: bytes) -> tuple[str, bytes]:
    boundary = "b0undary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="{i}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files))
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def test_a_raw_body_is_one_image_and_a_form_s_files_are_the_images_in_order() -> None:
    assert read(request(chunks(b"abc", b"def"))) == [b"abcdef"]
    kind, body = multipart(b"first", b"second")
    assert read(request(chunks(body), kind), limit=1000) == [b"first", b"second"]


@pytest.mark.parametrize(("kind", "body", "length", "status", "code"), [
    ("text/plain", b"x", None, 415, "unsupported_media_type"),
    ("", b"x", None, 415, "unsupported_media_type"),
    ("image/png", b"", None, 400, "empty_body"),
    ("image/png", b"x" * 101, None, 413, "payload_too_large"),  # streamed past the limit
    ("image/png", b"x", 101, 413, "payload_too_large"),  # declared past it: refused before reading
    ("multipart/form-data; boundary=zz", b"--zz--\r\n", None, 400, "no_files"),
    ("multipart/form-data; boundary=zz", b"garbage", None, 400, "bad_multipart"),
])
def test_bad_uploads_are_refused_naming_the_problem(kind: str, body: bytes, length: int | None, status: int,
                                                     code: str) -> None:
    with pytest.raises(uploads.Refused) as refused:
        read(request(chunks(body), kind, length))
    assert (refused.value.status, refused.value.code) == (status, code)


def test_a_non_numeric_content_length_and_too_many_files_are_refused() -> None:
    with pytest.raises(uploads.Refused, match="Content-Length 'ten' is not a number"):
        read(request(chunks(b"x"), length="ten"))
    kind, body = multipart(b"1", b"2", b"3")
    with pytest.raises(uploads.Refused, match=r"3 images in one request; the limit is 2 \(serve.max_batch_images\)"):
        read(request(chunks(body), kind), limit=1000)


def test_a_body_that_stops_arriving_is_408_and_reported_with_the_bytes_received() -> None:
    told: list[int] = []
    with pytest.raises(uploads.Refused) as refused:
        read(request(chunks(b"12345", then="stall")), timeout_s=0.05, on_timeout=told.append)
    assert (refused.value.status, refused.value.code) == (408, "body_timeout")
    assert refused.value.headers == {"Connection": "close"} and "serve.body_timeout_s" in refused.value.message
    assert told == [5]


def test_a_client_that_leaves_mid_body_is_an_abort_not_a_refusal() -> None:
    with pytest.raises(uploads.ClientAborted) as aborted:
        read(request(chunks(b"1234", b"56", then="leave")))
    assert aborted.value.received == 6
