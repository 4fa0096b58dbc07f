"""The scan a client sends to `POST /api/predict`, read by the server itself: the request body comes in as it
arrives (`request.stream()`), is parsed as multipart/form-data on the way (python-multipart's parser, the one
Starlette uses) and kept in memory. Nothing is written to disk, and nothing is read beyond the limit: a declared
Content-Length over it is refused before the body is read, a chunked body is cut off where it passes it.

>>> upload = await read_upload(request, max_bytes=20 * 2**20)      # doctest: +SKIP
>>> upload.name, upload.content_type, len(upload.data)              # doctest: +SKIP
('scan.png', 'image/png', 181223)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

OVERHEAD = 64 * 1024        # what multipart framing (boundaries, part headers, small fields) may add to the file


class UploadError(Exception):
    """An upload refused: the HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    name: str               # the file name the client gave, without any folder
    content_type: str
    data: bytes


@dataclass
class _Part:
    disposition: bytes = b""
    content_type: bytes = b""
    data: bytearray = field(default_factory=bytearray)


def _name(filename: bytes) -> str:
    """A client's file name without folders (either kind of separator), for messages and the JSON answer."""
    text = filename.decode("utf-8", "replace")
    return PurePosixPath(PureWindowsPath(text).name).name or "upload"


async def read_upload(request, max_bytes: int, field_name: str = "file") -> Upload:
    """The file in field `field_name` of the multipart body of `request`, at most `max_bytes`; raises UploadError
    (413 over the limit, 415 not multipart, 400 malformed, 422 without that field)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    media, params = parse_options_header(request.headers.get("content-type", ""))
    if media != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError(415, f"send the scan as multipart/form-data, in the field '{field_name}'")
    limit = max_bytes + OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise UploadError(413, f"upload of {int(declared):,} bytes is over the limit of {max_bytes:,}")

    parts: list[_Part] = []
    header = [b"", b""]                     # the part header being read: name, value

    def header_end() -> None:
        name = header[0].strip().lower()
        if name == b"content-disposition":
            parts[-1].disposition = header[1]
        elif name == b"content-type":
            parts[-1].content_type = header[1].strip()
        header[:] = [b"", b""]

    callbacks = {
        "on_part_begin": lambda: parts.append(_Part()),
        "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
        "on_header_end": header_end,
    }
    parser = MultipartParser(params[b"boundary"], callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise UploadError(413, f"upload is over the limit of {max_bytes:,} bytes")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as e:          # python-multipart's parse errors
        if e.__class__.__module__.startswith("python_multipart"):
            raise UploadError(400, "malformed multipart/form-data body") from None
        raise
    for part in parts:
        _, options = parse_options_header(part.disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") == field_name:
            if len(part.data) > max_bytes:
                raise UploadError(413, f"upload of {len(part.data):,} bytes is over the limit of {max_bytes:,}")
            kind = part.content_type.decode("latin-1").lower() or "application/octet-stream"
            return Upload(_name(options.get(b"filename", b"upload")), kind, bytes(part.data))
    raise UploadError(422, f"the form has no field '{field_name}' (the scan to analyse)")
