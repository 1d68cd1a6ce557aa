"""Streamed multipart uploads: the `file` part goes to disk under a server-made name, capped.

The request body is parsed as it arrives (python-multipart's push parser), so an upload over
the limit is refused (413) as soon as the limit is crossed (or at once, from Content-Length),
never held in memory, and never stored under the client's file name. A disk that fills up
during the upload is 507 ("no space left on the device"), the partial file removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from avatars.store_io import NO_SPACE, is_no_space

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 1024  # a text field (name, bbox_shift)
MAX_PARTS = 8


class UploadError(Exception):
    """The upload is refused; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _storage_error(exc: OSError) -> UploadError:
    """A failed write of the upload: 507 on a full disk, else 503."""
    if is_no_space(exc):
        log.warning("no space for an upload", extra={"error": exc.strerror})
        return UploadError(507, f"{NO_SPACE}: the upload cannot be stored")
    log.error("could not store an upload", extra={"error": repr(exc)})
    return UploadError(503, "the upload could not be stored; see the server log")


@dataclass
class Upload:
    path: Path | None = None  # the stored `file` part
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None


class _Collector:
    """Callbacks of the multipart parser: routes each part to a file or a field."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.upload = Upload()
        self._fd: int | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buf = bytearray()
        self._parts = 0

    # header callbacks
    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise UploadError(400, f"at most {MAX_PARTS} form parts are allowed")
        self._headers = {}
        self._name = None
        self._is_file = False
        self._buf = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        if name == "file":
            if self.upload.path is not None:
                raise UploadError(400, "only one `file` part is allowed")
            path = self.folder / f"upload-{secrets.token_hex(12)}"
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise _storage_error(exc) from None
            self.upload.path = path
            self._is_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._is_file:
            self.upload.size += n
            if self.upload.size > self.max_bytes:
                raise UploadError(413, f"the file is larger than {self.max_bytes} bytes")
            if self._fd is not None:
                self._write(self._fd, memoryview(data)[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > MAX_FIELD_BYTES:
                raise UploadError(
                    400, f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes"
                )

    def on_part_end(self) -> None:
        if self._is_file:
            self.close_file()
        elif self._name:
            self.upload.fields[self._name] = self._buf.decode("utf-8", "replace")

    def _write(self, fd: int, view: memoryview) -> None:
        """Unbuffered: a full disk shows here, at the chunk that did not fit."""
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise _storage_error(exc) from None

    def close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


async def receive_upload(request: Request, folder: Path, max_bytes: int) -> Upload:
    """Parse a multipart/form-data body; the `file` part is stored in `folder`."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(400, "send the file as multipart/form-data with a `file` part")
    length = request.headers.get("content-length")
    slack = 64 * 1024  # multipart framing and small fields
    if length is not None and length.isdigit() and int(length) > max_bytes + slack:
        raise UploadError(413, f"the file is larger than {max_bytes} bytes")
    collector = _Collector(folder, max_bytes)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        collector.close_file()
        collector.upload.discard()
        raise
    except Exception as exc:
        collector.close_file()
        collector.upload.discard()
        log.info("malformed upload", extra={"error": type(exc).__name__})
        raise UploadError(400, "the multipart body is malformed") from None
    collector.close_file()
    if collector.upload.path is None:
        raise UploadError(400, "the form has no `file` part")
    if collector.upload.size == 0:
        collector.upload.discard()
        raise UploadError(400, "the uploaded file is empty")
    return collector.upload
