"""TLS for the core transport: the SSL contexts a server and a client use.

::

    server = libchat.Server(host, port, ssl=tls.server_context("cert.pem", "key.pem"))
    client = await libchat.open_client(host, port, user="bob",
                                       ssl=tls.client_context(cafile="ca.pem"))

A client context verifies the server by default: the system's trusted CAs
plus ``cafile``, and the host name. ``verify=False`` turns both checks off
(the CLI's ``--insecure``); the traffic is still encrypted, but anyone on the
path can pretend to be the server.

The rest of the module turns the ``ssl`` module's errors into one line a
person can act on (:func:`tls_error`) and decides what counts as a
loopback address (:func:`is_loopback`), where a password may travel without
TLS.
"""

from __future__ import annotations

import ipaddress
import ssl

from .errors import ConnectionClosed

#: Oldest protocol either side accepts: TLS 1.0 and 1.1 are broken.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})
# What OpenSSL says when the "TLS server" answers with something else.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})


class TLSError(ConnectionClosed):
    """A TLS certificate or handshake failure; the connection is not made."""

    code = "tls_error"


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server context presenting ``certfile`` (a PEM chain) with the private
    key in ``keyfile`` (or in ``certfile`` itself). Raises TLSError with a
    readable reason when the files are missing, not PEM, or do not match."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        files = certfile if keyfile is None else f"{certfile} and {keyfile}"
        raise TLSError(
            f"cannot load the TLS certificate from {files}: {_reason(exc)} "
            "(expected a PEM certificate chain and its matching private key)"
        ) from None
    except OSError as exc:
        raise TLSError(f"cannot read {exc.filename or certfile}: {exc.strerror or exc}") from None
    return context


def client_context(*, cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context. It trusts the system's CAs plus those in ``cafile``
    and checks the server's host name; ``verify=False`` checks nothing."""
    # create_default_context(cafile=...) would trust *only* cafile; we want
    # the system store as well, so a public certificate keeps working.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = MINIMUM_VERSION
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except ssl.SSLError as exc:
            raise TLSError(f"cannot load CA certificates from {cafile}: {_reason(exc)}") from None
        except OSError as exc:
            raise TLSError(f"cannot read {cafile}: {exc.strerror or exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_error(exc: ssl.SSLError, host: str) -> TLSError:
    """A TLSError saying in one line why a TLS connection to ``host`` failed.
    Its ``details["reason"]`` is ``untrusted``, ``name_mismatch``,
    ``not_tls`` (the server speaks plaintext) or ``handshake``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH:
            return TLSError(
                f"TLS: the server's certificate is not valid for the name {host!r}",
                reason="name_mismatch",
            )
        detail = exc.verify_message or _reason(exc)
        return TLSError(
            f"TLS: the server's certificate is not trusted ({detail})", reason="untrusted"
        )
    if exc.reason in _NOT_TLS:
        return TLSError(
            f"TLS: the server at {host} does not speak TLS ({_reason(exc)})", reason="not_tls"
        )
    return TLSError(f"TLS handshake with {host} failed: {_reason(exc)}", reason="handshake")


def _reason(exc: ssl.SSLError) -> str:
    """The short reason of an SSLError, without OpenSSL's file and line."""
    if exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc.strerror or exc)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine without crossing a network.

    Only the name ``localhost`` (any case) and literal loopback addresses
    (127.0.0.0/8, ``::1``, with or without brackets or an IPv6 zone) count.
    Every other name goes to the resolver, and may go to DNS, which an
    attacker may answer: that includes ``*.localhost`` (RFC 6761 asks
    resolvers to keep those local; not every one does) and ``localhost.``
    with a trailing dot (an absolute name, looked up as such).
    """
    if host.lower() == "localhost":
        return True
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
