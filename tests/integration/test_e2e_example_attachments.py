"""examples/attachments/: a real Postfix sends mail through the bridge to the attachment filter.

The filter runs in the test's event loop (``make_app`` on a free loopback port) with a
secret; the bridge signs its eom requests with that secret and sends the body. A clean
message is delivered; a message with an executable, a zipped script or a screensaver two
multiparts deep is refused at end of data with 554 5.7.1 naming the file, and not delivered.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from email.message import EmailMessage

import pytest
import pytest_asyncio
from aiohttp import web

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event
from tests.test_examples import load

from .bridge import BridgeRunner, blocking, parse, smtp
from .postfix import PostfixInstance

pytestmark = pytest.mark.postfix

SECRET = "whsec_" + "YXR0YWNobWVudHMtZXhhbXBsZS10ZXN0LWtleQ=="
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest_asyncio.fixture
async def attachments_filter() -> AsyncIterator[str]:
    """The example's URL, served with SECRET on a free loopback port."""
    runner = web.AppRunner(load("attachments/filter.py").make_app([SECRET]), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


def endpoint(url: str) -> EndpointSettings:
    return EndpointSettings(
        name="attachments", url=url, events=frozenset({Event.EOM}), include_body=True, secrets=(SECRET,)
    )


def mail(subject: str, *files: tuple[str, str, bytes]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = RECIPIENT
    message["Subject"] = subject
    message.set_content("Please see the attachment.\n")
    for name, mime, data in files:
        maintype, subtype = mime.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return message


def wire(message: EmailMessage) -> bytes:
    return message.as_bytes().replace(b"\n", b"\r\n")


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def nested_screensaver() -> EmailMessage:
    """A multipart/mixed holding a PDF and another multipart/mixed that holds the .scr."""
    inner = EmailMessage()
    inner.set_content("the holiday pictures")
    inner.add_attachment(b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename="pictures.scr")
    outer = mail("holiday", ("summary.pdf", "application/pdf", PDF))
    outer.attach(inner)
    return outer


@pytest.mark.asyncio
async def test_clean_message_with_a_pdf_is_delivered(
    mta: PostfixInstance, bridges: BridgeRunner, attachments_filter: str
) -> None:
    await bridges.start(endpoint(attachments_filter))

    result = await smtp(mta, SENDER, [RECIPIENT], wire(mail("report", ("report.pdf", "application/pdf", PDF))))

    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    delivered = parse(raw)
    assert delivered["Subject"] == "report"
    assert [part.get_filename() for part in delivered.iter_attachments()] == ["report.pdf"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("message", "shown"),
    [
        pytest.param(
            wire(mail("invoice", ("invoice.pdf.exe", "application/octet-stream", b"MZ\x90\x00"))),
            "invoice.pdf.exe",
            id="exe",
        ),
        pytest.param(
            wire(mail("documents", ("documents.zip", "application/zip", zipped("open-me.js", b"WScript.Echo(1)")))),
            "documents.zip/open-me.js",
            id="zip-with-js",
        ),
        pytest.param(wire(nested_screensaver()), "pictures.scr", id="nested-multipart-scr"),
    ],
)
async def test_executable_attachment_is_refused(
    mta: PostfixInstance, bridges: BridgeRunner, attachments_filter: str, message: bytes, shown: str
) -> None:
    """Postfix answers the end of data with the filter's 554 5.7.1 naming the file and delivers nothing."""
    await bridges.start(endpoint(attachments_filter))

    result = await smtp(mta, SENDER, [RECIPIENT], message)

    reply = result.transaction.end_of_data
    assert reply is not None
    assert reply.code == 554
    assert reply.text == f"5.7.1 attachment {shown} refused: executable file name"
    assert not result.accepted
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []
