"""Example filter (milterbridge.sdk): refuse messages that carry executable attachments.

At ``eom`` (the endpoint needs ``include_body = true``) the message is rebuilt from the
request's headers and body and parsed with the standard library's email parser. Every MIME
part is checked, inside nested multiparts, attached messages (``message/rfc822``) and zip
archives (zips inside zips up to ``MAX_ZIP_DEPTH``):

* a file name whose last extension is in ``BLOCKED_EXTENSIONS`` (``invoice.pdf.exe`` too;
  trailing dots and spaces, which Windows ignores, are ignored here as well);
* a part whose MIME type is in ``BLOCKED_TYPES``;
* an encrypted zip, or an attachment that claims to be a zip or starts like one but cannot
  be read: its contents cannot be checked, so it is refused as suspicious;
* a message beyond the work limits (``MAX_PARTS`` parts, ``MAX_ZIP_MEMBERS`` members per
  zip, ``MAX_UNPACKED_BYTES`` unpacked for nested zips): refused as too complex to check.

The first finding refuses the message with ``554 5.7.1`` and a text naming the file (for a
file inside a zip: ``outer.zip/inner.js``). Anything else continues. When the bridge cut the
body (``max_body_bytes``), the parts that arrived are still checked, but an archive that does
not open is not held against the message, since the cut may be what broke it. An endpoint
without ``include_body`` gets every message tempfailed (451 4.3.5), so the mistake shows.

Run: ``FILTER_SECRET=whsec_... python filter.py`` (``--host``/``--port`` or ``HOST``/``PORT``;
default 127.0.0.1:8082) and point an endpoint at ``http://127.0.0.1:8082/``. Without
``FILTER_SECRET`` it refuses to start. A handler that raises (a message the parser chokes
on) gets a 500, and the endpoint's ``on_error`` decides.
"""

from __future__ import annotations

import argparse
import email
import email.message
import email.policy
import io
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from milterbridge import sdk

#: File name extensions that run code on a click (Windows and Java), lower case, with the dot.
BLOCKED_EXTENSIONS: Final = frozenset(
    {
        ".exe", ".scr", ".com", ".bat", ".cmd", ".pif", ".cpl", ".msi", ".msp", ".dll",
        ".js", ".jse", ".vbs", ".vbe", ".wsf", ".wsh", ".hta", ".ps1", ".psm1", ".jar",
        ".lnk", ".reg",
    }
)  # fmt: skip
#: MIME types of executables and scripts, whatever the file is called.
BLOCKED_TYPES: Final = frozenset(
    {
        "application/x-msdownload",
        "application/x-msdos-program",
        "application/x-dosexec",
        "application/x-executable",
        "application/vnd.microsoft.portable-executable",
        "application/x-msi",
        "application/x-ms-installer",
        "application/java-archive",
        "application/x-java-archive",
        "application/javascript",
        "application/x-javascript",
        "text/javascript",
        "application/x-vbscript",
        "text/vbscript",
        "application/x-bat",
        "application/hta",
    }
)
ZIP_TYPES: Final = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})

#: MIME parts checked in one message (nested ones included).
MAX_PARTS: Final = 500
#: Members checked in one zip archive.
MAX_ZIP_MEMBERS: Final = 1000
#: Zips inside zips: the outer archive is depth 1.
MAX_ZIP_DEPTH: Final = 3
#: Bytes unpacked from all nested zips of one message together (a zip bomb stops here).
MAX_UNPACKED_BYTES: Final = 20 * 1024 * 1024

#: The longest file name shown in a reply; longer ones are cut with "...".
_MAX_SHOWN_NAME: Final = 120


@dataclass(frozen=True, slots=True)
class Finding:
    """Why a message is refused: the file (``a.zip/b.js`` inside an archive) and the rule it broke."""

    name: str
    why: str

    def reply_text(self) -> str:
        """The SMTP reply text: printable ASCII only, the name cut to a sane length."""
        shown = "".join(c if " " <= c <= "~" else "?" for c in self.name)
        if len(shown) > _MAX_SHOWN_NAME:
            shown = shown[: _MAX_SHOWN_NAME - 3] + "..."
        return f"attachment {shown} refused: {self.why}"


class _TooComplex(Exception):
    """A work limit was reached before the message was fully checked."""


def blocked_name(name: str) -> bool:
    """True when ``name`` ends in an executable extension (``invoice.pdf.exe``, ``run.JS. ``)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(". \t").lower()
    _, dot, extension = base.rpartition(".")
    return bool(dot) and f".{extension}" in BLOCKED_EXTENSIONS


def _names(part: email.message.Message) -> Iterator[str]:
    """The file names a part gives: Content-Disposition's filename and Content-Type's name."""
    for name in (part.get_filename(), part.get_param("name")):
        if isinstance(name, str) and name:
            yield name


class _Scan:
    """One message's check, with its work budget."""

    def __init__(self, truncated: bool) -> None:
        self.truncated = truncated
        self.parts = 0
        self.unpacked = 0

    def message(self, message: email.message.Message) -> Finding | None:
        # walk() descends into multiparts and message/rfc822 parts alike.
        for part in message.walk():
            self.parts += 1
            if self.parts > MAX_PARTS:
                raise _TooComplex(f"more than {MAX_PARTS} MIME parts")
            finding = self.part(part)
            if finding is not None:
                return finding
        return None

    def part(self, part: email.message.Message) -> Finding | None:
        names = list(_names(part))
        label = names[0] if names else f"of type {part.get_content_type()}"
        for name in names:
            if blocked_name(name):
                return Finding(name, "executable file name")
        content_type = part.get_content_type()
        if content_type in BLOCKED_TYPES:
            return Finding(label, f"executable type {content_type}")
        if part.is_multipart() or part.get_content_maintype() in ("multipart", "message"):
            return None
        claims_zip = content_type in ZIP_TYPES or any(n.lower().endswith(".zip") for n in names)
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        if claims_zip or payload.startswith(b"PK\x03\x04"):
            return self.archive(payload, label, depth=1)
        return None

    def archive(self, data: bytes, path: str, depth: int) -> Finding | None:
        if depth > MAX_ZIP_DEPTH:
            return Finding(path, f"archives nested more than {MAX_ZIP_DEPTH} deep")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return self.members(archive, path, depth)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError):
            if self.truncated:
                return None
            return Finding(path, "archive that cannot be read (suspicious)")

    def members(self, archive: zipfile.ZipFile, path: str, depth: int) -> Finding | None:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise _TooComplex(f"more than {MAX_ZIP_MEMBERS} files in {path}")
        for member in members:
            inner = f"{path}/{member.filename}"
            if blocked_name(member.filename):
                return Finding(inner, "executable file name")
        for member in members:
            if member.flag_bits & 0x1:
                return Finding(path, "encrypted archive (its contents cannot be checked)")
        for member in members:
            if member.is_dir() or not member.filename.lower().endswith(".zip"):
                continue
            budget = MAX_UNPACKED_BYTES - self.unpacked
            with archive.open(member) as stream:
                data = stream.read(budget + 1)
            self.unpacked += len(data)
            if len(data) > budget:
                raise _TooComplex(f"more than {MAX_UNPACKED_BYTES} bytes unpacked from nested archives")
            finding = self.archive(data, f"{path}/{member.filename}", depth + 1)
            if finding is not None:
                return finding
        return None


def scan(raw: bytes, *, truncated: bool = False) -> Finding | None:
    """The first reason to refuse the message ``raw`` (headers and body), or ``None`` if it is clean.

    ``truncated``: the body was cut, so an archive that does not open is let through.
    """
    message = email.message_from_bytes(raw, policy=email.policy.default)
    scanner = _Scan(truncated)
    try:
        return scanner.message(message)
    except _TooComplex as exc:
        return Finding("(message)", f"too complex to check: {exc}")


def message_bytes(message: sdk.Message) -> bytes:
    """The message as the MTA received it: the headers (LF folds made CRLF), an empty line, the body."""
    lines = [
        h.name_bytes + b":" + h.value_bytes.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for h in message.headers
    ]
    body = message.body.bytes if message.body is not None else b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def check(request: sdk.Request) -> sdk.Decision | None:
    """The handler: refuse at ``eom`` when :func:`scan` finds something; continue otherwise."""
    if not isinstance(request, sdk.EomRequest) or request.message is None:
        return None
    message = request.message
    if message.body is None:
        # Without the body there is nothing to check; letting the mail through would hide the mistake.
        return sdk.tempfail(451, "4.3.5", "attachment filter misconfigured", reason="no body: set include_body = true")
    truncated = message.body.truncated or "body" in message.truncated
    finding = scan(message_bytes(message), truncated=truncated)
    if finding is None:
        return None
    return sdk.reject(554, "5.7.1", finding.reply_text(), reason=f"{finding.why}: {finding.name}")


def make_app(secrets: list[str]) -> web.Application:
    """The filter as an aiohttp application answering ``POST /``."""
    return sdk.make_app(check, secrets=secrets)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8082")))
    args = parser.parse_args()
    secret = os.environ.get("FILTER_SECRET", "").split()
    if not secret:
        sys.exit("set FILTER_SECRET to the endpoint's whsec_ secret (two, space-separated, during a rotation)")
    web.run_app(make_app(secret), host=args.host, port=args.port)
