"""Offline guard for a test's subprocess: every network attempt off loopback fails, and is logged.

Put this folder first on PYTHONPATH and name a log file in OFFLINE_GUARD_LOG: Python imports
`sitecustomize` at start-up, before any code of the process runs. A connection, datagram or name
lookup for anything but a loopback address (127.0.0.0/8, ::1, localhost) raises OSError at once,
as an unplugged network would, and is appended to the log with the process id and a short stack,
so a test can assert that nothing even tried. Unix sockets and binding are untouched.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import traceback

_LOG = os.environ.get("OFFLINE_GUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    name = str(host).strip("[]").split("%")[0].lower()
    if name in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what: str) -> None:
    if _LOG:
        stack = " <- ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack()[-8:-2])
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {what} [{stack}]\n")
    raise OSError(errno.ENETUNREACH, f"offline guard: {what} refused")


def _inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_sendto = socket.socket.sendto
_getaddrinfo, _gethostbyname = socket.getaddrinfo, socket.gethostbyname
_gethostbyname_ex, _gethostbyaddr = socket.gethostbyname_ex, socket.gethostbyaddr


def connect(self, address):
    if _inet(self) and not _is_local(address[0]):
        _refuse(f"connect {address[0]}:{address[1]}")
    return _connect(self, address)


def connect_ex(self, address):
    if _inet(self) and not _is_local(address[0]):
        _refuse(f"connect {address[0]}:{address[1]}")
    return _connect_ex(self, address)


def sendto(self, data, *args):
    address = args[-1]
    if _inet(self) and not _is_local(address[0]):
        _refuse(f"sendto {address[0]}:{address[1]}")
    return _sendto(self, data, *args)


def getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        _refuse(f"getaddrinfo {host}")
    return _getaddrinfo(host, *args, **kwargs)


def gethostbyname(host):
    if not _is_local(host):
        _refuse(f"gethostbyname {host}")
    return _gethostbyname(host)


def gethostbyname_ex(host):
    if not _is_local(host):
        _refuse(f"gethostbyname_ex {host}")
    return _gethostbyname_ex(host)


def gethostbyaddr(host):
    if not _is_local(host):
        _refuse(f"gethostbyaddr {host}")
    return _gethostbyaddr(host)


socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
socket.getaddrinfo, socket.gethostbyname = getaddrinfo, gethostbyname
socket.gethostbyname_ex, socket.gethostbyaddr = gethostbyname_ex, gethostbyaddr
