"""HTML form bodies (urlencoded and multipart), read with a size cap and the standard library.

Starlette's own form parser needs python-multipart, which this package does
not depend on; the dashboard's forms are tiny (a token, a name, one alloy of
at most MAX_ALLOY_BYTES), so the stdlib parsers are enough, and the body is
refused as it streams in once it passes the cap, never buffered whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qs

from starlette.requests import Request


class FormTooBig(ValueError):
    """The body passed the cap; the request is answered 413."""


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.fields.get(name, "")


async def read_form(request: Request, *, limit: int) -> Form:
    """The request's form; FormTooBig past `limit` bytes. An unknown
    content type is an empty form (the handler then says what is missing)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormTooBig(f"the form is over {limit} bytes")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded"):
        pairs = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=100)
        return Form(fields={k: v[0] for k, v in pairs.items()})
    if ctype.startswith("multipart/form-data"):
        return _multipart(ctype, bytes(body))
    return Form()


def _multipart(ctype: str, body: bytes) -> Form:
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    form = Form()
    if not msg.is_multipart():
        return form
    for part in list(msg.iter_parts())[:100]:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            if data or filename:
                form.files[name] = Upload(filename, data)
        else:
            form.fields[name] = data.decode("utf-8", "replace")
    return form
