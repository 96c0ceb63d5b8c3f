"""A generic multithreaded TCP server: the CHICKEN tcp-server egg for Python.

For every connection a thread runs a *thunk*, a function of no arguments,
with ``sys.stdin`` and ``sys.stdout`` bound to the connection for that
thread only, so ``print()`` and ``input()`` talk to the client::

    import time
    import tcpserver

    def daytime():
        print(time.ctime())

    server = tcpserver.make_tcp_server(6504, daytime)
    server(debug=True)          # serves until server.shutdown()

The server is a ``socketserver.ThreadingTCPServer`` and keeps its name, so
legacy code swaps ``socketserver.`` for ``tcpserver.`` and gets a limit on
concurrent requests, diagnostics and a hard close of failed connections.

The file reads top to bottom:

- the exceptions a thunk may meet: IdleTimeout, LineTooLong (and
  ProxyHeaderError, which only the server meets);
- hooks: tcp_listen(), systemd_listeners(), tcp_accept(), tcp_addresses(),
  tcp_abandon(), and tls_details(); the PROXY protocol's read_proxy_header();
- per-thread standard streams and current_connection();
- the handler adapter, ThunkHandler;
- the server's settings (one table, checked in one place) and its
  helpers, one job each: _Slots (slots, open requests, counters),
  _RequestThreads (spare threads, the drain), _AcceptLoop, _ConnectionSetup
  (TLS, the PROXY protocol), _StopSignals, _WorkerProcesses;
- the server, ThreadingTCPServer, which keeps socketserver's override
  points and hands the work to those helpers;
- the factory, make_tcp_server();
- the command line, ``python -m tcpserver`` (main()), after ucspi-tcp's
  tcpserver.

Thread model: the request threads accept connections themselves, one at a
time, the leader; serve_forever() hands out the lead and waits, and
shutdown(), from another thread, ends it all at once.  Before it accepts,
the leader takes one of max_requests slots, so clients beyond the limit
wait in the kernel's listen queue, in order.  Once it has accepted a
connection, it hands the lead on to a spare thread (or a new one) and
serves that connection: it reads a PROXY header and runs the TLS handshake
if the settings say so, finds the addresses, runs the handler (for
ThunkHandler: the thunk) and closes the connection; closing gives the slot
back, and the thread waits as a spare for its next job.  (A subclass that
replaces a step of the accept loop gets socketserver's loop: serve_forever()
accepts in the caller's thread and hands each connection to a request
thread.)  server_close(), in the caller's thread, drains: it waits for the
request threads, then resets the connections of those that do not end.
"""

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_PREFIX",
    "IdleTimeout",
    "LineTooLong",
    "ProxyHeaderError",
    "ThreadingTCPServer",
    "ThreadingUnixStreamServer",
    "ThunkHandler",
    "current_connection",
    "make_tcp_server",
    "peer_credentials",
    "read_proxy_header",
    "systemd_listeners",
    "tls_details",
    "unix_listen",
    "tcp_abandon",
    "tcp_accept",
    "tcp_addresses",
    "tcp_listen",
]

import codecs
import contextlib
import errno
import importlib.util
import io
import ipaddress
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NoReturn,
    Optional,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
)

#: Listen queue length of tcp_listen() and ThreadingTCPServer: as long as
#: the OS allows, so clients waiting for a slot are queued, not refused.
DEFAULT_BACKLOG = socket.SOMAXCONN

#: The egg's default for MAXREQUESTS, used by make_tcp_server().
DEFAULT_MAX_REQUESTS = 10000

#: The egg's default prefix of diagnostic lines: ``[tcp-server] ...``.
DEFAULT_PREFIX = "tcp-server"

#: Seconds server_close() lets running requests finish before resetting them.
DEFAULT_DRAIN_TIMEOUT = 10.0

#: Longest line a thunk reads: characters from sys.stdin, bytes from its buffer.
DEFAULT_MAX_LINE = 64 * 1024

#: Seconds a TLS client has to complete its handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# What stats() counts, besides "active" (the number of open requests).
_STATS = ("accepted", "completed", "failed", "refused", "peak_active")

# Which stats() counter a request's end counts in, by its kind; else "failed".
_COUNTED_AS = {"ok": "completed", "refused": "refused"}

# How a request may end that earns its connection a reset (RST).
_RESET_KINDS = frozenset(("error", "timed out", "line too long", "drained",
                          "TLS error"))

# The arguments of the EOFError that input() raises at the end of input.
_INPUT_EOF = ("EOF when reading a line",)

# Connections the classic accept loop takes at most per wake-up, if they
# are there: fewer wake-ups under a burst, as asyncio does.
_ACCEPT_BATCH = 16

# Request threads that must start at once, in a row, after failures to start
# one, before the server says that threads start again.
_STARTS_TO_RECOVER = 100

# accept() errors that only mean this one connection is gone: ignore.
_TRANSIENT_ERRNOS = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN,
                               errno.EWOULDBLOCK, errno.EINTR,
                               errno.ECONNRESET, errno.ENOTCONN))

# accept() errors that mean "out of descriptors or memory": back off.
_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                              errno.ENOMEM))

logger = logging.getLogger("tcpserver")

_Address = Tuple[Any, ...]
_Thunk = Callable[[], Any]


def _check_int(name: str, value: object, minimum: int, maximum: int,
               expected: str) -> None:
    """Raise TypeError or ValueError unless value is an int in [minimum, maximum].

    expected completes the message: "port must be <expected>, not 70000".
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("%s must be %s, not %s"
                        % (name, expected, type(value).__name__))
    if not minimum <= value <= maximum:
        raise ValueError("%s must be %s, not %r" % (name, expected, value))


def _check_seconds(name: str, value: object, zero_ok: bool = False) -> None:
    """Raise TypeError or ValueError unless value is None or a number > 0 (>= 0)."""
    if value is None:
        return
    expected = "a number of seconds %s or None" % (">= 0" if zero_ok else "> 0")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError("%s must be %s, not %s"
                        % (name, expected, type(value).__name__))
    if not (value >= 0 if zero_ok else value > 0):
        raise ValueError("%s must be %s, not %r" % (name, expected, value))


# The longest wait poll() and epoll take in one call: their timeout is an
# int of milliseconds.  A longer wait is made of several.
_LONGEST_POLL = (2 ** 31 - 1) // 1000  # seconds, about 24.8 days


def _wait_time(seconds: Optional[float]) -> Optional[float]:
    """Return seconds as a timeout every lock and socket takes: None (no
    limit) for None and for a duration beyond threading.TIMEOUT_MAX (inf,
    1e300, 10**30: at least 49 days, 292 years on most systems), which no
    wait could take and nobody could tell from no limit at all."""
    if seconds is None or seconds > threading.TIMEOUT_MAX:
        return None
    return seconds


def _socket_time(seconds: Optional[float]) -> Optional[float]:
    """Return seconds as a socket's own timeout: None (no limit) beyond
    _LONGEST_POLL (24.8 days), which its wait, a poll() in milliseconds,
    cannot take: a longer one would wrap around and end early."""
    seconds = _wait_time(seconds)
    return None if seconds is None or seconds > _LONGEST_POLL else seconds


def _poll_time(seconds: Optional[float]) -> Optional[float]:
    """Return seconds as a timeout for one select() or poll(), for a caller
    that waits again if it ran out early: at most _LONGEST_POLL."""
    seconds = _wait_time(seconds)
    return None if seconds is None else min(seconds, _LONGEST_POLL)


def _networks(name: str, value: Any) -> List[Any]:
    """Return value, a sequence of networks ("10.0.0.0/8", ...), parsed.

    Raises TypeError or ValueError naming the setting if it is not one.
    """
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError("%s must be a sequence of networks such as "
                        "['10.0.0.0/8'], not %r" % (name, value))
    try:
        return [ipaddress.ip_network(network) for network in value]
    except ValueError as exc:
        raise ValueError("%s: %s" % (name, exc)) from None


# ---------------------------------------------------------------------------
# Exceptions a thunk may meet on its streams: both are the client's doing.
# ---------------------------------------------------------------------------

class IdleTimeout(socket.timeout):
    """The client sent nothing, or read nothing, for the idle timeout.

    Raised by reads from sys.stdin and writes to sys.stdout in a thunk when
    the server's idle_timeout (or the handler's timeout) runs out.  A thunk
    may catch it (it is a socket.timeout, so TimeoutError from 3.10 on);
    uncaught, it ends the request with one diagnostic line and a reset.
    """


class LineTooLong(ValueError):
    """A line from the client is longer than the server's max_line.

    Raised by input(), readline(), readlines() and iteration, on sys.stdin
    once more than max_line characters came without a line end, on
    sys.stdin.buffer once more than max_line bytes did (the line end, LF or
    CRLF, counts as nothing on either).  The line is dropped whole: what
    came of it, and its rest, up to and including its end, before the next
    read returns anything, so its tail never reads as a line of its own.
    Uncaught, it ends the request with one diagnostic line and a reset.
    """


class ProxyHeaderError(OSError):
    """A PROXY protocol header was missing, malformed, truncated or too long.

    Raised by the get_addresses hook of a server with proxy_protocol on,
    before the handler runs: the server closes that one connection with
    one diagnostic line ("setup failed") and serves on.
    """


# ---------------------------------------------------------------------------
# Hooks: the egg's primitive socket operations.  The server calls them
# through its attributes accept_connection, get_addresses and
# prepare_hard_close, so a subclass (or an instance) can replace them,
# for instance to serve TLS.
# ---------------------------------------------------------------------------

def tcp_listen(port: int, backlog: int = DEFAULT_BACKLOG,
               host: str = "") -> socket.socket:
    """Return a TCP socket bound to (host, port) and listening: the egg's tcp-listen.

    host="" listens on all interfaces, IPv6 and IPv4 together where the OS
    allows a dual-stack socket, else IPv4 only.  Any other host is resolved
    and the socket takes the family of its first address.  port=0 lets the
    OS choose a free port; read it back with ``getsockname()[1]``.
    SO_REUSEADDR is set (on POSIX), so a restarted server can bind at once.

    Raises TypeError or ValueError for bad arguments, OSError if the
    address cannot be bound (for instance, it is in use).  The caller
    owns the socket; make_tcp_server() takes it over.
    """
    _check_int("port", port, 0, 65535, "an int in 0..65535")
    _check_int("backlog", backlog, 0, sys.maxsize, "an int >= 0")
    if not isinstance(host, str):
        raise TypeError("host must be a str, not %s" % type(host).__name__)
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6,
                                        backlog=backlog, dualstack_ipv6=True)
        return socket.create_server(("", port), backlog=backlog)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=backlog)


def unix_listen(path: Union[str, "os.PathLike[str]"],
                backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """Return a Unix-domain stream socket bound to path and listening.

    The socket file is made with the process's umask, so its permissions
    say who may connect (``umask 007`` before: the owner and the group).
    A socket file there that nobody accepts on any more (a server that is
    gone) is replaced; any other file there, or a live server's socket,
    raises OSError (EADDRINUSE).  The caller owns the socket and the file;
    make_tcp_server(path) makes both, and removes the file on close.
    Raises TypeError or ValueError for bad arguments.
    """
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty str, not %r" % (path,))
    _check_int("backlog", backlog, 0, sys.maxsize, "an int >= 0")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not _stale_socket(path):
                raise
            os.unlink(path)
            sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _stale_socket(path: str) -> bool:
    """Is path a socket file that nobody accepts on?"""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def peer_credentials(conn: socket.socket) -> Optional[Tuple[int, int, int]]:
    """Return (pid, uid, gid) of the process at the other end of a
    Unix-domain connection, as the kernel saw them when it connected, or
    None where the system does not say (SO_PEERCRED: Linux) or conn is
    not a Unix-domain socket."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or conn.family != getattr(socket, "AF_UNIX", None):
        return None
    try:
        pid, uid, gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, option,
                                  struct.calcsize("3i")))
    except OSError:
        return None  # gone already
    return pid, uid, gid


def _is_unix(sock: socket.socket) -> bool:
    """Is sock a Unix-domain socket?  (Windows has no AF_UNIX in Python.)"""
    return sock.family == getattr(socket, "AF_UNIX", None)


def systemd_listeners() -> List[socket.socket]:
    """Return the sockets systemd passed to this process (socket activation).

    Reads LISTEN_FDS and LISTEN_PID as sd_listen_fds(3) does: the sockets
    are descriptors 3, 4, ... and are for this process only if LISTEN_PID
    is its pid; otherwise, or without them, returns [].  The variables are
    removed, so programs this process starts do not take the sockets for
    theirs.  Hand a socket to make_tcp_server() or from_listener().
    Raises ValueError if LISTEN_FDS is not a number.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "0")
    if not count.isdigit():
        raise ValueError("LISTEN_FDS must be a number, not %r" % count)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listeners: List[socket.socket] = []
    try:
        for descriptor in range(3, 3 + int(count)):
            os.set_inheritable(descriptor, False)
            listeners.append(socket.socket(fileno=descriptor))
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _plain_address(address: _Address) -> _Address:
    """Return an IPv4-mapped IPv6 address ('::ffff:1.2.3.4', ...) as IPv4."""
    if (isinstance(address, tuple) and len(address) == 4
            and address[0].startswith("::ffff:")):
        host = address[0][7:]
        if "." not in host:  # not as inet_ntop() spells it: ask ipaddress
            host = _ip_text(ipaddress.ip_address(address[0]))
        if "." in host:
            return (host, address[1])
    return address


def _ip_text(address: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
             ) -> str:
    """Return address as text, an IPv4-mapped IPv6 address as plain IPv4.

    So a client on IPv4 has one spelling, whichever way its address came
    (a dual-stack socket, a PROXY header): the one rules and logs expect.
    """
    mapped = getattr(address, "ipv4_mapped", None)
    return str(address if mapped is None else mapped)


def tcp_accept(listener: socket.socket) -> Tuple[socket.socket, _Address]:
    """Accept a connection on listener; return (conn, peer): the egg's tcp-accept.

    The server calls it as ``self.accept_connection(self.socket)`` from
    get_request(), in the accepting thread, once a slot is free.  Keep it
    quick: the next client waits until it returns.  OSError propagates.
    IPv4 clients of a dual-stack listener are reported as plain IPv4, as
    tcp_addresses() does.  A listener wrapped in TLS (as
    http.server.HTTPSServer wraps its own) gives connections wrapped in its
    context whose handshake is left to their own thread: its accept()
    would run it here, and a silent client would hold up every other.
    """
    if _is_tls(listener):
        tls: Any = listener  # an ssl.SSLSocket
        conn, peer = socket.socket.accept(listener)
        conn = _server_side(tls.context, conn,
                            suppress_ragged_eofs=tls.suppress_ragged_eofs)
    else:
        conn, peer = listener.accept()
    if listener.gettimeout() == 0.0:  # serve_workers()' listener: on BSD
        conn.setblocking(True)        # the connection would inherit that
    return conn, _plain_address(peer)


def _server_side(context: Any, conn: socket.socket,
                 **options: Any) -> socket.socket:
    """Return conn wrapped in the ssl.SSLContext context as a server's, its
    handshake left for later.  Raises OSError, conn closed, if the client
    left already (a port scan): the ssl module would find that out itself
    and leave its own socket unclosed."""
    try:
        conn.getpeername()  # ENOTCONN once a reset came
        tls: socket.socket = context.wrap_socket(
            conn, server_side=True, do_handshake_on_connect=False, **options)
    except BaseException:
        conn.close()
        raise
    return tls


def tcp_addresses(conn: socket.socket) -> Tuple[_Address, _Address]:
    """Return the (local, peer) addresses of a connection: the egg's tcp-addresses.

    Addresses are as getsockname() and getpeername() give them, except that
    IPv4 clients of a dual-stack listener appear as plain IPv4
    (``('127.0.0.1', 5000)``, not ``('::ffff:127.0.0.1', 5000, 0, 0)``).
    The server calls it as ``self.get_addresses(conn)`` in the connection's
    own thread, before the handler runs: the peer becomes the handler's
    client_address and the diagnostics' ADDRESS.  Raises OSError if the
    client is already gone; the server then closes the connection.
    """
    return _plain_address(conn.getsockname()), _plain_address(conn.getpeername())


def tcp_abandon(conn: socket.socket) -> None:
    """Make the coming close() of conn send RST instead of FIN: the egg's tcp-abandon-port.

    Sets SO_LINGER to (on, 0 seconds).  The server calls it as
    ``self.prepare_hard_close(conn)`` in the connection's thread when the
    handler raised, just before it closes the connection, so the client
    sees a reset rather than an orderly end of a half-written reply.
    OSError (the connection is already gone) is ignored by the server.
    """
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    struct.pack("ii", 1, 0))


def tls_details(conn: socket.socket) -> Optional[Dict[str, Any]]:
    """Return what the TLS handshake of conn settled, or None if it is plain.

    For a connection the server has served the handshake of: in a handler
    (a thunk's is current_connection().tls), or in get_addresses().  Keys:

    - "version": "TLSv1.3", say; "cipher": its name; "bits": its secret
      bits;
    - "server_name": the name the client asked for (SNI), or None; known
      where the server's ssl_context served the handshake;
    - "peer_certificate": the client's certificate as ssl's getpeercert()
      gives it, {} if it sent none or the context did not verify it;
    - "peer_certificate_der": its bytes, None if it sent none;
    - "session_id": the TLS session's id in hex, or None.
    """
    if not _is_tls(conn):
        return None
    tls: Any = conn  # an ssl.SSLSocket
    name, version, bits = tls.cipher() or (None, tls.version(), None)
    session = tls.session
    return {"version": version, "cipher": name, "bits": bits,
            "server_name": getattr(tls, "_tcpserver_server_name", None),
            "peer_certificate": tls.getpeercert() or {},
            "peer_certificate_der": tls.getpeercert(True),
            "session_id": session.id.hex() if session is not None else None}


class _ServerNames:
    """An ssl.SSLContext's sni_callback that notes on each connection the
    name its client asked for (tls_details()' "server_name"), then calls
    the callback the context had, if any, as it would have been called."""

    def __init__(self, inner: Optional[Callable[..., Any]]) -> None:
        self.inner = inner

    def __call__(self, conn: Any, name: Optional[str], context: Any) -> Any:
        conn._tcpserver_server_name = name
        return None if self.inner is None else self.inner(conn, name, context)


def _note_server_names(context: Any) -> None:
    """Have context note the names clients ask for (see _ServerNames)."""
    if not isinstance(context.sni_callback, _ServerNames):
        context.sni_callback = _ServerNames(context.sni_callback)


# ---------------------------------------------------------------------------
# The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer in front
# sends the real client's addresses in a header before the client's bytes.
# ---------------------------------------------------------------------------

_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V1_MAX = 107   # bytes of the longest version 1 line, CRLF included
_PROXY_V2_MAX = 16384  # bytes of addresses and TLVs we accept after the 16


def read_proxy_header(conn: socket.socket, timeout: Optional[float] = None
                      ) -> Optional[Tuple[_Address, _Address]]:
    """Read a PROXY protocol header (version 1 or 2) from conn.

    Returns the (local, peer) addresses it carries, the balancer's view of
    the client's connection, or None for a header that carries none
    (version 2 LOCAL, as health checks send, or other than TCP over IP;
    version 1 UNKNOWN): the connection's own addresses stand then.  Reads
    exactly the header, so what follows (a TLS handshake, the client's
    data) stays unread.  With a timeout, the whole header must arrive
    within that many seconds; without, each read waits as conn's own
    timeout says.  Raises ProxyHeaderError for a missing, malformed,
    truncated or oversized header, and socket.timeout when time runs out.
    """
    timeout = _wait_time(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    start = _read_exactly(conn, 12, deadline)
    if start == _PROXY_V2_SIGNATURE:
        head = _read_exactly(conn, 4, deadline)
        length = struct.unpack("!H", head[2:])[0]
        if length > _PROXY_V2_MAX:
            raise ProxyHeaderError("PROXY v2 header of %d bytes: too long"
                                   % length)
        return _parse_proxy_v2(head, _read_exactly(conn, length, deadline))
    if not start.startswith(b"PROXY "):
        raise ProxyHeaderError("no PROXY protocol header: the connection "
                               "began with %r" % (start,))
    line = start
    while not line.endswith(b"\r\n"):
        if len(line) >= _PROXY_V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than %d bytes"
                                   % _PROXY_V1_MAX)
        line += _read_exactly(conn, 1, deadline)
    return _parse_proxy_v1(line)


def _read_exactly(conn: socket.socket, count: int,
                  deadline: Optional[float]) -> bytes:
    """Read count bytes from conn by deadline (bypassing TLS, if any: it
    comes after the header)."""
    data = b""
    while len(data) < count:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            conn.settimeout(_socket_time(left))
        chunk = socket.socket.recv(conn, count - len(data))
        if not chunk:
            raise ProxyHeaderError("PROXY protocol header cut short after "
                                   "%d bytes" % len(data))
        data += chunk
    return data


def _parse_proxy_v1(line: bytes) -> Optional[Tuple[_Address, _Address]]:
    """Return the addresses of a version 1 line ("PROXY TCP4 ... \r\n")."""
    fields = line[:-2].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return None  # the balancer does not know them: ours stand
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line %r" % (line,))
    version = 4 if fields[1] == b"TCP4" else 6
    try:
        source, destination = (_proxy_ip(field, version)
                               for field in fields[2:4])
        ports = [_proxy_port(field) for field in fields[4:6]]
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 line %r" % (line,)) from None
    return (destination, ports[1]), (source, ports[0])


def _proxy_ip(field: bytes, version: int) -> str:
    """Return field as an IP address of version, or raise ValueError."""
    text = field.decode("ascii")
    address = ipaddress.ip_address(text)
    if (address.version != version or "%" in text
            or (version == 4 and str(address) != text)):
        raise ValueError(field)  # wrong family, a scope, or leading zeros
    return _ip_text(address)


def _proxy_port(field: bytes) -> int:
    """Return field as a port: decimal, no sign or leading zero, <= 65535."""
    if not field.isdigit() or (field.startswith(b"0") and field != b"0"):
        raise ValueError(field)
    port = int(field)
    if port > 65535:
        raise ValueError(field)
    return port


def _parse_proxy_v2(head: bytes, body: bytes
                    ) -> Optional[Tuple[_Address, _Address]]:
    """Return the addresses of a version 2 header, after its signature."""
    version, command = head[0] >> 4, head[0] & 0x0F
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError("PROXY v2 header with version %d, command %d"
                               % (version, command))
    if command == 0 or head[1] not in (0x11, 0x21):
        return None  # LOCAL (a health check), or not TCP over IP: ours stand
    size = 4 if head[1] == 0x11 else 16
    if len(body) < 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 addresses cut short: %d bytes"
                               % len(body))
    source = _ip_text(ipaddress.ip_address(body[:size]))
    destination = _ip_text(ipaddress.ip_address(body[size:2 * size]))
    ports = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return (destination, ports[1]), (source, ports[0])


# ---------------------------------------------------------------------------
# Per-thread standard streams.  While a thunk runs, sys.stdin and sys.stdout
# are switches that hand each thread serving a connection that connection's
# streams, and every other thread the streams that were there before.
# ---------------------------------------------------------------------------

class _Bound(threading.local):
    """What a request thread is bound to; None in every other thread."""

    handler: Optional["ThunkHandler"] = None
    tls_error: Optional[OSError] = None  # the connection's, if it failed
    leading = False  # the thread has the lead: it waits for connections
    # The connection a leader accepted, to serve once it has handed the
    # lead on: (request, client_address, thread name).
    job: Optional[Tuple[socket.socket, _Address, str]] = None


_bound = _Bound()


class _Forward:
    """An attribute of the calling thread's stream, looked up at each use.

    A non-data descriptor, so a name the thread's own dict of a
    _ThreadStream holds (a shortcut) wins over it.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = name

    def __get__(self, stream: Any, owner: Optional[type] = None) -> Any:
        if stream is None:
            return self
        return getattr(stream._current(), self._attribute)


class _ThreadStream(threading.local):
    """Stands in for sys.stdin or sys.stdout, choosing the stream per thread.

    It offers io.TextIOWrapper's interface and forwards each name to the
    calling thread's stream: the connection's in a thread running a thunk,
    the one that was there before (the fallback) in every other thread.
    Where the process has no stream (sys.stdout is None in a daemon),
    writes are dropped, as print() drops them.  Other attributes a
    replaced sys.stdout may have are not forwarded: a forwarding
    __getattr__ would slow down every lookup, print()'s included.

    It is a threading.local so that a thread running a thunk can keep the
    connection's write, flush and buffer (sys.stdout, from its first
    write() on), or readline and fileno (sys.stdin, from its first
    readline() on), in its own attribute dict: print() and input() then
    find them with no Python call in between.  Until then the streams are
    not made, and flushing a sys.stdout nothing was written to makes none.
    """

    _SHORTCUTS = {"stdout": ("write", "flush", "buffer"),
                  "stdin": ("readline", "fileno")}

    def __init__(self, name: str, fallback: Any) -> None:
        # threading.local runs this in each thread that uses the stream.
        self._name = name            # "stdin" or "stdout"
        self._fallback = fallback    # the stream other threads keep seeing

    def _current(self) -> Any:
        """Return the stream the calling thread should use."""
        handler = _bound.handler
        return self._fallback if handler is None else getattr(handler,
                                                              self._name)

    def bind(self, stream: io.TextIOWrapper) -> None:
        """Give the calling thread stream's hot methods as shortcuts."""
        own = vars(self)
        for name in self._SHORTCUTS[self._name]:
            own[name] = getattr(stream, name)
        if self._name == "stdin":
            # input() asks for fileno at every call: the binary stream's is
            # C down to the descriptor where the connection reads through a
            # FileIO, the text stream's a Python call.
            own["fileno"] = stream.buffer.fileno

    def unbind(self) -> None:
        """Drop the calling thread's shortcuts."""
        own = vars(self)
        for name in self._SHORTCUTS[self._name]:
            own.pop(name, None)

    def write(self, text: str) -> int:
        stream = self._current()
        if stream is None:
            return len(text)
        if _bound.handler is not None:  # a thunk's stdout, made by now
            self.bind(stream)
        count: int = stream.write(text)
        return count

    def flush(self) -> None:
        handler = _bound.handler
        if handler is None:
            stream = self._fallback
        elif self._name == "stdout":
            stream = handler._made_output()  # input() flushes before a print()
        else:
            stream = handler.stdin
        if stream is not None:
            stream.flush()

    def readline(self, size: int = -1) -> str:
        stream = self._current()
        if _bound.handler is not None:  # a thunk's stdin, made by now
            self.bind(stream)
        line: str = stream.readline(size)
        return line

    buffer = _Forward()
    close = _Forward()
    closed = _Forward()
    detach = _Forward()
    encoding = _Forward()
    errors = _Forward()
    fileno = _Forward()
    isatty = _Forward()
    line_buffering = _Forward()
    mode = _Forward()
    name = _Forward()
    newlines = _Forward()
    read = _Forward()
    readable = _Forward()
    readlines = _Forward()
    reconfigure = _Forward()
    seek = _Forward()
    seekable = _Forward()
    tell = _Forward()
    truncate = _Forward()
    writable = _Forward()
    write_through = _Forward()
    writelines = _Forward()

    def __iter__(self) -> Any:
        return iter(self._current())

    def __next__(self) -> str:
        line: str = next(self._current())
        return line

    def __enter__(self) -> Any:
        return self._current().__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        return self._current().__exit__(*exc_info)

    def __repr__(self) -> str:
        return "<tcpserver per-thread sys.%s, elsewhere %r>" % (
            self._name, self._fallback)


class _StreamSwitch:
    """Installs the per-thread sys.stdin/sys.stdout while anyone needs them.

    Each serving server and each running thunk holds one reference (use it
    as a context manager).  The first reference installs the switches; the
    last puts the original streams back, unless somebody else replaced
    sys.stdin or sys.stdout meanwhile: their stream is then left alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._streams: List[_ThreadStream] = []

    def __enter__(self) -> "_StreamSwitch":
        with self._lock:
            if self._users == 0:
                self._streams = [_ThreadStream("stdin", sys.stdin),
                                 _ThreadStream("stdout", sys.stdout)]
                for stream in self._streams:
                    setattr(sys, stream._name, stream)
            self._users += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for stream in self._streams:
                    if getattr(sys, stream._name) is stream:
                        setattr(sys, stream._name, stream._fallback)
                self._streams = []

    def bind(self, stdout: io.TextIOWrapper) -> None:
        """Give the calling thread's sys.stdout the shortcuts to stdout, a
        thunk's, just made (see _ThreadStream): print() and
        sys.stdout.buffer find it with no Python call from now on."""
        for stream in self._streams:
            if stream._name == "stdout":
                stream.bind(stdout)

    def unbind(self) -> None:
        """Drop the shortcuts the calling thread's sys.stdin and sys.stdout
        took (see _ThreadStream): before the thread gives its reference back."""
        for stream in self._streams:
            stream.unbind()


_switch = _StreamSwitch()


def current_connection() -> "ThunkHandler":
    """Return the ThunkHandler serving the calling thread's connection.

    Call it from a thunk to learn about its client, as the egg's thunks ask
    their ports: ``client_address`` (the peer), ``local_address``,
    ``server``, ``connection`` (the socket) and the streams ``stdin``,
    ``stdout``, ``rfile``, ``wfile``.  Pass the handler (or its streams)
    to threads the thunk starts: they are ordinary threads and see the
    process-wide sys.stdin and sys.stdout, not the connection.

    Raises RuntimeError in any thread that is not running a thunk.
    """
    handler = _bound.handler
    if handler is None:
        raise RuntimeError(
            "current_connection() must be called from a thunk's own thread; "
            "threads the thunk starts must be handed the connection")
    return handler


# ---------------------------------------------------------------------------
# The handler adapter: runs in the connection's thread.
# ---------------------------------------------------------------------------

def _shorter(timeout: Optional[float], seconds: float) -> float:
    """Return the shorter of timeout (None: no limit) and seconds."""
    return seconds if timeout is None else min(timeout, seconds)


class _SocketReader(io.RawIOBase):
    """Unbuffered reads from a socket, for the connections an io.FileIO on
    the descriptor cannot read (see _raw_reader()).

    A read waits up to timeout seconds (the idle timeout, which the socket
    has), and, while a line is due (line_due()), no longer than its
    deadline.
    """

    def __init__(self, sock: socket.socket, timeout: Optional[float]) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self._deadline: Optional[float] = None  # time.monotonic()'s
        self._line_timeout: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            if self._deadline is not None:
                self._wait_within_line()
            return self._sock.recv_into(buffer)
        except socket.timeout:
            raise self._timed_out() from None

    def _wait_within_line(self) -> None:
        """Wait for input until the line is due: here, not by the socket's
        own timeout, which a thread writing to the client meanwhile relies
        on, and which stays as it is."""
        if not _ready(self._sock, True, _shorter(self._timeout, self._left())):
            raise socket.timeout("timed out")

    def _left(self) -> float:
        """Seconds left until the line is due; socket.timeout if none."""
        assert self._deadline is not None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left

    def _timed_out(self) -> IdleTimeout:
        """The IdleTimeout for a read that timed out: which limit it hit."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return IdleTimeout("the client took more than %s seconds to "
                               "send a line" % (self._line_timeout,))
        return IdleTimeout("the client sent nothing for %s seconds"
                           % (self._timeout,))

    @contextlib.contextmanager
    def line_due(self, seconds: float) -> Iterator[None]:
        """While a line is read: reads fail with IdleTimeout once seconds
        have passed from now, however steadily the client sends.  A line
        read within a line (the rest of one too long) shares its deadline."""
        if self._deadline is not None:
            yield
            return
        self._deadline = time.monotonic() + seconds
        self._line_timeout = seconds
        try:
            yield
        finally:
            self._deadline = None

    def fileno(self) -> int:
        return self._sock.fileno()


class _SocketWriter(io.RawIOBase):
    """Unbuffered writes to a socket.

    Each write is one send(), so a timeout bounds the wait for the client
    to make room, not the time a large write takes; the buffer above sends
    the rest.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except socket.timeout:
            raise IdleTimeout("the client read nothing for %s seconds"
                              % (self._sock.gettimeout(),)) from None

    def fileno(self) -> int:
        return self._sock.fileno()


class _DescriptorWriter(_SocketWriter):
    """_SocketWriter for a socket with a timeout, whose descriptor is
    non-blocking, where descriptors are files: os.write() first, which
    costs one system call where send() with a timeout first polls, and a
    wait for room only when there is none."""

    def write(self, data: Any) -> int:
        descriptor = self._sock.fileno()
        try:
            return os.write(descriptor, data)
        except BlockingIOError:
            pass
        timeout = self._sock.gettimeout()
        if not _ready(self._sock, False, timeout):
            raise IdleTimeout("the client read nothing for %s seconds"
                              % (timeout,))
        return os.write(descriptor, data)


# Bytes a connection with an idle timeout keeps queued and not yet sent, at
# most (TCP_NOTSENT_LOWAT).  Without that bound the kernel grows the send
# queue to megabytes and reports room in it only once half of it is gone:
# a write to a client that reads steadily would wait longer than the
# timeout for one step of progress.
_UNSENT_MAX = 128 * 1024


def _writes_show_progress(sock: socket.socket) -> None:
    """Make sock report room for writing as its client reads, not once half
    of what is queued has gone: for an idle timeout that measures progress.
    Where the system has no TCP_NOTSENT_LOWAT (Windows), a large write to a
    slow reader may take the timeout for a step that is under way."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, _UNSENT_MAX)
        except OSError:
            pass  # an older kernel: as where there is no such option


def _is_tls(sock: socket.socket) -> bool:
    """Is sock an ssl.SSLSocket?  (Without importing ssl for plain servers.)"""
    return hasattr(sock, "unwrap")


def _poll_ready(sock: socket.socket, read: bool,
                timeout: Optional[float]) -> bool:
    """Wait up to timeout seconds (None: no limit) for sock to be readable
    (or writable); return False if time ran out."""
    poller = select.poll()
    poller.register(sock, select.POLLIN if read else select.POLLOUT)
    return _until(lambda wait: bool(poller.poll(
        None if wait is None else wait * 1000)), timeout)


def _select_ready(sock: socket.socket, read: bool,
                  timeout: Optional[float]) -> bool:
    """_poll_ready() for Windows, which has no poll(), and whose select()
    has no limit on descriptor numbers."""
    waiting = [sock]
    return _until(lambda wait: any(select.select(
        waiting if read else [], [] if read else waiting, [], wait)[:2]),
        timeout)


def _until(ready: Callable[[Optional[float]], bool],
           timeout: Optional[float]) -> bool:
    """Return ready(wait) once it is True, or False after timeout seconds
    (None: no limit), waiting again as long as one wait cannot cover them."""
    if _wait_time(timeout) is None:
        return ready(_poll_time(timeout))
    assert timeout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        if ready(_poll_time(left)):
            return True
        if left <= _LONGEST_POLL:
            return False


_ready = _poll_ready if hasattr(select, "poll") else _select_ready

# Is a socket's fileno() a file descriptor that os-level I/O takes?  Not on
# Windows, where it is a SOCKET handle.
_SOCKETS_ARE_FILES = os.name == "posix"

# Can this system fork, run a PROGRAM on a socket and in a process group of
# its own, and change uids?  Worker processes and the command line's
# PROGRAM mode need that, which Windows lacks.
_POSIX = os.name == "posix"


def _tls_call(sock: Any, call: Callable[[Any], int], data: Any,
              timeout: Optional[float], silent: str) -> int:
    """Return call(data), a read or write on the TLS connection sock.

    With a timeout, sock is non-blocking and this waits up to timeout
    seconds for each step of progress the TLS layer needs (SSLWantRead or
    SSLWantWriteError), not for the whole call: a client that moves
    steadily is never cut, one that stalls gets IdleTimeout ("the client
    <silent> nothing ...").  An ssl.SSLError is remembered as the client's
    doing (a corrupt record, say), for the server's diagnostics.
    """
    import ssl  # sock is an SSLSocket: ssl is imported already
    while True:
        try:
            return call(data)
        except ssl.SSLWantReadError:
            read = True
        except ssl.SSLWantWriteError:
            read = False
        except ssl.SSLError as exc:
            _bound.tls_error = exc
            raise
        if not _ready(sock, read, timeout):
            raise IdleTimeout("the client %s nothing for %s seconds"
                              % (silent, timeout))


class _TLSReader(_SocketReader):
    """_SocketReader for a TLS connection: see _tls_call()."""

    def readinto(self, buffer: Any) -> int:
        timeout = self._timeout
        try:
            if self._deadline is not None:
                timeout = _shorter(timeout, self._left())
            return _tls_call(self._sock, self._sock.recv_into, buffer,
                             timeout, "sent")
        except socket.timeout:  # IdleTimeout too: which limit was hit?
            raise self._timed_out() from None


class _TLSWriter(_SocketWriter):
    """_SocketWriter for a TLS connection: see _tls_call()."""

    def __init__(self, sock: socket.socket, timeout: Optional[float]) -> None:
        super().__init__(sock)
        self._timeout = timeout

    def write(self, data: Any) -> int:
        return _tls_call(self._sock, self._sock.send, data, self._timeout,
                         "read")


def _raw_reader(sock: socket.socket, timeout: Optional[float],
                line_timeout: Optional[float]) -> io.RawIOBase:
    """Return an unbuffered binary reader on sock, whose timeout is timeout.

    A plain blocking socket read with no line_timeout gets a FileIO on its
    descriptor: readinto() in C, no Python call per read.  The rest need
    the socket's own recv_into(), and, for the timeouts, waits of their
    own (_SocketReader).
    """
    if _is_tls(sock):
        return _TLSReader(sock, timeout)
    if (_SOCKETS_ARE_FILES and type(sock) is socket.socket
            and timeout is None and line_timeout is None):
        return io.FileIO(sock.fileno(), "rb", closefd=False)
    return _SocketReader(sock, timeout)


def _raw_writer(sock: socket.socket, timeout: Optional[float]
                ) -> io.RawIOBase:
    """Return an unbuffered binary writer on sock, whose timeout is timeout.

    A plain blocking socket gets a FileIO on its descriptor: write() in C,
    no Python call per flush.  A socket with a timeout (whose descriptor is
    non-blocking) needs a wait for room when there is none; a TLS socket,
    or any socket where descriptors are not files, its own send().
    """
    if _is_tls(sock):
        return _TLSWriter(sock, timeout)
    if _SOCKETS_ARE_FILES and type(sock) is socket.socket:
        if timeout is None:
            return io.FileIO(sock.fileno(), "wb", closefd=False)
        return _DescriptorWriter(sock)
    return _SocketWriter(sock)


# What a thunk's binary stream drops before its next read returns anything
# (_BinaryReader.drop), so that each read of either layer starts where the
# last line ended:
_KEEP = 0         # nothing
_AN_LF = 1        # an LF, if it comes next: sys.stdin's last line ended at a
                  # CR, and a CRLF's LF had not come yet
_TO_LF = 2        # the rest of a line too long for sys.stdin.buffer, to its LF
_TO_LINE_END = 3  # the rest of a line too long for sys.stdin, to its CR or LF


def _line_end(data: bytes, cr_ends: bool) -> int:
    """Return the index of the first line end in data, or -1: its first LF,
    or its first CR or LF if cr_ends."""
    lf = data.find(b"\n")
    if not cr_ends:
        return lf
    cr = data.find(b"\r", 0, len(data) if lf < 0 else lf)
    return lf if cr < 0 else cr


_Line = TypeVar("_Line", str, bytes)

# The buffer's own peek() and read(), for a thunk's streams to call on a
# _BinaryReader past its overrides: a global name costs less to find.
_peek = io.BufferedReader.peek
_read = io.BufferedReader.read


def _too_long(limit: int, unit: str) -> LineTooLong:
    return LineTooLong("line longer than max_line=%d %s" % (limit, unit))


class _BinaryReader(io.BufferedReader):
    """sys.stdin.buffer of a thunk.

    Before any read that may wait for the client, it flushes the
    connection's output (the thunk's sys.stdout), so that a thunk can print
    a prompt without a newline and then wait for the answer; a read that
    its buffer serves flushes nothing.  readline() (and so iteration and
    readlines()) is capped at max_line bytes (None: no cap), the line end
    (LF or CRLF) not counted.  A line too long raises LineTooLong; the rest
    of it, to its LF, is dropped before the next read returns anything, as
    is the LF of a CRLF whose CR ended sys.stdin's last line (see drop):
    each read starts where the last line of either layer ended.
    """

    # Slots, not the instance dict: read on every line, they cost less so.
    __slots__ = ("max_line", "line_timeout", "output", "drop", "waits",
                 "at_eof")

    def __init__(self, raw: io.RawIOBase, size: int,
                 output: Optional[io.IOBase]) -> None:
        super().__init__(raw, size)
        self.max_line: Optional[int] = None
        self.line_timeout: Optional[float] = None  # seconds a line may take
        self.output = output  # None until the thunk writes
        self.drop = _KEEP
        # May the next read find the buffer empty, and so wait for the
        # client?  Each read that knows what it left in the buffer says.
        self.waits = True
        self.at_eof = False  # the last read found the client's input ended

    def flush_output(self) -> None:
        """Flush the connection's output, unless there is none yet or the
        thunk closed it."""
        output = self.output
        if output is not None and not output.closed:
            output.flush()

    def look(self) -> bytes:
        """Return what the buffer holds, without taking it: if it holds
        nothing, flush the output and read once (b"": the input ended)."""
        if self.waits:
            self.flush_output()
        data = _peek(self)
        self.waits = self.at_eof = not data
        return data

    def take(self, count: int, held: int) -> bytes:
        """Take count bytes of the held ones that look() returned."""
        self.waits = count == held
        return _read(self, count)

    def dropped(self) -> None:
        """Drop what drop says, reading as far as that needs."""
        while self.drop:
            data = self.look()
            if self.drop == _AN_LF or not data:
                if data.startswith(b"\n"):
                    self.take(1, len(data))
                self.drop = _KEEP
                continue
            end = _line_end(data, self.drop == _TO_LINE_END)
            self.take(len(data) if end < 0 else end + 1, len(data))
            if end >= 0:
                self.drop = _AN_LF if data[end] == 13 else _KEEP

    def readline(self, size: Optional[int] = -1) -> bytes:
        if (size is None or size < 0) and not self.drop and self.line_timeout is None:
            # The common case in this one call: a whole line in what the
            # buffer holds, or one read brings.
            data = self.look()
            end = data.find(b"\n")
            if end >= 0 and (self.max_line is None or end - (data[end - 1:end] == b"\r")
                             <= self.max_line):
                return self.take(end + 1, len(data))
        return self.timed(self._read_line, size)

    def timed(self, read_line: Callable[[Optional[int]], _Line],
              size: Optional[int]) -> _Line:
        """Return read_line(size), a line of either layer, read within
        line_timeout if one is set."""
        if self.line_timeout is None:
            return read_line(size)
        source = self.raw
        assert isinstance(source, _SocketReader)  # see _raw_reader()
        with source.line_due(self.line_timeout):
            return read_line(size)

    def _read_line(self, size: Optional[int]) -> bytes:
        """readline(size): take from the buffer exactly the line it returns.

        A line that cannot be returned whole (too long, or an IdleTimeout
        while it comes) is lost, and its rest is dropped before the next
        read, so that it never reads as a line of its own.
        """
        if self.drop:
            self.dropped()
        room = sys.maxsize if size is None or size < 0 else size
        pieces: List[bytes] = []
        length = 0  # bytes in pieces
        tail = b""  # their last two
        midline = False  # bytes of the line are taken, its end is not
        try:
            while room > 0:
                held = self.look()
                data = held[:room]
                if not data:
                    break
                end = data.find(b"\n")
                piece = data if end < 0 else data[:end + 1]
                self.take(len(piece), len(held))
                midline = end < 0
                pieces.append(piece)
                length += len(piece)
                room -= len(piece)
                tail = (tail + piece)[-2:]
                # The line end, LF or CRLF, counts as nothing; so does a CR
                # at the end of what came, while its LF may follow.
                if end >= 0:
                    line_end = 2 if tail == b"\r\n" else 1
                else:
                    line_end = 1 if tail.endswith(b"\r") else 0
                if self.max_line is not None and length - line_end > self.max_line:
                    raise _too_long(self.max_line, "bytes")
                if end >= 0:
                    break
        except BaseException:
            if midline:
                self.drop = _TO_LF
            raise
        return b"".join(pieces)

    def read(self, size: Optional[int] = -1) -> bytes:
        if self.drop:
            self.dropped()
        if size == 0:
            return b""
        if size is not None and size > 0 and not self.waits:
            held = _peek(self)  # what is buffered, no read
            if size <= len(held):
                return self.take(size, len(held))
        self.flush_output()  # more than the buffer holds: the read may wait
        self.waits = True
        return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        if self.drop:
            self.dropped()
        if size == 0:
            return b""
        if not self.waits:
            held = _peek(self)  # what is buffered, no read
            return self.take(len(held) if size < 0 else min(size, len(held)),
                             len(held))
        self.flush_output()  # one read, which may wait
        return super().read1(size)

    def readinto(self, buffer: Any) -> int:
        return self._copied(self.read, buffer)

    def readinto1(self, buffer: Any) -> int:
        return self._copied(self.read1, buffer)

    @staticmethod
    def _copied(read: Callable[[int], bytes], buffer: Any) -> int:
        """Fill buffer with what read(its length) returns; return the count."""
        view = memoryview(buffer).cast("B")
        data = read(len(view))
        view[:len(data)] = data
        return len(data)

    def peek(self, size: int = 0) -> bytes:
        if self.drop:
            self.dropped()
        return self.look()


def _cr_is_a_byte(encoding: str) -> bool:
    """Does encoding write CR and LF as the single bytes 13 and 10?"""
    return "\r\n".encode(encoding) == b"\r\n"


class _TextReader(io.TextIOBase):
    """sys.stdin of a thunk, for an encoding that writes CR and LF as the
    bytes 13 and 10 (most do; see _cr_is_a_byte()).

    It takes from its binary stream, the buffer attribute, exactly the
    bytes of what it returns, so what follows a line is still there for
    sys.stdin.buffer to read.  Lines end at LF, CRLF or a bare CR, as the
    egg's read-line has it: a line ended by a CR is returned at once, and
    the LF of a CRLF that comes later is dropped by the next read of
    either layer.  readline() is capped at max_line characters, the line
    end not counted; the rest of a line too long is dropped, to its end,
    before the next read returns anything.
    """

    __slots__ = ("max_line", "_binary", "_encoding", "_errors", "_decoder",
                 "_pending")  # as _BinaryReader's

    def __init__(self, binary: _BinaryReader, encoding: str,
                 errors: str) -> None:
        super().__init__()
        self.max_line: Optional[int] = None
        self._binary = binary
        self._encoding = encoding
        self._errors = errors
        # For a character that comes in pieces, as a line too long or
        # read(n) may cut it; _pending says that it holds the first bytes.
        self._decoder = codecs.getincrementaldecoder(encoding)(errors)
        self._pending = False

    @property
    def buffer(self) -> _BinaryReader:
        return self._binary

    # Read-only, as TextIOWrapper's; typeshed has them writable.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    @property
    def errors(self) -> str:  # type: ignore[override]
        return self._errors

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._binary.fileno()

    # typeshed gives every IOBase's readline() bytes: hence the ignore.
    def readline(self, size: Optional[int] = -1) -> str:  # type: ignore[override]
        binary = self._binary
        if ((size is None or size < 0) and not binary.drop and not self._pending
                and binary.line_timeout is None):
            # The common case in this one call, input()'s: a whole line,
            # ended by LF or CRLF, in what the buffer holds or one read
            # brings.  Anything else, the general path.  (binary.look()
            # and take(), written out.)
            output = binary.output
            if binary.waits and output is not None and not output.closed:
                output.flush()
            data = _peek(binary)
            end = data.find(b"\n")
            line = data[:end]
            if line[-1:] == b"\r":
                line = line[:-1]  # a CRLF
            if end >= 0 and 13 not in line:  # no CR: 13, not b"\r", is C alone
                try:
                    text = line.decode(self._encoding, self._errors)
                except UnicodeDecodeError:
                    pass  # the general path raises it, and drops the line
                else:
                    if self.max_line is None or len(text) <= self.max_line:
                        binary.waits = end + 1 == len(data)
                        _read(binary, end + 1)
                        return text + "\n"
        return binary.timed(self._read_line, size)

    def _read_line(self, size: Optional[int]) -> str:
        """readline(size): take from the binary stream exactly the bytes of
        the line it returns.

        A line that cannot be returned whole (too long, undecodable with
        decode_errors "strict", or an IdleTimeout while it comes) is lost,
        and its rest is dropped before the next read, so that it never
        reads as a line of its own.
        """
        binary = self._binary
        if binary.drop:
            binary.dropped()
        room = sys.maxsize if size is None or size < 0 else size
        pieces: List[str] = []
        length = 0  # characters in pieces
        midline = False  # bytes of the line are taken, its end is not
        try:
            while room > 0:
                data = binary.look()
                if not data:
                    pieces.append(self._decoded(b"", True))
                    break
                # Each byte is at most one character: room bytes are enough.
                end = _line_end(data[:room], True)
                if end >= 0:
                    binary.take(self._line_end_taken(data, end), len(data))
                    midline = False
                    text = self._decoded(data[:end], True)
                    if self.max_line is not None and length + len(text) > self.max_line:
                        raise _too_long(self.max_line, "characters")
                    return "".join(pieces) + text + "\n"
                piece = data[:room]
                binary.take(len(piece), len(data))
                midline = True
                text = self._decoded(piece, False)
                pieces.append(text)
                length += len(text)
                room -= len(text)
                if self.max_line is not None and length > self.max_line:
                    raise _too_long(self.max_line, "characters")
        except BaseException:
            if midline:
                binary.drop = _TO_LINE_END
            self._decoder.reset()
            self._pending = False
            raise
        return "".join(pieces)

    def _line_end_taken(self, data: bytes, end: int) -> int:
        """Return how many bytes of data a line ending at data[end] takes:
        a CRLF whole; a CR at the end of data, leaving its LF, if one comes,
        for the binary stream to drop."""
        if data[end] == 13:  # CR
            if end + 1 == len(data):
                self._binary.drop = _AN_LF
            elif data[end + 1] == 10:
                return end + 2
        return end + 1

    def _decoded(self, data: bytes, final: bool) -> str:
        """Return data decoded, after what a last call left pending."""
        if final and not self._pending:
            return data.decode(self._encoding, self._errors)
        self._pending = not final
        text: str = self._decoder.decode(data, final)
        return text

    def read(self, size: Optional[int] = -1) -> str:
        binary = self._binary
        if size is None or size < 0:
            return self._translated(binary.read(), True)
        pieces: List[str] = []
        room = size
        while room > 0:
            data = binary.read1(room)
            text = self._translated(data, not data)
            if not data:
                pieces.append(text)
                break
            pieces.append(text)
            room -= len(text)
        return "".join(pieces)

    def _translated(self, data: bytes, final: bool) -> str:
        """Return data decoded, with each CRLF and CR as LF; a CR at its end
        leaves the LF that may follow for the binary stream to drop."""
        if data.endswith(b"\r"):
            self._binary.drop = _AN_LF
        return self._decoded(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n"),
                             final)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._binary.close()


class _WideTextReader(io.TextIOWrapper):
    """sys.stdin of a thunk whose encoding writes CR or LF in more than one
    byte (UTF-16): Python's own text layer, which reads ahead (what
    follows a line is not left in the buffer for sys.stdin.buffer) and
    waits for the character after a CR to see whether an LF follows.
    readline() is capped at max_line characters, as _TextReader's, and the
    rest of a line too long is dropped too.
    """

    max_line: Optional[int] = None
    _dropping = False  # the rest of a line too long is to be dropped

    def readline(self, size: Optional[int] = -1) -> str:  # type: ignore[override]
        binary: _BinaryReader = self.buffer  # type: ignore[assignment]
        return binary.timed(self._read_line, size)

    def _read_line(self, size: Optional[int]) -> str:
        while self._dropping:
            rest = super().readline(DEFAULT_MAX_LINE)
            self._dropping = bool(rest) and not rest.endswith("\n")
        limit = self.max_line
        size = -1 if size is None else size
        if limit is None or 0 <= size <= limit:
            line: str = super().readline(size)
            return line
        line = super().readline(min(limit, sys.maxsize - 1) + 1)
        if len(line) > limit and not line.endswith("\n"):
            self._dropping = True
            raise _too_long(limit, "characters")
        return line


_TextStdin = Union[_TextReader, _WideTextReader]


def _buffer_size(size: int) -> int:
    """Return a handler's rbufsize or wbufsize as io's buffers take it,
    with socketserver's meanings too: a negative size is
    io.DEFAULT_BUFFER_SIZE; 0, unbuffered, is one byte (nothing read ahead;
    _UnbufferedWriter holds nothing back)."""
    return io.DEFAULT_BUFFER_SIZE if size < 0 else max(size, 1)


class _UnbufferedWriter(io.BufferedWriter):
    """The binary output of a handler whose wbufsize is 0: each write goes
    out whole at once, as socketserver's unbuffered wfile does."""

    def write(self, data: Any) -> int:
        count = super().write(data)
        self.flush()
        return count


class ThunkHandler(socketserver.StreamRequestHandler):
    """Run the server's thunk with sys.stdin and sys.stdout on the connection.

    For the thunk's thread only, ``sys.stdin`` and ``sys.stdout`` are text
    streams on the connection (``self.stdin``, ``self.stdout``); their
    ``.buffer`` attributes are the binary ``self.rfile`` and ``self.wfile``.
    Output is flushed at every newline (unless line_buffering is False),
    before every read that has to wait for the client, and when the thunk
    returns.  Reads and writes raise IdleTimeout after the server's
    idle_timeout without progress (over TLS too: the connection socket is
    then non-blocking, and the streams wait); a line longer than the
    server's max_line raises LineTooLong.  sys.stdin takes from
    sys.stdin.buffer only the bytes of what it returns, so a thunk may read
    a line of text, then a counted body of bytes after it (for encodings
    that write CR and LF as single bytes, which most do).  An EOFError
    from input() at the end of the client's input that escapes the thunk
    ends the request normally.  Any other exception propagates to the
    server, which logs it and resets the connection.

    A thunk must not assign sys.stdin or sys.stdout (contextlib's
    redirect_stdout does): that replaces them for every thread in the
    process.  To capture output, print(file=...) to a buffer instead.

    Class variables that may be overridden by subclasses:

    - encoding: of both directions, "utf-8".
    - decode_errors: what undecodable input becomes, "replace" (U+FFFD);
      "strict" makes reads raise UnicodeDecodeError, "surrogateescape"
      keeps the bytes as lone surrogates.
    - encode_errors: what unencodable output does, "strict" (raise);
      "surrogateescape" writes back bytes kept by decode_errors.
    - newline: written for each "\\n" printed; "\\n", or "\\r\\n" for line
      protocols.  Input accepts "\\n", "\\r\\n" and "\\r" line ends.
    - line_buffering: True flushes at every newline; False buffers output
      in blocks of wbufsize bytes, for bulk output.
    - rbufsize: size in bytes of the input buffer, which both layers read
      through, 512: the largest Python's own allocator serves, so an idle
      connection holds little.
    - wbufsize: size in bytes of the binary output buffer,
      io.DEFAULT_BUFFER_SIZE: sys.stdout.buffer.write() of short records
      goes out in blocks of that size.  It is made at the first output.
      For both, socketserver's values mean what they mean there: -1 the
      default size, 0 unbuffered.
    - timeout, disable_nagle_algorithm: as in StreamRequestHandler; Nagle
      is disabled so a flushed line leaves at once.

    The server checks these when it is made and when it starts serving, so
    a value no connection could be served with fails before any does.

    Instance variables: those of StreamRequestHandler, plus local_address,
    stdin and stdout; the four streams are made on first use.
    """

    encoding = "utf-8"
    decode_errors = "replace"
    encode_errors = "strict"
    newline = "\n"
    line_buffering = True
    rbufsize = 512
    wbufsize = io.DEFAULT_BUFFER_SIZE
    disable_nagle_algorithm = True

    server: "ThreadingTCPServer"  # the handler runs thunks of ours only

    def setup(self) -> None:
        """Make rfile, wfile and the text streams stdin, stdout on the connection."""
        self.connection = self.request
        self.local_address = self.server.local_address(self.request)
        timeout = _socket_time(self.timeout)
        if timeout is not None:
            self.connection.settimeout(timeout)
            _writes_show_progress(self.connection)
        if self.disable_nagle_algorithm and not _is_unix(self.connection):
            self.connection.setsockopt(socket.IPPROTO_TCP,
                                       socket.TCP_NODELAY, True)
        self._timeout = self.connection.gettimeout()
        if _is_tls(self.connection) and (
                self._timeout is not None
                or _wait_time(self.server.line_timeout) is not None):
            # The ssl module would give each TLS call the whole timeout,
            # however steadily the client moves, and a blocking one none
            # at all: the streams wait instead.
            self.connection.settimeout(0.0)
        # Each stream is made on first use: a connection waiting for its
        # client's first line holds no output buffer, and many thunks
        # never read.
        self._wfile: Optional[io.BufferedWriter] = None
        self._stdout: Optional[io.TextIOWrapper] = None
        self._rfile: Optional[_BinaryReader] = None
        self._stdin: Optional[_TextStdin] = None

    @property
    def wfile(self) -> io.BufferedWriter:  # type: ignore[override]
        """The binary output stream, sys.stdout.buffer (made on first use)."""
        if self._wfile is None:
            writer = (_UnbufferedWriter if self.wbufsize == 0  # socketserver's meaning
                      else io.BufferedWriter)
            self._wfile = writer(_raw_writer(self.connection, self._timeout),
                                 _buffer_size(self.wbufsize))
            self._output_made()
        return self._wfile

    @property
    def stdout(self) -> io.TextIOWrapper:
        """The text output stream, the thunk's sys.stdout (made on first use)."""
        if self._stdout is None:
            self._stdout = io.TextIOWrapper(
                self.wfile, encoding=self.encoding, errors=self.encode_errors,
                newline=self.newline, line_buffering=self.line_buffering,
                write_through=self.wbufsize == 0)
            self._output_made()
            if _bound.handler is self:  # in the thunk's own thread
                _switch.bind(self._stdout)
        return self._stdout

    def _made_output(self) -> Optional[io.IOBase]:
        """Return the outer output stream made so far: stdout, else wfile,
        else None (nothing written yet, nothing to flush)."""
        return self._stdout if self._stdout is not None else self._wfile

    def _output_made(self) -> None:
        """Have reads flush the output stream just made (see _BinaryReader)."""
        if self._rfile is not None:
            self._rfile.output = self._made_output()

    @property
    def rfile(self) -> _BinaryReader:  # type: ignore[override]
        """The binary input stream, sys.stdin.buffer (made on first use)."""
        if self._rfile is None:
            line_timeout = _wait_time(self.server.line_timeout)
            rfile = _BinaryReader(
                _raw_reader(self.connection, self._timeout, line_timeout),
                _buffer_size(self.rbufsize), self._made_output())
            rfile.max_line = self.server.max_line
            rfile.line_timeout = line_timeout
            self._rfile = rfile
        return self._rfile

    @property
    def tls(self) -> Optional[Dict[str, Any]]:
        """What the connection's TLS handshake settled (tls_details()), or
        None for a plain connection."""
        return tls_details(self.connection)

    @property
    def stdin(self) -> "_TextStdin":
        """The text input stream, the thunk's sys.stdin (made on first use)."""
        if self._stdin is None:
            stdin: _TextStdin
            if _cr_is_a_byte(self.encoding):
                stdin = _TextReader(self.rfile, self.encoding,
                                    self.decode_errors)
            else:
                stdin = _WideTextReader(self.rfile, encoding=self.encoding,
                                        errors=self.decode_errors)
            stdin.max_line = self.server.max_line
            self._stdin = stdin
        return self._stdin

    def handle(self) -> None:
        """Call the thunk with this thread's standard streams bound, then flush."""
        with _switch:
            _bound.handler = self
            try:
                thunk = self.server.thunk
                assert thunk is not None  # check_settings() saw to that
                thunk()
            except EOFError as exc:
                if not (self._rfile is not None and self._rfile.at_eof
                        and exc.args == _INPUT_EOF):
                    raise  # not input() at the end of the client's input
            finally:
                _switch.unbind()
                _bound.handler = None
        output = self._made_output()
        if output is not None and not output.closed:  # closed by the thunk: done
            output.flush()

    def finish(self) -> None:
        """Flush what is left and close the streams; the server closes the socket."""
        output = self._made_output()
        try:
            if output is not None:
                output.close()
        except OSError:
            pass  # the client is gone; the server has been told by now
        if self._stdin is not None:
            self._stdin.close()
        elif self._rfile is not None:
            self._rfile.close()


# ---------------------------------------------------------------------------
# The server's settings.  Each is a class attribute of ThreadingTCPServer,
# its default, and a keyword of its constructor and of make_tcp_server();
# check_settings() checks each with its function here.
# ---------------------------------------------------------------------------

def _check_thunk(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError("%s must be callable, not %s"
                        % (name, type(value).__name__))


def _check_limit(name: str, value: object) -> None:
    if value is not None:
        _check_int(name, value, 1, sys.maxsize, "a positive int or None")


def _check_count(name: str, value: object) -> None:
    _check_int(name, value, 0, sys.maxsize, "an int >= 0")


def _check_timeout(name: str, value: object) -> None:
    _check_seconds(name, value)


def _check_drain(name: str, value: object) -> None:
    _check_seconds(name, value, zero_ok=True)


def _check_duration(name: str, value: object, zero_ok: bool = False) -> None:
    if value is None:
        raise TypeError("%s must be a number of seconds %s, not None"
                        % (name, ">= 0" if zero_ok else "> 0"))
    _check_seconds(name, value, zero_ok)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError("%s must be True or False, not %r" % (name, value))


def _check_context(name: str, value: object) -> None:
    if value is not None and not hasattr(value, "wrap_socket"):
        raise TypeError("%s must be an ssl.SSLContext or None, not %s"
                        % (name, type(value).__name__))


def _check_debug(name: str, value: object) -> None:
    if not isinstance(value, (bool, str)) or value == "":
        error = ValueError if value == "" else TypeError
        raise error("%s must be a bool or a non-empty str, not %r"
                    % (name, value))


def _check_networks(name: str, value: object) -> None:
    _networks(name, value)


# The largest rbufsize or wbufsize of a ThunkHandler: each connection
# allocates its buffers whole, at once.
_MAX_BUFFER = 2 ** 30


def _check_handler(handler: Type[ThunkHandler]) -> None:
    """Raise TypeError or ValueError for a class attribute of a ThunkHandler
    that no connection could be served with."""
    name = handler.__name__
    for size in ("rbufsize", "wbufsize"):
        _check_int("%s.%s" % (name, size), getattr(handler, size),
                   -sys.maxsize, _MAX_BUFFER,
                   "an int of at most %d bytes (< 0: the default, 0: "
                   "unbuffered)" % _MAX_BUFFER)
    _check_seconds(name + ".timeout", handler.timeout)
    _check_flag(name + ".line_buffering", handler.line_buffering)
    if handler.newline not in ("\n", "\r\n", "\r", "", None):
        raise ValueError("%s.newline must be '\\n', '\\r\\n', '\\r', '' or None, "
                         "not %r" % (name, handler.newline))
    for attribute in ("encoding", "decode_errors", "encode_errors"):
        value = getattr(handler, attribute)
        if not isinstance(value, str):
            raise TypeError("%s.%s must be a str, not %s"
                            % (name, attribute, type(value).__name__))
    _check_codec(name, handler.encoding, handler.decode_errors,
                 handler.encode_errors)


def _check_codec(name: str, encoding: str, decode_errors: str,
                 encode_errors: str) -> None:
    """Raise ValueError unless encoding is a text encoding, and its error
    handlers are known and work in their direction (tried on bytes and
    characters it cannot take).  sys.stdin's reads count on at most one
    character for each byte: a decode_errors that makes more (as
    "backslashreplace" does) is refused where CR is a byte."""
    try:
        if not getattr(codecs.lookup(encoding), "_is_text_encoding", True):
            raise LookupError("%r is not a text encoding" % (encoding,))
    except LookupError as exc:
        raise ValueError("%s.encoding: %s" % (name, exc)) from None
    try:
        text = b"\xff\xfe\xfd".decode(encoding, decode_errors)
    except UnicodeError:
        text = ""  # it raises, as "strict" does
    except (LookupError, TypeError) as exc:  # unknown, or not for decoding
        raise ValueError("%s.decode_errors: %s" % (name, exc)) from None
    if len(text) > 3 and _cr_is_a_byte(encoding):
        raise ValueError("%s.decode_errors must make at most one character "
                         "of each byte ('replace', 'surrogateescape', "
                         "'ignore', 'strict'), not %r" % (name, decode_errors))
    try:
        "\udcff\u20ac".encode(encoding, encode_errors)
    except UnicodeError:
        pass  # it raises, as "strict" does
    except (LookupError, TypeError) as exc:  # unknown, or not for encoding
        raise ValueError("%s.encode_errors: %s" % (name, exc)) from None


_SETTINGS: Dict[str, Callable[[str, Any], None]] = {
    "thunk": _check_thunk,
    "max_requests": _check_limit,
    "max_per_client": _check_limit,
    "idle_timeout": _check_timeout,
    "line_timeout": _check_timeout,
    "drain_timeout": _check_drain,
    "reset_grace": _check_duration,
    "max_line": _check_limit,
    "ssl_context": _check_context,
    "handshake_timeout": _check_duration,
    "max_spare_threads": _check_count,
    "spare_thread_lifetime": _check_duration,
    "proxy_protocol": _check_flag,
    "trusted_proxies": _check_networks,
    "verify_in_thread": _check_flag,
    "debug": _check_debug,
}

# The constructor's keywords that name a setting otherwise: socketserver's
# own timeout attribute is handle_request()'s, so ours is idle_timeout.
_KEYWORDS = {"timeout": "idle_timeout"}


# ---------------------------------------------------------------------------
# The server's helpers, one job each: the slots and counters, the request
# threads, the worker processes.
# ---------------------------------------------------------------------------

class _Open:
    """What the server keeps of an open request.

    number: its serial number; host: its client's host, or None until a
    PROXY header names it; local: its local address, once known; tls:
    whether the server wrapped it in TLS, so its thread runs the handshake;
    counted: whether how it ended is counted yet.
    """

    __slots__ = ("number", "host", "local", "tls", "counted")

    def __init__(self, number: int, host: Optional[str], tls: bool) -> None:
        self.number = number
        self.host = host
        self.local: Optional[_Address] = None
        self.tls = tls
        self.counted = False


class _Slots:
    """The server's request slots, its open requests and its counters.

    One lock guards them (and the request threads' lists): the accept
    thread takes a slot before it accepts, a request gives it back when
    its connection closes, stats() reads from any thread.  The condition
    freed wakes the accepting thread when a slot comes free, a request thread
    turns spare, or shutdown() wants the thread back.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.freed = threading.Condition(self.lock)
        self.taken = 0           # slots held: open requests, and one pending
        self.pending = False     # the accepting thread holds a slot, no request
        self.full = False        # "all slots busy" has been logged
        self.stopping = False    # shutdown() wants the accepting thread back
        self.open: Dict[socket.socket, _Open] = {}
        self.per_client: Dict[str, int] = {}  # host -> its requests open
        self.drained: Set[socket.socket] = set()  # reset by server_close()
        self.counts = dict.fromkeys(_STATS, 0)  # stats() without "active"
        self.dispatched = 0      # requests handed to a thread so far
        self.ended = 0           # open requests counted as ended already

    def take(self, limit: Optional[int], timeout: Optional[float],
             log: Callable[[str, int], None]) -> None:
        """Hold a slot for the next connection, waiting up to timeout for one.

        Raises OSError if none frees in time or shutdown() ends the wait.
        A full limit is logged once on entry and once on exit.
        """
        with self.lock:
            if self.pending:
                return  # still held: the last accept failed
            if limit is None or (self.taken < limit and not self.full):
                self.taken += 1
                self.pending = True
                self.full = False  # no limit now: nothing to report
                return
            became_full = not self.full
            self.full = True
        if became_full:
            log("all %d request slots busy; new clients wait" % limit,
                logging.INFO)
        with self.lock:
            self.freed.wait_for(lambda: self.stopping or self.taken < limit,
                                _wait_time(timeout))
            if self.stopping or self.taken >= limit:
                raise OSError("no request slot is free")
            self.taken += 1
            self.pending = True
            self.full = False
        log("a request slot is free; accepting again", logging.INFO)

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds, or until shutdown(); True if stopping."""
        with self.lock:
            return self.freed.wait_for(lambda: self.stopping, timeout)

    def count_in(self, host: Optional[str],
                 max_per_client: Optional[int]) -> bool:
        """Count one more request from host (None: not known yet), unless it
        has max_per_client open already: False then.  Lock held."""
        if host is None:
            return True
        opened = self.per_client.get(host, 0)
        if max_per_client is not None and opened >= max_per_client:
            return False
        self.per_client[host] = opened + 1
        return True

    def open_request(self, request: socket.socket, host: Optional[str],
                     tls: bool) -> int:
        """Make the pending slot's connection an open request; return its
        number.  Lock held."""
        self.counts["accepted"] += 1
        self.pending = False
        self.dispatched += 1
        self.open[request] = _Open(self.dispatched, host, tls)
        self.counts["peak_active"] = max(self.counts["peak_active"],
                                         len(self.open))
        return self.dispatched

    def close_request(self, request: socket.socket) -> None:
        """Give back the slot of request, or of the pending connection that
        was refused before it became one (counted then)."""
        with self.lock:
            opened = self.open.pop(request, None)
            if opened is not None and opened.counted:
                self.ended -= 1  # counted by end(): not active since
            elif opened is not None:
                # process_request() raised before a thread served it.
                self.counts["failed"] += 1
            if opened is not None and opened.host is not None:
                self.per_client[opened.host] -= 1
                if not self.per_client[opened.host]:
                    del self.per_client[opened.host]
            elif opened is None:
                if not self.pending:
                    return  # not ours, or given back already
                self.pending = False
                self.counts["accepted"] += 1
                self.counts["refused"] += 1
            self.taken -= 1
            self.freed.notify()

    def count_lost(self) -> None:
        """Count a connection accepted and lost before it became a request
        (its client left at once); the pending slot serves the next."""
        with self.lock:
            self.counts["accepted"] += 1
            self.counts["failed"] += 1

    def release_pending(self) -> None:
        """Give back the slot held for a connection that never became a
        request, and is not counted (its accept or verify step failed)."""
        with self.lock:
            if self.pending:
                self.pending = False
                self.taken -= 1
                self.freed.notify()

    def end(self, request: socket.socket, kind: str) -> bool:
        """Count how request ended (its kind); return True if server_close()
        reset it meanwhile, which then is how it ended."""
        with self.lock:
            drained = request in self.drained
            self.drained.discard(request)
            self.counts[_COUNTED_AS.get("drained" if drained else kind,
                                        "failed")] += 1
            opened = self.open.get(request)
            if opened is not None and not opened.counted:
                # Not active from now on, in the same step, so that stats()
                # adds up while the connection is being closed.
                opened.counted = True
                self.ended += 1
            return drained

    def drain(self) -> List[socket.socket]:
        """Mark every open request still running as reset by
        server_close(); return them.  One that has ended (counted by end())
        is being closed in order by its thread: a reset now would drop what
        it has not sent yet, and its mark would never come off."""
        with self.lock:
            running = [request for request, opened in self.open.items()
                       if not opened.counted]
            self.drained.update(running)
            return running

    def stats(self) -> Dict[str, int]:
        with self.lock:
            counts = dict(self.counts)
            counts["active"] = len(self.open) - self.ended
        return counts


# A request thread's job: (request, client_address, thread name), or _LEAD.
_Job = Tuple[Optional[socket.socket], _Address, str]

# The job of waiting for connections, accepting, and handing this job on
# to another thread before serving the connection: the lead.
_LEAD: _Job = (None, (), "tcpserver-leader")


class _RequestThread:
    """A request thread, and how to hand it its next job while it is spare.

    job is a _Job or None; wake is a lock held while the thread waits,
    released to give it a job (or, with job None, the end).
    """

    __slots__ = ("thread", "job", "wake")

    def __init__(self, job: _Job, run: Callable[["_RequestThread"], None],
                 daemon: bool) -> None:
        self.job: Optional[_Job] = job
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread = threading.Thread(target=run, args=(self,), name=job[2],
                                       daemon=daemon)

    def hand(self, job: _Job) -> None:
        """Give a spare thread its next job."""
        self.job = job
        self.wake.release()


class _RequestThreads:
    """The server's request threads: each serves its request, then waits
    as a spare for the next one, for a while.

    Its lists are guarded by the slots' lock, as they change together.
    Starting a thread may fail (RuntimeError: the process or its user is
    out of threads): the accepting thread then waits, backing off as for
    EMFILE, while other clients wait in the listen queue, until a thread
    starts or one turns spare.  That is logged once when threads begin to
    fail, and once more when _STARTS_TO_RECOVER in a row have started at
    once (threads free up between failures, so failures and successes
    alternate until the pressure ends).
    """

    def __init__(self, server: "ThreadingTCPServer") -> None:
        self.server = server
        self.slots = server._slots
        self.threads: Set[_RequestThread] = set()
        self.spare: List[_RequestThread] = []
        self.closing = False      # server_close() has begun
        self.start_failures = 0   # threads that could not start, lately
        self.good_starts = 0      # started at once since the last failure
        self.recovered = 0        # failures before a recovery not logged yet

    def take_spare(self) -> Optional[_RequestThread]:
        """Return a spare thread, taken off the list, or None.  Lock held."""
        return self.spare.pop() if self.spare else None

    def start(self, job: _Job) -> bool:
        """Have a new thread (or one that turns spare meanwhile) serve job.

        Returns False, job unserved, if shutdown() comes first.  Called in
        the accepting thread.
        """
        failures = 0  # for this job
        while not self.try_start(job):
            failures += 1
            spare, stopping = self.wait_for_spare(failures)
            if spare is not None:
                spare.hand(job)
                break
            if stopping:
                return False
        return True

    def try_start(self, job: _Job) -> bool:
        """Start a new request thread for job; False if none can start now."""
        worker = _RequestThread(job, self.run, self.server.daemon_threads)
        with self.slots.lock:
            self.threads.add(worker)
        try:
            worker.thread.start()
        except BaseException as exc:
            with self.slots.lock:
                self.threads.discard(worker)  # server_close() cannot join it
            if not isinstance(exc, RuntimeError):
                raise
            if not self.start_failures:
                self.server.log("cannot start a request thread (%s); new "
                                "clients wait" % (exc,), logging.WARNING)
            self.start_failures += 1
            self.good_starts = 0
            return False
        if self.start_failures:
            self.good_starts += 1
            if self.good_starts == _STARTS_TO_RECOVER:
                # Logged by report_recovery(): what log() raised here would
                # look like a failed start of a thread that runs its job.
                with self.slots.lock:
                    self.recovered = self.start_failures
                self.start_failures = 0
        return True

    def report_recovery(self) -> None:
        """Log that threads start again, if they do since the last call.
        Called by serve_forever()'s thread with service_actions(), and
        as it returns."""
        with self.slots.lock:
            failures, self.recovered = self.recovered, 0
        if failures:
            self.server.log("request threads start again, after %d failures"
                            % failures, logging.WARNING)

    def wait_for_spare(self, failures: int
                       ) -> Tuple[Optional[_RequestThread], bool]:
        """Back off after failures to start a thread; return a spare thread
        if one came free meanwhile, and whether shutdown() is waiting."""
        delay = min(1.0, 0.01 * 2 ** (failures - 1))
        with self.slots.lock:
            self.slots.freed.wait_for(
                lambda: self.slots.stopping or self.spare, delay)
            return self.take_spare(), self.slots.stopping

    def run(self, worker: _RequestThread) -> None:
        """A request thread's life: serve its job, then each job it is
        handed while spare."""
        try:
            while worker.job is not None:
                request, client_address, worker.thread.name = worker.job
                worker.job = None
                if request is None:  # _LEAD
                    self.server._loop.lead()
                else:
                    self.server.process_request_thread(request,
                                                       client_address)
                self.wait_for_job(worker)
        finally:  # its end, or an exception: it can take no job now
            with self.slots.lock:
                self.threads.discard(worker)
                if worker in self.spare:
                    self.spare.remove(worker)

    def wait_for_job(self, worker: _RequestThread) -> None:
        """Wait as a spare thread until handed a job; leave worker.job None
        to end."""
        loop = self.server._loop
        with self.slots.lock:
            while True:
                if loop.take_vacant_lead():
                    worker.job = _LEAD
                    return
                if self.closing or loop.selector is None:
                    return  # not serving: end
                if len(self.spare) < self.server.max_spare_threads:
                    break
                if not loop.handing_out:
                    return  # spare threads enough: end
                # A hand-out of the lead is under way, and may fail (no
                # thread can start): then the lead falls vacant, and this
                # thread may be the only one left to take it.
                loop.vacated.wait()
            self.spare.append(worker)
            self.slots.freed.notify()  # for wait_for_spare(), if it waits
        lifetime = _wait_time(self.server.spare_thread_lifetime)
        if worker.wake.acquire(timeout=-1 if lifetime is None else lifetime):
            return
        with self.slots.lock:
            if worker in self.spare:  # nobody took it in time: retire
                self.spare.remove(worker)
                return
        worker.wake.acquire()  # process_request() took it: the job is coming

    def release_spare(self) -> None:
        """End the spare threads: they wait for a serve_forever() that has
        ended, and would keep the process alive."""
        with self.slots.lock:
            spare, self.spare = self.spare, []
        for worker in spare:
            worker.wake.release()  # with no job: the thread ends

    def alive(self) -> List[threading.Thread]:
        """Return the request threads still running."""
        with self.slots.lock:
            return [worker.thread for worker in self.threads
                    if worker.thread.is_alive()]

    def drain(self, wait: bool) -> None:
        """End the spare threads, then, if wait, the others: see server_close()."""
        with self.slots.lock:
            self.closing = True
            spare, self.spare = self.spare, []
            threads = [worker.thread for worker in self.threads
                       if not worker.thread.daemon]
        for worker in spare:
            worker.wake.release()  # with no job: the thread ends
        server = self.server
        if not wait or _join(threads, server.drain_timeout):
            return
        server.log("resetting %d requests still running after the %s s drain"
                   % (self.slots.stats()["active"], server.drain_timeout),
                   logging.WARNING)
        # SHUT_RD wakes blocked reads without sending FIN, so the client sees
        # only the reset; SHUT_RDWR then wakes writes blocked on the client.
        for how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self.reset_open_requests(how)
            if _join(threads, server.reset_grace):
                return
        server.log("request threads still running after their reset: %s"
                   % ", ".join(t.name for t in threads if t.is_alive()),
                   logging.WARNING)

    def reset_open_requests(self, how: int) -> None:
        """Mark open requests for a reset and shut their sockets down (how)."""
        for request in self.slots.drain():
            try:
                self.server.prepare_hard_close(request)
                # shutdown() wakes a thread blocked on the socket; close()
                # would not.  socket.socket's, for SSLSocket's drops TLS.
                socket.socket.shutdown(request, how)
            except OSError:
                pass  # closed meanwhile


class _AcceptLoop:
    """serve_forever()'s loop, in either of two ways.

    Led (run_led()): the request threads wait for connections themselves,
    one at a time, the leader; the one that accepts a connection hands the
    lead on to a spare thread (or a new one) and serves that connection, so
    no connection is handed from thread to thread.  Classic (run()):
    socketserver's loop in the caller's thread, which accepts every
    connection (several per wake-up, if they are there) and hands each to
    a request thread.  Either way the loop waits on a socket that stop()
    writes to, so that it ends at once; and this is how accept() errors
    are met.
    """

    def __init__(self, server: "ThreadingTCPServer") -> None:
        self.server = server
        self.slots = server._slots
        self.stopped = threading.Event()  # shutdown() wants the loop to end
        self.done = threading.Event()     # the loop has ended
        self.poll_interval: Optional[float] = None  # while the loop runs
        self.errors = 0                   # failed accepts in a row
        # The slots' lock guards these:
        self.wake: Optional[socket.socket] = None  # what stop() writes to
        self.selector: Optional[selectors.BaseSelector] = None  # the leader's
        self.led = False       # run_led() runs, with threads leading
        self.lead_out = False  # a thread has the lead, or is being handed it
        self.handing_out = False  # hand_out() is under way
        self.vacated = threading.Condition(self.slots.lock)  # lead_out fell
        self.failure: Optional[BaseException] = None  # a leader's, to raise

    def run(self, poll_interval: float) -> None:
        """Serve until stop(), the classic way."""
        with self.waiting(poll_interval) as selector:
            self.accept_here(selector, poll_interval)

    def accept_here(self, selector: selectors.BaseSelector,
                    poll_interval: float) -> None:
        """The classic loop: each ready connection goes to
        _handle_request_noblock(); service_actions() after each wake."""
        server = self.server
        while not self.stopped.is_set():
            ready = selector.select(_poll_time(poll_interval))
            if self.stopped.is_set():
                break
            if any(key.fileobj is server for key, _ in ready):
                self.accept_batch()
            self.service_actions()

    def accept_batch(self) -> None:
        """Accept a ready connection, and those that came with it."""
        for _ in range(_ACCEPT_BATCH):
            self.server._handle_request_noblock()
            if (self.stopped.is_set()
                    or not _ready(self.server.socket, True, 0.0)):
                return

    def run_led(self, poll_interval: float) -> None:
        """Serve until stop(), led: request threads wait for connections
        (lead()); this thread hands out the lead, hands it out again when
        it falls vacant (no thread could take it when handed on), and calls
        service_actions() each poll_interval.  If no thread can take the
        first lead (none can start), it accepts itself, the classic way.
        Raises what an override raised in a leader (verify_request(), say),
        as socketserver's loop would."""
        with self.waiting(poll_interval) as selector:
            try:
                with self.slots.lock:
                    self.led = self.lead_out = True
                if not self.hand_out():
                    with self.slots.lock:
                        self.led = False
                    self.accept_here(selector, poll_interval)
                    return
                self.supervise(poll_interval)
            finally:  # stop(), a failure, or KeyboardInterrupt here
                self.end_lead()
            failure, self.failure = self.failure, None
            if failure is not None:
                raise failure

    def supervise(self, poll_interval: float) -> None:
        """run_led()'s wait: for stop(), each poll_interval for
        service_actions(), and for the lead to fall vacant."""
        actions_at = time.monotonic() + poll_interval
        failures = 0  # hand-outs of a vacant lead in a row that failed
        while True:
            wait = max(0.0, actions_at - time.monotonic())
            with self.slots.lock:
                if self.lead_out:  # a request thread took it meanwhile
                    failures = 0
                if failures:  # back off, as when no thread can start
                    self.vacated.wait_for(
                        self.stopped.is_set,
                        min(wait, 0.01 * 2 ** min(failures - 1, 7)))
                else:
                    self.vacated.wait_for(
                        lambda: self.stopped.is_set() or not self.lead_out,
                        _wait_time(wait))
                if self.stopped.is_set():
                    return
                vacant = self.take_vacant_lead()
                # Under way from now on, for wait_for_job(): hand_out() says
                # so itself, too late for a thread that turns free meanwhile.
                self.handing_out = vacant
            if vacant:
                failures = 0 if self.hand_out() else failures + 1
            if time.monotonic() >= actions_at:
                self.service_actions()
                actions_at = time.monotonic() + poll_interval

    def service_actions(self) -> None:
        """The loop's own chores, then the server's service_actions()."""
        self.server._request_threads.report_recovery()
        self.server._post_stats()
        self.server.service_actions()

    def take_vacant_lead(self) -> bool:
        """Take the lead if nobody has it while serving led; lock held."""
        if self.lead_out or not self.led or self.stopped.is_set():
            return False
        self.lead_out = True
        return True

    def end_lead(self) -> None:
        """Wake the leader, if it waits, and wait until it has ended: the
        selector must outlive it.  A KeyboardInterrupt meanwhile is raised
        once it has; a second one at once (a leader stuck in an override's
        verify_request() must not make Ctrl-C useless)."""
        self.request_end()
        interrupted: Optional[BaseException] = None
        while True:
            try:
                with self.slots.lock:
                    self.vacated.wait_for(lambda: not self.lead_out)
                break
            except KeyboardInterrupt as exc:
                if interrupted is not None:
                    raise
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    @contextlib.contextmanager
    def waiting(self, poll_interval: float
                ) -> Iterator[selectors.BaseSelector]:
        """While serving: the selector that waits for connections and for
        stop(), and the state that stop() and done tell of.  Raises
        RuntimeError if the loop runs already (in another thread): one
        loop would not keep the other's max_requests."""
        with self.slots.lock:
            self.refuse_second()
            self.poll_interval = poll_interval
        self.done.clear()
        try:
            with contextlib.ExitStack() as made:  # closed however this ends
                woken, wake = socket.socketpair()
                made.callback(woken.close)
                made.callback(wake.close)
                selector = made.enter_context(selectors.DefaultSelector())
                selector.register(self.server, selectors.EVENT_READ)
                selector.register(woken, selectors.EVENT_READ)
                with self.slots.lock:
                    self.wake, self.selector = wake, selector
                try:
                    yield selector
                finally:
                    with self.slots.lock:
                        self.wake = self.selector = None
                        self.led = self.slots.stopping = False
                    self.server._request_threads.release_spare()
        finally:
            self.stopped.clear()
            self.poll_interval = None
            self.done.set()
            self.server._request_threads.report_recovery()  # the last one

    def refuse_second(self) -> None:
        """Raise RuntimeError if the loop runs already."""
        if self.poll_interval is not None:
            raise RuntimeError("serve_forever() is running already, in "
                               "another thread: a server serves in one loop "
                               "at a time")

    def hand_out(self) -> bool:
        """Hand the lead on (lead_out is set): pass_lead().  If no thread
        took it, or an exception (KeyboardInterrupt) came first, the lead
        falls vacant.  Returns whether a thread took it."""
        handed = False
        with self.slots.lock:
            self.handing_out = True
        try:
            handed = self.pass_lead()
        finally:
            if not handed:
                self.return_lead()
            with self.slots.lock:
                self.handing_out = False
                self.vacated.notify_all()  # for wait_for_job()
        return handed

    def pass_lead(self) -> bool:
        """Hand the lead to a spare request thread, or to a new one;
        return False if no thread could take it (none can start)."""
        threads = self.server._request_threads
        with self.slots.lock:
            spare = threads.take_spare()
        if spare is not None:
            spare.hand(_LEAD)
            return True
        return threads.try_start(_LEAD)

    def lead(self) -> None:
        """A request thread's turn as the leader: wait for connections and
        accept them (_handle_request_noblock()), until process_request()
        has handed the lead on, or stop(); then serve the connection it
        left in _bound.job (outside socketserver's step, which would close
        it a second time if the handler raised SystemExit)."""
        with self.slots.lock:
            selector = self.selector  # this run's, or None: it has ended
        _bound.leading = True
        try:
            self.accept_as_leader(selector)
        except BaseException as exc:  # an override's: serve_forever() raises it
            self.fail(exc, selector)
        finally:
            if _bound.leading:  # still ours: it falls vacant
                _bound.leading = False
                self.return_lead(selector)
        job, _bound.job = _bound.job, None
        if job is not None:
            request, client_address, threading.current_thread().name = job
            self.server.process_request_thread(request, client_address)

    def accept_as_leader(self, selector: Optional[selectors.BaseSelector]
                         ) -> None:
        """lead()'s loop, on the selector of the run it leads in."""
        while (_bound.leading and selector is not None
               and not self.stopped.is_set()):
            ready = selector.select(_poll_time(self.poll_interval))
            if self.stopped.is_set() or not self.runs(selector):
                return
            if any(key.fileobj is self.server for key, _ in ready):
                self.server._handle_request_noblock()

    def runs(self, selector: Optional[selectors.BaseSelector]) -> bool:
        """Is the run whose selector this is still on?  (A leader handed the
        lead just as an exception ended serve_forever() may come late.)"""
        with self.slots.lock:
            return selector is not None and selector is self.selector

    def fail(self, exc: BaseException,
             selector: Optional[selectors.BaseSelector]) -> None:
        """A leader's step raised: give back the slot it held for the
        connection, and end the loop, whose thread raises exc.  Nothing,
        if that run has ended already."""
        with self.slots.lock:
            if selector is None or selector is not self.selector:
                return
            self.failure = exc
        if _bound.leading:  # the pending slot is this thread's, not the next leader's
            self.slots.release_pending()
        self.request_end()

    def return_lead(self, selector: Optional[selectors.BaseSelector] = None
                    ) -> None:
        """Nobody leads now.  Given a run's selector, only while that run is
        on."""
        with self.slots.lock:
            if selector is not None and selector is not self.selector:
                return
            self.lead_out = False
            self.vacated.notify_all()

    def stop(self) -> None:
        """End run() or run_led() at once; return once it has ended."""
        self.request_end()
        self.done.wait()

    def request_end(self) -> None:
        """Ask the loop to end: wake it (or the leader), and any wait for a
        slot or a thread."""
        self.stopped.set()
        with self.slots.lock:
            self.slots.stopping = True
            self.slots.freed.notify_all()
            self.vacated.notify_all()
            if self.wake is not None:
                try:
                    self.wake.send(b"\0")
                except OSError:
                    pass  # the loop closed its end: it is ending anyway

    def accept_failed(self, exc: OSError) -> None:
        """Log the first of a run of accept errors; back off if resources ran out."""
        if exc.errno in _TRANSIENT_ERRNOS:
            # The client left first: no matter.
            self.server.log("accept: %s" % (exc,))
            return
        self.errors += 1
        if self.errors == 1:
            self.server.log("accept failed: %s" % (exc,), logging.WARNING)
        if exc.errno in _RESOURCE_ERRNOS:
            self.slots.wait(min(1.0, 0.01 * 2 ** (self.errors - 1)))

    def accepted(self) -> None:
        """Note that accept() works (again, after a run of errors)."""
        if self.errors:
            self.server.log("accept works again after %d failures"
                            % self.errors, logging.WARNING)
            self.errors = 0


class _ConnectionSetup:
    """What a connection goes through before its handler runs, as the
    server's settings have it at the time: TLS (wrapped in the accept
    thread, the handshake in the connection's own), a PROXY header."""

    def __init__(self, server: "ThreadingTCPServer") -> None:
        self.server = server
        self.trusted: List[Any] = []  # trusted_proxies, parsed

    def wrap_tls(self, conn: socket.socket) -> socket.socket:
        """Wrap conn in ssl_context, leaving the handshake to conn's thread:
        there a slow client holds up nobody (see _server_side())."""
        return _server_side(self.server.ssl_context, conn)

    def read_header(self, request: socket.socket
                    ) -> Optional[Tuple[_Address, _Address]]:
        """Return the (local, peer) addresses of the connection's PROXY
        header, or None if it has none to read or carries none.

        A header is read if proxy_protocol is on and the peer is one of the
        trusted_proxies, within handshake_timeout; a missing or bad one
        raises ProxyHeaderError.  A LOCAL header (a health check) carries
        no addresses.  A peer outside trusted_proxies is served as it is:
        its first bytes are not read as a header, so it cannot claim
        another address.  The header's local address is the connection's
        local_address() from now on.  Called in the connection's thread.
        """
        server, slots = self.server, self.server._slots
        if not (server.proxy_protocol and self.is_trusted(request)):
            return None
        header = read_proxy_header(request, server.handshake_timeout)
        request.settimeout(None)
        if header is not None:
            with slots.lock:
                opened = slots.open.get(request)
                if opened is not None:
                    opened.local = header[0]
        return header

    def addresses(self, request: socket.socket,
                  header: Optional[Tuple[_Address, _Address]]
                  ) -> Tuple[_Address, _Address]:
        """Return the connection's (local, peer) addresses, once judged.

        Runs the TLS handshake first if get_request() wrapped the
        connection (within handshake_timeout), then get_addresses(); the
        PROXY header's addresses, if any, win over the connection's own.
        Called in the connection's thread.
        """
        server, slots = self.server, self.server._slots
        with slots.lock:
            opened = slots.open.get(request)
        if opened is not None and opened.tls:
            request.settimeout(_socket_time(server.handshake_timeout))
            request.do_handshake()  # type: ignore[attr-defined]
            request.settimeout(None)
        local, peer = server.get_addresses(request)
        if header is not None:
            local, peer = header
        with slots.lock:
            if opened is not None:
                opened.local = local
        return local, peer

    def is_trusted(self, request: socket.socket) -> bool:
        """Is the peer of request (a balancer) allowed to send a PROXY
        header?  One on this machine, through a Unix-domain socket, is: the
        socket file's permissions say who may connect."""
        if _is_unix(request):
            return True
        peer = request.getpeername()
        address = ipaddress.ip_address(_plain_address(peer)[0].split("%")[0])
        return any(address in network for network in self.trusted)


def _join(threads: List[threading.Thread], timeout: Optional[float]) -> bool:
    """Join threads within timeout seconds in all (None: wait); True if all ended."""
    timeout = _wait_time(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in threads:
        thread.join(None if deadline is None
                    else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def _stop_processes(pids: List[int]) -> None:
    """Send SIGTERM to each process of pids that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended; its parent reaps it


def _exit_now(code: int) -> NoReturn:
    """End the process now, with what was written flushed, threads or not."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no stream, or a closed one: nothing to flush
    os._exit(code)


# The signals serving takes (_take_signals()): SIGTERM and SIGINT stop,
# SIGHUP reloads, SIGUSR1 reports; blocked while workers are forked, until
# each has handlers of its own.  Windows has the first two alone.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in
                      ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")
                      if hasattr(signal, name))


def _untaken(name: str) -> Optional[int]:
    """Return the signal name (SIGHUP, SIGUSR1) if serving may take it: while
    it has its default action, which would end the process (without a
    drain, leaving PROGRAMs and workers behind).  None if it is ignored
    (nohup) or has a handler of the application's own, which are left
    alone, and where there is no such signal (Windows)."""
    number = getattr(signal, name, None)
    if number is None or signal.getsignal(number) != signal.SIG_DFL:
        return None
    return int(number)


def _take_signals(stop: Callable[[int, Any], None],
                  hang_up: Callable[[int, Any], None],
                  report: Callable[[int, Any], None]) -> Dict[int, Any]:
    """Handle the signals serving takes: SIGTERM and SIGINT with stop;
    SIGHUP (reload) with hang_up and SIGUSR1 (stats) with report, where
    _untaken().  Return the handlers they had, to put back."""
    previous: Dict[int, Any] = {number: signal.signal(number, stop)
                                for number in (signal.SIGTERM, signal.SIGINT)}
    for number, handler in ((_untaken("SIGHUP"), hang_up),
                            (_untaken("SIGUSR1"), report)):
        if number is not None:
            previous[number] = signal.signal(number, handler)
    return previous


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


class _StopSignals:
    """Handlers of the signals serving takes, while in a with block: the
    first SIGTERM or SIGINT stops the server (shutdown()), a second one, at
    least patience seconds later, ends the process at once (stop_now());
    SIGHUP, while it has its default action (_untaken()), reloads
    (reload())."""

    def __init__(self, server: "ThreadingTCPServer", patience: float) -> None:
        self.server = server
        self.patience = patience
        self.first_at = 0.0  # when the first signal came
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        self.previous = _take_signals(self.first, self.hang_up, self.report)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def first(self, signum: int, frame: Any) -> None:
        self.first_at = time.monotonic()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self.second)
        # shutdown() waits for serve_forever(), so not from its thread.
        threading.Thread(target=self.server.shutdown, name="signal").start()

    def hang_up(self, signum: int, frame: Any) -> None:
        # Not in this thread, which may hold a lock that reload() needs.
        threading.Thread(target=self.server._reload, name="reload").start()

    def report(self, signum: int, frame: Any) -> None:
        # As for SIGHUP: stats() takes the slots' lock.
        threading.Thread(target=self.server.report_stats, name="report").start()

    def second(self, signum: int, frame: Any) -> None:
        if time.monotonic() - self.first_at < self.patience:
            return  # the same stop, told twice
        self.server.log("a second signal: stopping at once", logging.WARNING)
        self.server.stop_now()
        _exit_now(0)


class _StatsBoard:
    """Where worker processes post their stats() for their supervisor.

    Shared memory, made before the workers are forked, a slot for each:
    its worker alone writes it, between two increments of a sequence
    number, so a reader that finds the number odd or changed reads again;
    the supervisor reads the slots at any time.  The supervisor hands the
    slots out and takes them back, keeping the counts of the workers that
    have ended.
    """

    _SLOT = struct.Struct("=%dq" % (2 + len(_STATS) + 1))  # seq, pid, counts

    def __init__(self, slots: int) -> None:
        import mmap  # only workers need it
        self.memory = mmap.mmap(-1, self._SLOT.size * slots)
        self.free = list(range(slots))
        self.slot_of: Dict[int, int] = {}  # pid -> its slot
        self.past = dict.fromkeys(_STATS, 0)  # the workers that ended

    def post(self, slot: int, pid: int, counts: Dict[str, int]) -> None:
        """Write a worker's counts (stats()) to its slot; in the worker."""
        offset = slot * self._SLOT.size
        sequence = self._SLOT.unpack_from(self.memory, offset)[0]
        values = [counts[key] for key in _STATS] + [counts["active"]]
        self._SLOT.pack_into(self.memory, offset, sequence + 1, pid, *values)
        self._SLOT.pack_into(self.memory, offset, sequence + 2, pid, *values)

    def read(self, slot: int) -> Dict[str, int]:
        """Return the counts in a slot, as its worker last posted them."""
        offset = slot * self._SLOT.size
        while True:
            first = self._SLOT.unpack_from(self.memory, offset)
            again = self._SLOT.unpack_from(self.memory, offset)
            if first == again and first[0] % 2 == 0:
                break  # not caught in the midst of a post
        counts = dict(zip(_STATS, first[2:]))
        counts["active"] = first[-1]
        return counts

    def take(self) -> Optional[int]:
        """Hand a slot out, emptied, to the worker about to be forked; None
        if none is free (reloads in a row, each leaving workers to drain):
        that worker's counts are then not posted."""
        if not self.free:
            return None
        slot = self.free.pop()
        offset = slot * self._SLOT.size
        self.memory[offset:offset + self._SLOT.size] = bytes(self._SLOT.size)
        return slot

    def give_back(self, pid: int) -> None:
        """Keep the counts of a worker that ended; free its slot."""
        slot = self.slot_of.pop(pid, None)
        if slot is None:
            return
        ended = self.read(slot)
        for key in _STATS:
            self.past[key] += ended[key]
        self.free.append(slot)

    def stats(self) -> Dict[str, Any]:
        """Return the workers' counts added up, those that ended included,
        and, under "workers", each running worker's, by pid."""
        totals: Dict[str, Any] = dict(self.past)
        totals["active"] = 0
        workers = {pid: self.read(slot) for pid, slot in self.slot_of.items()}
        for counts in workers.values():
            for key, value in counts.items():
                totals[key] += value
        totals["workers"] = workers
        return totals


class _WorkerProcesses:
    """Worker processes that serve one listening socket, and their
    supervisor, this process: serve_workers() is its run()."""

    def __init__(self, server: "ThreadingTCPServer", count: int,
                 poll_interval: float) -> None:
        self.server = server
        self.count = count
        self.poll_interval = poll_interval
        self.running: Dict[int, float] = {}  # pid -> when it started
        self.retiring: Set[int] = set()  # workers a reload replaced: draining
        self.previous: Dict[int, Any] = {}  # the signals' own handlers
        self.stopping: List[int] = []  # the signals received, to pass on
        self.quick_deaths = 0  # workers in a row that died within a second
        # Room for reloads in a row, each leaving workers to drain.
        self.board = _StatsBoard(4 * count + 16)

    def run(self, ready: Optional[Callable[[], None]]) -> None:
        """Fork, replace and stop the workers until a stop signal ends them."""
        self.previous = _take_signals(self.pass_on, self.hang_up, self.report)
        # Blocking accept() in a worker that lost the race for a connection
        # would keep it from noticing shutdown().
        listener = self.server.socket
        blocking = listener.getblocking()
        listener.setblocking(False)
        try:
            if ready is not None:
                ready()
            while self.running or self.retiring or not self.stopping:
                self.fork_missing()
                if not self.running and not self.retiring:
                    break
                self.reap_one()
        finally:
            self.end_all()
            listener.setblocking(blocking)
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    def pass_on(self, signum: int, frame: Any) -> None:
        """The supervisor's handler of a stop signal: pass it on to the workers."""
        self.stopping.append(signum)
        _stop_processes(list(self.running) + list(self.retiring))

    def report(self, signum: int, frame: Any) -> None:
        """The supervisor's SIGUSR1: one line of the workers' counts."""
        self.server.report_stats()

    def hang_up(self, signum: int, frame: Any) -> None:
        """The supervisor's SIGHUP: reload() here, then fresh workers take
        over from the running ones, which drain and end.  The listening
        socket stays open all along, and the fresh workers accept before
        the others stop: no client is refused.  A reload that fails leaves
        the workers as they are."""
        if self.stopping or not self.server._reload():
            return
        began = time.monotonic()
        old = dict(self.running)
        self.retiring.update(old)
        self.running.clear()
        try:
            self.fork_missing()
        except OSError as exc:  # no process can start: the others serve on
            self.server.log("reload: fresh workers cannot start (%s); the "
                            "others serve on" % (exc,), logging.WARNING)
            self.retiring.difference_update(old)
            self.running.update(old)
            return
        _stop_processes(list(old))
        self.server.log("reload: %d fresh workers in %.3fs; %d others drain"
                        % (len(self.running), time.monotonic() - began,
                           len(old)), logging.INFO)

    def fork_missing(self) -> None:
        """Start workers until there are count, unless stopping."""
        # Blocked until the new pids are in running, for pass_on().
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            while not self.stopping and len(self.running) < self.count:
                slot = self.board.take()
                pid = self.fork(slot)
                if slot is not None:
                    self.board.slot_of[pid] = slot
                self.running[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def reap_one(self) -> None:
        """Wait for a child to end; a worker that died unasked is replaced,
        after a growing pause if workers keep dying at once."""
        pid, status = os.wait()
        self.board.give_back(pid)
        began = self.running.pop(pid, None)
        if began is None or self.stopping:
            self.retiring.discard(pid)
            return  # a child not ours, one a reload replaced, or the stop
        self.server.log("worker %d ended (wait status %d); starting another"
                        % (pid, status), logging.WARNING)
        if time.monotonic() - began >= 1.0:
            self.quick_deaths = 0
            return
        self.quick_deaths += 1
        if self.quick_deaths > 1:  # no storm of forks
            time.sleep(min(1.0, 0.05 * 2 ** (self.quick_deaths - 2)))

    def end_all(self) -> None:
        """Stop the workers still running, and reap them."""
        self.running.update(dict.fromkeys(self.retiring, 0.0))
        self.retiring.clear()
        _stop_processes(list(self.running))
        for pid in self.running:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # reaped already
            self.board.give_back(pid)

    def fork(self, slot: Optional[int]) -> int:
        """Start one worker process, which posts its counts to slot of the
        board; return its pid.  The worker never returns.

        Called with the stop signals blocked: the worker unblocks them
        once it has handlers of its own, as this process's would pass the
        signal on to the worker's siblings.
        """
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            # A worker: its own counts, posted; the socket file is the
            # supervisor's to remove, at its end.
            self.server._workers = None
            self.server._post = None if slot is None else (self.board, slot)
            self.server.worker = os.getpid()
            self.server._owned_path = None
            # The worker takes the signals as this process did before it
            # began to supervise (a SIGHUP ignored stays ignored), while
            # they are blocked still.
            for number, handler in self.previous.items():
                signal.signal(number, handler)
            # The supervisor passes on a signal the worker may have had
            # too (a stop of the whole process group): not a second one.
            self.server.serve_until_signalled(self.poll_interval,
                                              ready=_unblock_stop_signals,
                                              patience=0.5)
            self.server._post_stats()  # the last word
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            _exit_now(code)  # never run the parent's code, or its atexit


def _runs_thunks(handler_class: Any) -> bool:
    """Return True if handler_class is a ThunkHandler (it may be a partial)."""
    return isinstance(handler_class, type) and issubclass(handler_class,
                                                          ThunkHandler)


def _raised_by(exc: BaseException, sock: socket.socket) -> bool:
    """Did a call on the connection sock raise exc: a method of sock, or of
    a stream its handler made on it (rfile, wfile, or what they buffer)?

    exc's traceback says: its innermost frame is a method of the object
    that raised it, and, further out, the handler's own frames show which
    streams are the connection's (closed by now, they no longer tell).
    """
    owners = []
    trace = exc.__traceback__
    while trace is not None:
        owners.append(trace.tb_frame.f_locals.get("self"))
        trace = trace.tb_next
    if not owners:
        return False
    connection: List[Any] = [sock]
    for owner in owners:
        if (isinstance(owner, socketserver.BaseRequestHandler)
                and owner.request is sock):
            for stream in (getattr(owner, "rfile", None),
                           getattr(owner, "wfile", None)):
                connection += [stream, getattr(stream, "raw", None)]
    return any(owners[-1] is candidate for candidate in connection
               if candidate is not None)


def _describe(exc: BaseException) -> str:
    """Return "Type: message" for a diagnostic line, whatever exc's __str__ does."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the failure
        message = "<exception str() failed>"
    return "%s: %s" % (type(exc).__name__, message)


# Linux's TCP states (tcp_info's first byte) in which the client's FIN has
# come: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING.
_FIN_RECEIVED = frozenset((6, 8, 9, 11))


def _traffic(conn: socket.socket) -> str:
    """Return ", N bytes in, M out" for the diagnostic line of a connection
    about to close: the bytes it received and sent on the wire (TLS records
    included), as the kernel counted them; "" where it does not say.

    Linux's TCP_INFO gives the bytes received and those the client
    acknowledged; TIOCOUTQ adds those sent or queued, not acknowledged yet.
    An acknowledgement between the two would count its bytes in neither:
    they are read again until none came in between (thrice at most).
    """
    try:
        import fcntl
        import termios
        for _ in range(3):
            info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            queued = fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            again = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if info[120:128] == again[120:128]:
                break
    except (AttributeError, ImportError, OSError, ValueError):
        return ""  # not Linux, not TCP, or closed already
    if len(info) < 136:  # a kernel older than 4.2
        return ""
    acknowledged, received = struct.unpack_from("=QQ", info, 120)
    if info[0] in _FIN_RECEIVED:
        received -= 1  # the client's FIN counts as a byte there
    sent = acknowledged + struct.unpack("=i", queued)[0]
    return ", %d bytes in, %d out" % (received, sent)


def _client(request: socket.socket, address: _Address) -> str:
    """Return who the client of request is, for max_per_client and the
    diagnostics: its host; over a Unix-domain socket, its user ("uid
    1000"), where the system says (peer_credentials()), else "local"."""
    if not _is_unix(request):
        return _host(address)
    credentials = peer_credentials(request)
    return "local" if credentials is None else "uid %d" % credentials[1]


def _host(address: _Address) -> str:
    """Return the host part of an address for a diagnostic line."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


# ---------------------------------------------------------------------------
# The server: connections are accepted by the leader, a request thread (or
# by serve_forever()'s thread, in the classic loop), and served each in a
# request thread of its own.
# ---------------------------------------------------------------------------

_Server = TypeVar("_Server", bound="ThreadingTCPServer")


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    """A socketserver.ThreadingTCPServer with the egg's limit, diagnostics and hooks.

    Used with any StreamRequestHandler subclass it serves as its parent
    does, plus: at most max_requests requests at once (the others wait in
    the listen queue), a listen queue of DEFAULT_BACKLOG, a reset (RST)
    instead of an orderly close when the handler raises, no traceback when
    the client has simply gone away, a back-off when accept() runs out of
    descriptors, and diagnostics.  With ThunkHandler it runs the thunk for
    every connection.

    Methods for the caller: those of socketserver.ThreadingTCPServer, and

    - __call__(debug=False, poll_interval=0.5, workers=None): serve, the
      egg's way;
    - serve_until_signalled(poll_interval=0.5, ready=None, patience=0):
      serve until SIGTERM or SIGINT, then drain; SIGHUP: reload();
    - serve_workers(workers, poll_interval=0.5, ready=None): serve in
      worker processes;
    - from_listener(listener, RequestHandlerClass, **kwargs): a server on
      a socket that is already listening;
    - check_settings(): check the settings below;
    - local_address(request): an open connection's local address;
    - stats(), and the property serving.

    Methods that may be overridden: those of the parent, and

    - accept_connection(listener) -> (conn, peer), default tcp_accept;
    - get_addresses(conn) -> (local, peer), default tcp_addresses;
    - prepare_hard_close(conn), default tcp_abandon;
    - log(message, level): one diagnostic line;
    - client_gone(request, exc): does exc mean the client left?
    - report_refusal(client_address, reason): a connection closed unserved;
    - abort_request(request, peer): reset a failed connection;
    - stop_now(): what to end before the process exits at once;
    - reload(): a new configuration, on SIGHUP.

    Settings: class variables that subclasses or instances may override,
    and keywords of the constructor (timeout sets idle_timeout).  A change
    made on an instance takes effect when serving starts, which checks
    them all again (check_settings()):

    - thunk: the function each ThunkHandler calls, None;
    - max_requests: requests served at once, None for no limit;
    - max_per_client: connections from one IP address at once, None;
    - idle_timeout (keyword timeout): seconds a connection may make no
      progress, None for no limit; a handler's own timeout wins;
    - line_timeout: seconds a thunk's client may take to send the line a
      read asks for, however steadily it sends, None for no limit;
    - drain_timeout: seconds server_close() gives running requests before
      it resets their connections, DEFAULT_DRAIN_TIMEOUT; None waits;
    - reset_grace: seconds a reset request has to end before the next,
      harder step of the drain, 2;
    - max_line: longest line a thunk reads, DEFAULT_MAX_LINE; None: no cap;
    - ssl_context: an ssl.SSLContext to serve TLS with, None;
    - handshake_timeout: seconds a TLS client has for its handshake (and
      a balancer for its PROXY header);
    - max_spare_threads: request threads kept waiting for the next
      request once theirs ended, 16 (0: a new thread for each request);
    - spare_thread_lifetime: seconds a spare thread waits before it ends;
    - proxy_protocol: read each connection's real addresses from a PROXY
      protocol header (HAProxy's, version 1 or 2), False;
    - trusted_proxies: the networks allowed to send that header, loopback;
    - verify_in_thread: call verify_request() in the connection's own
      thread, before any TLS handshake, so a slow one (a lookup) holds up
      no other client, False (True with proxy_protocol);
    - debug: False, True for the prefix DEFAULT_PREFIX, or a prefix.
    """

    request_queue_size = DEFAULT_BACKLOG
    thunk: Optional[_Thunk] = None
    max_requests: Optional[int] = None
    max_per_client: Optional[int] = None
    idle_timeout: Optional[float] = None
    line_timeout: Optional[float] = None
    drain_timeout: Optional[float] = DEFAULT_DRAIN_TIMEOUT
    reset_grace: float = 2.0
    max_line: Optional[int] = DEFAULT_MAX_LINE
    ssl_context: Any = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_spare_threads = 16
    spare_thread_lifetime = 60.0
    proxy_protocol = False
    trusted_proxies: Any = ("127.0.0.0/8", "::1/128")
    verify_in_thread = False
    debug: Union[bool, str] = False

    accept_connection = staticmethod(tcp_accept)
    get_addresses = staticmethod(tcp_addresses)
    prepare_hard_close = staticmethod(tcp_abandon)

    # The per-server state, made by __new__.
    _slots: _Slots
    _request_threads: _RequestThreads
    _setup: "_ConnectionSetup"
    _loop: "_AcceptLoop"
    _owned_path: Optional[Tuple[str, int]]  # see own_path()
    _workers: Optional["_WorkerProcesses"]  # serve_workers()', here
    _post: Optional[Tuple[_StatsBoard, int]]  # a worker's: where it posts
    #: In a worker process of serve_workers(), its pid; else None.
    worker: Optional[int] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "ThreadingTCPServer":
        """Create the per-server state, whichever __init__ runs.

        Server classes combined with this one may call TCPServer.__init__
        directly (SimpleXMLRPCServer does) and so skip ours.
        """
        self = super().__new__(cls)
        self._slots = _Slots()
        self._request_threads = _RequestThreads(self)
        self._setup = _ConnectionSetup(self)
        self._loop = _AcceptLoop(self)
        self._owned_path = None
        self._workers = self._post = None
        return self

    def __init__(self, server_address: _Address, RequestHandlerClass: Any,
                 *args: Any, **kwargs: Any) -> None:
        """Constructor.  May be extended, do not override.

        As socketserver's (server_address, RequestHandlerClass,
        bind_and_activate=True), plus keyword-only settings that replace
        the class attributes of the same name (timeout sets idle_timeout;
        the parent's timeout, for handle_request(), is left alone).  Other
        arguments go on to the next class's __init__, so this class
        combines with other server classes.  Raises TypeError or ValueError
        for bad settings, before anything is bound.
        """
        for keyword in list(kwargs):
            name = _KEYWORDS.get(keyword, keyword)
            if name in _SETTINGS:
                setattr(self, name, kwargs.pop(keyword))
        self.RequestHandlerClass = RequestHandlerClass  # for check_settings()
        self.check_settings()
        super().__init__(server_address, RequestHandlerClass, *args, **kwargs)

    def check_settings(self) -> None:
        """Raise TypeError or ValueError for a setting out of its range.

        Checks every setting (see the class docstring), as the instance has
        it now.  Called by the constructor and again when serving starts,
        so a setting changed on the instance meanwhile takes effect, and a
        bad one fails before any connection is accepted.  May be extended.
        """
        for name, check in _SETTINGS.items():
            check(name, getattr(self, name))
        handler = getattr(self, "RequestHandlerClass", None)
        if handler is not None and _runs_thunks(handler):
            if self.thunk is None:
                raise TypeError("thunk must be callable when "
                                "RequestHandlerClass is a ThunkHandler, "
                                "not None")
            _check_handler(handler)
        self._setup.trusted = _networks("trusted_proxies",
                                        self.trusted_proxies)
        if self.ssl_context is not None:
            _note_server_names(self.ssl_context)

    @classmethod
    def from_listener(cls: Type[_Server], listener: socket.socket,
                      RequestHandlerClass: Any, **kwargs: Any) -> _Server:
        """Return a server that accepts on an existing listening socket.

        A TCP or Unix-domain stream socket, from tcp_listen(),
        unix_listen(), socket.create_server() or a parent process.  The
        server owns the socket from now on: server_close() closes it.
        Keyword arguments are those of the constructor.  As the socket is
        bound already, server_bind() is not called: a class that does more
        there (HTTPServer sets server_name and server_port) must be given
        that by hand.  Raises TypeError or ValueError if listener is not a
        listening stream socket.
        """
        if not isinstance(listener, socket.socket):
            raise TypeError("listener must be a socket, not %s"
                            % type(listener).__name__)
        if ((listener.family not in (socket.AF_INET, socket.AF_INET6)
             and not _is_unix(listener))
                or listener.type != socket.SOCK_STREAM):
            raise ValueError("listener must be a stream socket (AF_INET, "
                             "AF_INET6 or AF_UNIX, SOCK_STREAM), not %r"
                             % (listener,))
        if (hasattr(socket, "SO_ACCEPTCONN") and not listener.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            raise ValueError("listener must be listening: call listen() on "
                             "it or make it with tcp_listen(), not %r"
                             % (listener,))
        server = cls(listener.getsockname(), RequestHandlerClass,
                     bind_and_activate=False, **kwargs)
        server.socket.close()
        server.socket = listener
        server.address_family = listener.family
        server.server_address = listener.getsockname()
        return server

    # -- serving, in the caller's thread ------------------------------------

    def __call__(self, debug: Union[bool, str] = False,
                 poll_interval: float = 0.5,
                 workers: Optional[int] = None) -> None:
        """Serve until shutdown() is called from another thread: the egg's server procedure.

        debug=True writes the egg's diagnostic lines to stderr, prefixed
        ``[tcp-server]``; a string replaces the prefix.  workers=N serves
        in N processes instead, until SIGTERM or SIGINT (serve_workers()).
        Raises TypeError or ValueError for another debug or workers value.
        """
        _check_debug("debug", debug)
        self.debug = debug
        if workers is not None:
            self.serve_workers(workers, poll_interval)
            return
        self.log("waiting for requests...", logging.INFO)
        self.serve_forever(poll_interval)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(), as socketserver does.  May be extended.

        Checks the settings first (check_settings()).  With a ThunkHandler,
        sys.stdin and sys.stdout are per-thread while it runs: each thunk
        sees its connection, every other thread the streams it had.

        The request threads wait for connections themselves, one at a time
        (the leader): the one that accepts a connection hands that role on
        to another thread, then serves the connection.  So get_request(),
        verify_request() and process_request() run, in that order, in
        request threads, and this thread only calls service_actions() each
        poll_interval.  A subclass that overrides get_request(),
        process_request() or _handle_request_noblock() gets socketserver's
        loop instead, in this thread, which hands each connection to a
        request thread.  Either way shutdown() ends the loop at once, even
        while every slot is busy.
        """
        self._check_serving(poll_interval)
        run = self._loop.run_led if self._leads() else self._loop.run
        if _runs_thunks(self.RequestHandlerClass):
            with _switch:
                run(poll_interval)
        else:
            run(poll_interval)

    def handle_request(self) -> None:
        """Handle one request, as socketserver does, waiting up to the
        parent's timeout attribute for it.  Checks the settings first, as
        serve_forever() does.  May be extended."""
        self.check_settings()
        super().handle_request()

    def _check_serving(self, poll_interval: float) -> None:
        """Raise TypeError or ValueError for a bad setting (check_settings())
        or poll_interval: a number of seconds >= 0 (inf: service_actions()
        is never called); RuntimeError if serve_forever() runs already."""
        _check_duration("poll_interval", poll_interval, zero_ok=True)
        self.check_settings()
        self._loop.refuse_second()

    def _leads(self) -> bool:
        """Can request threads accept by themselves (leader/followers)?
        Not if the class or instance replaced a step of the accept loop,
        which may expect the classic loop's thread."""
        steps = ("get_request", "process_request", "_handle_request_noblock")
        return not any(
            getattr(type(self), step) is not getattr(ThreadingTCPServer, step)
            or step in vars(self) for step in steps)

    @property
    def serving(self) -> bool:
        """True while serve_forever() runs."""
        return self._loop.poll_interval is not None

    def shutdown(self) -> None:
        """Stop the serve_forever() loop and wait until it has stopped.

        Returns at once, even while every slot is taken and clients wait.
        Must be called from another thread than serve_forever()'s, or it
        deadlocks, as socketserver's.  Requests still running carry on;
        server_close() drains them.
        """
        self._loop.stop()

    def serve_until_signalled(self, poll_interval: float = 0.5, *,
                              ready: Optional[Callable[[], None]] = None,
                              patience: float = 0.0) -> None:
        """Serve until SIGTERM or SIGINT, then drain with server_close().

        ready(), if given, is called once the signal handlers are in place:
        the place to say the server is up, as a signal sent from then on is
        handled.  SIGHUP, while it has its default action (not ignored by
        nohup, no handler of the application's own), calls reload().  A
        second signal (patience seconds or more after the first: a stop sent
        to a whole process group may come twice) stops at once: stop_now(),
        then the process exits 0 whatever its threads are doing.  So does the
        end of the drain if request threads outlived it (a thunk that never
        returns), rather than hang at interpreter exit.  Main thread only, as
        signal handlers are; the previous handlers come back.
        """
        self._check_serving(poll_interval)
        with _StopSignals(self, patience):
            if ready is not None:
                ready()
            self.serve_forever(poll_interval)
            self.server_close()
        left = [thread.name for thread in self._request_threads.alive()]
        if left:
            self.log("exiting while %s still run" % ", ".join(left),
                     logging.WARNING)
            self.stop_now()
            _exit_now(0)

    def reload(self) -> None:
        """Apply a new configuration to the connections from now on.  May be
        overridden.

        Called on SIGHUP: by serve_until_signalled(), in a thread of its
        own, and by serve_workers() in the supervising process, whose fresh
        workers then take over from the running ones, which drain.  Does
        nothing here; a subclass reads again what it read at start, a
        certificate say, and sets it (self.ssl_context = a new context:
        connections accepted from then on are wrapped in it).  An Exception
        it raises means the reload failed: the old configuration stays,
        with one warning and no traceback.
        """

    def _reload(self) -> bool:
        """Call reload() and say how it went, in one line; True if it did."""
        try:
            self.reload()
        except Exception as exc:
            self.log("reload failed, the configuration stays as it was: %s"
                     % (_describe(exc),), logging.WARNING)
            return False
        self.log("reloaded", logging.INFO)
        return True

    def stop_now(self) -> None:
        """End what must not outlive the process when it exits at once.

        Called by serve_until_signalled() before it ends the process on a
        second signal, or after a drain that threads outlived.  Nothing
        here; the command line ends its PROGRAMs.  May be overridden.
        """

    def serve_workers(self, workers: int, poll_interval: float = 0.5, *,
                      ready: Optional[Callable[[], None]] = None) -> None:
        """Serve in worker processes that share the listening socket (POSIX).

        Forks workers processes; each serves as serve_until_signalled()
        does, with its own threads and its own max_requests: until SIGTERM
        or SIGINT, then it drains (server_close()) and exits 0.  This
        process supervises: a worker that dies is replaced (after a growing
        pause if they keep dying at once); SIGTERM or SIGINT is passed on
        to every worker (a second one, half a second or more after the
        first, makes them stop at once), and this returns once all have
        ended.  SIGHUP (as serve_until_signalled() takes it) calls reload()
        here; then fresh workers start, with what it set, and the running
        ones stop accepting and drain, while the listening socket stays
        open: no client is refused.  ready(), if given, is called once, in this process, as soon
        as the signal handlers are in place and before any worker starts:
        the place to say the server is up, as a signal sent from then on is
        handled.  Call it from the main thread, before this process starts
        threads or child processes of its own (fork copies only the
        caller's thread, and the supervisor reaps any child), then call
        server_close() here as usual.  Raises NotImplementedError where
        there is no fork() (Windows).
        """
        _check_int("workers", workers, 1, 1024, "an int in 1..1024")
        if not _POSIX:
            raise NotImplementedError("worker processes need fork(), which "
                                      "this system lacks: serve in one process")
        self._check_serving(poll_interval)
        self._workers = _WorkerProcesses(self, workers, poll_interval)
        self._workers.run(ready)

    # -- diagnostics, from any thread ---------------------------------------

    def _verbose(self, level: int) -> bool:
        """Return True if log() at level shows anywhere: worth formatting for."""
        return bool(self.debug) or logger.isEnabledFor(level)

    def log(self, message: str, level: int = logging.DEBUG) -> None:
        """Report one diagnostic event.  May be overridden.

        Sends message to logging.getLogger("tcpserver") at level: DEBUG for
        each request's lines, INFO for the server's, WARNING for failures
        to accept.  Each request's lines are made, and this is called for
        them, only while debug is on or the logger is enabled for DEBUG.
        When debug is on, also writes ``[prefix] message`` to sys.stderr;
        a line that cannot be written (stderr a closed pipe) is dropped, as
        logging's handlers do.  Called from the accepting thread and request
        threads, in the midst of handing a connection or the lead on: an
        override must not raise either.
        """
        shown = bool(self.debug) and sys.stderr is not None
        if shown:
            try:
                sys.stderr.write("[%s] %s\n" % (self._prefix(), message))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass  # diagnostics must not stop the server
        if not shown or logger.hasHandlers():
            # Unconfigured, logging would print a WARNING on stderr again.
            logger.log(level, "%s", message)

    def stats(self) -> Dict[str, Any]:
        """Return a snapshot of the server's counters, safe from any thread.

        accepted: connections accepted; active: requests open now;
        completed: requests whose handler returned; failed: requests ended
        by an exception (error, client gone, timeout, failed TLS handshake);
        refused: connections closed unserved (verify_request(),
        max_per_client, no request thread could start before shutdown());
        peak_active: most requests open at once.  accepted is the sum of
        the last three and active.

        In the process that supervises worker processes (serve_workers(),
        while it runs and after), the workers' counters added up, those of
        workers that ended included (as last posted: each posts every
        poll_interval and as it ends); peak_active adds the workers' own
        peaks; and "workers": each running worker's counters, by pid.
        """
        if self._workers is not None:
            return self._workers.board.stats()
        return self._slots.stats()

    def stats_line(self) -> str:
        """Return stats() as one line for a log: "stats: accepted 12,
        active 0, ...", and in a supervisor each running worker's after a
        semicolon, "; worker 4242: accepted 6, ..."."""
        stats = self.stats()

        def counts(of: Dict[str, Any]) -> str:
            return ", ".join("%s %d" % (key, of[key]) for key in sorted(of)
                             if key != "workers")

        line = "stats: " + counts(stats)
        for pid, worker in sorted(stats.get("workers", {}).items()):
            line += "; worker %d: %s" % (pid, counts(worker))
        return line

    def report_stats(self) -> None:
        """Write stats_line() to stderr, after the prefix of the
        diagnostics (and a worker's pid): SIGUSR1 asks for it, where
        serve_until_signalled() or serve_workers() serve.  May be
        overridden."""
        try:
            sys.stderr.write("[%s] %s\n" % (self._prefix(), self.stats_line()))
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass  # a stderr nobody reads: nothing to report to

    def _prefix(self) -> str:
        """The prefix of the diagnostic lines: debug's, or DEFAULT_PREFIX;
        a worker's pid after it."""
        prefix = self.debug if isinstance(self.debug, str) else DEFAULT_PREFIX
        return prefix if self.worker is None else "%s %d" % (prefix, self.worker)

    def _post_stats(self) -> None:
        """In a worker process: post stats() for the supervisor."""
        if self._post is not None:
            board, slot = self._post
            board.post(slot, os.getpid(), self._slots.stats())

    def local_address(self, request: socket.socket) -> Optional[_Address]:
        """Return the local address of an open request's connection.

        For any handler, from any thread, once the handler runs: as
        get_addresses() gave it, or as the PROXY header did (the address
        the client connected to at the balancer).  None for a connection
        that is not an open request of this server.
        """
        with self._slots.lock:
            opened = self._slots.open.get(request)
            return None if opened is None else opened.local

    # -- the accepting thread: the leader, or serve_forever()'s or
    # handle_request()'s in the classic loop ------------------------------

    def get_request(self) -> Tuple[socket.socket, _Address]:
        """Take a free slot, then accept a connection through accept_connection().

        Called by serve_forever() and handle_request() in the accepting thread
        once select() reports a pending connection.  With ssl_context set,
        the connection is wrapped in TLS (its handshake is left to its own
        thread).  Raises OSError when no slot frees within the poll
        interval or shutdown() ends the wait, so serve_forever() can poll
        again, or when accepting fails: that is logged once for a run of
        failures and, when descriptors or memory ran out, followed by a
        growing back-off, so the loop neither dies nor spins.  A client
        that left before the wrap is counted as accepted and failed, with
        one diagnostic line.  May be extended.
        """
        wait = self._loop.poll_interval  # None: handle_request()'s
        self._slots.take(self.max_requests,
                         self.timeout if wait is None else wait, self.log)
        try:
            request, client_address = self.accept_connection(self.socket)
        except OSError as exc:
            self._loop.accept_failed(exc)
            raise
        self._loop.accepted()
        if self.ssl_context is not None:
            try:
                request = self._setup.wrap_tls(request)
            except OSError as exc:  # the client left at once (a port scan)
                self._slots.count_lost()
                self.log("%s left before its TLS handshake (%s)"
                         % (_host(client_address), _describe(exc)))
                raise
        return request, client_address

    def _handle_request_noblock(self) -> None:
        """Accept and dispatch one connection, as socketserver does.

        But what verify_request() raises is met as what process_request()
        raises (socketserver lets it out with the connection still open):
        an Exception goes to handle_error() and the connection is closed,
        serving goes on; anything else closes the connection and ends
        serve_forever().  With proxy_protocol or verify_in_thread on,
        verify_request() is not called here: process_request_thread()
        calls it in the connection's own thread, before any TLS handshake,
        with the client's address (a PROXY header's, once it is read).
        """
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            if self._verifies_in_thread() or self.verify_request(
                    request, client_address):
                self.process_request(request, client_address)
            else:
                self.shutdown_request(request)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    # socketserver's stubs type a request as a socket or, for a datagram
    # server, (data, socket); a TCP server's are sockets: hence the ignores.
    def process_request(  # type: ignore[override]
            self, request: socket.socket, client_address: _Address) -> None:
        """Have a request thread run process_request_thread().  May be extended.

        The request takes over the slot get_request() held.  A client that
        already has max_per_client connections open is refused: closed at
        once, counted, logged.  (With proxy_protocol on, the client is only
        known once the request thread has read the PROXY header, and
        process_request_thread() checks then.)  The request goes to a spare
        request thread if one waits, else to a new thread; either is named
        tcpserver-N for the N-th request, is a daemon if daemon_threads is
        true, and is joined by server_close() if block_on_close is true.
        Called by the leader (see serve_forever()), it hands the lead on,
        and the leader serves the request itself once this returns, in its
        own thread, renamed so.  (If no thread can start to take the lead,
        the lead falls vacant until a thread is free.)
        """
        host = None if self.proxy_protocol else _client(request, client_address)
        slots = self._slots
        leading = _bound.leading
        with slots.lock:
            refused = not slots.count_in(host, self.max_per_client)
            if not refused:
                number = slots.open_request(request, host, _is_tls(request))
                spare = None if leading else self._request_threads.take_spare()
        if refused:
            reason = "%s connections from it already" % (self.max_per_client,)
            self.log("refused %s: %s" % (host, reason), logging.INFO)
            self.report_refusal(client_address, reason)
            self.close_request(request)
            return
        job = (request, client_address, "tcpserver-%d" % number)
        if leading:
            # The lead goes on (or falls vacant: no thread could take it,
            # and the next one free takes it), then this thread serves.
            _bound.leading = False
            self._loop.hand_out()
            _bound.job = job
        elif spare is not None:
            spare.hand(job)
        elif not self._request_threads.start(job):
            reason = "no request thread could start before the server stopped"
            self.log("refused %s: %s" % (_host(client_address), reason),
                     logging.INFO)
            self.report_refusal(client_address, reason)
            slots.end(request, "refused")
            self.close_request(request)

    # -- a request's own thread ---------------------------------------------

    def process_request_thread(  # type: ignore[override]
            self, request: socket.socket, client_address: _Address) -> None:
        """Serve one connection in its own thread, then close it.

        Finds the connection's addresses (a PROXY header's, the TLS
        handshake, get_addresses(): _ConnectionSetup), then calls finish_request()
        with the peer as client_address.  (With proxy_protocol on, the peer
        is the client the PROXY header names, and verify_request() and
        max_per_client judge it here first: a refused one is closed,
        counted and logged.)  On success the connection is shut down (FIN).
        If the client went away (client_gone()) or the setup failed (a TLS
        handshake, say), it is closed with one diagnostic line and no
        traceback.  Any other exception goes to handle_error() (if it is an
        Exception: SystemExit and the like are re-raised) and the
        connection is reset through abort_request().  The slot always
        comes back.  May be extended.
        """
        verbose = self._verbose(logging.DEBUG)
        began = time.monotonic() if verbose else 0.0
        peer = client_address
        started = False
        kind = outcome = "ok"
        try:
            header = self._setup.read_header(request)
            if header is not None:
                peer = header[1]
            refusal = (self._refusal(request, peer)
                       if self._verifies_in_thread() else None)
            if refusal is None:
                local, peer = self._setup.addresses(request, header)
                started = True
                self._serve(request, local, peer, verbose)
            else:
                kind, outcome = "refused", "refused: " + refusal
        except BaseException as exc:
            kind = self._failure_kind(request, exc, started)
            outcome = "%s, %s" % (kind, _describe(exc))
            if not isinstance(exc, Exception):
                raise
            if kind == "error":
                self.handle_error(request, peer)
            elif kind == "setup failed":
                self.report_refusal(peer, outcome)
        finally:
            traffic = _traffic(request) if verbose else ""
            outcome = self._close(request, peer, kind, outcome)
            if verbose:
                # Without a start line, say whom the failed setup was with.
                who = "" if started else " (with %s)" % (_host(peer),)
                self.log("%s%s finished (%s) in %.3fs%s."
                         % (threading.current_thread().name, who, outcome,
                            time.monotonic() - began, traffic))

    def _close(self, request: socket.socket, peer: _Address, kind: str,
               outcome: str) -> str:
        """Count a request's end, close its connection (a reset for the
        kinds of _RESET_KINDS), and return its outcome for the log."""
        _bound.tls_error = None
        if self._slots.end(request, kind):
            kind, outcome = "drained", "drained, reset by server_close()"
        if kind in _RESET_KINDS:
            self.abort_request(request, peer)
        else:
            self.shutdown_request(request)
        return outcome

    def _verifies_in_thread(self) -> bool:
        """Does verify_request() run in the connection's own thread?"""
        return self.proxy_protocol or self.verify_in_thread

    def _refusal(self, request: socket.socket, peer: _Address) -> Optional[str]:
        """Judge a client in its connection's thread: why verify_request()
        or, for the client a PROXY header named, max_per_client refuse it,
        or None once it is counted in."""
        if not self.verify_request(request, peer):
            return "by verify_request()"
        if not self.proxy_protocol:
            return None  # max_per_client counted it at accept
        host = _host(peer)
        slots = self._slots
        with slots.lock:
            if slots.count_in(host, self.max_per_client):
                slots.open[request].host = host
                return None
        reason = "%s connections from it already" % (self.max_per_client,)
        self.report_refusal(peer, reason)
        return reason

    def _serve(self, request: socket.socket, local: _Address, peer: _Address,
               verbose: bool) -> None:
        """Run the handler on an admitted connection (finish_request())."""
        timeout = _socket_time(self.idle_timeout)
        if timeout is not None:
            request.settimeout(timeout)
            _writes_show_progress(request)
        if verbose:
            with self._slots.lock:
                opened = self._slots.open.get(request)
                active = len(self._slots.open)
            self.log("request %d from %s; %s (of %d) started..."
                     % (0 if opened is None else opened.number,
                        _client(request, peer), threading.current_thread().name,
                        active))
        self.finish_request(request, peer)

    def _failure_kind(self, request: socket.socket, exc: BaseException,
                      started: bool) -> str:
        """Name what ended a request: a kind of _RESET_KINDS, or "client gone", "setup failed"."""
        with self._slots.lock:
            if request in self._slots.drained:  # server_close()'s doing
                return "drained"
        if exc is _bound.tls_error:
            return "TLS error"  # the client's records, not the handler's bug
        if self.client_gone(request, exc):
            return "client gone"
        if isinstance(exc, OSError) and not started:
            return "setup failed"
        if isinstance(exc, IdleTimeout):
            return "timed out"
        if isinstance(exc, LineTooLong):
            return "line too long"
        return self._legacy_failure_kind(request, exc)

    def _legacy_failure_kind(self, request: socket.socket,
                             exc: BaseException) -> str:
        """Name what ended a request whose handler is not a ThunkHandler
        (whose streams say exactly, with IdleTimeout and their note of TLS
        errors), if the connection itself raised it (_raised_by()): a
        socket.timeout is the client's silence, "timed out"; an
        ssl.SSLError the client's records, "TLS error".  Else "error": any
        other socket's, a future's TimeoutError, a bug."""
        if _runs_thunks(self.RequestHandlerClass) or not _raised_by(exc, request):
            return "error"
        if isinstance(exc, socket.timeout):
            return "timed out"
        ssl = sys.modules.get("ssl")  # imported, if the connection is TLS
        if ssl is not None and isinstance(exc, ssl.SSLError):
            return "TLS error"
        return "error"

    def client_gone(self, request: socket.socket, exc: BaseException) -> bool:
        """Return True if exc means the client went away, not a bug.  May be overridden.

        True for an OSError (broken pipe, reset, ...) when the connection
        itself is no longer connected, so a reset from some other socket
        the handler uses still counts as an error.
        """
        if not isinstance(exc, OSError):
            return False
        try:
            request.getpeername()
        except OSError:
            return True
        return False

    def report_refusal(self, client_address: _Address, reason: str) -> None:
        """Hear of a connection closed before its handler ran, for a reason
        of the server's own.  May be overridden.

        reason says why, in a few words: max_per_client ("2 connections
        from it already"), a failed setup ("setup failed, SSLError: ..."
        for a TLS handshake, a PROXY header), or no request thread.  Called
        in the thread that closes the connection, once for each.  Refusals
        of verify_request(), which knows its reasons, are not reported.
        Does nothing: the diagnostics say as much already.  The command
        line writes a line for each at -v.
        """

    def handle_error(self, request: Any, client_address: _Address) -> None:
        """Report a handler's exception: its traceback on stderr, as
        socketserver does.  A stderr that cannot take it (a closed pipe) drops
        it, as log() does, and serving goes on.  May be overridden.
        """
        try:
            super().handle_error(request, client_address)
        except (OSError, ValueError):
            pass  # diagnostics must not stop the server

    def abort_request(self, request: socket.socket, peer: _Address) -> None:
        """Close a failed request's connection with RST.  May be overridden.

        Calls prepare_hard_close(request), then close_request(request).
        """
        self.log("closing connection to %s with a reset..." % (_host(peer),))
        try:
            self.prepare_hard_close(request)
        except OSError:
            pass  # already gone: closing is all there is left to do
        finally:
            self.close_request(request)

    # -- any thread ---------------------------------------------------------

    def close_request(  # type: ignore[override]
            self, request: socket.socket) -> None:
        """Close one connection and give its slot back.  May be extended.

        Called in the request's thread, or in the accepting thread for a
        connection that was refused (verify_request(), max_per_client).
        """
        try:
            super().close_request(request)
        finally:
            self._slots.close_request(request)

    def shutdown_request(  # type: ignore[override]
            self, request: socket.socket) -> None:
        """Close one connection in order: TLS close_notify if any, then FIN.  May be extended.

        close_notify tells a TLS client the reply is complete; it is sent
        without waiting for the client's own.
        """
        if _is_tls(request):
            try:
                request.settimeout(0)
                request.unwrap()  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass  # SSLWantReadError once close_notify is out; or no TLS
        super().shutdown_request(request)

    # -- the caller's thread, at the end ------------------------------------

    def server_close(self) -> None:
        """Close the listening socket, then drain the requests still running.

        They get drain_timeout seconds to finish; then their connections
        are reset (prepare_hard_close() and a shutdown that ends blocked
        reads, and after reset_grace seconds one that ends blocked writes)
        and every request thread is joined, so a thunk blocked on input()
        cannot make this hang.  With drain_timeout None it waits as long as
        they run, as socketserver does; with block_on_close false it does
        not wait at all.
        """
        self._loop.request_end()  # serve_forever() still running: misuse
        super().server_close()
        self._remove_owned_path()
        self._request_threads.drain(self.block_on_close)

    def own_path(self, path: str) -> None:
        """Have server_close() remove the Unix-domain socket file at path,
        which this server made, unless something else has replaced it
        meanwhile.  Called by make_tcp_server() and
        ThreadingUnixStreamServer.server_bind()."""
        self._owned_path = (path, os.stat(path).st_ino)

    def _remove_owned_path(self) -> None:
        owned, self._owned_path = self._owned_path, None
        if owned is None:
            return
        path, inode = owned
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass  # removed already


if sys.platform != "win32":
    class ThreadingUnixStreamServer(ThreadingTCPServer,
                                    socketserver.ThreadingUnixStreamServer):
        """socketserver.ThreadingUnixStreamServer with ThreadingTCPServer's
        limit, settings, diagnostics and drain: a drop-in, for local
        services behind nginx or HAProxy, with the socket file's
        permissions (the umask) as access control.

        server_address is the socket file's path.  server_bind() makes the
        file, replacing one that a server that is gone left there, and
        server_close() removes it, unless something else replaced it
        meanwhile.  max_per_client counts the connections of one user
        (uid, by peer_credentials()), where the system says who it is.
        client_address is what accept() gives, as in socketserver: the
        empty string for most clients.
        """

        def server_bind(self) -> None:
            """Make the socket file at server_address, and own it."""
            path = self.server_address
            if isinstance(path, str) and path and _stale_socket(path):
                os.unlink(path)
            super().server_bind()
            if isinstance(path, str) and path:
                self.own_path(path)
else:  # Windows: Python has no Unix-domain sockets there
    class ThreadingUnixStreamServer(ThreadingTCPServer):
        """What needs Unix-domain sockets, which this system lacks."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("Unix-domain sockets: this system "
                                      "lacks them")


# ---------------------------------------------------------------------------
# The factory: the egg's make-tcp-server.
# ---------------------------------------------------------------------------

_Listener = Union[socket.socket, int, Tuple[str, int], str, "os.PathLike[str]"]


def make_tcp_server(listener: _Listener, thunk: _Thunk,
                    max_requests: Optional[int] = DEFAULT_MAX_REQUESTS,
                    **settings: Any) -> ThreadingTCPServer:
    """Return a server that runs thunk for every connection: the egg's make-tcp-server.

    listener is a listening socket (from tcp_listen(), unix_listen(),
    socket.create_server() or a parent process), a port number (all
    interfaces, as tcp_listen(port)), a (host, port) tuple, or the path of
    a Unix-domain socket to make (a str with a "/" in it, such as
    "./app.sock", or an os.PathLike: unix_listen(path), its file removed
    again by server_close()).  The server owns the socket.  At most
    max_requests thunks run at once (None: no limit).  The other settings are
    keyword-only, those of ThreadingTCPServer's constructor: max_per_client,
    timeout (idle, per connection), drain_timeout, max_line, ssl_context
    (serve TLS), proxy_protocol and trusted_proxies (read the client's
    address from a balancer), and the rest its docstring lists.  Call the
    server to serve: ``server(debug=False)``; stop it with server.shutdown()
    from another thread and release it with server_close() (or a with
    block).

    Raises TypeError or ValueError for bad arguments, OSError if a port
    or path cannot be bound.
    """
    path = None
    if isinstance(listener, socket.socket):
        sock = listener
    elif isinstance(listener, int) and not isinstance(listener, bool):
        sock = tcp_listen(listener)
    elif (isinstance(listener, tuple) and len(listener) == 2
          and isinstance(listener[0], str)):
        sock = tcp_listen(listener[1], host=listener[0])
    elif isinstance(listener, os.PathLike) or (isinstance(listener, str)
                                               and "/" in listener):
        path = os.fspath(listener)
        sock = unix_listen(path)
    else:
        raise TypeError("listener must be a listening socket, a port number, "
                        "a (host, port) tuple or the path of a Unix-domain "
                        "socket (with a '/' in it: './app.sock'), not %r"
                        % (listener,))
    try:
        server = ThreadingTCPServer.from_listener(
            sock, ThunkHandler, thunk=thunk, max_requests=max_requests,
            **settings)
    except BaseException:
        if sock is not listener:
            sock.close()  # ours: a bad setting must not leak it
            if path is not None:
                os.unlink(path)
        raise
    if path is not None:
        server.own_path(path)
    return server


# ---------------------------------------------------------------------------
# The command line: python -m tcpserver, a ucspi-tcp tcpserver in Python.
# ---------------------------------------------------------------------------

# The section's one public name: the library above does not need it, so the
# file may be cut at this section's banner and lose nothing else.
__all__ += ["main"]

_EXIT_USAGE = 100      # a bad option or argument, as ucspi-tcp's usage errors
_EXIT_TEMPORARY = 111  # a failure worth retrying (address in use), djb's code
# Can this system run a PROGRAM on a socket and in a process group of its
# own, fork workers and change uids?  Not Windows.
_POSIX_COMMAND = os.name == "posix"
_END_GRACE = 1.0       # seconds a PROGRAM's group has from SIGTERM to SIGKILL
_EXIT_POLL = 0.02      # seconds between looks at PROGRAM's exit, without pidfd
_PUMP_WAIT = 3600.0    # seconds one wait of the pump takes at most: poll()
                       # cannot wait a year (--timeout), so it waits again

_USAGE = ("usage: python -m tcpserver [options] HOST PORT PROGRAM [ARG ...]\n"
          "       python -m tcpserver [options] HOST PORT --call FILE.py:FUNCTION\n"
          "       python -m tcpserver [options] --unix PATH PROGRAM [ARG ...]\n"
          "       python -m tcpserver [options] --inherit PROGRAM [ARG ...]")

_HELP = _USAGE + """

Runs PROGRAM for every TCP connection to HOST PORT, with its stdin and
stdout on the connection (its stderr stays on the server's), as ucspi-tcp's
tcpserver does; or, with --call, a Python thunk with print() and input() on
the connection.  HOST 0 is every IPv4 interface, :: every interface of both
families; PORT 0 picks a free port (print it with -1).

examples:
  python -m tcpserver -v 127.0.0.1 6504 date
  python -m tcpserver -c 100 -HRl0 0 7000 cat
  echo 'def hello(): print("hello,", input("name? "))' > hello.py
  python -m tcpserver -1 127.0.0.1 0 --call hello.py:hello
  python -m tcpserver --tls-cert c.pem --tls-key k.pem 0 993 ./imapd

ucspi-tcp's options (same letters, same meanings):
  -c N       run at most N programs at once (default 40); others wait
  -b N       listen queue of N connections (default 20)
  -v, -Q, -q verbose log lines / only errors (default) / nothing, on stderr
  -B TEXT    write TEXT to each client before running PROGRAM
  -1         print the local port on stdout once listening
  -d, -D     Nagle on / off (default -D: each write leaves at once)
  -h, -H     look up the client's host name (TCPREMOTEHOST) / do not
  -p, -P     paranoid: drop a host name whose address differs / do not
  -l NAME    TCPLOCALHOST=NAME instead of looking up the local name
  -r, -R, -t N  ident lookups: accepted, never done (no TCPREMOTEINFO)
  -o, -O     keep / clear (default) IPv4 options of each connection
  -x FILE    follow the rules in FILE, a cdb made by tcprules(1): allow,
             deny, set environment variables (FILE is opened per connection)
  -X         with -x, allow connections if FILE does not exist
  -u UID, -g GID, -U   drop to that uid/gid ($UID, $GID) after binding

options of our own:
  --call FILE.py:FUNCTION, --call MODULE:FUNCTION
                          serve that thunk instead of a PROGRAM: FUNCTION
                          of the Python file FILE.py, or of a module that
                          the current directory or sys.path holds
  --per-client N          at most N connections from one IP address
  --timeout SECONDS       end a connection idle that long; a client silent
                          before its TLS handshake or PROXY header too (that
                          wait is 10 s at most, without --timeout)
  --drain SECONDS         on SIGTERM/SIGINT, let connections finish for
                          this long (default 10), then reset them (each
                          step of the reset waits as long, 2 s at most)
  --tls-cert FILE, --tls-key FILE   serve TLS (PROGRAM is then fed by pipes)
  --tls-ca FILE           and require client certificates signed by FILE
  --proxy-protocol        behind HAProxy & co: take the client's address
                          from a PROXY header (v1 or v2) on each connection
  --trusted-proxies NETS  who may send that header, comma-separated
                          (default 127.0.0.0/8,::1/128)
  --inherit               serve the socket systemd passes (socket
                          activation); HOST and PORT are then left out
  --unix PATH             serve on a Unix-domain socket at PATH instead of
                          HOST PORT, as ucspi-unix's unixserver: PROGRAM gets
                          PROTO=UNIX, UNIXLOCALPATH, UNIXREMOTEEUID, ...; the
                          file is made with the umask and removed at exit
  -w N                    serve in N worker processes sharing the port,
                          each with its own -c limit; dead ones restarted
  --help                  this text

PROGRAM's environment adds PROTO=TCP, TCPLOCALIP, TCPLOCALPORT,
TCPREMOTEIP, TCPREMOTEPORT, and TCPLOCALHOST, TCPREMOTEHOST when known.
SIGTERM or SIGINT stops accepting, drains, and exits 0; a second one
stops at once.  SIGHUP reads the TLS files again, for new connections; with
-w, fresh workers take over and the others drain.  Exit codes: 0 stopped
by a signal, 100 bad usage, 111 temporary failure (address in use,
cannot resolve HOST, cannot drop privileges)."""


class _CommandError(Exception):
    """The command cannot run: one line for stderr, and its exit code."""

    code = _EXIT_TEMPORARY  # a failure worth retrying


class _UsageError(_CommandError):
    """The command line is wrong."""

    code = _EXIT_USAGE

    def __str__(self) -> str:
        return "usage error: %s (see --help)" % (super().__str__(),)


def _say(line: str, worker: Optional[int] = None) -> None:
    """Write one line of ours to stderr, as ucspi-tcp does: "tcpserver: ...";
    a worker's (-w) say which it is, as syslog does: "tcpserver[4242]: ..."."""
    name = "tcpserver" if worker is None else "tcpserver[%d]" % worker
    _write(sys.stderr, "%s: %s\n" % (name, line))


def _write(stream: Any, text: str) -> None:
    """Write text to stream (sys.stdout or sys.stderr) and flush it.

    A stream that cannot take it (a pipe nobody reads: a dead log
    collector) must not stop the server, nor leave output that fails again
    at exit: its descriptor is pointed at /dev/null, and what it held is
    dropped there, as is what PROGRAMs write to it from then on.
    """
    try:
        stream.write(text)
        stream.flush()
    except (AttributeError, OSError, ValueError):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return  # out of descriptors: the next line tries again
        try:
            os.dup2(null, stream.fileno())
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no descriptor (None, a StringIO): nothing more to do
        finally:
            os.close(null)


class _Options:
    """The command line's settings; the defaults are ucspi-tcp's, -D aside."""

    limit = 40
    backlog = 20
    verbosity = 1          # 0: -q, 1: -Q (errors), 2: -v
    banner = b""           # -B's bytes as given: os.fsencode() of the argument
    print_port = False
    nodelay = True
    remote_host = True     # -h
    paranoid = False       # -p
    local_host: Optional[str] = None  # -l NAME
    ip_options = False     # -o keeps them
    rules: Optional[str] = None
    rules_optional = False
    uid: Optional[int] = None
    gid: Optional[int] = None
    per_client: Optional[int] = None
    timeout: Optional[float] = None
    drain = DEFAULT_DRAIN_TIMEOUT
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    call: Optional[str] = None
    proxy_protocol = False
    trusted_proxies: Any = ThreadingTCPServer.trusted_proxies
    inherit = False
    unix: Optional[str] = None  # --unix PATH
    workers = 1
    help = False
    host = ""
    port = 0
    program: List[str] = []


_YEAR = 365 * 24 * 3600.0  # seconds: more than any timeout needs


def _number(option: str, text: str, minimum: float = 0,
            maximum: float = sys.maxsize,
            kind: Callable[[str], Any] = int) -> Any:
    """Return text as a number in minimum..maximum, or raise _UsageError
    naming option."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not minimum <= value <= maximum:  # NaN fails too
        raise _UsageError("%s needs a number from %s to %s, not %r"
                          % (option, minimum, maximum, text))
    return value


def _parse_command_line(argv: List[str]) -> _Options:
    """Return the options of a command line; raise _UsageError if it is wrong."""
    import getopt  # 2 ms (gettext) that the library need not pay
    options = _Options()
    try:
        pairs, rest = getopt.getopt(
            argv, "c:b:vqQB:1dDhHpPl:rRt:oOx:Xu:g:Uw:",
            ["call=", "per-client=", "timeout=", "drain=", "tls-cert=",
             "tls-key=", "tls-ca=", "proxy-protocol", "trusted-proxies=",
             "inherit", "unix=", "help"])
        if len(rest) >= 4 and rest[2] == "--call":  # HOST PORT --call M:F
            pairs.append(("--call", rest[3]))
            extra = rest[4:]
            rest = rest[:2]
            if extra:
                raise _UsageError("--call takes no PROGRAM: %r" % extra[0])
        elif len(rest) >= 3 and rest[2].startswith("--call="):
            pairs.append(("--call", rest[2][len("--call="):]))
            rest = rest[:2] + rest[3:]
    except getopt.GetoptError as exc:
        raise _UsageError(str(exc)) from None
    for option, value in pairs:
        _apply_option(options, option, value)
    if options.help:
        return options
    if options.inherit and options.unix:
        raise _UsageError("--inherit and --unix go separately")
    if options.inherit or options.unix:  # no HOST PORT
        options.program = rest
    elif len(rest) < 2:
        raise _UsageError("HOST and PORT are needed")
    else:
        options.host = {"0": "0.0.0.0", "::": ""}.get(rest[0], rest[0])
        options.port = _port_number(rest[1])
        options.program = rest[2:]
    if bool(options.program) == bool(options.call):
        raise _UsageError("give either PROGRAM or --call FILE.py:FUNCTION")
    if bool(options.tls_cert) != bool(options.tls_key):
        raise _UsageError("--tls-cert and --tls-key go together")
    if options.tls_ca and not options.tls_cert:
        raise _UsageError("--tls-ca needs --tls-cert and --tls-key")
    if options.unix and (options.rules or options.proxy_protocol):
        raise _UsageError("-x and --proxy-protocol need TCP, not --unix")
    if not _POSIX_COMMAND:
        _check_posix_options(options)
    return options


def _check_posix_options(options: _Options) -> None:
    """Raise _UsageError for what only a POSIX system can do (Windows)."""
    for used, what in ((options.program, "PROGRAM needs"),
                       (options.unix, "--unix needs"),
                       (options.workers > 1, "-w needs"),
                       (options.uid or options.gid, "-u, -g and -U need")):
        if used:
            raise _UsageError("%s a POSIX system; here, serve a Python thunk "
                              "in one process with --call FILE.py:FUNCTION"
                              % what)


# What each option sets: a flag's value; a number's range and kind; the
# text of the others as given.  -t (ident timeout) is checked, not used.
_FLAGS = {"-v": ("verbosity", 2), "-Q": ("verbosity", 1),
          "-q": ("verbosity", 0), "-1": ("print_port", True),
          "-d": ("nodelay", False), "-D": ("nodelay", True),
          "-h": ("remote_host", True), "-H": ("remote_host", False),
          "-p": ("paranoid", True), "-P": ("paranoid", False),
          "-o": ("ip_options", True), "-O": ("ip_options", False),
          "-X": ("rules_optional", True), "--help": ("help", True),
          "--proxy-protocol": ("proxy_protocol", True),
          "--inherit": ("inherit", True), "-r": (None, None),
          "-R": (None, None)}
_NUMBERS: Dict[str, Tuple[Optional[str], float, float, Callable[[str], Any]]] = {
    "-c": ("limit", 1, sys.maxsize, int),
    "-w": ("workers", 1, 1024, int),
    "-b": ("backlog", 0, 2 ** 31 - 1, int),
    "-u": ("uid", 0, 2 ** 32 - 2, int),
    "-g": ("gid", 0, 2 ** 32 - 2, int),
    "--per-client": ("per_client", 1, sys.maxsize, int),
    "--timeout": ("timeout", 0.001, _YEAR, float),
    "--drain": ("drain", 0.0, _YEAR, float),  # --drain 0: no drain
    "-t": (None, 0, sys.maxsize, int),
}
_TEXTS = {"-l": "local_host", "-x": "rules", "--call": "call", "--unix": "unix",
          "--tls-cert": "tls_cert", "--tls-key": "tls_key",
          "--tls-ca": "tls_ca"}


def _apply_option(options: _Options, option: str, value: str) -> None:
    """Set what one option (from getopt) means."""
    if option in _FLAGS:
        name, setting = _FLAGS[option]
        if name is not None:
            setattr(options, name, setting)
    elif option in _NUMBERS:
        name, minimum, maximum, kind = _NUMBERS[option]
        number = _number(option, value, minimum, maximum, kind)
        if name is not None:
            setattr(options, name, number)
    elif option in _TEXTS:
        setattr(options, _TEXTS[option], value)
    elif option == "-B":
        options.banner = os.fsencode(value)  # the bytes as given
    elif option == "--trusted-proxies":
        options.trusted_proxies = value.split(",")  # the server checks them
    else:  # -U
        for name in ("UID", "GID"):
            if name in os.environ:
                setattr(options, name.lower(),
                        _number("-U ($%s)" % name, os.environ[name], 0,
                                2 ** 32 - 2))


def _port_number(text: str) -> int:
    """Return PORT as a number: digits, or a service name from /etc/services."""
    if text.isdigit():
        port: int = _number("PORT", text, 0, 65535)
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise _UsageError("PORT %r is neither a number nor a known service"
                          % text) from None


def _cdb_get(rules: io.FileIO, size: int, key: bytes) -> Optional[bytes]:
    """Return the first value of key in a cdb file, or None.

    rules is the file, opened unbuffered, size its length.  cdb (D. J.
    Bernstein's constant database, which tcprules writes): 256 (position,
    slots) pairs, then records, then the hash tables.  Only what the lookup
    needs is read, a few small reads whatever the file's size: the key's
    pair, the slots it probes, the record.  Raises ValueError where the
    file ends before what it points to.
    """
    digest = 5381
    for byte in key:
        digest = ((digest * 33) ^ byte) & 0xFFFFFFFF
    position, slots = _cdb_pair(rules, size, (digest & 255) * 8)
    if not slots:
        return None
    slot = (digest >> 8) % slots
    for _ in range(slots):
        found, record = _cdb_pair(rules, size, position + slot * 8)
        if not record:
            return None
        if found == digest:
            key_length, value_length = _cdb_pair(rules, size, record)
            if (key_length == len(key)
                    and _cdb_read(rules, size, record + 8, key_length) == key):
                return _cdb_read(rules, size, record + 8 + key_length,
                                 value_length)
        slot = (slot + 1) % slots
    return None


def _cdb_pair(rules: io.FileIO, size: int, position: int) -> Tuple[int, int]:
    """Return the two little-endian 32-bit numbers at position in a cdb."""
    first, second = struct.unpack("<II", _cdb_read(rules, size, position, 8))
    return first, second


def _cdb_read(rules: io.FileIO, size: int, position: int, count: int
              ) -> bytes:
    """Return count bytes at position of a cdb file; ValueError past its end.

    Checked against size first, so a damaged length cannot make us
    allocate more than the file holds.
    """
    data = b""
    if position + count <= size:
        rules.seek(position)
        data = rules.read(count) or b""
    if len(data) != count:  # past the end, or the file shrank meanwhile
        raise ValueError("the file ends at %d, before byte %d"
                         % (size, position + count))
    return data


def _rule_keys(ip: str, host: Optional[str]) -> List[str]:
    """The keys tcprules' cdb is searched for, in ucspi-tcp's order.

    The address; =host; the address's prefixes that end in "." or ":"
    (not ":" alone), longest first, as ucspi-tcp's IPv6 patch has it
    ("127.0.", "2001:db8:"); =.suffix for each "." in host; "="; "".
    """
    keys = [ip]
    if host:
        keys.append("=" + host)
    keys += [ip[:end] for end in range(len(ip) - 1, 0, -1)
             if ip[end - 1] == "." or (ip[end - 1] == ":" and end > 1)]
    if host:
        keys += ["=" + host[start:] for start in range(len(host))
                 if host[start] == "."]
        keys.append("=")
    keys.append("")
    return keys


def _follow_rules(path: str, ip: str, host: Optional[str],
                  optional: bool) -> Optional[Dict[str, str]]:
    """Return the environment tcprules' file at path sets for a client, or
    None if it denies the client.  The file is opened for each connection,
    so tcprules can replace it while the server runs; only the few bytes
    each key's lookup needs are read, so a large file costs no memory."""
    try:
        rules = open(path, "rb", buffering=0)
    except FileNotFoundError:
        if optional:
            return {}
        raise
    with rules:
        size = os.fstat(rules.fileno()).st_size
        try:
            for key in _rule_keys(ip, host):
                value = _cdb_get(rules, size, key.encode())
                if value is not None:
                    break
            else:
                return {}
        except ValueError:
            raise ValueError("%s is not a cdb file (made by tcprules)"
                             % path) from None
    environment = {}
    for item in value.split(b"\0"):
        if item == b"D":
            return None
        if item.startswith(b"+") and b"=" in item:
            name, _, setting = item[1:].partition(b"=")
            environment[os.fsdecode(name)] = os.fsdecode(setting)
    return environment


def _host_name(ip: str, paranoid: bool) -> Optional[str]:
    """Return the name the resolver gives ip, or None.  paranoid: only if
    that name resolves back to ip (-p)."""
    try:
        name = socket.gethostbyaddr(ip)[0]
        if paranoid and ip not in socket.gethostbyname_ex(name)[2]:
            return None
    except (OSError, UnicodeError):
        return None
    return name


class _CommandServer(ThreadingTCPServer):
    """The server behind ``python -m tcpserver``: ucspi-tcp's log lines,
    environment and rules on top of ThreadingTCPServer.

    A connection's "number" in the log is its PROGRAM's process id, as in
    ucspi-tcp; where no process runs (a denied connection, --call) it is
    the connection's serial number instead.
    """

    def __init__(self, *args: Any, options: _Options, **kwargs: Any) -> None:
        self.options = options
        self._log_lock = threading.Lock()  # keeps the counts and lines in step
        self._running = 0
        self._numbers = 0
        self._children: Set[Any] = set()  # subprocess.Popen
        self._spawn_lock = threading.Lock()  # held while one starts
        self._stopping_now = False  # stop_now() has run: start no more
        # The process groups of PROGRAMs that ended while others of the
        # group still ran, each group's id its PROGRAM's pid: the server
        # ends them too when it stops, as they may hold a connection.
        self._left: Set[int] = set()
        # What verify_request() decided for each connection, for its handler:
        # PROGRAM's environment and the fields of the "ok" line.
        self._admitted: Dict[socket.socket, Tuple[Dict[str, str], Optional[str]]] = {}
        super().__init__(*args, **kwargs)

    def say(self, line: str) -> None:
        """Write one of ucspi-tcp's -v lines to stderr."""
        if self.options.verbosity >= 2:
            _say(line, self.worker)

    def log(self, message: str, level: int = logging.DEBUG) -> None:
        """Our own diagnostics: warnings and worse, unless -q."""
        if level >= logging.WARNING and self.options.verbosity >= 1:
            _say("warning: " + message, self.worker)

    def report_stats(self) -> None:
        """SIGUSR1: one line of stats() on stderr, unless -q."""
        if self.options.verbosity >= 1:
            _say(self.stats_line(), self.worker)

    def handle_error(self, request: Any, client_address: Tuple[Any, ...]) -> None:
        """A thunk's exception: its traceback, unless -q."""
        if self.options.verbosity >= 1:
            super().handle_error(request, client_address)

    def report_refusal(self, client_address: Tuple[Any, ...], reason: str) -> None:
        """One -v line for a connection the server closed unserved."""
        who = (":%s::%s" % client_address[:2] if isinstance(client_address, tuple)
               else "a local client")
        self.say("refused %s (%s)" % (who, reason))

    def begin(self) -> int:
        """Count a connection in (status line); return its serial number."""
        with self._log_lock:
            self._running += 1
            self._numbers += 1
            self.say("status: %d/%d" % (self._running, self.options.limit))
            return self._numbers

    def end(self, number: int, status: int) -> None:
        """Log a connection's end with its raw wait status; count it out."""
        with self._log_lock:
            self._running -= 1
            self.say("end %d status %d" % (number, status))
            self.say("status: %d/%d" % (self._running, self.options.limit))

    def environment(self, local: Tuple[Any, ...],
                    peer: Tuple[Any, ...]) -> Tuple[Dict[str, str], str, str]:
        """Return a connection's TCP* variables and the local and remote
        fields of its log lines."""
        options = self.options
        local_host = options.local_host
        if local_host is None:
            local_host = _host_name(local[0], False)
        remote_host = (_host_name(peer[0], options.paranoid)
                       if options.remote_host else None)
        variables = {"PROTO": "TCP", "TCPLOCALIP": str(local[0]),
                     "TCPLOCALPORT": str(local[1]),
                     "TCPREMOTEIP": str(peer[0]),
                     "TCPREMOTEPORT": str(peer[1])}
        if local_host is not None:
            variables["TCPLOCALHOST"] = local_host
        if remote_host is not None:
            variables["TCPREMOTEHOST"] = remote_host
        fields = ("%s:%s:%s" % (local_host or "", local[0], local[1]),
                  "%s:%s::%s" % (remote_host or "", peer[0], peer[1]))
        return variables, fields[0], fields[1]

    def unix_environment(self, connection: socket.socket) -> Dict[str, str]:
        """Return a Unix-domain connection's variables, as ucspi-unix's
        unixserver sets them (but UNIXLOCALPID, PROGRAM's own pid, which is
        known only once it runs)."""
        variables = {"PROTO": "UNIX", "UNIXLOCALPATH": str(connection.getsockname()),
                     "UNIXLOCALUID": str(os.geteuid()),
                     "UNIXLOCALGID": str(os.getegid())}
        credentials = peer_credentials(connection)
        if credentials is not None:
            for name, value in zip(("UNIXREMOTEPID", "UNIXREMOTEEUID", "UNIXREMOTEEGID"),
                                   credentials):
                variables[name] = str(value)
        return variables

    def verify_request(self, request: Any, client_address: Tuple[Any, ...]) -> bool:
        """Decide on a connection in its own thread, before any TLS
        handshake (verify_in_thread): set its socket options, send the
        banner (over plain TCP; over TLS it goes after the handshake),
        follow the rules (-x).  Remembers its environment for the handler;
        False if the rules deny it (logged as ucspi-tcp does)."""
        self._prepare(request, banner=self.ssl_context is None)
        if request.family == getattr(socket, "AF_UNIX", None):
            with self._log_lock:  # no rules, no "ok" line: as unixserver
                self._admitted[request] = (self.unix_environment(request), None)
            return True
        local = self.local_address(request) or tcp_addresses(request)[0]
        variables, local_field, remote_field = self.environment(local, client_address)
        granted = self.granted(client_address, variables.get("TCPREMOTEHOST"))
        if granted is None:
            number = self.begin()
            self.say("pid %d from %s" % (number, client_address[0]))
            self.say("deny %d %s %s" % (number, local_field, remote_field))
            self.end(number, _EXIT_USAGE << 8)  # as ucspi-tcp's denying child
            return False
        variables.update(granted)
        with self._log_lock:
            self._admitted[request] = (variables, "%s %s" % (local_field, remote_field))
        return True

    def granted(self, peer: Tuple[Any, ...], host: Optional[str]
                ) -> Optional[Dict[str, str]]:
        """Return the variables the rules (-x) set for a client, or None if
        they deny it; {} without rules."""
        if not self.options.rules:
            return {}
        try:
            return _follow_rules(self.options.rules, str(peer[0]), host,
                                 self.options.rules_optional)
        except (OSError, ValueError) as exc:  # as ucspi-tcp: no rules, no service
            self.log("unable to read %s: %s" % (self.options.rules, exc),
                     logging.WARNING)
            return None

    def admitted(self, connection: socket.socket
                 ) -> Tuple[Dict[str, str], Optional[str]]:
        """Return what verify_request() decided for a connection about to be
        served: its environment and the fields of its "ok" line (None: no
        such line, for a Unix-domain connection).  Sends a
        TLS connection's banner, now that the handshake is done."""
        with self._log_lock:
            admission = self._admitted.pop(connection)
        if self.ssl_context is not None:
            self._prepare(connection, banner=True)
        return admission

    def close_request(self, request: socket.socket) -> None:  # type: ignore[override]
        """Close a connection, and forget what verify_request() decided for
        it if it was never served (its TLS handshake failed, say)."""
        with self._log_lock:
            self._admitted.pop(request, None)
        super().close_request(request)

    def started(self, number: int, peer: Tuple[Any, ...],
                fields: Optional[str]) -> None:
        """Log a PROGRAM's (or a thunk's) start, under its number: over a
        Unix-domain socket (fields None) as unixserver does, a pid alone."""
        if fields is None:
            self.say("pid %d" % number)
            return
        self.say("pid %d from %s" % (number, peer[0]))
        self.say("ok %d %s" % (number, fields))

    def _prepare(self, connection: socket.socket, banner: bool) -> None:
        """Set the connection's socket options; send the banner (-B) if banner."""
        if connection.family != getattr(socket, "AF_UNIX", None):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                  self.options.nodelay)
        if not self.options.ip_options and connection.family == socket.AF_INET:
            try:
                connection.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"")
            except OSError:
                pass  # not every system lets them be cleared
        if banner and self.options.banner:
            connection.sendall(self.options.banner)

    def spawn(self, program: List[str], **popen: Any) -> Any:
        """Start a PROGRAM (subprocess.Popen(program, **popen)), and
        remember it in the same step, so server_close() and stop_now() can
        end it: one started just as stop_now() ends the others would
        outlive the server.  Raises RuntimeError once stop_now() has run."""
        with self._spawn_lock:
            if self._stopping_now:
                raise RuntimeError("stopping at once: no more PROGRAMs")
            child = subprocess.Popen(program, **popen)
            with self._log_lock:
                self._children.add(child)
        return child

    def reaped(self, child: Any) -> None:
        """Forget a PROGRAM that ended, but not its process group while
        processes it started still run there."""
        with self._log_lock:
            self._children.discard(child)
            self._left.add(child.pid)
            self._left = {group for group in self._left
                          if _signal_group(group, 0)}  # gone: forgotten

    def shutdown_request(  # type: ignore[override]
            self, request: socket.socket) -> None:
        """Close our copy only, where PROGRAM has the socket itself: it
        (and its children) may hold the connection longer, and it ends when
        the last copy closes.  Piped (TLS, --timeout): an orderly close."""
        if self.options.program and self.ssl_context is None:
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def server_close(self) -> None:
        """Drain as ThreadingTCPServer does, but end the PROGRAMs still
        running after drain_timeout, and whatever they left running: a
        closed connection may not end them, and their processes hold the
        client's connection open as long as they run."""
        killer = None
        if self.drain_timeout is not None:
            killer = threading.Timer(self.drain_timeout, self.end_programs)
            killer.start()
        try:
            super().server_close()
        finally:
            if killer is not None:
                killer.cancel()
                killer.join()
            self.end_programs()

    def reload(self) -> None:
        """Read the TLS files (--tls-cert, --tls-key, --tls-ca) again, for
        the connections from now on: SIGHUP, after a certificate's renewal.
        Raises ValueError if they cannot be read: the old ones stay."""
        if not self.options.tls_cert:
            return
        try:
            context = _tls_context(self.options)
        except _UsageError as exc:
            raise ValueError(exc.args[0]) from None
        self.ssl_context = context
        self.check_settings()
        self.say("reload: TLS files read again")

    def stop_now(self) -> None:
        """SIGKILL every PROGRAM's process group, at once, and reap the
        PROGRAMs: we are exiting, and nothing of ours may linger."""
        with self._spawn_lock:  # none half started, and none from now on
            self._stopping_now = True
        with self._log_lock:
            children = list(self._children)
            groups = [child.pid for child in children] + list(self._left)
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        for child in children:
            child.wait()
        with self._log_lock:  # all gone: nothing left for end_programs()
            self._children.difference_update(children)
            self._left.difference_update(groups)

    def end_programs(self) -> None:
        """End the process group of every PROGRAM still running, and those
        that ended PROGRAMs left running (SIGTERM, then SIGKILL); reap the
        PROGRAMs.  Each group is ended once, though the PROGRAMs' threads
        note the groups again as they reap them meanwhile."""
        with self._log_lock:
            children = list(self._children)
            left = list(self._left)
        for child in children:
            self.log("killing %s (pid %d): still running after the drain"
                     % (child.args[0], child.pid), logging.WARNING)
        for group in left:
            self.log("killing process group %d: left running by its PROGRAM"
                     % group, logging.WARNING)
        groups = [child.pid for child in children] + left
        _end_groups(groups, children)
        for child in children:
            child.wait()
        with self._log_lock:
            self._left.difference_update(groups)


class _CommandConnection(socketserver.BaseRequestHandler):
    """One connection of the command line, admitted by verify_request():
    counted, served by serve(), and logged with its number and raw wait
    status."""

    server: "_CommandServer"
    request: socket.socket

    def handle(self) -> None:
        server = self.server
        variables, fields = server.admitted(self.request)
        self.number = server.begin()  # a PROGRAM's pid replaces it
        self.status = _EXIT_TEMPORARY << 8  # as ucspi-tcp's child that fails
        try:
            self.serve(variables, fields)
        finally:
            server.end(self.number, self.status)

    def serve(self, variables: Dict[str, str], fields: Optional[str]) -> None:
        """Serve an admitted connection; set number and status."""
        raise NotImplementedError


class _ProgramHandler(_CommandConnection):
    """Runs the command line's PROGRAM for one connection."""

    def serve(self, variables: Dict[str, str], fields: Optional[str]) -> None:
        """Run PROGRAM on the connection; note its pid and raw wait status."""
        server = self.server
        environment = dict(os.environ)
        for name in ("TCPLOCALHOST", "TCPREMOTEHOST", "TCPREMOTEINFO"):
            environment.pop(name, None)  # not inherited from our own caller
        environment.update(variables)
        environment.update(_tls_environment(tls_details(self.request)))
        piped = server.ssl_context is not None or server.idle_timeout is not None
        if piped:
            stream: Any = subprocess.PIPE
        else:
            self.request.setblocking(True)  # the child shares the flags
            stream = self.request.fileno()
        self.status = _EXIT_TEMPORARY << 8  # as ucspi-tcp's child that cannot exec
        # A session of its own, so it and its children can be ended together
        # (killpg); unlike preexec_fn, start_new_session is safe in threads.
        child = server.spawn(server.options.program, stdin=stream,
                             stdout=stream, env=environment,
                             start_new_session=True)
        self.number = child.pid
        try:
            server.started(child.pid, self.client_address, fields)
            if piped:
                self.pump(child)
        finally:
            code = child.wait()
            server.reaped(child)
            # The raw wait status, as ucspi-tcp logs it: exit code << 8, or
            # the signal that killed it.
            self.status = code << 8 if code >= 0 else -code

    def pump(self, child: Any) -> None:
        """Carry the connection to and from PROGRAM's pipes (_Pump); if
        that fails (idle timeout, client gone), end PROGRAM's group."""
        try:
            _Pump(self.request, child).run(self.server.idle_timeout)
        except BaseException:
            # The connection is over, and so is PROGRAM.
            _end_groups([child.pid], [child])
            raise
        finally:
            child.stdin.close()
            child.stdout.close()


# The short names of a distinguished name's fields, as OpenSSL prints them.
_DN_FIELDS = {"countryName": "C", "stateOrProvinceName": "ST",
              "localityName": "L", "organizationName": "O",
              "organizationalUnitName": "OU", "commonName": "CN"}


def _tls_environment(details: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """Return the SSL_* variables that ucspi-ssl's sslserver -s (after
    mod_ssl) gives a PROGRAM, for a TLS connection's tls_details(); {} for
    a plain one.  A field the handshake did not settle is left out."""
    if details is None:
        return {}
    variables = {"SSL_PROTOCOL": details["version"],
                 "SSL_CIPHER": details["cipher"],
                 "SSL_CIPHER_USEKEYSIZE": details["bits"],
                 "SSL_CIPHER_ALGKEYSIZE": details["bits"],
                 "SSL_SESSION_ID": details["session_id"],
                 "SSL_TLS_SNI": details["server_name"]}
    certificate = details["peer_certificate"]
    for prefix, key in (("SSL_CLIENT_S_DN", "subject"), ("SSL_CLIENT_I_DN", "issuer")):
        fields = [(_DN_FIELDS.get(name, name), value)
                  for entry in certificate.get(key, ()) for name, value in entry]
        if fields:
            variables[prefix] = "".join("/%s=%s" % field for field in fields)
            for name, value in fields:
                variables.setdefault("%s_%s" % (prefix, name), value)
    variables.update({"SSL_CLIENT_M_SERIAL": certificate.get("serialNumber"),
                      "SSL_CLIENT_M_VERSION": certificate.get("version"),
                      "SSL_CLIENT_V_START": certificate.get("notBefore"),
                      "SSL_CLIENT_V_END": certificate.get("notAfter")})
    if details["peer_certificate_der"]:
        import ssl  # imported already: the connection is TLS
        variables["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(
            details["peer_certificate_der"])
    return {name: str(value) for name, value in variables.items()
            if value is not None}


def _signal_group(group: int, signum: int) -> bool:
    """Send signum (0: none, a question) to process group group; return
    False if no process of it is left that we may signal."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # left to processes of another user: not ours
        return False
    return True


def _end_groups(groups: List[int], children: List[Any],
                grace: float = _END_GRACE) -> None:
    """Ask the process groups to end (SIGTERM), and make what is left of
    them end (SIGKILL) after grace seconds.

    children (subprocess.Popen) are the PROGRAMs among the groups' leaders:
    polled meanwhile, so one that no other thread reaps does not keep its
    group alive as a zombie.  Returns once every group is gone or has had
    its SIGKILL.  A group has no descriptor to wait on, hence the polling.
    """
    left = [group for group in groups if _signal_group(group, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        for child in children:
            child.poll()
        left = [group for group in left if _signal_group(group, 0)]
    for group in left:
        _signal_group(group, signal.SIGKILL)


class _Pump:
    """Carries bytes between a connection and PROGRAM's pipes, for piped
    mode (TLS, --timeout): one method per direction.

    One thread, non-blocking, so a TLS connection is never used by two
    threads at once.  The client's bytes go to PROGRAM's stdin for as long
    as it is open, as they would from the socket itself; PROGRAM's output
    goes to the client until PROGRAM closes its stdout.
    """

    def __init__(self, connection: socket.socket, child: Any) -> None:
        import ssl  # for its exceptions; only the command line pumps
        self.would_block = (BlockingIOError, ssl.SSLWantReadError,
                            ssl.SSLWantWriteError)
        self.connection = connection
        self.child = child  # subprocess.Popen
        self.stdin: Any = child.stdin  # None once closed
        self.stdout: Any = child.stdout  # None once closed
        self.inward = bytearray()  # from the client, for PROGRAM
        self.outward = bytearray()  # from PROGRAM, for the client
        self.client_open = True  # till the client's end, or PROGRAM's stdin's
        # Both closed by run():
        self.selector = selectors.DefaultSelector()
        self.exit_fd = _pidfd(child.pid)  # readable once PROGRAM exits
        connection.setblocking(False)
        os.set_blocking(self.stdin.fileno(), False)
        os.set_blocking(self.stdout.fileno(), False)

    def run(self, timeout: Optional[float]) -> None:
        """Pump until PROGRAM has closed its stdout and exited.

        Raises IdleTimeout after timeout seconds in which nothing moved
        either way; the caller ends PROGRAM then.
        """
        moved_at = time.monotonic()
        try:
            while not self.finished():
                reading = self.watch()
                if not (reading and _pending(self.connection)):
                    self.selector.select(self.wait(timeout, moved_at))
                moved = self.to_program()
                moved = self.to_client() or moved
                if moved:
                    moved_at = time.monotonic()
                elif (timeout is not None
                      and time.monotonic() - moved_at >= timeout):
                    raise IdleTimeout("nothing moved for %s seconds" % timeout)
        finally:
            self.selector.close()
            if self.exit_fd is not None:
                os.close(self.exit_fd)

    def finished(self) -> bool:
        """True once PROGRAM's output is all out, its stdout closed, and it
        has exited (reaped here: its returncode is set)."""
        return self.output_done() and self.child.poll() is not None

    def output_done(self) -> bool:
        """True once PROGRAM's stdout is closed and all it wrote is out:
        from then on only PROGRAM's exit (or the client's input) can come."""
        return self.stdout is None and not self.outward

    def watch(self) -> bool:
        """Register what the next select() waits for; return True if that
        includes reading the client."""
        reading = (self.client_open and self.stdin is not None
                   and not self.inward)
        _watch(self.selector, self.connection, reading, bool(self.outward))
        _watch(self.selector, self.stdin, False, bool(self.inward))
        _watch(self.selector, self.stdout, not self.outward, False)
        _watch(self.selector, self.exit_fd, self.output_done(), False)
        return reading

    def wait(self, timeout: Optional[float],
             moved_at: float) -> Optional[float]:
        """Seconds select() may wait: what is left of timeout (_PUMP_WAIT
        at most), and at most _EXIT_POLL once only polling shows PROGRAM's
        exit."""
        left: Optional[float] = None
        if timeout is not None:
            left = min(_PUMP_WAIT,
                       max(0.0, moved_at + timeout - time.monotonic()))
        if self.output_done() and self.exit_fd is None:
            left = _EXIT_POLL if left is None else min(left, _EXIT_POLL)
        return left

    def to_program(self) -> bool:
        """Move the client's bytes on to PROGRAM's stdin; True if any moved.

        Closes the stdin once the client has ended and all it sent is
        written.  Once PROGRAM closes its stdin, the client's bytes are
        left unread, as they would be on a socket that PROGRAM reads.
        """
        if self.stdin is None:
            return False
        moved = False
        if self.client_open and not self.inward:
            data = self.receive()
            if data is not None:
                self.inward += data
                self.client_open = bool(data)
                moved = True
        if self.inward:
            try:
                del self.inward[:os.write(self.stdin.fileno(), self.inward)]
                moved = True
            except BlockingIOError:
                pass
            except BrokenPipeError:
                self.inward.clear()
                self.client_open = False
        if not self.client_open and not self.inward:
            self.close(self.stdin)
            self.stdin = None
        return moved

    def to_client(self) -> bool:
        """Move PROGRAM's output on to the client; True if any moved.

        A client gone raises the socket's error: the caller ends PROGRAM.
        """
        moved = False
        if self.stdout is not None and not self.outward:
            try:
                data = os.read(self.stdout.fileno(), 65536)
            except BlockingIOError:
                data = None
            if data == b"":
                self.close(self.stdout)
                self.stdout = None
            elif data:
                self.outward += data
            moved = data is not None
        if self.outward:
            try:
                del self.outward[:self.connection.send(self.outward)]
                moved = True
            except self.would_block:
                pass
        return moved

    def receive(self) -> Optional[bytes]:
        """Return what the client sent (b"" at its end), or None if nothing
        came yet."""
        try:
            return self.connection.recv(65536)
        except self.would_block:
            return None
        except ConnectionResetError:
            return b""

    def close(self, stream: Any) -> None:
        """Stop watching one of PROGRAM's pipes, and close it."""
        _watch(self.selector, stream, False, False)
        stream.close()


def _pidfd(pid: int) -> Optional[int]:
    """Return a descriptor that turns readable when process pid exits, or
    None where there is none (os.pidfd_open: Linux 5.3+, Python 3.9+)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:  # an older kernel (ENOSYS), or no descriptor left
        return None


def _pending(connection: socket.socket) -> int:
    """Return how many bytes TLS has decrypted but not yet handed over
    (select() cannot see them); 0 for a plain socket."""
    return int(getattr(connection, "pending", lambda: 0)())


def _watch(selector: Any, stream: Any, read: bool, write: bool) -> None:
    """Make selector watch stream for reading and/or writing, or not at all."""
    if stream is None:
        return
    events = (selectors.EVENT_READ if read else 0) | (
        selectors.EVENT_WRITE if write else 0)
    try:
        key = selector.get_key(stream)
    except KeyError:
        key = None
    if key is None and events:
        selector.register(stream, events)
    elif key is not None and not events:
        selector.unregister(stream)
    elif key is not None and key.events != events:
        selector.modify(stream, events)


class _CallHandler(_CommandConnection, ThunkHandler):
    """Runs the command line's --call thunk for one connection."""

    server: "_CommandServer"  # both bases declare it: say which one wins
    disable_nagle_algorithm = False  # verify_request() set it as -d or -D say

    def serve(self, variables: Dict[str, str], fields: Optional[str]) -> None:
        self.server.started(self.number, self.client_address, fields)
        self.status = 1 << 8  # as a PROGRAM that exits 1, if it raises
        ThunkHandler.handle(self)
        self.status = 0


def _command_target(options: _Options) -> Tuple[Any, Optional[Callable[[], Any]]]:
    """Return the handler class and thunk that serve what the command names."""
    if not options.call:
        if shutil.which(options.program[0]) is None:
            raise _UsageError("PROGRAM %r is not an executable file, here or "
                              "on $PATH" % options.program[0])
        return _ProgramHandler, None
    # The last colon: FILE may be C:\\like\\this.py, FUNCTION has none.
    module_name, _, function_name = options.call.rpartition(":")
    if not module_name or not function_name:
        raise _UsageError("--call needs FILE.py:FUNCTION or MODULE:FUNCTION, "
                          "not %r" % options.call)
    try:
        module = _load_module(module_name)
    except Exception as exc:  # the module's own failure, whatever it is
        failure = traceback.format_exception_only(type(exc), exc)[-1]
        raise _UsageError("--call: cannot load %s: %s"
                          % (module_name, failure.strip())) from None
    thunk = getattr(module, function_name, None)
    if not callable(thunk):
        raise _UsageError("--call: %s has no function %s"
                          % (module_name, function_name))
    return _CallHandler, thunk


def _load_module(name: str) -> Any:
    """Import the module --call names: a file (FILE.py, by its path) or a
    module on sys.path (which the current directory leads, as for -m).

    A file is run as a module named after it, not as __main__, so its
    ``if __name__ == "__main__":`` part stays out; its directory goes in
    front of sys.path, so it imports its neighbours as it would when run.
    """
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise FileNotFoundError("no such file: %s" % path)
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ImportError("not a Python file: %s" % path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    sys.modules[spec.name] = module  # for pickle, dataclasses and the like
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]  # as import does with a failed module
        raise
    return module


def _tls_context(options: _Options) -> Any:
    """Return the ssl.SSLContext the TLS options ask for, or None."""
    if not options.tls_cert:
        return None
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
        if options.tls_ca:
            context.load_verify_locations(options.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise _UsageError("cannot load the TLS files: %s" % (exc,)) from None
    return context


def _command_listener(options: _Options) -> socket.socket:
    """Return the listening socket: HOST PORT's, --unix PATH's, or
    systemd's (--inherit)."""
    if options.unix:
        try:
            return unix_listen(options.unix, options.backlog)
        except OSError as exc:
            raise _CommandError("fatal: unable to listen on %s: %s"
                                % (options.unix, exc)) from None
    if not options.inherit:
        try:
            return tcp_listen(options.port, options.backlog, options.host)
        except OSError as exc:
            raise _CommandError("fatal: unable to listen on %s port %d: %s"
                                % (options.host or "::", options.port,
                                   exc)) from None
    try:
        listeners = systemd_listeners()
    except (OSError, ValueError) as exc:
        raise _UsageError("--inherit: %s" % exc) from None
    if len(listeners) != 1:
        for listener in listeners:
            listener.close()
        raise _UsageError("--inherit needs one socket from systemd "
                          "(LISTEN_FDS=1, LISTEN_PID=this process), not %d"
                          % len(listeners))
    return listeners[0]


def _drop_privileges(options: _Options) -> None:
    """Become -g GID and -u UID (after binding; 0 or none leaves them, as
    in ucspi-tcp)."""
    if options.gid:
        os.setgroups([options.gid])
        os.setgid(options.gid)
    if options.uid:
        os.setuid(options.uid)


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``python -m tcpserver`` with argv (default sys.argv[1:]).

    Returns the exit code: 0 after a signal stopped it, _EXIT_USAGE for a
    bad command line, _EXIT_TEMPORARY when it cannot listen or drop
    privileges.
    """
    try:
        options = _parse_command_line(sys.argv[1:] if argv is None else argv)
        if options.help:
            print(_HELP)
            return 0
        server = _command_server(options)
    except _CommandError as exc:
        _say(str(exc))
        return exc.code

    def ready() -> None:
        if options.print_port and isinstance(server.server_address, tuple):
            _write(sys.stdout, "%d\n" % server.server_address[1])
        server.say("status: 0/%d" % options.limit)

    if options.workers > 1:
        server.serve_workers(options.workers, ready=ready)
        server.server_close()
    else:
        server.serve_until_signalled(ready=ready)
    for stream in (sys.stdout, sys.stderr):
        _write(stream, "")  # what is left, or nothing, before exit flushes
    return 0


def _command_server(options: _Options) -> "_CommandServer":
    """Return the server the command line asks for, listening, with the
    privileges dropped; raise _CommandError if that cannot be."""
    handler, thunk = _command_target(options)
    settings = dict(options=options, thunk=thunk, max_requests=options.limit,
                    max_per_client=options.per_client,
                    timeout=options.timeout, drain_timeout=options.drain,
                    # A silent client is idle before its TLS handshake or
                    # PROXY header too.
                    handshake_timeout=min(DEFAULT_HANDSHAKE_TIMEOUT,
                                          options.timeout or DEFAULT_HANDSHAKE_TIMEOUT),
                    # The rules may look names up: not in the leader.
                    verify_in_thread=True,
                    # A short drain asks for a quick stop: so is the reset.
                    reset_grace=min(ThreadingTCPServer.reset_grace,
                                    max(options.drain, 0.05)),
                    ssl_context=_tls_context(options),
                    proxy_protocol=options.proxy_protocol,
                    trusted_proxies=options.trusted_proxies)
    if options.timeout is not None:
        import ssl  # noqa: F401  # for _Pump, while we may read the files
    try:  # the settings first: a bad command line must not listen
        _CommandServer(("", 0), handler, bind_and_activate=False,
                       **settings).server_close()
    except (TypeError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    listener = _command_listener(options)
    try:
        server = _CommandServer.from_listener(listener, handler, **settings)
    except (TypeError, ValueError) as exc:  # an inherited socket, not TCP
        listener.close()
        raise _UsageError("--inherit: %s" % exc) from None
    if options.unix:
        server.own_path(options.unix)
    try:
        _drop_privileges(options)
    except OSError as exc:
        server.server_close()
        raise _CommandError("fatal: unable to drop privileges: %s"
                            % (exc,)) from None
    return server


if __name__ == "__main__":
    # Run the importable module's main(), not this __main__ copy's: a --call
    # thunk that imports tcpserver must share its per-thread streams.
    import tcpserver
    sys.exit(tcpserver.main())
