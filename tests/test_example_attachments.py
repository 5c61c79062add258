"""examples/attachments/: finding executable attachments, and the filter driven through the bridge."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from email.message import EmailMessage

import pytest
import pytest_asyncio
from aiohttp import web

from milterbridge.client import Envelope
from milterbridge.config import EndpointSettings
from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event
from tests.test_examples import SECRET, load, run

attachments = load("attachments/filter.py")
scan = attachments.scan

PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def make_zip(*members: tuple[str, bytes]) -> bytes:
    """A zip archive of ``(name, content)`` members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def flag_encrypted(archive: bytes) -> bytes:
    """``archive`` with the "encrypted" bit set on every member, as a password-protected zip has it.

    zipfile cannot write encrypted archives; the bit in the local and central headers is all a
    reader sees before it would ask for the password.
    """
    data = bytearray(archive)
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start != -1:
            data[start + flags_at] |= 0x1
            start = data.find(signature, start + 4)
    return bytes(data)


def mail(*files: tuple[str, str, bytes]) -> EmailMessage:
    """A text message with ``(filename, mime type, content)`` attachments."""
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "bob@example.net"
    message["Subject"] = "files"
    message.set_content("see attached\n")
    for name, mime, data in files:
        maintype, subtype = mime.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return message


def raw(*files: tuple[str, str, bytes]) -> bytes:
    return mail(*files).as_bytes()


@pytest.mark.parametrize(
    ("name", "blocked"),
    [
        ("setup.exe", True),
        ("invoice.pdf.exe", True),
        ("SCREEN.SCR", True),
        ("run.js. ", True),
        ("tools\\install.msi", True),
        ("dir/script.ps1", True),
        (".bat", True),
        ("report.pdf", False),
        ("exe", False),
        ("notes.exe.txt", False),
        ("archive.zip", False),
    ],
)
def test_blocked_name(name: str, blocked: bool) -> None:
    """The last extension decides; case, trailing dots and spaces and directories do not hide it."""
    assert attachments.blocked_name(name) is blocked


def test_clean_message_with_a_pdf_passes() -> None:
    """A PDF, a zip of documents and a plain text part are no finding."""
    zipped = make_zip(("minutes.txt", b"notes"), ("plan.pdf", PDF))
    assert scan(raw(("report.pdf", "application/pdf", PDF), ("docs.zip", "application/zip", zipped))) is None


def test_executable_name_is_found() -> None:
    finding = scan(raw(("report.pdf", "application/pdf", PDF), ("invoice.pdf.exe", "application/octet-stream", b"MZ")))
    assert finding == attachments.Finding("invoice.pdf.exe", "executable file name")
    assert finding.reply_text() == "attachment invoice.pdf.exe refused: executable file name"


def test_executable_type_is_found_whatever_the_name() -> None:
    finding = scan(raw(("data.bin", "application/x-msdownload", b"MZ")))
    assert finding == attachments.Finding("data.bin", "executable type application/x-msdownload")


def test_name_in_content_type_only_is_found() -> None:
    """An old mailer names the file in Content-Type's name parameter and gives no Content-Disposition."""
    message = (
        b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--b\r\nContent-Type: application/octet-stream; name="=?utf-8?B?cGF5LnBkZi5jb20=?="\r\n\r\nxx\r\n'
        b"--b--\r\n"
    )
    assert scan(message) == attachments.Finding("pay.pdf.com", "executable file name")


def test_nested_multipart_is_searched() -> None:
    """An attachment two multiparts deep is found."""
    inner = EmailMessage()
    inner.set_content("inner text")
    inner.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="holiday.scr")
    outer = mail(("report.pdf", "application/pdf", PDF))
    outer.attach(inner)
    assert outer.as_bytes().count(b"multipart/mixed") == 2
    assert scan(outer.as_bytes()) == attachments.Finding("holiday.scr", "executable file name")


def test_attached_message_is_searched() -> None:
    """A message/rfc822 part carrying an executable is found."""
    forwarded = mail(("tool.vbs", "application/octet-stream", b"MsgBox 1"))
    outer = mail()
    outer.add_attachment(forwarded)
    assert b"message/rfc822" in outer.as_bytes()
    assert scan(outer.as_bytes()) == attachments.Finding("tool.vbs", "executable file name")


def test_zip_member_is_found() -> None:
    zipped = make_zip(("readme.txt", b"hi"), ("docs/open.js", b"WScript.Echo(1)"))
    finding = scan(raw(("docs.zip", "application/zip", zipped)))
    assert finding == attachments.Finding("docs.zip/docs/open.js", "executable file name")


def test_zip_is_recognised_by_content_not_name() -> None:
    """A zip sent as application/octet-stream under another name is opened all the same."""
    zipped = make_zip(("a.jar", b"PK"))
    assert scan(raw(("photo.dat", "application/octet-stream", zipped))) == attachments.Finding(
        "photo.dat/a.jar", "executable file name"
    )


def test_nested_zip_is_found_up_to_the_depth_limit() -> None:
    deepest = make_zip(("payload.exe", b"MZ"))
    level2 = make_zip(("inner.zip", deepest))
    level1 = make_zip(("middle.zip", level2))
    finding = scan(raw(("outer.zip", "application/zip", level1)))
    assert finding == attachments.Finding("outer.zip/middle.zip/inner.zip/payload.exe", "executable file name")
    too_deep = make_zip(("deeper.zip", level1))
    finding = scan(raw(("outer.zip", "application/zip", too_deep)))
    assert finding is not None
    assert finding.name == "outer.zip/deeper.zip/middle.zip/inner.zip"
    assert finding.why == f"archives nested more than {attachments.MAX_ZIP_DEPTH} deep"


def test_encrypted_zip_is_refused() -> None:
    zipped = flag_encrypted(make_zip(("secret.pdf", PDF)))
    assert zipfile.ZipFile(io.BytesIO(zipped)).infolist()[0].flag_bits & 0x1
    finding = scan(raw(("locked.zip", "application/zip", zipped)))
    assert finding == attachments.Finding("locked.zip", "encrypted archive (its contents cannot be checked)")


def test_unreadable_zip_is_refused_unless_the_body_was_cut() -> None:
    broken = make_zip(("a.txt", b"x" * 100))[:60]
    message = raw(("files.zip", "application/zip", broken))
    assert scan(message) == attachments.Finding("files.zip", "archive that cannot be read (suspicious)")
    assert scan(message, truncated=True) is None


def test_too_many_parts_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_PARTS", 3)
    files = [(f"f{i}.txt", "text/plain", b"x") for i in range(3)]
    finding = scan(raw(*files))
    assert finding == attachments.Finding("(message)", "too complex to check: more than 3 MIME parts")
    assert scan(raw(*files[:1])) is None


def test_too_many_zip_members_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_ZIP_MEMBERS", 2)
    zipped = make_zip(("a.txt", b""), ("b.txt", b""), ("c.txt", b""))
    finding = scan(raw(("many.zip", "application/zip", zipped)))
    assert finding == attachments.Finding("(message)", "too complex to check: more than 2 files in many.zip")


def test_zip_bomb_stops_at_the_unpack_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachments, "MAX_UNPACKED_BYTES", 1000)
    inner = make_zip(("big.txt", b"\0" * 5000))
    zipped = make_zip(("a.zip", inner), ("b.zip", inner))
    finding = scan(raw(("bomb.zip", "application/zip", zipped)))
    assert finding is not None
    assert finding.why == "too complex to check: more than 1000 bytes unpacked from nested archives"


def test_reply_text_is_printable_ascii_and_short() -> None:
    finding = attachments.Finding("r\u00e9sum\u00e9" + "x" * 200 + ".exe", "executable file name")
    text = finding.reply_text()
    assert text.isascii()
    assert text.startswith("attachment r?sum?xxx")
    assert "..." in text
    assert len(text) < 200


# -- through the bridge -------------------------------------------------------------------


@pytest_asyncio.fixture
async def attachments_url() -> AsyncIterator[str]:
    runner = web.AppRunner(attachments.make_app([SECRET]), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


def endpoint(url: str, *, include_body: bool = True) -> EndpointSettings:
    return EndpointSettings(
        name="attachments", url=url, events=frozenset({Event.EOM}), include_body=include_body, secrets=(SECRET,)
    )


@pytest.mark.asyncio
async def test_filter_rejects_a_zipped_script_through_the_bridge(attachments_url: str) -> None:
    """The bridge's eom request (headers + body) is rebuilt into the message and the zip member found."""
    message = mail(("docs.zip", "application/zip", make_zip(("open.js", b"x"))))
    # A folded header: the bridge sends its value with an LF fold, the filter puts the CRLF back.
    folded = b"X-Folded: one\r\n two\r\n" + message.as_bytes().replace(b"\n", b"\r\n")
    result = await run((endpoint(attachments_url),), Envelope(), folded)
    assert result.final == m.ReplyCode(text=b"554 5.7.1 attachment docs.zip/open.js refused: executable file name")


@pytest.mark.asyncio
async def test_filter_passes_a_clean_message_through_the_bridge(attachments_url: str) -> None:
    message = mail(("report.pdf", "application/pdf", PDF)).as_bytes().replace(b"\n", b"\r\n")
    result = await run((endpoint(attachments_url),), Envelope(), message)
    assert result.eom is not None
    assert result.eom.reply == m.Continue()


@pytest.mark.asyncio
async def test_filter_without_the_body_tempfails(attachments_url: str) -> None:
    """An endpoint configured without include_body cannot check anything and says so."""
    result = await run((endpoint(attachments_url, include_body=False),), Envelope(), raw())
    assert isinstance(result.final, m.ReplyCode)
    assert result.final.text.startswith(b"451 4.3.5 ")
