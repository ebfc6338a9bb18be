"""TLS on the loop: create_server/open_connection with ssl, start_tls upgrade.

The certificate is self-signed, made here: with the ``cryptography`` package if it is
installed, else with the ``openssl`` command; the tests skip when neither is there.
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import shutil
import ssl
import subprocess
import sys

import pytest

from .utils import CollectProtocol, MiB, payload, requires, run

pytestmark = pytest.mark.timeout(60)

HOSTNAME = "localhost"


def _make_cert_cryptography(cert_path, key_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(HOSTNAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _make_cert_openssl(cert_path, key_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key_path), "-out", str(cert_path), "-days", "2",
         "-subj", f"/CN={HOSTNAME}",
         "-addext", f"subjectAltName=DNS:{HOSTNAME},IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("no way to make a certificate: neither the cryptography package "
                        "nor the openssl command is available")
        try:
            _make_cert_openssl(cert_path, key_path)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"openssl could not make a self-signed certificate: {e}")
    else:
        _make_cert_cryptography(cert_path, key_path)
    return cert_path, key_path


@pytest.fixture
def server_ctx(cert_files):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert_files)
    return ctx


@pytest.fixture
def client_ctx(cert_files):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert_files[0]))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


async def echo_handler(reader, writer):
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


def test_tls_stream_echo(loop, server_ctx, client_ctx):
    requires(loop, "tls")
    data = payload(2 * MiB + 5)

    async def main():
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=HOSTNAME)
            sslobj = writer.get_extra_info("ssl_object")
            assert sslobj is not None and sslobj.version().startswith("TLS")
            assert writer.get_extra_info("peercert")["subject"]
            assert writer.get_extra_info("cipher") is not None

            async def send():
                for i in range(0, len(data), 200_000):
                    writer.write(data[i:i + 200_000])
                    await writer.drain()

            sender = asyncio.create_task(send())
            got = await reader.readexactly(len(data))
            await sender
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_tls_verification_failure(loop, loop_errors, server_ctx):
    """A client that does not trust the certificate fails the handshake."""
    requires(loop, "tls")
    if loop.get_debug():     # in debug mode asyncio reports the server side's failure too
        loop_errors.expect(message="Error on transport creation", min_count=0)

    async def main():
        async def handler(reader, writer):
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port,
                                              ssl=ssl.create_default_context(),
                                              server_hostname=HOSTNAME)

    run(loop, main())


def test_tls_protocols_many_clients(loop, server_ctx, client_ctx):
    requires(loop, "tls")

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)
            if data.endswith(b"\n"):
                self.transport.close()

    class Client(CollectProtocol):
        def data_received(self, data):
            super().data_received(data)
            if self.data.endswith(b"\n"):
                self.transport.close()

    async def one(port, i):
        tr, proto = await loop.create_connection(
            lambda: Client(loop), "127.0.0.1", port, ssl=client_ctx, server_hostname=HOSTNAME)
        assert tr.get_extra_info("sslcontext") is client_ctx
        tr.write(f"hello {i}\n".encode())
        await proto.done
        return bytes(proto.data)

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            got = await asyncio.gather(*(one(port, i) for i in range(20)))
            assert got == [f"hello {i}\n".encode() for i in range(20)]
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_start_tls_upgrade(loop, server_ctx, client_ctx):
    """A plain connection upgraded with loop.start_tls on both sides (STARTTLS)."""
    requires(loop, "tls")
    data = payload(300_000)

    class Server(asyncio.Protocol):
        def __init__(self):
            self.buf = b""
            self.upgrading = False
            self.tls_transport = None
            self.pending = []

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, chunk):
            if self.upgrading:                       # decrypted data: echo it
                if self.tls_transport is None:       # start_tls() has not returned yet
                    self.pending.append(chunk)
                else:
                    self.tls_transport.write(chunk)
                return
            self.buf += chunk
            if self.buf == b"STARTTLS\n":
                # stop reading before answering: the ClientHello must reach TLS
                self.transport.pause_reading()
                self.transport.write(b"OK\n")
                self.upgrading = True
                asyncio.ensure_future(self.upgrade())

        async def upgrade(self):
            self.tls_transport = await loop.start_tls(self.transport, self, server_ctx,
                                                      server_side=True)
            for chunk in self.pending:
                self.tls_transport.write(chunk)

        def eof_received(self):
            return None

        def connection_lost(self, exc):
            # Python 3.10's TLS app transport warns (ResourceWarning) when collected
            # unless its owner closed it, even after the connection was lost
            if self.tls_transport is not None:
                self.tls_transport.close()

    async def main():
        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     "127.0.0.1", port)
            assert tr.get_extra_info("ssl_object") is None
            tr.write(b"STARTTLS\n")
            while proto.data != b"OK\n":
                await asyncio.sleep(0.005)
            proto.data.clear()
            tls_tr = await loop.start_tls(tr, proto, client_ctx, server_hostname=HOSTNAME)
            assert tls_tr.get_extra_info("ssl_object") is not None
            assert tls_tr.get_protocol() is proto
            tls_tr.write(data)
            while len(proto.data) < len(data):
                await asyncio.sleep(0.005)
            assert bytes(proto.data) == data
            tls_tr.close()
            await proto.done
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_ssl_shutdown_timeout_argument(loop, server_ctx, client_ctx):
    """ssl_shutdown_timeout= is taken where the running Python's asyncio has it (3.11+)
    and refused with asyncio's own TypeError where it does not (3.10)."""
    requires(loop, "tls")
    has_it = sys.version_info >= (3, 11)
    kw = {"ssl_shutdown_timeout": 5.0}

    class ServerSide(CollectProtocol):
        def connection_lost(self, exc):
            self.transport.close()    # 3.10's TLS app transport warns unless closed
            super().connection_lost(exc)

    async def main():
        if not has_it:
            with pytest.raises(TypeError, match="ssl_shutdown_timeout"):
                await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_ctx,
                                         **kw)
        server = await loop.create_server(lambda: ServerSide(loop), "127.0.0.1", 0,
                                          ssl=server_ctx, **(kw if has_it else {}))
        port = server.sockets[0].getsockname()[1]
        try:
            if not has_it:
                with pytest.raises(TypeError, match="ssl_shutdown_timeout"):
                    await loop.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                                 ssl=client_ctx, server_hostname=HOSTNAME,
                                                 **kw)
            tr, proto = await loop.create_connection(
                lambda: CollectProtocol(loop), "127.0.0.1", port, ssl=client_ctx,
                server_hostname=HOSTNAME, **(kw if has_it else {}))
            assert tr.get_extra_info("ssl_object") is not None
            tr.close()
            await proto.done
            assert proto.lost_exc is None
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())
