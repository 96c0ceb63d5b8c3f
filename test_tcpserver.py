"""Tests for tcpserver: ``python -m unittest -v test_tcpserver``.

Every test talks to real sockets on loopback, binds port 0, waits on events
with timeouts (never on sleeps), and checks afterwards that it left no
thread or file descriptor behind.  Tests driven by real client programs
(nc, socat, curl, openssl s_client) skip with a reason when the program is
missing; .ci/run installs them.
"""

import ast
import atexit
import errno
import functools
import gc
import hashlib
import http.server
import io
import ipaddress
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import unittest
import unittest.mock
import urllib.error
import urllib.request
import weakref
import xmlrpc.client
import xmlrpc.server

import tcpserver

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10.0  # seconds: the bound of every wait in these tests
# The soak and fuzz tests run at full size only with TEST_FULL_SOAK=1
# (as .ci/run does); otherwise smaller, down the same paths.
FULL_SOAK = bool(os.environ.get("TEST_FULL_SOAK"))
TEST_RELOADS = 20  # reloads of the TLS files under load, with TEST_FULL_SOAK

if os.environ.get("TEST_SWITCH_INTERVAL"):
    # The race-shaking pass (.ci/run): the interpreter switches threads at
    # almost every bytecode, which surfaces races that the GIL's usual 5 ms
    # slices hide.  Servers the tests start in this process are shaken;
    # programs they run keep the default.
    sys.setswitchinterval(float(os.environ["TEST_SWITCH_INTERVAL"]))

if os.environ.get("TEST_PORTABLE_IO"):
    # The I/O a platform without poll(), and without socket descriptors that
    # are files (Windows), gets: .ci/run runs the suite so once.
    tcpserver._SOCKETS_ARE_FILES = False
    tcpserver._ready = tcpserver._select_ready


def open_fds():
    """Return the set of open descriptors, or None where /proc is absent."""
    try:
        listing = os.open("/proc/self/fd", os.O_RDONLY)
    except OSError:
        return None
    try:
        return set(os.listdir(listing)) - {str(listing)}
    finally:
        os.close(listing)


def describe_fds(fds):
    """Say what each descriptor in fds is, for a leak's failure message."""
    described = []
    for fd in sorted(fds, key=int):
        try:
            described.append("%s -> %s" % (fd, os.readlink("/proc/self/fd/" + fd)))
        except OSError:
            described.append(fd)
    return described


def echo_lines():
    """A thunk that answers each line with "echo LINE" until the input ends."""
    while True:
        print("echo", input())


def read_all(sock):
    """Read from sock until the peer closes; each recv is bounded by its timeout."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exchange(sock, data):
    """Send data, end our side, return all the peer sent back.

    A peer that refuses a connection may close it before it reads what we
    send, and, as data was left unread, reset it: our send or shutdown
    then fails (EPIPE, ECONNRESET, ENOTCONN), and what the peer sent
    before its close is still its whole answer.  A reset that does not
    come first is still raised.
    """
    closed_first = False
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            raise
        closed_first = True
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        if not closed_first:
            raise
    return b"".join(chunks)


def reset(sock):
    """Close sock so that the peer sees RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def environment(extra=None):
    """os.environ for a program the tests run: tcpserver importable, its
    output unbuffered (as on a terminal, where the README's scripts print
    their port), plus extra."""
    env = dict(os.environ, PYTHONPATH=HERE, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_python(args, env=None, **kwargs):
    """Run Python with args to its end, in the clone (see environment());
    return the CompletedProcess, with stdout and stderr captured."""
    return subprocess.run([sys.executable] + args, cwd=HERE, env=environment(env),
                          capture_output=True, timeout=TIMEOUT, **kwargs)


class Program:
    """A program run beside a test (see environment()), killed when the test ends.

    Threads collect its output as it comes: lines["stdout"] and
    lines["stderr"] keep the first keep lines of each (1000), so a runaway
    program cannot fill memory; seen counts them all; closed names the pipes at
    their end; changed is notified for each line and each end.  Unless
    ready is None, the constructor waits until ready's pattern matches what
    came on ready's pipe; the pattern's first group, if it has one, is the
    port the program serves (the default reads the line of a -1 option).
    """

    def __init__(self, test, argv, env=None, cwd=HERE, ready=("stdout", r"\A(\d+)\n"),
                 keep=1000, **popen):
        self.keep = keep
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=environment(env), cwd=cwd,
                                        **popen)
        self.lines = {"stdout": [], "stderr": []}
        self.seen = {"stdout": 0, "stderr": 0}
        self.closed = set()
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._collect, args=(name,), name="read " + name)
                        for name in self.lines]
        for reader in self.readers:
            reader.start()
        test.addCleanup(self.close)
        self.port = None
        if ready is not None:
            found = self.wait_for(ready[1], ready[0])
            if found.re.groups:
                self.port = int(found.group(1))

    def _collect(self, name):
        for raw in getattr(self.process, name):
            with self.changed:
                self.seen[name] += 1
                if len(self.lines[name]) < self.keep:
                    self.lines[name].append(raw.decode("utf-8", "replace"))
                self.changed.notify_all()
        with self.changed:
            self.closed.add(name)  # the program has closed it, or ended
            self.changed.notify_all()

    def text(self, name="stderr"):
        """Return what came on the pipe name so far (its first 1000 lines)."""
        with self.changed:
            return "".join(self.lines[name])

    def wait_until(self, predicate, timeout=TIMEOUT):
        """Wait until predicate() is true, for timeout seconds at most; return it."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def wait_for(self, pattern, name="stderr"):
        """Wait until what came on the pipe name matches pattern; return the match.

        Fails the test if it does not within TIMEOUT, or if the pipe ends first.
        """
        def search():
            return re.search(pattern, "".join(self.lines[name]))

        with self.changed:
            self.changed.wait_for(lambda: search() or name in self.closed, TIMEOUT)
            found = search()
        if not found:
            raise AssertionError("no match for %r on the %s of %s: %r; stderr: %r"
                                 % (pattern, name, self.process.args, self.text(name),
                                    self.text("stderr")))
        return found

    def proc(self, name):
        """Return the text of the program's /proc/PID/<name>."""
        with open("/proc/%d/%s" % (self.process.pid, name)) as file:
            return file.read()

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def talk(self, data=b""):
        """Send data, end our side, return what came back."""
        with self.connect() as sock:
            return exchange(sock, data)

    def wait(self):
        """Wait until the program ends; return (exit code, what it wrote on stderr)."""
        code = self.process.wait(TIMEOUT)
        for reader in self.readers:
            reader.join(TIMEOUT)
        return code, self.text("stderr")

    def stop(self, signum=signal.SIGTERM):
        """Send signum, then wait(): return (exit code, what it wrote on stderr)."""
        self.process.send_signal(signum)
        return self.wait()

    def close(self):
        """Kill the program if it runs, and close its pipes; may be called again."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)
        for reader in self.readers:
            reader.join(TIMEOUT)
        self.process.stdout.close()
        self.process.stderr.close()


class ServerTestCase(unittest.TestCase):
    """Starts servers in threads and checks that each test cleans up."""

    host = "127.0.0.1"

    def setUp(self):
        # Registered first, so it runs last: after every server is closed.
        self.addCleanup(self.check_no_leaks, set(threading.enumerate()), open_fds())

    def check_no_leaks(self, threads_before, fds_before):
        deadline = time.monotonic() + TIMEOUT
        for thread in set(threading.enumerate()) - threads_before:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threading.enumerate()
                 if t not in threads_before and t.is_alive()]
        self.assertEqual(alive, [], "threads left running")
        fds_after = open_fds()
        # join() returns before the OS thread is gone, and glibc may still be
        # loading libgcc_s to end it (3.8): such files close by themselves.
        while (fds_before is not None and len(fds_after) > len(fds_before)
               and time.monotonic() < deadline):
            time.sleep(0.01)
            fds_after = open_fds()
        if fds_before is not None:
            self.assertLessEqual(len(fds_after), len(fds_before),
                                 "descriptors left open: %s"
                                 % describe_fds(fds_after - fds_before))

    def serve(self, server, debug=False):
        """Run server in a thread until the test ends; return server."""
        if isinstance(server, tcpserver.ThreadingTCPServer):
            target = functools.partial(server, debug=debug, poll_interval=0.01)
        else:
            target = functools.partial(server.serve_forever, poll_interval=0.01)
        thread = threading.Thread(target=target, name="serve")
        thread.start()
        server.test_thread = thread
        self.addCleanup(self.stop, server)
        return server

    def start(self, thunk, max_requests=None, debug=False):
        """Serve thunk with make_tcp_server() on this class's host, port 0."""
        server = tcpserver.make_tcp_server((self.host, 0), thunk, max_requests)
        return self.serve(server, debug)

    def stop(self, server):
        """Shut server down and close it; safe to call twice."""
        thread = server.test_thread
        if thread.is_alive():
            server.shutdown()
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "serve_forever() did not return")
        server.server_close()
        self.assertEqual(server.fileno(), -1)

    @staticmethod
    def address(server):
        """Return where to reach server: loopback if it listens on all interfaces."""
        host, port = server.server_address[:2]
        return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), port

    def connect(self, server):
        sock = socket.create_connection(self.address(server), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        return sock

    def talk(self, server, data=b""):
        """Send data, close our side, return all the server sent back."""
        with socket.create_connection(self.address(server), timeout=TIMEOUT) as sock:
            return exchange(sock, data)

    def assert_reset(self, server, data=b"", end_input=False):
        """Send data (then end our side if end_input), expect a reset."""
        with self.assertRaises(ConnectionResetError):
            # The reset may come so soon that even connect() sees it.
            with socket.create_connection(self.address(server), timeout=TIMEOUT) as sock:
                sock.sendall(data)
                if end_input:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError as exc:  # reset already: recv() says so
                        if exc.errno != errno.ENOTCONN:
                            raise
                read_all(sock)

    def log_to(self, emit):
        """Call emit(record) for every record of the "tcpserver" logger until the test ends."""
        handler = logging.Handler(logging.DEBUG)
        handler.emit = emit
        logger = logging.getLogger("tcpserver")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.DEBUG)

    def capture(self, name):
        """Replace sys.<name> with a StringIO until the test ends; return it."""
        stream = io.StringIO()
        self.addCleanup(setattr, sys, name, getattr(sys, name))
        setattr(sys, name, stream)
        return stream


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------

class TestListen(ServerTestCase):

    def test_default_host_accepts_ipv4_and_ipv6(self):
        with tcpserver.tcp_listen(0) as listener:
            port = listener.getsockname()[1]
            hosts = ["127.0.0.1"]
            if socket.has_dualstack_ipv6():
                self.assertEqual(listener.family, socket.AF_INET6)
                hosts.append("::1")
            for host in hosts:
                with socket.create_connection((host, port), timeout=TIMEOUT):
                    conn, _ = listener.accept()
                    with conn:
                        local, peer = tcpserver.tcp_addresses(conn)
                    self.assertEqual(peer[0], host)  # no '::ffff:' prefix
                    self.assertEqual(local[:2], (host, port))

    def test_host_chooses_the_family(self):
        cases = [("127.0.0.1", socket.AF_INET)]
        if socket.has_ipv6:
            cases.append(("::1", socket.AF_INET6))
        for host, family in cases:
            with self.subTest(host=host), tcpserver.tcp_listen(0, host=host) as sock:
                self.assertEqual(sock.family, family)
                self.assertEqual(sock.getsockname()[0], host)
                self.assertNotEqual(sock.getsockname()[1], 0)

    def test_backlog_and_reuse(self):
        with tcpserver.tcp_listen(0, backlog=3, host="127.0.0.1") as sock:
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_bad_arguments(self):
        for args, kwargs, error, text in [
                (("80",), {}, TypeError, "port must be an int in 0..65535, not str"),
                ((True,), {}, TypeError, "not bool"),
                ((70000,), {}, ValueError, "port must be an int in 0..65535, not 70000"),
                ((-1,), {}, ValueError, "not -1"),
                ((0,), {"backlog": -1}, ValueError, "backlog must be an int >= 0, not -1"),
                ((0,), {"host": 127001}, TypeError, "host must be a str, not int")]:
            with self.subTest(args=args, kwargs=kwargs):
                with self.assertRaises(error) as caught:
                    tcpserver.tcp_listen(*args, **kwargs)
                self.assertIn(text, str(caught.exception))

    def test_port_in_use_is_an_oserror(self):
        with tcpserver.tcp_listen(0, host="127.0.0.1") as first:
            port = first.getsockname()[1]
            with self.assertRaises(OSError):
                tcpserver.tcp_listen(port, host="127.0.0.1")


class TestHooks(ServerTestCase):

    def test_tcp_abandon_makes_close_send_rst(self):
        with tcpserver.tcp_listen(0, host="127.0.0.1") as listener:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
                conn, peer = tcpserver.tcp_accept(listener)
                self.assertEqual(peer, client.getsockname())
                tcpserver.tcp_abandon(conn)
                conn.close()
                with self.assertRaises(ConnectionResetError):
                    read_all(client)

    def test_subclass_methods_are_called_at_the_right_points(self):
        calls = []

        class Server(tcpserver.ThreadingTCPServer):
            def accept_connection(self, listener):
                calls.append(("accept", listener is self.socket,
                              threading.current_thread().name))
                return tcpserver.tcp_accept(listener)

            def get_addresses(self, conn):
                calls.append(("addresses", threading.current_thread().name))
                local, peer = tcpserver.tcp_addresses(conn)
                return local, ("192.0.2.7", 4242)  # as a PROXY header would say

            def prepare_hard_close(self, conn):
                calls.append(("hard close", threading.current_thread().name))
                tcpserver.tcp_abandon(conn)

        def thunk():
            connection = tcpserver.current_connection()
            print(connection.client_address)
            if input() == "fail":
                raise RuntimeError("thunk failed on purpose")

        stderr = self.capture("stderr")
        server = self.serve(Server(("127.0.0.1", 0), tcpserver.ThunkHandler,
                                   thunk=thunk), debug=True)
        self.assertEqual(self.talk(server, b"ok\n"), b"('192.0.2.7', 4242)\n")
        # The request thread that accepts (the leader) serves the connection.
        self.assertEqual(calls, [("accept", True, "tcpserver-leader"),
                                 ("addresses", "tcpserver-1")])
        with self.connect(server) as sock:
            sock.sendall(b"fail\n")
            with self.assertRaises(ConnectionResetError):
                read_all(sock)
        self.stop(server)
        self.assertEqual(calls[2:], [("accept", True, "tcpserver-leader"),
                                     ("addresses", "tcpserver-2"),
                                     ("hard close", "tcpserver-2")])
        self.assertIn("request 1 from 192.0.2.7;", stderr.getvalue())

    def test_instance_may_be_given_plain_functions(self):
        seen = []

        def accept(listener):
            seen.append("accept")
            return tcpserver.tcp_accept(listener)

        def addresses(conn):
            seen.append("addresses")
            return tcpserver.tcp_addresses(conn)

        def hard_close(conn):
            seen.append("hard close")
            tcpserver.tcp_abandon(conn)

        def thunk():
            raise RuntimeError("thunk failed on purpose")

        self.capture("stderr")
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk)
        server.accept_connection = accept
        server.get_addresses = addresses
        server.prepare_hard_close = hard_close
        self.serve(server)
        self.assert_reset(server)
        self.stop(server)
        self.assertEqual(seen, ["accept", "addresses", "hard close"])

    def serve_once_through(self, accept):
        """Serve one client with accept as the accept hook; return the log records."""
        records = []
        self.log_to(records.append)
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), lambda: print("served"))
        server.accept_connection = accept
        self.serve(server)
        self.assertEqual(self.talk(server), b"served\n")
        self.stop(server)
        return records

    def test_accept_errors_are_logged_once_and_backed_off(self):
        calls = []

        def accept(listener):
            calls.append(time.monotonic())
            if len(calls) <= 5:
                raise OSError(errno.EMFILE, "Too many open files")
            return tcpserver.tcp_accept(listener)

        records = self.serve_once_through(accept)
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        self.assertEqual(warnings, ["accept failed: [Errno 24] Too many open files",
                                    "accept works again after 5 failures"])
        gaps = [later - earlier for earlier, later in zip(calls, calls[1:])]
        for number, gap in enumerate(gaps[:5]):  # 10 ms, then doubling
            self.assertGreaterEqual(gap, 0.009 * 2 ** number, gaps)

    def test_transient_accept_errors_are_ignored(self):
        calls = []

        def accept(listener):
            calls.append(None)
            if len(calls) <= 3:
                raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
            return tcpserver.tcp_accept(listener)

        records = self.serve_once_through(accept)
        self.assertEqual([r for r in records if r.levelno >= logging.WARNING], [])
        self.assertEqual(len(calls), 4)

    def test_a_broken_stderr_does_not_stop_the_server(self):
        class Broken(io.StringIO):
            def write(self, text):
                raise BrokenPipeError(errno.EPIPE, "stderr is a closed pipe")

        self.capture("stderr")
        sys.stderr = Broken()
        server = self.start(lambda: print("hi"), max_requests=1, debug=True)
        self.assertEqual([self.talk(server) for _ in range(3)], [b"hi\n"] * 3)
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 3)

    def test_what_verify_request_raises_closes_that_connection(self):
        # An error costs that connection (and a traceback); serving goes on.
        def verify(request, client_address):
            calls.append(client_address)
            if len(calls) == 2:
                raise ValueError("verify_request() failed on purpose")
            return True

        calls = []
        stderr = self.capture("stderr")
        server = self.start(lambda: print("hi"), max_requests=1)
        server.verify_request = verify
        self.assertEqual([self.talk(server) for _ in range(3)], [b"hi\n", b"", b"hi\n"])
        self.stop(server)
        self.assertEqual(stderr.getvalue().count("ValueError: verify_request() failed"), 1)

    def test_what_verify_request_raises_but_errors_ends_serve_forever(self):
        # As in socketserver's loop, which closes the connection first here.
        class Stop(BaseException):
            pass

        def verify(request, client_address):
            calls.append(client_address)
            if len(calls) == 2:
                raise Stop
            return True

        calls, raised = [], []
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), lambda: print("hi"), 1)
        server.verify_request = verify

        def serve():
            try:
                server.serve_forever(0.01)
            except Stop as exc:
                raised.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        self.assertEqual(self.talk(server), b"hi\n")
        self.assertEqual(self.talk(server), b"")
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "serve_forever() did not end")
        self.assertEqual(len(raised), 1)
        self.serve(server)
        self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        self.assertEqual(len(calls), 3)

    def test_shutdown_without_server_close_leaves_no_thread_waiting(self):
        server = self.start(lambda: print("hi"))
        for _ in range(3):
            self.assertEqual(self.talk(server), b"hi\n")
        server.shutdown()
        threads = [thread for thread in threading.enumerate()
                   if thread.name.startswith("tcpserver-")]
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual([thread.name for thread in threads if thread.is_alive()], [])

    def test_get_request_may_replace_the_socket(self):
        # Legacy TLS code wraps the socket in get_request(), and a failed
        # handshake raises there: neither may cost a slot.
        attempts = []

        class Wrapping(tcpserver.ThreadingTCPServer):
            def get_request(self):
                conn, address = super().get_request()
                attempts.append(address)
                if len(attempts) <= 2:
                    conn.close()
                    raise OSError("handshake failed")
                return socket.socket(fileno=conn.detach()), address

        server = self.serve(Wrapping(("127.0.0.1", 0), EchoHandler, max_requests=1))
        for _ in range(2):
            self.assertEqual(self.talk(server), b"")
        for _ in range(3):
            self.assertEqual(self.talk(server, b"x\n"), b"2:x\n")
        self.assertEqual(len(attempts), 5)

    def test_accept_reports_ipv4_clients_of_dual_stack_as_ipv4(self):
        seen = []

        def verify(request, address):
            seen.append(address)
            return True

        server = tcpserver.make_tcp_server(0, lambda: print(
            tcpserver.current_connection().client_address))
        server.verify_request = verify
        self.serve(server)
        with self.connect(server) as sock:
            expected = sock.getsockname()
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(sock).decode(), "%s\n" % (expected,))
        self.assertEqual(seen, [expected])

    def test_hook_defaults(self):
        self.assertIs(tcpserver.ThreadingTCPServer.accept_connection, tcpserver.tcp_accept)
        self.assertIs(tcpserver.ThreadingTCPServer.get_addresses, tcpserver.tcp_addresses)
        self.assertIs(tcpserver.ThreadingTCPServer.prepare_hard_close, tcpserver.tcp_abandon)


# ---------------------------------------------------------------------------
# TLS served by overriding hooks only: the recipe of README.rst, run as is.
# ---------------------------------------------------------------------------

def readme_code(marker):
    """Return the README's Python code block that contains marker, dedented."""
    with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as readme:
        text = readme.read()
    for block in re.findall(r"::\n\n((?:(?:    .*)?\n)+)", text):
        if marker in block:
            return textwrap.dedent(block)
    raise AssertionError("no code block with %r in README.rst" % marker)


def make_certificate(directory, name, subject, alt_names=None):
    """Write a self-signed certificate for CN=subject, and its key, with
    openssl; return their paths (name.pem, name.key in directory).

    An EC (P-256) key: made in milliseconds, where RSA-2048 takes a tenth
    of a second or more.
    """
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
    command = ["openssl", "req", "-x509", "-newkey", "ec",
               "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=" + subject]
    if alt_names:
        command += ["-addext", "subjectAltName=" + alt_names]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


@functools.lru_cache(maxsize=None)
def certificates():
    """Return the certificates of this run, made on first use.

    cert and key: a server's, for localhost and 127.0.0.1; client_cert and
    client_key: a client's (CN=client).  Each is self-signed, so it is its
    own CA.  They live in one temporary directory, removed at exit.
    """
    directory = tempfile.mkdtemp(prefix="test_tcpserver-")
    atexit.register(shutil.rmtree, directory, True)
    cert, key = make_certificate(directory, "server", "localhost",
                                 "DNS:localhost,IP:127.0.0.1")
    client_cert, client_key = make_certificate(directory, "client", "client")
    return types.SimpleNamespace(cert=cert, key=key, client_cert=client_cert,
                                 client_key=client_key)


def tls_over(sock, cafile):
    """Handshake over the plain socket sock with an ssl.SSLObject; return it.

    So a test can send the TLS records it writes as it likes: in pieces,
    or corrupted.  pull() feeds what the server sent into it.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=cafile).wrap_bio(
        incoming, outgoing, server_hostname="localhost")
    tls.push = lambda: sock.sendall(outgoing.read())
    tls.pull = lambda: incoming.write(sock.recv(65536) or b"")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            tls.push()
            tls.pull()
    tls.push()
    tls.records = outgoing.read
    return tls


@unittest.skipUnless(shutil.which("openssl"), "openssl is not installed (apt-get install openssl)")
class TestTLSRecipe(ServerTestCase):

    @classmethod
    def setUpClass(cls):
        cls.cert, cls.key = certificates().cert, certificates().key
        cls.recipe = {}
        exec(readme_code("class TLSServer("), cls.recipe)

    def start_tls(self, thunk, debug=False):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        server = self.recipe["TLSServer"].from_listener(
            tcpserver.tcp_listen(0, host="127.0.0.1"), tcpserver.ThunkHandler,
            thunk=thunk, max_requests=4)
        server.context = context
        return self.serve(server, debug)

    def tls_connect(self, server):
        # A ragged EOF raises: an orderly end needs the server's close_notify.
        context = ssl.create_default_context(cafile=self.cert)
        sock = socket.create_connection(server.server_address, timeout=TIMEOUT)
        return context.wrap_socket(sock, server_hostname="localhost",
                                   suppress_ragged_eofs=False)

    def test_python_client(self):
        def thunk():
            name = input("name? ")
            print("hello", name, tcpserver.current_connection().connection.version())

        server = self.start_tls(thunk)
        with self.tls_connect(server) as sock:
            self.assertEqual(read_exactly(sock, 6), b"name? ")
            sock.sendall(b"tls\n")
            self.assertRegex(read_all(sock), rb"^hello tls TLSv1\.[23]\n$")

    def test_handshake_runs_in_the_connection_thread(self):
        def thunk():
            print("served")

        server = self.start_tls(thunk)
        silent = self.connect(server)  # connects, never says a word
        with self.tls_connect(server) as sock:
            self.assertEqual(read_all(sock), b"served\n")
        silent.close()

    def test_plaintext_client_costs_one_line_and_no_traceback(self):
        def thunk():
            print("served")

        stderr = self.capture("stderr")
        server = self.start_tls(thunk, debug=True)
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                read_all(sock)
            except ConnectionResetError:
                pass  # the failed handshake left some of our bytes unread
        with self.tls_connect(server) as sock:
            self.assertEqual(read_all(sock), b"served\n")
        self.stop(server)
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertRegex(stderr.getvalue(),
                         r"tcpserver-1 \(with 127\.0\.0\.1\) finished \(setup failed, SSLError")

    def test_thunk_error_resets_the_tls_connection(self):
        def thunk():
            raise ValueError("thunk failed on purpose")

        stderr = self.capture("stderr")
        server = self.start_tls(thunk)
        with self.tls_connect(server) as sock:
            # ssl reports a reset as a plain EOF; read the TCP layer beneath it.
            with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                raw.settimeout(TIMEOUT)
                with self.assertRaises(ConnectionResetError):
                    read_all(raw)
        self.stop(server)
        self.assertIn("ValueError: thunk failed on purpose", stderr.getvalue())

    def test_openssl_s_client(self):
        def thunk():
            print("hello", input())

        server = self.start_tls(thunk)
        result = subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % server.server_address[1],
             "-quiet", "-verify_return_error", "-CAfile", self.cert,
             "-servername", "localhost"],
            input=b"s_client\n", capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout, b"hello s_client\n", result.stderr)
        self.assertEqual(result.returncode, 0, result.stderr)  # no "unexpected eof"


# ---------------------------------------------------------------------------
# Per-thread standard streams
# ---------------------------------------------------------------------------

class StreamTests:
    """Run on IPv4 and IPv6 (see the two classes below)."""

    def test_print_and_input(self):
        def thunk():
            name = input()
            print("hello,", name)
            print("again,", input())

        server = self.start(thunk)
        self.assertEqual(self.talk(server, b"world\r\nyou\n"), b"hello, world\nagain, you\n")

    def test_current_connection(self):
        def thunk():
            connection = tcpserver.current_connection()
            print(connection.client_address)
            print(connection.local_address)
            print(connection.server is server, connection.stdout is sys.stdout._current())

        server = self.start(thunk)
        with self.connect(server) as sock:
            expected = [str(sock.getsockname()), str(sock.getpeername()), "True True"]
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(sock).decode().splitlines(), expected)


class TestStreamsIPv4(StreamTests, ServerTestCase):
    host = "127.0.0.1"


@unittest.skipUnless(socket.has_ipv6, "no IPv6")
class TestStreamsIPv6(StreamTests, ServerTestCase):
    host = "::1"


class TestStreams(ServerTestCase):

    def test_readline_and_iteration(self):
        def thunk():
            print("first:", sys.stdin.readline(), end="")
            for line in sys.stdin:
                print(line.upper(), end="")

        server = self.start(thunk)
        self.assertEqual(self.talk(server, b"a\nb\nc\n"), b"first: a\nB\nC\n")

    def test_binary_buffers(self):
        payload = os.urandom(1 << 20)

        def thunk():
            data = sys.stdin.buffer.read()
            sys.stdout.buffer.write(hashlib.sha256(data).digest())
            sys.stdout.buffer.write(data)

        server = self.start(thunk)
        reply = self.talk(server, payload)
        self.assertEqual(reply[:32], hashlib.sha256(payload).digest())
        self.assertEqual(hashlib.sha256(reply[32:]).digest(), hashlib.sha256(payload).digest())

    def test_prompt_is_flushed_before_reading(self):
        def thunk():
            sys.stdout.write("> ")
            print("got", sys.stdin.readline().strip())
            print("name", input("name? "))

        server = self.start(thunk)
        with self.connect(server) as sock:
            self.assertEqual(read_exactly(sock, 2), b"> ")
            sock.sendall(b"one\n")
            self.assertEqual(read_exactly(sock, 14), b"got one\nname? ")
            sock.sendall(b"two\n")
            self.assertEqual(read_all(sock), b"name two\n")

    def test_a_read_that_waits_flushes_the_output_first(self):
        # Block-buffered output leaves when a read has to wait for the
        # client (or when the thunk returns): each prompt must reach the
        # client before the thunk waits for the answer, whichever read it
        # waits in, and whatever reads the socket (a FileIO; the socket's
        # own calls, with an idle or a line timeout).
        class BlockBuffered(tcpserver.ThunkHandler):
            line_buffering = False

        def peek_then_read():
            data = sys.stdin.buffer.peek()
            return data, sys.stdin.buffer.read(len(data))

        def readinto():
            buffer = bytearray(4)
            return sys.stdin.buffer.readinto(buffer), bytes(buffer)

        steps = [  # (read, what the client sends, what read() returns)
            (lambda: sys.stdin.readline(), b"one\n", "one\n"),
            (lambda: sys.stdin.readline(), b"two\r\n", "two\n"),
            (input, b"three\n", "three"),
            (lambda: sys.stdin.read(4), b"four", "four"),
            (lambda: sys.stdin.buffer.read(4), b"five", b"five"),
            (lambda: sys.stdin.buffer.read1(100), b"six", b"six"),
            (lambda: sys.stdin.buffer.readline(), b"seven\n", b"seven\n"),
            (peek_then_read, b"eight", (b"eight", b"eight")),
            (readinto, b"nine", (4, b"nine")),
            (lambda: next(sys.stdin), b"ten\n", "ten\n"),
            (lambda: next(sys.stdin.buffer), b"eleven\n", b"eleven\n"),
        ]

        def thunk():
            for number, (read, _, _) in enumerate(steps):
                sys.stdout.write("%d?" % number)
                sys.stdout.write(repr(read()) + ";")

        expected = "".join("%d?%r;" % (number, result)
                           for number, (_, _, result) in enumerate(steps))
        for settings in ({}, {"idle_timeout": TIMEOUT}, {"line_timeout": TIMEOUT}):
            with self.subTest(**settings):
                server = self.serve(tcpserver.ThreadingTCPServer(
                    ("127.0.0.1", 0), BlockBuffered, thunk=thunk, **settings))
                with self.connect(server) as sock:
                    received = b""
                    for number, (_, data, _) in enumerate(steps):
                        while not received.endswith(b"%d?" % number):
                            chunk = sock.recv(4096)  # times out if not flushed
                            self.assertTrue(chunk, received)
                            received += chunk
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    received += read_all(sock)
                self.assertEqual(received.decode(), expected)

    def test_each_line_leaves_at_once(self):
        release = threading.Event()

        def thunk():
            for number in range(3):
                print("line", number)
                release.wait(TIMEOUT)  # still running: the line must be out already
                release.clear()

        server = self.start(thunk)
        with self.connect(server) as sock:
            sock.settimeout(3)
            reader = sock.makefile("rb")
            for number in range(3):
                self.assertEqual(reader.readline(), b"line %d\n" % number)
                release.set()
            reader.close()

    def test_tcp_nodelay_is_set(self):
        def thunk():
            connection = tcpserver.current_connection().connection
            print(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)

        self.assertEqual(self.talk(self.start(thunk)), b"True\n")

    def test_output_without_newline_is_flushed_at_return(self):
        server = self.start(lambda: sys.stdout.write("no newline"))
        self.assertEqual(self.talk(server), b"no newline")

    def test_block_buffering(self):
        printed, release = threading.Event(), threading.Event()

        class BulkHandler(tcpserver.ThunkHandler):
            line_buffering = False

        def thunk():
            print("held back")
            printed.set()
            release.wait(TIMEOUT)

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), BulkHandler,
                                                         thunk=thunk))
        with self.connect(server) as sock:
            self.assertTrue(printed.wait(TIMEOUT))
            sock.setblocking(False)
            with self.assertRaises(BlockingIOError):
                sock.recv(100)  # nothing sent yet
            sock.settimeout(TIMEOUT)
            release.set()
            self.assertEqual(read_all(sock), b"held back\n")

    def test_utf8_and_undecodable_input(self):
        server = self.start(lambda: print(input()[::-1]))
        self.assertEqual(self.talk(server, "héllo\n".encode()), "olléh\n".encode())
        self.assertEqual(self.talk(server, b"a\xffb\n"), "b\ufffda\n".encode())

    def test_handler_class_attributes(self):
        class CRLFHandler(tcpserver.ThunkHandler):
            newline = "\r\n"
            encoding = "latin-1"

        def thunk():
            print("caf\xe9")
            print(input())

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), CRLFHandler,
                                                         thunk=thunk))
        self.assertEqual(self.talk(server, b"\xe9t\xe9\r\n"), b"caf\xe9\r\n\xe9t\xe9\r\n")

    def test_stderr_is_not_redirected(self):
        stderr = self.capture("stderr")

        def thunk():
            print("to the server's stderr", file=sys.stderr)
            print("to the client")

        self.assertEqual(self.talk(self.start(thunk)), b"to the client\n")
        self.assertEqual(stderr.getvalue(), "to the server's stderr\n")

    def test_100_clients_and_the_main_thread_keep_their_own_streams(self):
        stdout = self.capture("stdout")
        count, lines = 100, 50
        entered = threading.Condition()
        inside = []
        release = threading.Event()

        def thunk():
            token = input()
            with entered:
                inside.append(token)
                entered.notify_all()
            release.wait(TIMEOUT)
            for number in range(lines):
                print(token, number)

        server = self.start(thunk)
        clients = [self.connect(server) for _ in range(count)]
        for number, sock in enumerate(clients):
            sock.sendall(b"client-%d\n" % number)
        with entered:
            self.assertTrue(entered.wait_for(lambda: len(inside) == count, TIMEOUT))
        print("main thread line")  # while 100 thunks hold sys.stdout
        release.set()
        for number, sock in enumerate(clients):
            expected = "".join("client-%d %d\n" % (number, n) for n in range(lines))
            self.assertEqual(read_all(sock).decode(), expected)
        self.assertEqual(stdout.getvalue(), "main thread line\n")

    def test_threads_a_thunk_starts_see_the_process_streams(self):
        stdout = self.capture("stdout")
        seen = []

        def child():
            print("from the child thread")
            try:
                tcpserver.current_connection()
            except RuntimeError as exc:
                seen.append(str(exc))

        def thunk():
            thread = threading.Thread(target=child)
            thread.start()
            thread.join(TIMEOUT)
            print("from the thunk")

        self.assertEqual(self.talk(self.start(thunk)), b"from the thunk\n")
        self.assertEqual(stdout.getvalue(), "from the child thread\n")
        self.assertEqual(len(seen), 1)
        self.assertIn("must be called from a thunk's own thread", seen[0])

    def test_the_text_stream_interface_in_every_thread(self):
        names = [name for name in dir(io.TextIOWrapper) if not name.startswith("_")]
        self.addCleanup(setattr, sys, "stdout", sys.stdout)
        sys.stdout = original = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
        mismatches = []

        def attribute(stream, name):
            try:
                return getattr(stream, name)
            except AttributeError as exc:  # e.g. name, where the raw stream has none
                return type(exc)

        def compare(proxy, stream, where):
            for name in names:
                if name in ("write", "flush", "readline"):  # the switch's own, unless bound
                    same = callable(getattr(proxy, name)) == callable(getattr(stream, name))
                else:
                    same = attribute(proxy, name) == attribute(stream, name)
                if not same:
                    mismatches.append((where, name))

        def thunk():
            handler = tcpserver.current_connection()
            compare(sys.stdout, handler.stdout, "thunk stdout")
            compare(sys.stdin, handler.stdin, "thunk stdin")
            print("compared")

        server = self.start(thunk)
        self.assertEqual(self.talk(server), b"compared\n")
        compare(sys.stdout, original, "main thread")
        self.assertEqual(mismatches, [])
        self.assertEqual(sys.stdout.encoding, "latin-1")
        self.assertIn("per-thread sys.stdout", repr(sys.stdout))

    def test_a_spare_thread_lets_go_of_its_last_connection(self):
        streams = []
        server = self.start(lambda: streams.append(
            weakref.ref(tcpserver.current_connection().stdout)))
        self.assertEqual(self.talk(server), b"")
        deadline = time.monotonic() + TIMEOUT
        while server.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the request ends just after the client's EOF
        gc.collect()
        self.assertEqual(len(streams), 1)
        self.assertIsNone(streams[0]())  # the thread waits for work, holding nothing

    def test_current_connection_outside_a_thunk(self):
        with self.assertRaises(RuntimeError):
            tcpserver.current_connection()

    def test_streams_are_swapped_only_while_serving(self):
        original_stdin, original_stdout = sys.stdin, sys.stdout
        server = self.start(lambda: print("x"))
        self.assertEqual(self.talk(server), b"x\n")  # so serving has begun
        self.assertIsNot(sys.stdout, original_stdout)
        self.assertIs(sys.stdout._fallback, original_stdout)
        self.assertIs(sys.stdin._fallback, original_stdin)
        self.stop(server)
        self.assertIs(sys.stdout, original_stdout)
        self.assertIs(sys.stdin, original_stdin)

    def test_a_stream_replaced_meanwhile_is_left_alone(self):
        self.addCleanup(setattr, sys, "stdout", sys.stdout)
        server = self.start(lambda: print("x"))
        self.assertEqual(self.talk(server), b"x\n")
        replacement = io.StringIO()
        sys.stdout = replacement
        self.stop(server)
        self.assertIs(sys.stdout, replacement)

    def test_two_servers_at_once(self):
        original_stdout = sys.stdout
        first = self.start(lambda: print("first", input()))
        second = self.start(lambda: print("second", input()))
        self.assertEqual(self.talk(first, b"a\n"), b"first a\n")
        self.assertEqual(self.talk(second, b"b\n"), b"second b\n")
        self.stop(first)
        self.assertEqual(self.talk(second, b"c\n"), b"second c\n")
        self.stop(second)
        self.assertIs(sys.stdout, original_stdout)

    def test_line_ends(self):
        def thunk():
            print([input() for _ in range(4)])

        self.assertEqual(self.talk(self.start(thunk), b"a\nb\r\nc\rd\n"),
                         b"['a', 'b', 'c', 'd']\n")

    def test_a_bare_cr_ends_a_line_at_once(self):
        def thunk():
            for _ in range(4):
                print(repr(input()))

        server = self.start(thunk)
        with self.connect(server) as sock:
            sock.settimeout(1.0)  # the line must come without another byte
            for sent, expected in ((b"a\r", b"'a'\n"), (b"\nb\r\n", b"'b'\n"),
                                   (b"\r\n", b"''\n"), (b"c\n", b"'c'\n")):
                sock.sendall(sent)
                self.assertEqual(read_exactly(sock, len(expected)), expected, sent)

    def test_line_ends_of_an_encoding_without_single_byte_cr(self):
        class UTF16Handler(tcpserver.ThunkHandler):
            encoding = "utf-16-le"

        def thunk():
            print([input() for _ in range(4)])

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), UTF16Handler,
                                                         thunk=thunk))
        reply = self.talk(server, "a\nb\r\nc\r\u20acd\n".encode("utf-16-le"))
        self.assertEqual(reply.decode("utf-16-le"), "['a', 'b', 'c', '\u20acd']\n")

    def test_a_line_then_a_counted_body(self):
        def thunk():
            while True:
                try:
                    count = int(input())
                except EOFError:
                    break
                how = input()
                if how == "read":
                    body = sys.stdin.buffer.read(count)
                elif how == "read1":
                    body = b""
                    while len(body) < count:
                        body += sys.stdin.buffer.read1(count - len(body))
                else:
                    body = sys.stdin.buffer.readline()
                print(count, how, body)

        # The client's bytes come in reads of rbufsize bytes at most: every
        # way a read can end, the CRLF split in two included.
        for rbufsize in (1, 2, 3, 5, tcpserver.ThunkHandler.rbufsize):
            handler = type("Handler", (tcpserver.ThunkHandler,), {"rbufsize": rbufsize})
            server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), handler,
                                                             thunk=thunk))
            for how in ("read", "read1", "readline"):
                with self.subTest(rbufsize=rbufsize, how=how):
                    body = b"0123456789" + (b"\n" if how == "readline" else b"")
                    request = b"10\r\n%s\n%s" % (how.encode(), body)
                    self.assertEqual(self.talk(server, request * 3),
                                     b"10 %s %r\n" % (how.encode(), body) * 3)
            self.stop(server)

    def test_binary_lines_then_text_lines(self):
        def thunk():
            print(sys.stdin.buffer.readline(), sys.stdin.buffer.read(3), input(),
                  sys.stdin.buffer.read(2), sys.stdin.readline(), sys.stdin.read())

        reply = self.talk(self.start(thunk), b"one\r\nabctwo\r\nxythree\nfour\rfive")
        self.assertEqual(reply, b"b'one\\r\\n' b'abc' two b'xy' three\n four\nfive\n")

    def test_the_binary_stream_keeps_every_cr(self):
        def thunk():
            assert sys.stdin.buffer is tcpserver.current_connection().rfile
            sys.stdout.buffer.write(sys.stdin.buffer.read())

        reply = self.talk(self.start(thunk), b"a\r\nb\r\r\nc\r")
        self.assertEqual(reply, b"a\r\nb\r\r\nc\r")

    def test_surrogateescape_round_trip(self):
        class BytesHandler(tcpserver.ThunkHandler):
            decode_errors = encode_errors = "surrogateescape"

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), BytesHandler,
                                                         thunk=lambda: print(input())))
        self.assertEqual(self.talk(server, b"a\xffb\n"), b"a\xffb\n")

    def test_main_thread_without_stdout(self):
        self.addCleanup(setattr, sys, "stdout", sys.stdout)
        sys.stdout = None  # a daemon whose stdout was closed
        server = self.start(lambda: print("to the client"))
        self.assertEqual(self.talk(server), b"to the client\n")
        print("dropped, as print() drops it without a stdout")
        self.stop(server)
        self.assertIsNone(sys.stdout)

    def test_streams_are_made_on_first_use(self):
        # An idle connection waiting for its client's first line holds no
        # output buffer; sys.stdout.flush(), which input() calls, makes none.
        seen = []

        def thunk():
            handler = tcpserver.current_connection()
            seen.append(handler._made_output())
            sys.stdout.flush()
            line = input()
            seen.append(handler._made_output())
            print(line.upper())
            seen.append(handler._made_output() is handler.stdout)

        server = self.start(thunk)
        self.assertEqual(self.talk(server, b"first\n"), b"FIRST\n")
        self.stop(server)
        self.assertEqual(seen, [None, None, True])

    def test_binary_output_alone_is_flushed_before_a_read_waits(self):
        def thunk():
            handler = tcpserver.current_connection()
            handler.wfile.write(b"name? ")  # buffered: leaves when the read waits
            line = handler.rfile.readline()
            handler.wfile.write(b"hello " + line)  # leaves at the return

        server = self.start(thunk)
        with self.connect(server) as sock:
            self.assertEqual(read_exactly(sock, 6), b"name? ")
            sock.sendall(b"you\n")
            self.assertEqual(read_all(sock), b"hello you\n")

    def test_thunk_may_close_its_stdout(self):
        stderr = self.capture("stderr")

        def thunk():
            print("bye")
            sys.stdout.close()

        server = self.start(thunk)
        with self.connect(server) as sock:
            self.assertEqual(read_all(sock), b"bye\n")
        self.stop(server)
        self.assertEqual(stderr.getvalue(), "")

    def test_legacy_handlers_leave_the_streams_alone(self):
        original_stdout = sys.stdout
        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler))
        self.assertEqual(self.talk(server, b"x\n"), b"2:x\n")
        self.assertIs(sys.stdout, original_stdout)

    def test_eof_on_input_ends_the_request_normally(self):
        stderr = self.capture("stderr")

        server = self.start(echo_lines, debug=True)
        self.assertEqual(self.talk(server, b"a\nb\n"), b"echo a\necho b\n")
        self.stop(server)
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertIn("tcpserver-1 finished (ok)", stderr.getvalue())

    def test_eof_error_after_the_end_of_input_is_still_an_error(self):
        stderr = self.capture("stderr")

        def thunk():
            sys.stdin.read()
            raise EOFError("backend record truncated")

        self.assert_reset(self.start(thunk), end_input=True)
        self.assertIn("EOFError: backend record truncated", stderr.getvalue())

    def test_other_eof_errors_are_errors(self):
        stderr = self.capture("stderr")

        def thunk():
            raise EOFError("not the client's end of input")

        server = self.start(thunk)
        self.assert_reset(server)
        self.stop(server)
        self.assertIn("EOFError: not the client's end of input", stderr.getvalue())


# ---------------------------------------------------------------------------
# The limit
# ---------------------------------------------------------------------------

class TestLimit(ServerTestCase):

    def test_burst_never_exceeds_the_limit_and_is_served_in_order(self):
        limit, clients = 3, 30
        changed = threading.Condition()
        state = {"active": 0, "peak": 0}
        release = threading.Event()

        def thunk():
            with changed:
                state["active"] += 1
                state["peak"] = max(state["peak"], state["active"])
                changed.notify_all()
            release.wait(TIMEOUT)
            with changed:
                state["active"] -= 1
            print(threading.current_thread().name)

        server = self.start(thunk, max_requests=limit)
        socks = [self.connect(server) for _ in range(clients)]
        with changed:
            self.assertTrue(changed.wait_for(lambda: state["active"] == limit, TIMEOUT))
        release.set()
        names = [read_all(sock).decode().strip() for sock in socks]
        self.assertEqual(names, ["tcpserver-%d" % n for n in range(1, clients + 1)])
        self.assertEqual(state["peak"], limit)

    def test_every_slot_comes_back_however_the_thunk_ends(self):
        barrier = threading.Barrier(2, timeout=TIMEOUT)

        def thunk():
            how = input()
            if how == "raise":
                raise RuntimeError("thunk failed on purpose")
            if how == "gone":
                while True:
                    print("x" * 1000)
            if how == "hold":
                barrier.wait()  # needs two slots at once
            if how == "exit":
                sys.exit("the thunk ends its thread")
            print(how)

        self.capture("stderr")
        server = self.start(thunk, max_requests=2)
        for _ in range(3):
            self.assertEqual(self.talk(server, b"ok\n"), b"ok\n")
            self.assert_reset(server, b"raise\n")
            with self.connect(server) as sock:
                sock.sendall(b"gone\n")
                sock.recv(1)
                reset(sock)
            self.assertEqual(self.talk(server, b""), b"")  # EOF before any input
            with self.connect(server):
                pass  # a client that vanishes before the thunk reads
            self.assert_reset(server, b"exit\n")
        first, second = self.connect(server), self.connect(server)
        for sock in (first, second):
            sock.sendall(b"hold\n")
        self.assertEqual(read_all(first), b"hold\n")
        self.assertEqual(read_all(second), b"hold\n")
        self.stop(server)
        stats = server.stats()
        self.assertEqual((stats["accepted"], stats["refused"], stats["active"]), (20, 0, 0))
        self.assertLessEqual(stats["peak_active"], 2)

    def busy_server(self):
        """A server whose one slot a thunk holds; returns (server, release)."""
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def thunk():
            started.set()
            release.wait(TIMEOUT)

        server = self.start(thunk, max_requests=1)
        self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        return server, release

    def test_a_second_serve_forever_at_once_is_refused(self):
        running, release = threading.Semaphore(0), threading.Event()
        peak, lock = [0, 0], threading.Lock()

        def thunk():
            with lock:
                peak[0] += 1
                peak[1] = max(peak)
            running.release()
            release.wait(TIMEOUT)
            with lock:
                peak[0] -= 1

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, 2))
        deadline = time.monotonic() + TIMEOUT
        while not server.serving and time.monotonic() < deadline:
            time.sleep(0.001)  # serve_forever() has begun in its thread
        ready = []
        for call in (server, server.serve_forever,
                     functools.partial(server.serve_until_signalled,
                                       ready=lambda: ready.append(True))):
            with self.assertRaisesRegex(RuntimeError, "serve_forever\\(\\) is running already"):
                call(poll_interval=0.01)
        self.assertEqual(ready, [])  # not told it is up
        clients = [self.connect(server) for _ in range(4)]
        for _ in range(2):
            self.assertTrue(running.acquire(timeout=TIMEOUT))
        self.assertFalse(running.acquire(timeout=0.05))  # the limit holds: two at once
        release.set()
        for _ in range(2):
            self.assertTrue(running.acquire(timeout=TIMEOUT))
        for sock in clients:
            self.assertEqual(read_all(sock), b"")
        self.assertEqual(peak[1], 2)
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 4)

    def test_shutdown_is_prompt_while_all_slots_are_busy(self):
        server, release = self.busy_server()
        waiting = [self.connect(server) for _ in range(5)]
        began = time.monotonic()
        server.shutdown()
        self.assertLess(time.monotonic() - began, 2.0)
        release.set()
        self.stop(server)
        for sock in waiting:  # never accepted: closed with the listener
            with self.assertRaises(ConnectionResetError):
                read_all(sock)

    def test_a_thunk_that_raises_systemexit_closes_its_request_once(self):
        # A second close_request() would give back a slot twice: the one the
        # next client waits for, so the limit would no longer hold.
        def thunk():
            if input() == "exit":
                sys.exit("the thunk ends its thread")
            print("served")

        server = self.start(thunk, max_requests=1)
        closed = []
        close_request = server.close_request
        server.close_request = lambda request: (closed.append(request.fileno()),
                                                close_request(request))
        for _ in range(3):
            self.assert_reset(server, b"exit\n")
            self.assertEqual(self.talk(server, b"again\n"), b"served\n")
        self.stop(server)
        self.assertEqual(len(closed), 6, "close_request() calls")
        stats = server.stats()
        self.assertEqual((stats["accepted"], stats["refused"], stats["failed"],
                          stats["completed"], stats["peak_active"]), (6, 0, 3, 3, 1))

    def test_handle_request_waits_for_a_slot_no_longer_than_timeout(self):
        server, release = self.busy_server()
        server.shutdown()
        server.timeout = 0.05
        self.connect(server)  # in the listen queue: handle_request() may see it
        began = time.monotonic()
        server.handle_request()  # the one slot stays busy
        self.assertLess(time.monotonic() - began, 2.0)
        release.set()

    def test_no_limit_by_default_on_the_class(self):
        count = 20
        barrier = threading.Barrier(count, timeout=TIMEOUT)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                barrier.wait()  # all 20 at once
                self.wfile.write(b"done\n")

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))
        self.assertIsNone(server.max_requests)
        socks = [self.connect(server) for _ in range(count)]
        self.assertEqual([read_all(sock) for sock in socks], [b"done\n"] * count)

    def test_make_tcp_server_default_limit_is_the_eggs(self):
        with tcpserver.make_tcp_server(("127.0.0.1", 0), print) as server:
            self.assertEqual(server.max_requests, 10000)
            self.assertEqual(tcpserver.DEFAULT_MAX_REQUESTS, 10000)

    def test_class_attribute_limit(self):
        class Limited(tcpserver.ThreadingTCPServer):
            max_requests = 7

        with Limited(("127.0.0.1", 0), socketserver.StreamRequestHandler) as server:
            self.assertEqual(server.max_requests, 7)
        with Limited(("127.0.0.1", 0), socketserver.StreamRequestHandler,
                     max_requests=2) as server:
            self.assertEqual(server.max_requests, 2)

    def test_bad_arguments(self):
        thunk = lambda: None  # noqa: E731
        cases = [
            ((("127.0.0.1", 0), thunk, 0), ValueError,
             "max_requests must be a positive int or None, not 0"),
            ((("127.0.0.1", 0), thunk, -5), ValueError, "not -5"),
            ((("127.0.0.1", 0), thunk, "3"), TypeError,
             "max_requests must be a positive int or None, not str"),
            ((("127.0.0.1", 0), thunk, 2.5), TypeError, "not float"),
            ((("127.0.0.1", 0), thunk, True), TypeError, "not bool"),
            ((("127.0.0.1", 0), "thunk"), TypeError, "thunk must be callable, not str"),
            (("6504", thunk), TypeError,
             "listener must be a listening socket, a port number, a (host, port) tuple or "
             "the path of a Unix-domain socket (with a '/' in it: './app.sock'), not '6504'"),
            ((6504.0, thunk), TypeError, "not 6504.0"),
            ((("127.0.0.1",), thunk), TypeError, "not ('127.0.0.1',)"),
        ]
        for args, error, text in cases:
            with self.subTest(args=args):
                with self.assertRaises(error) as caught:
                    tcpserver.make_tcp_server(*args)
                self.assertIn(text, str(caught.exception))

    def test_bad_listener_sockets(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            with self.assertRaisesRegex(ValueError, "listener must be a stream socket"):
                tcpserver.make_tcp_server(udp, print)
        with socket.socket() as unbound:
            with self.assertRaisesRegex(ValueError, "listener must be listening"):
                tcpserver.make_tcp_server(unbound, print)

    def test_settings_changed_on_the_instance_take_effect_when_serving_starts(self):
        server = tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: print(tcpserver.current_connection().client_address[0]))
        server.proxy_protocol = True
        server.trusted_proxies = ["127.0.0.0/8"]
        server.max_per_client = 1
        self.serve(server)
        reply = self.talk(server, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 6504\r\n")
        self.assertEqual(reply, b"203.0.113.7\n")

    def test_a_bad_setting_fails_before_any_connection(self):
        cases = [("max_requests", -5, ValueError, "max_requests must be a positive int or None"),
                 ("max_spare_threads", -1, ValueError, "max_spare_threads must be an int >= 0"),
                 ("spare_thread_lifetime", 0, ValueError, "spare_thread_lifetime must be a number"),
                 ("reset_grace", None, TypeError, "reset_grace must be a number of seconds > 0"),
                 ("proxy_protocol", "yes", TypeError, "proxy_protocol must be True or False"),
                 ("trusted_proxies", ["10.0.0.0/33"], ValueError, "trusted_proxies: "),
                 ("thunk", None, TypeError, "thunk must be callable when RequestHandlerClass")]
        for name, value, error, text in cases:
            with self.subTest(name=name), \
                    tcpserver.make_tcp_server(("127.0.0.1", 0), print) as server:
                setattr(server, name, value)
                watchdog = threading.Timer(TIMEOUT, server.shutdown)  # if it served
                watchdog.start()
                try:
                    with self.assertRaises(error) as caught:
                        server(poll_interval=0.01)
                finally:
                    watchdog.cancel()
                    watchdog.join()
                self.assertIn(text, str(caught.exception))
                self.assertFalse(server.serving)
                with self.assertRaises(error):  # as a keyword too
                    tcpserver.make_tcp_server(("127.0.0.1", 0), print, **{name: value})

    def test_every_setting_is_a_keyword(self):
        settings = {"max_per_client": 3, "timeout": 4.5, "drain_timeout": 0, "reset_grace": 0.5,
                    "max_line": 80, "handshake_timeout": 2, "max_spare_threads": 0,
                    "spare_thread_lifetime": 5, "proxy_protocol": True,
                    "trusted_proxies": ["10.0.0.0/8"], "debug": "name"}
        with tcpserver.make_tcp_server(("127.0.0.1", 0), print, 7, **settings) as server:
            settings["idle_timeout"] = settings.pop("timeout")
            self.assertEqual({name: getattr(server, name) for name in settings}, settings)
            self.assertEqual(server.max_requests, 7)

    def test_server_class_arguments(self):
        with self.assertRaisesRegex(TypeError, "thunk must be callable when RequestHandlerClass "
                                               "is a ThunkHandler, not None"):
            tcpserver.ThreadingTCPServer(("127.0.0.1", 0), tcpserver.ThunkHandler)
        with self.assertRaisesRegex(TypeError, "thunk must be callable, not int"):
            tcpserver.ThreadingTCPServer(("127.0.0.1", 0), tcpserver.ThunkHandler, thunk=3)
        with self.assertRaisesRegex(ValueError,
                                    "max_requests must be a positive int or None, not 0"):
            tcpserver.ThreadingTCPServer(("127.0.0.1", 0), tcpserver.ThunkHandler,
                                         thunk=print, max_requests=0)

    def test_listener_kinds(self):
        def thunk():
            print("ok")

        listener = socket.create_server(("127.0.0.1", 0))
        with tcpserver.tcp_listen(0, host="127.0.0.1") as original:
            # as a socket inherited from a parent process arrives
            inherited = socket.socket(fileno=os.dup(original.fileno()))
        for source in (listener, inherited, ("127.0.0.1", 0), 0):
            with self.subTest(listener=source):
                server = self.start_from(source, thunk)
                self.assertEqual(self.talk(server), b"ok\n")
                self.stop(server)
        self.assertEqual(listener.fileno(), -1)  # the server owned and closed it
        self.assertEqual(inherited.fileno(), -1)

    def start_from(self, listener, thunk):
        return self.serve(tcpserver.make_tcp_server(listener, thunk))


# ---------------------------------------------------------------------------
# Errors and diagnostics
# ---------------------------------------------------------------------------

class TestErrors(ServerTestCase):

    def test_return_closes_cleanly(self):
        server = self.start(lambda: print("bye"))
        with self.connect(server) as sock:
            self.assertEqual(read_all(sock), b"bye\n")  # FIN, no reset
            self.assertEqual(sock.recv(10), b"")

    def test_raise_resets_logs_the_traceback_and_serving_goes_on(self):
        stderr = self.capture("stderr")

        def thunk():
            if input() == "boom":
                raise ValueError("thunk failed on purpose")
            print("fine")

        server = self.start(thunk)
        self.assert_reset(server, b"boom\n")
        self.assertEqual(self.talk(server, b"next\n"), b"fine\n")
        self.stop(server)
        self.assertIn("Traceback", stderr.getvalue())
        self.assertIn("ValueError: thunk failed on purpose", stderr.getvalue())

    def test_client_gone_is_not_an_error(self):
        stderr = self.capture("stderr")
        errors = []

        def thunk():
            while True:
                print("x" * 1000)

        server = self.start(thunk, debug=True)
        server.handle_error = lambda request, address: errors.append(address)
        for _ in range(3):
            with self.connect(server) as sock:
                sock.recv(1)
                reset(sock)
        server.thunk = lambda: print("still serving")
        self.assertEqual(self.talk(server), b"still serving\n")
        self.stop(server)
        self.assertEqual(errors, [])
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(stderr.getvalue().count("(client gone, "), 3)

    def test_reset_of_another_socket_is_an_error(self):
        stderr = self.capture("stderr")

        def thunk():
            raise ConnectionResetError("a backend reset, not the client")

        server = self.start(thunk, debug=True)
        self.assert_reset(server)
        self.stop(server)
        self.assertIn("Traceback", stderr.getvalue())
        self.assertIn("finished (error, ConnectionResetError", stderr.getvalue())

    def test_system_exit_in_a_thunk_resets(self):
        stderr = self.capture("stderr")

        def thunk():
            print("partial")
            sys.exit(3)

        server = self.start(thunk, debug=True)
        self.assert_reset(server)
        self.assert_reset(server)  # again: the server goes on serving
        self.stop(server)
        self.assertIn("finished (error, SystemExit: 3)", stderr.getvalue())

    def test_an_exception_whose_str_raises_is_still_an_error(self):
        stderr = self.capture("stderr")

        class Unprintable(Exception):
            def __str__(self):
                raise ValueError("no text for this one")

        def thunk():
            if input() == "boom":
                raise Unprintable()
            print("fine")

        server = self.start(thunk, debug=True)
        self.assert_reset(server, b"boom\n")
        self.assertEqual(self.talk(server, b"next\n"), b"fine\n")
        self.stop(server)
        log = stderr.getvalue()
        self.assertIn("tcpserver-1 finished (error, Unprintable: <exception str() failed>)", log)
        self.assertIn("Traceback", log)  # handle_error() ran
        self.assertEqual(server.stats()["failed"], 1)

    def test_debug_lines(self):
        for debug, prefix in [(True, "tcp-server"), ("myname", "myname")]:
            with self.subTest(debug=debug):
                stderr = self.capture("stderr")
                server = self.start(lambda: print("hi"), debug=debug)
                self.assertEqual(self.talk(server), b"hi\n")
                self.stop(server)
                lines = stderr.getvalue().splitlines()
                self.assertEqual(lines[0], "[%s] waiting for requests..." % prefix)
                self.assertEqual(lines[1], "[%s] request 1 from 127.0.0.1; tcpserver-1 (of 1) "
                                           "started..." % prefix)
                self.assertRegex(lines[2],
                                 r"^\[%s\] tcpserver-1 finished \(ok\) in \d+\.\d{3}s"
                                 r"(, 0 bytes in, 3 out)?\.$" % prefix)
                self.assertEqual(len(lines), 3)

    @unittest.skipUnless(sys.platform.startswith("linux"),
                         "the kernel's byte counts (TCP_INFO) are Linux's")
    def test_the_finished_line_counts_bytes_in_and_out(self):
        stderr = self.capture("stderr")
        server = self.start(lambda: print(input() * 3), debug=True)
        self.assertEqual(self.talk(server, b"abcd\n"), b"abcdabcdabcd\n")
        legacy = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler),
                            debug=True)
        self.assertEqual(self.talk(legacy, b"abcd\n" * 1000), b"5:abcd\n" * 1000)
        self.stop(server)
        self.stop(legacy)
        log = stderr.getvalue()
        self.assertRegex(log, r"tcpserver-1 finished \(ok\) in [0-9.]+s, 5 bytes in, 13 out\.")
        self.assertRegex(log, r"tcpserver-1 finished \(ok\) in [0-9.]+s, 5000 bytes in, "
                              r"7000 out\.")

    def test_debug_warning_is_not_printed_twice(self):
        stderr = self.capture("stderr")
        with tcpserver.make_tcp_server(("127.0.0.1", 0), print) as server:
            server.debug = True
            server.log("accept failed: [Errno 24] Too many open files", logging.WARNING)
        self.assertEqual(stderr.getvalue(),
                         "[tcp-server] accept failed: [Errno 24] Too many open files\n")

    def test_debug_line_for_an_error(self):
        stderr = self.capture("stderr")

        def thunk():
            raise KeyError("nope")

        server = self.start(thunk, debug="dbg")
        self.assert_reset(server)
        self.stop(server)
        self.assertIn("[dbg] closing connection to 127.0.0.1 with a reset...", stderr.getvalue())
        self.assertIn("[dbg] tcpserver-1 finished (error, KeyError: 'nope') in", stderr.getvalue())

    def test_full_limit_is_logged_on_entry_and_exit(self):
        stderr = self.capture("stderr")
        release = threading.Event()
        started = threading.Event()

        def thunk():
            started.set()
            release.wait(TIMEOUT)

        busy = threading.Event()
        self.log_to(lambda record: "slots busy" in record.getMessage() and busy.set())
        server = self.start(thunk, max_requests=1, debug=True)
        first = self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        second = self.connect(server)
        self.assertTrue(busy.wait(TIMEOUT))
        release.set()
        self.assertEqual(read_all(first) + read_all(second), b"")
        self.stop(server)
        self.assertEqual(stderr.getvalue().count("all 1 request slots busy; new clients wait"), 1)
        self.assertIn("a request slot is free; accepting again", stderr.getvalue())

    def test_bad_debug_values(self):
        with tcpserver.make_tcp_server(("127.0.0.1", 0), print) as server:
            with self.assertRaisesRegex(TypeError,
                                        "debug must be a bool or a non-empty str, not 1"):
                server(debug=1)
            with self.assertRaisesRegex(ValueError,
                                        "debug must be a bool or a non-empty str, not ''"):
                server(debug="")

    def test_quiet_by_default(self):
        stderr = self.capture("stderr")
        server = self.start(lambda: print("hi"))
        self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        self.assertEqual(stderr.getvalue(), "")

    def test_events_go_to_logging(self):
        records = []
        self.log_to(records.append)
        server = self.start(lambda: print("hi"))
        self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        levels = {record.getMessage(): record.levelname for record in records}
        self.assertEqual(levels.pop("waiting for requests..."), "INFO")
        self.assertEqual(levels.pop("request 1 from 127.0.0.1; tcpserver-1 (of 1) started..."),
                         "DEBUG")
        [(finished, level)] = levels.items()
        self.assertRegex(finished, r"^tcpserver-1 finished \(ok\) in ")
        self.assertEqual(level, "DEBUG")

    def test_server_close_waits_for_running_requests(self):
        started, release = threading.Event(), threading.Event()
        finished = []

        def thunk():
            started.set()
            release.wait(TIMEOUT)
            finished.append(True)

        server = self.start(thunk)
        self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        server.shutdown()
        closer = threading.Thread(target=server.server_close)
        closer.start()
        self.assertEqual(finished, [])
        release.set()
        closer.join(TIMEOUT)
        self.assertFalse(closer.is_alive())
        self.assertEqual(finished, [True])


# ---------------------------------------------------------------------------
# Hardening: TLS through ssl_context, timeouts, drain, limits per client
# ---------------------------------------------------------------------------

@unittest.skipUnless(shutil.which("openssl"), "openssl is not installed (apt-get install openssl)")
class TestTLS(ServerTestCase):

    @classmethod
    def setUpClass(cls):
        made = certificates()
        cls.cert, cls.key = made.cert, made.key
        cls.client_cert, cls.client_key = made.client_cert, made.client_key

    def server_context(self, client_certificates=False):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if client_certificates:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_cert)
        return context

    def start_tls(self, thunk, context=None, debug=False, **settings):
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                           ssl_context=context or self.server_context(),
                                           **settings)
        return self.serve(server, debug)

    def tls_connect(self, server, certificate=False, context=None):
        if context is None:
            context = ssl.create_default_context(cafile=self.cert)
        if certificate:
            context.load_cert_chain(self.client_cert, self.client_key)
        sock = socket.create_connection(server.server_address, timeout=TIMEOUT)
        try:
            return context.wrap_socket(sock, server_hostname="localhost",
                                       suppress_ragged_eofs=False)
        except BaseException:
            sock.close()
            raise

    def test_ssl_context_serves_tls_around_the_hooks(self):
        calls = []

        class Recording(tcpserver.ThreadingTCPServer):
            def accept_connection(self, listener):
                calls.append("accept")
                return tcpserver.tcp_accept(listener)

            def get_addresses(self, conn):
                calls.append("addresses after the handshake: %s" % conn.version())
                return tcpserver.tcp_addresses(conn)

        def thunk():
            print("hello", input(), tcpserver.current_connection().connection.version())

        server = Recording(("127.0.0.1", 0), tcpserver.ThunkHandler, thunk=thunk)
        server.ssl_context = self.server_context()  # on the instance, after construction
        self.serve(server)
        with self.tls_connect(server) as sock:
            sock.sendall(b"tls\n")
            self.assertRegex(read_all(sock), rb"^hello tls TLSv1\.[23]\n$")
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 1)
        self.assertEqual(calls[0], "accept")
        self.assertRegex(calls[1], r"^addresses after the handshake: TLSv1\.[23]$")

    def test_xmlrpc_over_tls_with_a_class_attribute(self):
        class SecureXMLRPCServer(xmlrpc.server.SimpleXMLRPCServer, tcpserver.ThreadingTCPServer):
            ssl_context = self.server_context()  # SimpleXMLRPCServer skips our __init__

        server = self.serve(SecureXMLRPCServer(("127.0.0.1", 0), logRequests=False))
        server.register_function(pow)
        url = "https://localhost:%d/" % server.server_address[1]
        context = ssl.create_default_context(cafile=self.cert)
        with xmlrpc.client.ServerProxy(url, context=context) as proxy:
            self.assertEqual(proxy.pow(2, 16), 65536)

    def test_openssl_s_client(self):
        server = self.start_tls(lambda: print("hello", input()))
        result = subprocess.run(
            ["openssl", "s_client", "-connect", "127.0.0.1:%d" % server.server_address[1],
             "-quiet", "-verify_return_error", "-CAfile", self.cert, "-servername", "localhost"],
            input=b"s_client\n", capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout, b"hello s_client\n", result.stderr)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_20_silent_clients_do_not_delay_a_good_one(self):
        server = self.start_tls(lambda: print("served"), max_requests=32)
        silent = [self.connect(server) for _ in range(20)]
        began = time.monotonic()
        with self.tls_connect(server) as sock:
            self.assertEqual(read_all(sock), b"served\n")
        self.assertLess(time.monotonic() - began, 2.0)  # a handshake timeout is 10 s
        for sock in silent:
            sock.close()

    def test_a_silent_client_costs_at_most_the_handshake_timeout(self):
        stderr = self.capture("stderr")
        server = self.start_tls(print, debug=True)
        server.handshake_timeout = 0.1
        began = time.monotonic()
        with self.connect(server) as sock:
            self.assertEqual(read_all(sock), b"")  # closed by the server
        self.assertLess(time.monotonic() - began, 3.0)
        self.stop(server)
        self.assertEqual(server.stats()["failed"], 1)
        self.assertIn("finished (setup failed, ", stderr.getvalue())
        self.assertIn("timed out", stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())

    def test_client_certificates_accepted_and_refused(self):
        stderr = self.capture("stderr")
        context = self.server_context(client_certificates=True)
        server = self.start_tls(lambda: print("hello", tcpserver.current_connection()
                                              .connection.getpeercert()["subject"]),
                                context=context, debug=True)
        with self.tls_connect(server, certificate=True) as sock:
            self.assertEqual(read_all(sock), b"hello ((('commonName', 'client'),),)\n")
        with self.assertRaises(OSError):  # refused: an alert, or a reset
            with self.tls_connect(server) as sock:
                read_all(sock)
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 1)
        self.assertEqual(server.stats()["failed"], 1)
        self.assertIn("finished (setup failed, SSLError", stderr.getvalue())

    def test_a_steady_reader_is_not_cut_by_the_idle_timeout(self):
        class SmallBuffers(tcpserver.ThunkHandler):
            def setup(self):  # so the reply cannot hide in the kernel's buffers
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                super().setup()

        size = 10 ** 6
        server = self.serve(tcpserver.ThreadingTCPServer(
            ("127.0.0.1", 0), SmallBuffers, thunk=lambda: sys.stdout.buffer.write(b"x" * size),
            ssl_context=self.server_context(), timeout=0.2))
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.settimeout(TIMEOUT)
        raw.connect(server.server_address)
        with ssl.create_default_context(cafile=self.cert).wrap_socket(
                raw, server_hostname="localhost") as sock:
            received = 0
            while True:  # 64 KiB every 20 ms: about 0.3 s for all, no pause near 0.2 s
                step = 0
                while step < 65536:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    step += len(chunk)
                received += step
                if step < 65536:
                    break
                time.sleep(0.02)
        self.assertEqual(received, size)
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 1)

    def test_a_record_sent_in_pieces_is_not_cut_by_the_idle_timeout(self):
        server = self.start_tls(lambda: print(len(input())), timeout=0.2)
        with self.connect(server) as sock:
            tls = tls_over(sock, self.cert)
            tls.write(b"y" * 3000 + b"\n")  # one record
            record = tls.records()
            for start in range(0, len(record), 400):  # 8 pieces, 0.05 s apart: 0.4 s
                sock.sendall(record[start:start + 400])
                time.sleep(0.05)
            reply = b""
            while not reply.endswith(b"\n"):
                try:
                    reply += tls.read(100)
                except ssl.SSLWantReadError:
                    tls.pull()
            self.assertEqual(reply, b"3000\n")

    def test_a_silent_tls_client_still_times_out(self):
        server = self.start_tls(lambda: print(input()), timeout=0.1)
        with self.tls_connect(server) as sock:
            began = time.monotonic()
            with self.assertRaises(OSError):  # a reset, or the ssl module's view of it
                read_all(sock)
            self.assertLess(time.monotonic() - began, 3.0)
        self.stop(server)
        self.assertEqual(server.stats()["failed"], 1)

    def test_tls_details_for_a_thunk(self):
        def thunk():
            tls = tcpserver.current_connection().tls
            print(tls["version"], tls["server_name"], bool(tls["cipher"]), tls["bits"] > 0,
                  dict(field[0] for field in tls["peer_certificate"]["subject"]),
                  hashlib.sha256(tls["peer_certificate_der"]).hexdigest(),
                  tls == tcpserver.tls_details(tcpserver.current_connection().connection))

        server = self.start_tls(thunk, self.server_context(client_certificates=True))
        with self.tls_connect(server, certificate=True) as sock:
            reply = read_all(sock).decode()
            expected = hashlib.sha256(sock.getpeercert(True)).hexdigest()  # the server's
        with open(self.client_cert) as pem:
            client = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read())).hexdigest()
        self.assertNotEqual(client, expected)
        self.assertRegex(reply, r"^TLSv1\.[23] localhost True True {'commonName': 'client'} "
                                + client + r" True\n$")
        plain = self.start(lambda: print(tcpserver.current_connection().tls))
        self.assertEqual(self.talk(plain), b"None\n")

    def test_a_tls_client_that_stops_reading_is_cut_off(self):
        ended = threading.Event()
        self.log_to(lambda record: "finished (timed out" in record.getMessage() and ended.set())

        def thunk():
            while True:
                sys.stdout.buffer.write(b"x" * 65536)

        server = self.start_tls(thunk, timeout=0.1)
        with self.tls_connect(server):
            self.assertTrue(ended.wait(TIMEOUT))  # we never read a byte

    def test_a_line_timeout_bounds_a_dripping_tls_client(self):
        def thunk():
            try:
                input()
            except tcpserver.IdleTimeout as exc:
                print(exc)

        # A byte every 20 ms, with an idle timeout; one byte, then silence,
        # without one (the connection is blocking then, but for the streams).
        for settings, drip in (({"timeout": 1}, True), ({}, False)):
            with self.subTest(**settings):
                server = self.start_tls(thunk, line_timeout=0.2, **settings)
                with self.connect(server) as sock:
                    tls = tls_over(sock, self.cert)
                    sock.settimeout(0.02)
                    deadline = time.monotonic() + TIMEOUT
                    reply, sent = b"", 0
                    while not reply.endswith(b"\n") and time.monotonic() < deadline:
                        try:
                            tls.pull()
                            reply += tls.read(1000)
                        except ssl.SSLWantReadError:
                            pass  # a record that is not data (a session ticket)
                        except socket.timeout:
                            if drip or not sent:
                                tls.write(b"x")  # a record of one byte
                                tls.push()
                                sent += 1
                self.assertEqual(reply,
                                 b"the client took more than 0.2 seconds to send a line\n")
                self.stop(server)

    def test_a_corrupt_record_costs_one_line_and_a_reset(self):
        for handler in (tcpserver.ThunkHandler, EchoHandler):  # our streams, socketserver's
            with self.subTest(handler=handler.__name__):
                stderr = self.capture("stderr")
                server = self.serve(tcpserver.ThreadingTCPServer(
                    ("127.0.0.1", 0), handler, thunk=lambda: print(input()),
                    ssl_context=self.server_context()), debug=True)
                with self.connect(server) as sock:
                    tls_over(sock, self.cert)
                    # An application data record whose contents decrypt to nothing.
                    sock.sendall(b"\x17\x03\x03\x00\x40" + bytes(range(64)))
                    with self.assertRaises(ConnectionResetError):
                        read_all(sock)
                self.stop(server)
                log = stderr.getvalue()
                self.assertRegex(log, r"tcpserver-1 finished \(TLS error, SSLError: .*\)")
                self.assertNotIn("Traceback", log)
                self.assertEqual(server.stats()["failed"], 1)

    def test_a_client_that_resets_while_queued_is_counted_without_a_warning(self):
        records = []
        self.log_to(records.append)
        server = self.start_tls(print, max_requests=1, handshake_timeout=TIMEOUT)
        holder = self.connect(server)  # silent: holds the one slot in its handshake
        deadline = time.monotonic() + TIMEOUT
        while server.stats()["accepted"] < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        leaver = socket.create_connection(server.server_address, timeout=TIMEOUT)
        reset(leaver)  # queued, then gone: a port scan, a health check
        holder.close()  # the slot comes free: the server accepts the one that left
        while server.stats()["accepted"] < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        with self.tls_connect(server) as sock:
            self.assertEqual(read_all(sock), b"\n")  # and serves on
        stats = server.stats()
        self.stop(server)
        self.assertEqual((stats["accepted"], stats["failed"]), (3, 2), stats)
        self.assertEqual([r.getMessage() for r in records if r.levelno >= logging.WARNING], [])
        self.assertTrue(any("left before its TLS handshake" in r.getMessage() for r in records))

    def test_a_renegotiation_attempt_costs_one_line_and_a_reset(self):
        stderr = self.capture("stderr")

        server = self.start_tls(echo_lines, debug=True)
        client = subprocess.Popen(
            ["openssl", "s_client", "-tls1_2", "-connect",
             "127.0.0.1:%d" % server.server_address[1]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(client.stdout.close)
        self.addCleanup(client.stdin.close)
        killer = threading.Timer(TIMEOUT, client.kill)  # bounds the reads below
        killer.start()
        try:
            client.stdin.write(b"hello\n")
            client.stdin.flush()
            for line in client.stdout:  # the handshake's report, then the echo
                if line == b"echo hello\n":
                    break
            client.stdin.write(b"R\n")  # s_client's command: renegotiate
            client.stdin.flush()
            self.assertIn(b"RENEGOTIATING", client.stdout.read())
            client.wait(TIMEOUT)
        finally:
            killer.cancel()
            killer.join()
        self.stop(server)
        log = stderr.getvalue()
        self.assertRegex(log, r"tcpserver-1 finished \(TLS error, SSLError: .*\)")
        self.assertNotIn("Traceback", log)

    def test_the_thunks_own_tls_errors_keep_their_traceback(self):
        stderr = self.capture("stderr")

        def thunk():
            raise ssl.SSLError(1, "a backend's TLS failed")

        server = self.start_tls(thunk, debug=True)
        with self.tls_connect(server) as sock:
            with self.assertRaises(OSError):
                read_all(sock)
        self.stop(server)
        self.assertIn("finished (error, SSLError: ", stderr.getvalue())
        self.assertIn("Traceback", stderr.getvalue())

    def test_a_refused_protocol_version_costs_one_line(self):
        stderr = self.capture("stderr")
        context = self.server_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        server = self.start_tls(lambda: print("served"), context=context, debug=True)
        old = ssl.create_default_context(cafile=self.cert)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with self.assertRaises(ssl.SSLError):
            self.tls_connect(server, context=old).close()
        with self.tls_connect(server) as sock:
            self.assertEqual(read_all(sock), b"served\n")
        self.stop(server)
        self.assertEqual(stderr.getvalue().count("setup failed, SSLError"), 1)
        self.assertNotIn("Traceback", stderr.getvalue())


# A write in one call, larger than the kernel's buffers hold, to a client
# that reads steadily: 32 KiB every 10 ms, about 3 MB/s.  Were writability
# not reported as the client reads (TCP_NOTSENT_LOWAT), a wait for room in
# the 2 MiB send queue would last more than 0.2 s, beyond the timeout.
STEADY_SIZE = 26 * 10 ** 5
STEADY_TIMEOUT = 0.15


class LargeSendQueue(tcpserver.ThunkHandler):
    def setup(self):  # the same on every machine: 2 MiB, as SO_SNDBUF doubles
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 ** 20)
        super().setup()


def write_in_one_call():
    sys.stdout.buffer.write(b"x" * STEADY_SIZE)


def small_window_connection(server):
    """A client socket connected to server, whose receive buffer holds little:
    what it has not read stays in the server's send queue."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.settimeout(TIMEOUT)
        sock.connect(server.server_address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_steadily(sock, step=32768, pause=0.01):
    """Read sock to its end, step bytes at a time with a pause after each;
    return how many bytes came."""
    received = 0
    while True:
        chunk = sock.recv(step)
        if not chunk:
            return received
        received += len(chunk)
        time.sleep(pause)


class TestTimeouts(ServerTestCase):

    def test_a_large_write_to_a_steady_reader_is_not_cut(self):
        server = self.serve(tcpserver.ThreadingTCPServer(
            ("127.0.0.1", 0), LargeSendQueue, thunk=write_in_one_call,
            timeout=STEADY_TIMEOUT))
        with small_window_connection(server) as sock:
            self.assertEqual(read_steadily(sock), STEADY_SIZE)
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 1)

    def test_a_thunk_may_catch_the_idle_timeout(self):
        def thunk():
            try:
                input()
            except tcpserver.IdleTimeout as exc:
                print("caught", isinstance(exc, socket.timeout), exc)

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, timeout=0.1))
        with self.connect(server) as sock:
            self.assertEqual(read_all(sock),
                             b"caught True the client sent nothing for 0.1 seconds\n")

    def test_uncaught_idle_timeout_resets_and_frees_the_slot(self):
        stderr = self.capture("stderr")
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: print(input()), max_requests=1, timeout=0.1), debug=True)
        with self.connect(server) as sock:
            with self.assertRaises(ConnectionResetError):
                read_all(sock)
        self.assertEqual(self.talk(server, b"next\n"), b"next\n")
        self.stop(server)
        self.assertIn("finished (timed out, IdleTimeout: ", stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(server.stats()["failed"], 1)

    def test_a_client_that_stops_reading_is_cut_off(self):
        ended = threading.Event()
        self.log_to(lambda record: "finished (timed out" in record.getMessage() and ended.set())

        def thunk():
            chunk = b"x" * 65536
            while True:
                sys.stdout.buffer.write(chunk)

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, timeout=0.1))
        with self.connect(server):
            self.assertTrue(ended.wait(TIMEOUT))  # we never read a byte

    def drip(self, server, first=b""):
        """Send first, then a byte every 20 ms until the server answers
        (bounded); return the answer."""
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(first)
            sock.settimeout(0.02)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    return sock.recv(1000)
                except socket.timeout:
                    sock.sendall(b"x")
        self.fail("no answer while the client dripped")

    def test_a_line_timeout_bounds_a_dripping_client(self):
        def thunk():
            layer = sys.stdin if input() == "text" else sys.stdin.buffer
            began = time.monotonic()
            try:
                layer.readline()
            except tcpserver.IdleTimeout as exc:
                print(exc, time.monotonic() - began < 1.0)

        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), thunk, timeout=1, line_timeout=0.2))
        for layer in (b"text", b"binary"):
            with self.subTest(layer=layer):
                # The idle timeout never fires: a byte comes every 20 ms.
                self.assertEqual(self.drip(server, layer + b"\n"),
                                 b"the client took more than 0.2 seconds to send a line True\n")

    def test_a_line_lost_to_an_error_leaves_no_tail(self):
        def thunk():
            layer = sys.stdin if input() == "text" else sys.stdin.buffer
            for _ in range(2):
                try:
                    print(repr(layer.readline()))
                except (tcpserver.IdleTimeout, UnicodeDecodeError) as exc:
                    print(type(exc).__name__)

        class Strict(tcpserver.ThunkHandler):
            decode_errors = "strict"

        server = self.serve(tcpserver.ThreadingTCPServer(
            ("127.0.0.1", 0), Strict, thunk=thunk, line_timeout=0.2))
        cases = [(b"text", [b"GET ", b"/adm", b"in\n"], [b"IdleTimeout", b"'next\\n'"]),
                 (b"binary", [b"GET ", b"/adm", b"in\n"], [b"IdleTimeout", b"b'next\\n'"]),
                 (b"text", [b"NOTE: \xff ", b"DELETE ALL\n"],
                  [b"UnicodeDecodeError", b"'next\\n'"])]
        for layer, pieces, expected in cases:
            with self.subTest(layer=layer, pieces=pieces):
                with self.connect(server) as sock:
                    sock.sendall(layer + b"\n")
                    lines = sock.makefile("rb")
                    for piece in pieces:
                        sock.sendall(piece)
                        if piece.startswith(b"/adm"):  # after the line's deadline
                            self.assertEqual(lines.readline().rstrip(), expected[0])
                    sock.sendall(b"next\n")
                    replies = [line.rstrip() for line in lines]
                    lines.close()
                self.assertEqual(expected[1:] if b"/adm" in pieces else expected, replies)

    def test_a_line_timeout_leaves_the_socket_to_a_writing_thread(self):
        size = 4 * 2 ** 20

        def thunk():
            handler = tcpserver.current_connection()

            def write():
                for _ in range(size // 65536):  # a write call each: each sees the socket
                    handler.wfile.write(b"x" * 65536)
                    # Through to the socket even where a write this size
                    # fits in the buffer (3.14's io.DEFAULT_BUFFER_SIZE is
                    # 128 KiB): the client waits for all of it.
                    handler.wfile.flush()

            writer = threading.Thread(target=write)
            writer.start()
            line = input()  # waits, with its deadline, while the writer writes
            writer.join()
            handler.wfile.flush()
            print(line)

        class SmallSendQueue(tcpserver.ThunkHandler):
            def setup(self):  # so the writer waits for room, many times
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                super().setup()

        server = self.serve(tcpserver.ThreadingTCPServer(
            ("127.0.0.1", 0), SmallSendQueue, thunk=thunk, line_timeout=TIMEOUT))
        with small_window_connection(server) as sock:
            self.assertEqual(read_exactly(sock, size), b"x" * size)
            sock.sendall(b"done\n")
            self.assertEqual(read_all(sock), b"done\n")

    def test_a_line_timeout_is_per_line(self):
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), echo_lines, line_timeout=0.2))
        with self.connect(server) as sock:
            lines = sock.makefile("rb")
            for line in (b"a\n", b"b\n", b"c\n"):  # longer than 0.2 s in all
                sock.sendall(line)
                self.assertEqual(lines.readline(), b"echo " + line)
                time.sleep(0.1)  # the client's pause between lines, not a wait for the server
            lines.close()

    def test_the_handler_timeout_wins(self):
        class Impatient(tcpserver.ThunkHandler):
            timeout = 0.1

        def thunk():
            try:
                input()
            except socket.timeout:
                print("timed out")

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Impatient,
                                                         thunk=thunk, timeout=60))
        with self.connect(server) as sock:
            self.assertEqual(read_all(sock), b"timed out\n")


class TestExtremeSettings(ServerTestCase):
    """Every value a setting accepts works: "forever", the huge, the least."""

    # No wait could take these: each means no limit.
    FOREVER = (float("inf"), 1e300, 10 ** 30, threading.TIMEOUT_MAX * 2)

    def test_forever_is_no_limit(self):
        def thunk():
            print(current_client(), input())

        def current_client():
            return tcpserver.current_connection().client_address[0]

        header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n"
        for name in ("timeout", "line_timeout", "handshake_timeout", "spare_thread_lifetime",
                     "drain_timeout", "reset_grace"):
            for value in self.FOREVER:
                with self.subTest(name=name, value=value):
                    server = self.serve(tcpserver.make_tcp_server(
                        ("127.0.0.1", 0), thunk, proxy_protocol=True, **{name: value}))
                    for _ in range(3):  # the second and third on a spare thread
                        self.assertEqual(self.talk(server, header + b"hi\n"),
                                         b"192.0.2.1 hi\n")
                    self.stop(server)

    def test_a_socket_timeout_beyond_what_poll_takes(self):
        # 2**32 ms and 50 ms: a socket given it would wait 50 ms (the int
        # of milliseconds wraps around); beyond 24.8 days it means no limit.
        wrapping = (2 ** 32 + 50) / 1000
        for settings in ({"timeout": wrapping}, {"line_timeout": wrapping}):
            with self.subTest(**settings):
                server = self.serve(tcpserver.make_tcp_server(
                    ("127.0.0.1", 0), lambda: print(input()), **settings))
                with self.connect(server) as sock:
                    sock.sendall(b"a")  # a line begun
                    sock.settimeout(0.1)
                    with self.assertRaises(socket.timeout):  # not a reset after 50 ms
                        sock.recv(100)
                    sock.sendall(b"b\n")
                    sock.settimeout(TIMEOUT)
                    self.assertEqual(read_all(sock), b"ab\n")
                self.stop(server)

    def test_a_reset_grace_of_forever_still_ends_the_drain(self):
        started = threading.Event()
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: (started.set(), input()), drain_timeout=0.01,
            reset_grace=float("inf")))
        stderr = self.capture("stderr")
        with self.connect(server) as sock:
            self.assertTrue(started.wait(TIMEOUT))
            self.stop(server)  # drains: a reset wakes input() at once
            with self.assertRaises(ConnectionResetError):
                read_all(sock)
        self.assertEqual(server.stats()["failed"], 1)
        self.assertIn("resetting 1 requests still running after the 0.01 s drain",
                      stderr.getvalue())

    def test_a_handler_timeout_of_forever(self):
        class Patient(tcpserver.ThunkHandler):
            timeout = float("inf")

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Patient,
                                                         thunk=lambda: print(input())))
        self.assertEqual(self.talk(server, b"hi\n"), b"hi\n")

    def test_the_largest_counts(self):
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: print(input()), max_requests=sys.maxsize,
            max_per_client=sys.maxsize, max_spare_threads=sys.maxsize, max_line=sys.maxsize))
        for _ in range(3):
            self.assertEqual(self.talk(server, b"hi\n"), b"hi\n")

    def test_no_spare_threads(self):
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: print(input()), max_spare_threads=0))
        for _ in range(3):
            self.assertEqual(self.talk(server, b"hi\n"), b"hi\n")

    def test_poll_intervals(self):
        for interval in (0, 0.01, float("inf"), 1e300):
            with self.subTest(poll_interval=interval):
                server = tcpserver.make_tcp_server(("127.0.0.1", 0), lambda: print(input()))
                thread = threading.Thread(target=server, kwargs={"poll_interval": interval})
                thread.start()
                try:
                    self.assertEqual(self.talk(server, b"hi\n"), b"hi\n")
                finally:
                    server.shutdown()  # at once, whatever the interval
                    thread.join(TIMEOUT)
                    server.server_close()
                self.assertFalse(thread.is_alive())

    def test_bad_poll_intervals_fail_before_serving(self):
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), print)
        self.addCleanup(server.server_close)
        for interval, error in ((None, TypeError), ("1", TypeError), (-1, ValueError),
                                (float("nan"), ValueError)):
            for call in (server, server.serve_forever, server.serve_until_signalled,
                         functools.partial(server.serve_workers, 2)):
                with self.subTest(poll_interval=interval, call=call):
                    with self.assertRaisesRegex(error, "poll_interval must be a number of "
                                                       "seconds >= 0"):
                        call(poll_interval=interval)
        self.assertFalse(server.serving)

    def test_bad_handler_attributes_fail_before_any_connection(self):
        cases = [("rbufsize", "8", TypeError, "Bad.rbufsize must be an int"),
                 ("wbufsize", 2 ** 40, ValueError, "Bad.wbufsize must be an int of at most"),
                 ("timeout", 0, ValueError, "Bad.timeout must be a number of seconds > 0"),
                 ("encoding", "no-such-codec", ValueError, "Bad.encoding: unknown encoding"),
                 ("decode_errors", None, TypeError, "Bad.decode_errors must be a str"),
                 ("encode_errors", "nope", ValueError, "Bad.encode_errors: unknown error"),
                 ("newline", "\n\n", ValueError, "Bad.newline must be"),
                 ("encoding", "rot13", ValueError, "Bad.encoding: 'rot13' is not a text encoding"),
                 ("decode_errors", "xmlcharrefreplace", ValueError, "Bad.decode_errors: "),
                 ("decode_errors", "backslashreplace", ValueError,
                  "Bad.decode_errors must make at most one character of each byte"),
                 ("line_buffering", "no", TypeError, "Bad.line_buffering must be True or False")]
        for attribute, value, error, message in cases:
            with self.subTest(attribute=attribute):
                bad = type("Bad", (tcpserver.ThunkHandler,), {attribute: value})
                with self.assertRaisesRegex(error, re.escape(message)):
                    tcpserver.ThreadingTCPServer(("127.0.0.1", 0), bad, thunk=print)

    def test_every_newline_textiowrapper_takes(self):
        for newline in ("\n", "\r\n", "\r", "", None):
            with self.subTest(newline=newline):
                handler = type("Handler", (tcpserver.ThunkHandler,), {"newline": newline})
                server = self.serve(tcpserver.ThreadingTCPServer(
                    ("127.0.0.1", 0), handler, thunk=lambda: print("a")))
                self.assertEqual(self.talk(server), b"a" + (newline or os.linesep).encode())
                self.stop(server)

    def test_unbuffered_output_leaves_at_once(self):
        class Unbuffered(tcpserver.ThunkHandler):
            wbufsize = 0  # socketserver's unbuffered
            line_buffering = False

        seen = [threading.Event(), threading.Event()]

        def thunk():  # no read, which would flush: only the writes themselves
            sys.stdout.buffer.write(b"a")
            seen[0].wait(TIMEOUT)
            sys.stdout.write("b")
            seen[1].wait(TIMEOUT)

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Unbuffered,
                                                         thunk=thunk))
        with self.connect(server) as sock:
            for expected, event in zip((b"a", b"b"), seen):
                self.assertEqual(read_exactly(sock, 1), expected)
                event.set()
            self.assertEqual(read_all(sock), b"")

    def test_socketservers_buffer_sizes(self):
        class Copied(tcpserver.ThunkHandler):
            rbufsize = -1  # StreamRequestHandler's: the default size
            wbufsize = 0   # unbuffered

        def thunk():
            line = sys.stdin.buffer.readline()
            sys.stdout.buffer.write(line)
            print(input())

        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Copied, thunk=thunk))
        self.assertEqual(self.talk(server, b"one\ntwo\n"), b"one\ntwo\n")


class TestDrain(ServerTestCase):

    def test_server_close_resets_a_thunk_blocked_forever(self):
        started = threading.Event()

        def thunk():
            started.set()
            input()

        stderr = self.capture("stderr")  # logging's last resort writes the warning there
        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                                      drain_timeout=0.1))
        sock = self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        server.shutdown()
        closer = threading.Thread(target=server.server_close)
        began = time.monotonic()
        closer.start()
        closer.join(TIMEOUT)
        self.assertFalse(closer.is_alive(), "server_close() hangs")
        self.assertLess(time.monotonic() - began, 3.0)
        self.assertEqual(server.stats()["active"], 0)
        with self.assertRaises(ConnectionResetError):
            read_all(sock)
        self.assertIn("resetting 1 requests still running after the 0.1 s drain",
                      stderr.getvalue())

    def test_a_drained_writer_costs_one_line_and_no_traceback(self):
        stderr = self.capture("stderr")
        started = threading.Event()

        def thunk():  # the client never reads: the write blocks
            started.set()
            while True:
                sys.stdout.buffer.write(b"x" * 65536)

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                                      drain_timeout=0.1, reset_grace=0.1),
                            debug=True)
        sock = self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        self.stop(server)
        log = stderr.getvalue()
        self.assertIn("tcpserver-1 finished (drained, reset by server_close())", log)
        self.assertNotIn("Traceback", log)
        self.assertEqual(server.stats()["failed"], 1)
        sock.close()

    def test_requests_may_finish_during_the_drain(self):
        started = threading.Event()

        def thunk():
            started.set()
            print("late", input())

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                                      drain_timeout=TIMEOUT))
        sock = self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        server.shutdown()
        self.assertFalse(server.serving)
        closer = threading.Thread(target=server.server_close)
        closer.start()
        sock.sendall(b"reply\n")
        self.assertEqual(read_all(sock), b"late reply\n")
        closer.join(TIMEOUT)
        self.assertFalse(closer.is_alive())
        self.assertEqual(server.stats()["completed"], 1)

    def test_stats_and_serving(self):
        def thunk():
            if input() == "fail":
                raise RuntimeError("thunk failed on purpose")
            print("ok")

        def verify(request, address):
            return not refuse

        self.capture("stderr")
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk)
        server.verify_request = verify
        self.assertFalse(server.serving)
        self.assertEqual(server.stats(), {"accepted": 0, "active": 0, "completed": 0,
                                          "failed": 0, "refused": 0, "peak_active": 0})
        self.serve(server)
        refuse = False
        self.assertEqual(self.talk(server, b"a\n"), b"ok\n")
        self.assertTrue(server.serving)
        self.assertEqual(self.talk(server, b"b\n"), b"ok\n")
        self.assert_reset(server, b"fail\n")
        refuse = True
        self.assertEqual(self.talk(server), b"")
        self.stop(server)
        self.assertFalse(server.serving)
        stats = server.stats()
        # The next clients may come before the last requests' threads closed
        # (a client sees the FIN before its request is counted out).
        self.assertIn(stats.pop("peak_active"), range(1, 5))
        self.assertEqual(stats, {"accepted": 4, "active": 0, "completed": 2,
                                 "failed": 1, "refused": 1})
        with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as readme:
            shown = re.search(r">>> server.stats\(\)\n\s+(\{.*\})", readme.read()).group(1)
        self.assertEqual(list(server.stats()), list(eval(shown)))  # the README's order

    def test_stats_add_up_at_every_moment(self):
        # accepted == completed + failed + refused + active in every
        # snapshot, also while a request's connection is being closed.
        server = self.start(lambda: print("ok"), max_requests=None)
        done = threading.Event()
        broken = []

        def poll():
            while not done.is_set():
                stats = server.stats()
                if stats["accepted"] != (stats["completed"] + stats["failed"]
                                         + stats["refused"] + stats["active"]):
                    broken.append(stats)

        poller = threading.Thread(target=poll, name="poll stats")
        poller.start()
        try:
            for _ in range(30):
                self.assertEqual(self.talk(server), b"ok\n")
        finally:
            done.set()
            poller.join(TIMEOUT)
        self.assertEqual(broken[:3], [])

    def test_example_drains_on_sigterm(self):
        example = Program(self, [sys.executable, os.path.join(HERE, "example_daytime.py"), "0"],
                          ready=("stderr", r"\A.*port (\d+)"))
        with example.connect() as sock:
            self.assertTrue(read_all(sock).endswith(b"\n"))
        code, log = example.stop(signal.SIGTERM)
        self.assertEqual(code, 0)
        self.assertNotIn("Traceback", log)


class TestClientLimits(ServerTestCase):

    def held_server(self, **settings):
        """A server whose thunks wait for a line; returns (server, started count)."""
        started = threading.Semaphore(0)

        def thunk():
            started.release()
            print("served", input())

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, **settings))
        return server, started

    def connect_from(self, server, host):
        sock = socket.create_connection(server.server_address, timeout=TIMEOUT,
                                        source_address=(host, 0))
        self.addCleanup(sock.close)
        return sock

    def test_max_per_client(self):
        server, started = self.held_server(max_per_client=2)
        first, second = (self.connect_from(server, "127.0.0.1"),
                         self.connect_from(server, "127.0.0.1"))
        for _ in range(2):
            self.assertTrue(started.acquire(timeout=TIMEOUT))
        third = self.connect_from(server, "127.0.0.1")
        self.assertEqual(read_all(third), b"")  # closed at once, unserved
        other = self.connect_from(server, "127.0.0.2")  # another address: unaffected
        self.assertTrue(started.acquire(timeout=TIMEOUT))
        for sock in (first, second, other):
            sock.sendall(b"x\n")
            self.assertEqual(read_all(sock), b"served x\n")
        self.stop(server)
        self.assertEqual(server.stats()["refused"], 1)
        self.assertEqual(server.stats()["completed"], 3)

    def test_allow_list_recipe(self):
        namespace = {}
        exec(readme_code("class AllowListServer("), namespace)
        server = namespace["AllowListServer"](("127.0.0.1", 0), tcpserver.ThunkHandler,
                                              thunk=lambda: print("welcome"))
        server.allowed = [ipaddress.ip_network("127.0.0.1/32")]
        self.serve(server)
        self.assertEqual(read_all(self.connect_from(server, "127.0.0.1")), b"welcome\n")
        self.assertEqual(read_all(self.connect_from(server, "127.0.0.2")), b"")
        self.stop(server)
        self.assertEqual(server.stats()["refused"], 1)

    def test_allow_list_recipe_behind_a_balancer(self):
        namespace = {}
        exec(readme_code("class AllowListServer("), namespace)
        server = self.serve(namespace["AllowListServer"](
            ("127.0.0.1", 0), tcpserver.ThunkHandler, thunk=lambda: print("welcome"),
            proxy_protocol=True))
        # The balancer is 127.0.0.1, which the list allows; its clients count.
        self.assertEqual(self.talk(server, b"PROXY TCP4 10.1.2.3 10.0.0.5 5000 6504\r\n"),
                         b"welcome\n")
        self.assertEqual(self.talk(server, b"PROXY TCP4 203.0.113.7 10.0.0.5 5000 6504\r\n"),
                         b"")
        self.stop(server)
        self.assertEqual(server.stats()["refused"], 1)
        self.assertEqual(server.stats()["completed"], 1)

    def test_max_per_client_behind_a_balancer_counts_each_client(self):
        stderr = self.capture("stderr")
        server, started = self.held_server(max_per_client=1, proxy_protocol=True)
        server.debug = True
        first = self.connect(server)
        first.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 6504\r\n")
        self.assertTrue(started.acquire(timeout=TIMEOUT))
        other = self.connect(server)  # another client of the same balancer
        other.sendall(b"PROXY TCP4 198.51.100.9 192.0.2.1 40001 6504\r\n")
        self.assertTrue(started.acquire(timeout=TIMEOUT))
        again = self.connect(server)  # the first client's second connection
        self.assertEqual(exchange(again, b"PROXY TCP4 203.0.113.7 192.0.2.1 40002 6504\r\n"),
                         b"")
        for sock in (first, other):
            self.assertEqual(exchange(sock, b"x\n"), b"served x\n")
        self.stop(server)
        self.assertEqual(server.stats()["refused"], 1)
        self.assertEqual(server.stats()["completed"], 2)
        self.assertIn("(with 203.0.113.7) finished (refused: 1 connections from it already)",
                      stderr.getvalue())


class TestThreadsThatCannotStart(ServerTestCase):
    """Request threads that cannot start (RLIMIT_NPROC reached, say)."""

    def fail_thread_starts(self, count):
        """Make the next count starts of request threads fail as the
        threading module does when the system refuses a thread."""
        original = threading.Thread.start
        failed = []

        def start(thread):
            if thread.name.startswith("tcpserver-") and len(failed) < count:
                failed.append(thread.name)
                raise RuntimeError("can't start new thread")
            return original(thread)

        patcher = unittest.mock.patch.object(threading.Thread, "start", start)
        patcher.start()
        self.addCleanup(patcher.stop)
        return failed

    def start_logged(self, thunk, **settings):
        stderr = self.capture("stderr")
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, **settings)
        server.max_spare_threads = 0  # every request needs a thread of its own
        return self.serve(server, debug=True), stderr

    def test_clients_wait_until_a_thread_starts(self):
        server, stderr = self.start_logged(lambda: print("hi"))
        failed = self.fail_thread_starts(3)
        # Each client needs a thread start (for itself, or for the lead it hands
        # on), 3 of which fail: enough clients for 100 good ones after those.
        clients = tcpserver._STARTS_TO_RECOVER + 4
        for _ in range(clients):
            self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        self.assertEqual(len(failed), 3)
        stats = server.stats()
        # The next clients may come before the last requests' threads closed
        # (a client sees the FIN before its request is counted out).
        self.assertGreaterEqual(stats.pop("peak_active"), 1)
        self.assertEqual(stats, {"accepted": clients, "completed": clients, "failed": 0,
                                 "refused": 0, "active": 0})
        log = stderr.getvalue()
        self.assertEqual(log.count("cannot start a request thread (can't start new thread); "
                                   "new clients wait"), 1)
        self.assertEqual(log.count("request threads start again, after 3 failures"), 1)
        self.assertNotIn("Traceback", log)

    def test_a_thread_that_turns_spare_takes_the_waiting_client(self):
        started, release = threading.Event(), threading.Event()

        def thunk():
            started.set()
            release.wait(TIMEOUT)
            print("hi")

        waiting = threading.Event()
        self.log_to(lambda record: "cannot start" in record.getMessage() and waiting.set())
        server, stderr = self.start_logged(thunk)
        server.max_spare_threads = 16
        first = self.connect(server)
        self.assertTrue(started.wait(TIMEOUT))
        self.fail_thread_starts(10 ** 6)  # no new thread from now on
        second = self.connect(server)
        self.assertTrue(waiting.wait(TIMEOUT))
        release.set()  # the first thread ends its request and turns spare
        self.assertEqual(exchange(first, b""), b"hi\n")
        self.assertEqual(exchange(second, b""), b"hi\n")
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 2)
        self.assertEqual(stderr.getvalue().count("cannot start a request thread"), 1)

    def test_a_lead_no_thread_can_take_goes_to_the_next_free_thread(self):
        server, stderr = self.start_logged(lambda: print("hi"))
        self.assertEqual(self.talk(server), b"hi\n")  # a thread has the lead
        self.fail_thread_starts(10 ** 6)
        for _ in range(3):
            self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 4)
        self.assertEqual(stderr.getvalue().count("cannot start a request thread"), 1)

    def test_a_slow_failing_hand_out_of_the_lead_keeps_the_last_thread(self):
        # serve_forever()'s thread holds the vacant lead while it fails to
        # start a thread for it (slowly here): the request thread that
        # finishes meanwhile, the only one, must take the lead, not end.
        server, stderr = self.start_logged(lambda: print("hi"))
        self.assertEqual(self.talk(server), b"hi\n")  # a thread has the lead
        original = threading.Thread.start

        def start(thread):
            if thread.name.startswith("tcpserver-"):
                if threading.current_thread() is server.test_thread:
                    time.sleep(0.05)
                raise RuntimeError("can't start new thread")
            return original(thread)

        patcher = unittest.mock.patch.object(threading.Thread, "start", start)
        patcher.start()
        self.addCleanup(patcher.stop)
        for _ in range(3):
            self.assertEqual(self.talk(server), b"hi\n")
        self.stop(server)
        self.assertEqual(server.stats()["completed"], 4)

    def test_a_thread_start_that_raises_costs_that_client_only(self):
        server, stderr = self.start_logged(lambda: print("hi"))
        self.assertEqual(self.talk(server), b"hi\n")  # a thread has the lead
        original, failed = threading.Thread.start, []

        def start(thread):
            if thread.name.startswith("tcpserver-") and not failed:
                failed.append(thread.name)
                raise ValueError("Thread.start() failed on purpose")
            return original(thread)

        with unittest.mock.patch.object(threading.Thread, "start", start):
            self.assertEqual(self.talk(server), b"")  # closed: its lead went nowhere
            self.assertEqual([self.talk(server) for _ in range(3)], [b"hi\n"] * 3)
        self.stop(server)
        self.assertEqual(failed, ["tcpserver-leader"])
        self.assertEqual(stderr.getvalue().count("ValueError: Thread.start() failed"), 1)
        stats = server.stats()
        self.assertEqual((stats["accepted"], stats["completed"], stats["failed"]), (5, 4, 1))

    def test_a_ctrl_c_while_the_lead_is_handed_out_ends_serve_forever(self):
        original, fired = tcpserver._RequestThreads.try_start, []

        def try_start(threads, job):
            if not fired and threading.current_thread().name == "serve":
                fired.append(job)
                raise KeyboardInterrupt  # as if SIGINT landed just here
            return original(threads, job)

        server = tcpserver.make_tcp_server(("127.0.0.1", 0), lambda: print("hi"))
        self.addCleanup(server.server_close)
        raised = []

        def serve():
            try:
                server.serve_forever(0.01)
            except KeyboardInterrupt as exc:
                raised.append(exc)

        with unittest.mock.patch.object(tcpserver._RequestThreads, "try_start", try_start):
            thread = threading.Thread(target=serve, name="serve")
            thread.start()
            thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive(), "serve_forever() did not end")
        self.assertEqual(len(raised), 1)
        self.serve(server)  # and it serves again
        self.assertEqual(self.talk(server), b"hi\n")

    def test_shutdown_is_prompt_and_the_waiting_client_is_refused(self):
        # No thread can take the lead either: the server accepts the classic
        # way, in serve_forever()'s thread, and the client waits for a thread.
        self.fail_thread_starts(10 ** 6)
        server, stderr = self.start_logged(print)
        sock = self.connect(server)
        deadline = time.monotonic() + TIMEOUT
        while server.stats()["active"] == 0:  # accepted, waiting for a thread
            self.assertLess(time.monotonic(), deadline, "never accepted")
            time.sleep(0.01)
        began = time.monotonic()
        self.stop(server)
        self.assertLess(time.monotonic() - began, 2.0)
        self.assertEqual(read_all(sock), b"")
        self.assertEqual(server.stats(), {"accepted": 1, "completed": 0, "failed": 0,
                                          "refused": 1, "peak_active": 1, "active": 0})
        self.assertIn("refused 127.0.0.1: no request thread could start", stderr.getvalue())


class TestMaxLine(ServerTestCase):

    def test_a_thunk_may_catch_line_too_long_and_read_on(self):
        def thunk():
            try:
                input()
            except tcpserver.LineTooLong as exc:
                print("too long:", exc)
            print(input())

        server = self.start(thunk)
        reply = self.talk(server, b"a" * 70000 + b"\nok\n")
        # The rest of the line too long is dropped: the next line is the next input().
        self.assertEqual(reply, b"too long: line longer than max_line=65536 characters\nok\n")

    def test_the_tail_of_a_line_too_long_is_never_a_line(self):
        def thunk():
            layer = sys.stdin if input() == "text" else sys.stdin.buffer
            while True:
                try:
                    line = layer.readline()
                except tcpserver.LineTooLong:
                    print("too long")
                    continue
                if not line:
                    break
                print(repr(line))

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, max_line=1000))
        smuggled = b"X-Comment: " + b"a" * 990 + b"DELETE ALL\n"
        for layer, lines in (("text", ["'next\\n'", "'the end'"]),
                             ("binary", ["b'next\\n'", "b'the end'"])):
            with self.subTest(layer=layer):
                for pieces in ([smuggled + b"next\n" + b"b" * 5000 + b"\r\nthe end"],
                               [smuggled[:500], smuggled[500:] + b"next\n", b"b" * 5000,
                                b"\r\nthe end"]):
                    with self.connect(server) as sock:
                        sock.sendall(layer.encode() + b"\n")
                        for piece in pieces:
                            sock.sendall(piece)
                        sock.shutdown(socket.SHUT_WR)
                        reply = read_all(sock).decode().splitlines()
                    self.assertEqual(reply, ["too long", lines[0], "too long", lines[1]])

    def test_a_line_end_counts_as_nothing_on_both_layers(self):
        def thunk():
            for layer in (sys.stdin, sys.stdin.buffer) * 2:
                try:
                    print(len(layer.readline()))
                except tcpserver.LineTooLong:
                    print("too long")

        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, max_line=10))
        reply = self.talk(server, b"x" * 10 + b"\r\n" + b"y" * 10 + b"\r\n"
                                  + b"x" * 11 + b"\r\n" + b"y" * 11 + b"\n")
        self.assertEqual(reply, b"11\n12\ntoo long\ntoo long\n")

    def test_a_cap_of_any_size(self):
        for cap in (1, 2 ** 31, sys.maxsize):
            with self.subTest(max_line=cap):
                server = self.serve(tcpserver.make_tcp_server(
                    ("127.0.0.1", 0),
                    lambda: print(len(input()), len(sys.stdin.buffer.readline())),
                    max_line=cap))
                self.assertEqual(self.talk(server, b"a\nb\n"), b"1 2\n")
                self.stop(server)

    def test_uncaught_line_too_long_resets_without_traceback(self):
        stderr = self.capture("stderr")
        server = self.start(input, debug=True)
        self.assert_reset(server, b"z" * 100000)
        self.stop(server)
        self.assertIn("finished (line too long, LineTooLong: ", stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())

    def test_binary_readline_is_capped_in_bytes(self):
        def thunk():
            binary = sys.stdin.buffer
            try:
                binary.readline()
            except tcpserver.LineTooLong as exc:
                print("too long:", exc)
            print(len(binary.readline()), binary.readline(2), binary.readline())
            try:
                for _line in binary:
                    pass
            except tcpserver.LineTooLong:
                print("iteration is capped too")

        server = self.start(thunk)
        reply = self.talk(server, b"a" * 70000 + b"\n" + b"b" * 20 + b"\nok\n" + b"c" * 70000)
        self.assertEqual(reply, b"too long: line longer than max_line=65536 bytes\n"
                                b"21 b'ok' b'\\n'\n"
                                b"iteration is capped too\n")

    def test_max_line_none_lifts_the_cap(self):
        server = self.serve(tcpserver.make_tcp_server(
            ("127.0.0.1", 0), lambda: print(len(input())), max_line=None))
        self.assertEqual(self.talk(server, b"b" * 200000 + b"\n"), b"200000\n")

    def test_bad_settings(self):
        cases = [({"timeout": 0}, ValueError,
                  "idle_timeout must be a number of seconds > 0 or None, not 0"),
                 ({"timeout": "5"}, TypeError,
                  "idle_timeout must be a number of seconds > 0 or None, not str"),
                 ({"drain_timeout": -1}, ValueError,
                  "drain_timeout must be a number of seconds >= 0 or None, not -1"),
                 ({"max_line": 0}, ValueError, "max_line must be a positive int or None, not 0"),
                 ({"max_per_client": 1.5}, TypeError,
                  "max_per_client must be a positive int or None, not float"),
                 ({"ssl_context": "cert.pem"}, TypeError,
                  "ssl_context must be an ssl.SSLContext or None, not str")]
        for settings, error, text in cases:
            with self.subTest(settings=settings):
                with self.assertRaises(error) as caught:
                    tcpserver.make_tcp_server(("127.0.0.1", 0), print, **settings)
                self.assertIn(text, str(caught.exception))
        with self.assertRaisesRegex(ValueError,
                                    "max_per_client must be a positive int or None, not 0"):
            tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, max_per_client=0)


class TestSoakAndFaults(ServerTestCase):
    """Load, fuzzing and exhaustion: the server serves on and leaks nothing.

    The soak and the fuzz run at full size with TEST_FULL_SOAK=1, else
    smaller (a few seconds less): still more clients than slots at once.
    """

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def exchange(sock, data, digest=None):
        """Send data, then end our side, while reading the reply in this thread.

        The sending runs in a thread of its own, so that neither side stalls
        on a full socket buffer.  Returns (reply, error): reply is the bytes
        read (b"" when digest is given: it is updated with them instead),
        error the first OSError of either side, or None.
        """
        errors = []

        def send():
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, name="sender")
        sender.start()
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                if digest is None:
                    chunks.append(chunk)
                else:
                    digest.update(chunk)
        except OSError as exc:
            errors.insert(0, exc)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # so that the sender stops too
            except OSError:
                pass
        finally:
            sender.join(TIMEOUT)
        return b"".join(chunks), (errors[0] if errors else None)

    def spawn_server(self, body):
        """Serve a thunk in a subprocess, with debug on; return (child, port).

        body defines thunk() and may fill the dict settings with keywords for
        make_tcp_server().  The server's diagnostics are child.lines["stderr"].
        """
        script = ("import tcpserver\nsettings = {}\n" + textwrap.dedent(body)
                  + textwrap.dedent("""
                  server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, **settings)
                  print(server.server_address[1], flush=True)
                  server(debug=True)
                  """))
        child = Program(self, [sys.executable, "-c", script])
        return child, child.port

    def connect_to(self, port):
        """Connect to a server in a subprocess; the socket is closed when the test ends."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        return sock

    # -- the tests ----------------------------------------------------------

    def test_soak_clients_through_32_slots(self):
        # 2000 clients of 256 KiB each at full size, else 300 of 64 KiB;
        # 64 at a time, through 32 slots.
        clients, size = (2000, 256 * 1024) if FULL_SOAK else (300, 64 * 1024)
        limit, workers = 32, 64
        lock = threading.Lock()
        running = {"now": 0, "peak": 0, "started": 0}
        # The first thunks wait for each other, and then until the server says
        # that clients wait for a slot (or, were the limit not kept, one more
        # thunk starts): the limit is reached however quickly the others run.
        first = threading.Barrier(limit, timeout=TIMEOUT)
        full = threading.Event()
        self.log_to(lambda record: "request slots busy" in record.getMessage() and full.set())

        def thunk():  # echoes chunk by chunk, while the client is still sending
            with lock:
                running["now"] += 1
                running["peak"] = max(running["peak"], running["now"])
                running["started"] += 1
                number = running["started"]
            try:
                if number <= limit:
                    first.wait()
                    full.wait(TIMEOUT)
                else:
                    full.set()
                source, sink = sys.stdin.buffer, sys.stdout.buffer
                while True:
                    chunk = source.read1(65536)
                    if not chunk:
                        break
                    sink.write(chunk)
            finally:
                with lock:
                    running["now"] -= 1

        stderr = self.capture("stderr")
        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                                      max_requests=limit))
        address = self.address(server)
        numbers = iter(range(clients))
        results = {}  # client number -> None if its echo came back exactly, else why not

        def client():
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                data = os.urandom(size)
                digest = hashlib.sha256()
                try:
                    with socket.create_connection(address, timeout=TIMEOUT) as sock:
                        error = self.exchange(sock, data, digest)[1]
                except OSError as exc:
                    error = exc
                if error is None and digest.digest() != hashlib.sha256(data).digest():
                    error = "the echo differs"
                with lock:
                    results[number] = None if error is None else repr(error)

        threads = [threading.Thread(target=client, name="client-%d" % n)
                   for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.stop(server)  # joins the request threads: the counts are final
        failures = {n: why for n, why in results.items() if why is not None}
        self.assertEqual(len(results), clients, "clients left unfinished")
        self.assertEqual(len(failures), 0, sorted(failures.items())[:10])
        self.assertEqual(running["peak"], limit)
        self.assertEqual(server.stats(), {"accepted": clients, "completed": clients,
                                          "failed": 0, "refused": 0, "active": 0,
                                          "peak_active": limit})
        self.assertEqual(stderr.getvalue().count("Traceback"), 0, stderr.getvalue()[:2000])

    def test_fuzz_keeps_serving_and_leaks_nothing(self):
        slots, max_line = 8, tcpserver.DEFAULT_MAX_LINE
        together = threading.Barrier(slots, timeout=TIMEOUT)

        def thunk():
            while True:
                try:
                    line = input()
                except EOFError:
                    return
                if line == "<flood>":  # writes until the client is gone
                    while True:
                        print("x" * 1000)
                if line == "<together>":  # needs every slot at once
                    together.wait()
                    print("together")
                    return
                print(line.upper())

        def expected(payload):
            """Return the thunk's reply to payload, and whether a line is too long."""
            text = payload.decode("utf-8", "replace")  # as ThunkHandler decodes
            reply = []
            for line in io.StringIO(text, newline=None):  # "\r\n" and "\r" end lines
                content = line[:-1] if line.endswith("\n") else line
                if len(content) > max_line:  # input() raises LineTooLong: a reset
                    return "".join(reply).encode(), True
                reply.append(content.upper() + "\n")
            return "".join(reply).encode(), False

        rng = random.Random(1234)

        def random_bytes(count, line_ends=True):
            data = rng.getrandbits(8 * count).to_bytes(count, "little") if count else b""
            if not line_ends:
                data = data.replace(b"\n", b"n").replace(b"\r", b"r")
            return data

        def random_payload(most):
            """Return up to most bytes of random lines: binary, unicode, NULs, some too long."""
            parts, total = [], 0
            while total < most:
                kind = rng.random()
                if kind < 0.35:
                    part = random_bytes(rng.randint(0, 200))
                elif kind < 0.6:
                    part = "".join(rng.choice("aZ09 \t\x00éßﬁ€𝄞ÿ\u2028")
                                   for _ in range(rng.randint(0, 80))).encode()
                elif kind < 0.7:  # invalid UTF-8: stray continuation bytes, cut sequences
                    part = rng.choice([b"\x80", b"\xc3", b"\xe2\x82", b"\xff\xfe",
                                       b"\xed\xa0\x80"]) * rng.randint(1, 50)
                elif kind < 0.8:  # either side of the limit
                    part = b"L" * (max_line + rng.randint(-2, 2))
                else:
                    part = random_bytes(rng.randint(0, 3000), line_ends=False)
                parts.append(part + rng.choice([b"\n", b"\r\n", b"\r", b""]))
                total += len(parts[-1])
            return b"".join(parts)[:most]

        plan = []  # (behaviour, payload, whether to vanish with a reset)
        for _ in range(300 if FULL_SOAK else 100):
            behaviour = rng.choice(["half-open", "half-open", "half-open", "long line",
                                    "reset mid-write", "close at once", "reset at once",
                                    "send and vanish"])
            if behaviour == "half-open":
                payload = random_payload(rng.choice([100, 3000, 70000, 200000]))
            elif behaviour == "long line":
                payload = random_bytes(rng.randint(max_line + 1, 300 * 1024), line_ends=False)
                payload += rng.choice([b"\n", b""])
            elif behaviour == "send and vanish":  # small: the replies fit the buffers
                payload = random_payload(rng.choice([10, 1000, 16000]))
            else:
                payload = b""
            plan.append((behaviour, payload, rng.random() < 0.5))

        def run(behaviour, payload, vanish_with_reset):
            """Play one client; return what went wrong, or None."""
            with socket.create_connection(self.address(server), timeout=TIMEOUT) as sock:
                if behaviour in ("half-open", "long line"):
                    reply, error = self.exchange(sock, payload)
                    want, too_long = expected(payload)
                    if too_long:
                        if not isinstance(error, (ConnectionResetError, BrokenPipeError)):
                            return "no reset for a line too long: %r" % (error,)
                        if not want.startswith(reply):
                            return "the reply before the reset differs"
                    elif error is not None or reply != want:
                        return "the reply differs (error %r, %d bytes, want %d)" % (
                            error, len(reply), len(want))
                elif behaviour == "reset mid-write":
                    sock.sendall(b"<flood>\n")
                    if len(read_exactly(sock, 5000)) != 5000:
                        return "no flood"
                    reset(sock)
                elif behaviour == "reset at once":
                    reset(sock)
                elif behaviour == "send and vanish":
                    try:
                        sock.sendall(payload)
                    except OSError:
                        pass  # the server may have reset us already
                    if vanish_with_reset:
                        reset(sock)
            return None

        stderr = self.capture("stderr")
        finished = []
        changed = threading.Condition()

        def record(entry):
            with changed:
                if " finished (" in entry.getMessage():
                    finished.append(entry.getMessage())
                changed.notify_all()

        self.log_to(record)
        server = self.serve(tcpserver.make_tcp_server(("127.0.0.1", 0), thunk,
                                                      max_requests=slots, timeout=1))
        silent = self.connect(server)  # sends nothing: the idle timeout resets it

        # Twelve clients at a time, more than there are slots: some wait.
        complaints = []
        lock = threading.Lock()
        todo = iter(enumerate(plan))

        def client():
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                number, (behaviour, payload, vanish_with_reset) = item
                try:
                    complaint = run(behaviour, payload, vanish_with_reset)
                except OSError as exc:
                    complaint = repr(exc)
                if complaint:
                    with lock:
                        complaints.append("%d %s: %s" % (number, behaviour, complaint))

        threads = [threading.Thread(target=client, name="fuzz-%d" % n) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(complaints[:10], [], "%d clients went wrong" % len(complaints))
        with self.assertRaises(ConnectionResetError):
            read_all(silent)

        # Every connection so far was accepted and has ended, each in its way.
        # Each request's "finished" line is its thread's last word, logged
        # after its slot came back: wait for them all, not just for the
        # counts (the silent client's, say, may still be coming).
        opened = len(plan) + 1
        with changed:
            self.assertTrue(changed.wait_for(
                lambda: len(finished) == opened
                and (server.stats()["accepted"], server.stats()["active"]) == (opened, 0),
                TIMEOUT), (server.stats(), len(finished)))
        stats = server.stats()
        self.assertEqual(stats["completed"] + stats["failed"], opened, stats)
        self.assertEqual(stats["refused"], 0)
        self.assertLessEqual(stats["peak_active"], slots)
        with changed:
            outcomes = {re.search(r" finished \(([^,)]*)", line).group(1) for line in finished}
        self.assertEqual(outcomes, {"ok", "client gone", "line too long", "timed out"})

        # A well-behaved client is served, and every slot can be held at once.
        self.assertEqual(self.talk(server, b"hello\n"), b"HELLO\n")
        socks = [self.connect(server) for _ in range(slots)]
        for sock in socks:
            sock.sendall(b"<together>\n")
        for sock in socks:
            self.assertEqual(read_all(sock), b"together\n")
        self.stop(server)
        self.assertEqual(server.stats()["active"], 0)
        self.assertEqual(len(stderr.getvalue()), 0, stderr.getvalue()[:2000])  # no traceback

    def test_accept_backs_off_when_descriptors_run_out(self):
        try:
            import resource  # noqa: F401  (the subprocess lowers its limit with it)
        except ImportError:
            self.skipTest("no resource module: RLIMIT_NOFILE cannot be lowered")
        if not os.path.exists("/proc/self/stat"):
            self.skipTest("no /proc: the server's CPU time cannot be read")
        fd_limit = 64
        child, port = self.spawn_server("""
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (%d, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

            def thunk():  # holds its descriptor until the client sends a line or leaves
                try:
                    print(input())
                except EOFError:
                    pass
            """ % fd_limit)
        log = child.lines["stderr"]

        def count(text):
            # "[tcp-server] ": with debug on, as logging's last resort also
            # prints the warnings, without the prefix.
            return sum(line.startswith("[tcp-server] ") and text in line for line in log)

        def tail():
            return "".join(log[-20:])

        def cpu_seconds():
            stat = child.proc("stat").rsplit(")", 1)[1].split()
            return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        # Clients one at a time, each one served, until one cannot be accepted:
        # the kernel has completed its handshake, so it waits in the listen
        # queue, alone, which makes a second run of failures impossible later.
        clients = []
        for number in range(1, fd_limit + 1):
            clients.append(self.connect_to(port))
            self.assertTrue(child.wait_until(
                lambda number=number: count("accept failed") or count("request %d from" % number)),
                tail())
            if count("accept failed"):
                break
        self.assertEqual(count("accept failed: [Errno 24]"), 1, tail())

        # Out of descriptors for 1 s, the server logs nothing more and, backing
        # off, hardly uses the CPU: a loop retrying at once uses the whole 1 s
        # (half of it on a machine as loaded as CI's).
        before, lines_before = cpu_seconds(), child.seen["stderr"]
        self.assertFalse(child.wait_until(lambda: child.seen["stderr"] > lines_before, 1.0),
                         tail())
        self.assertLess(cpu_seconds() - before, 0.2)

        # Descriptors come back: the waiting client is served, then a new one.
        for sock in clients:
            sock.close()
        self.assertTrue(child.wait_until(lambda: count(" finished (") == len(clients)), tail())
        with self.connect_to(port) as sock:
            sock.sendall(b"ping\n")
            self.assertEqual(read_all(sock), b"ping\n")
        child.close()  # every line it wrote is read
        self.assertEqual(count("accept failed"), 1, tail())
        self.assertEqual(count("accept works again"), 1, tail())

    def test_long_line_flood_keeps_memory_bounded(self):
        if not os.path.exists("/proc/self/status"):
            self.skipTest("no /proc: the server's peak memory cannot be read")
        child, port = self.spawn_server("""
            def thunk():
                count = 0
                while True:
                    try:
                        input()
                    except tcpserver.LineTooLong:
                        count += 1
                    except EOFError:
                        break
                print(count)
            """)
        chunk, chunks = b"x" * (2 ** 20 - 1) + b"\n", 100  # 100 lines of 1 MiB
        with self.connect_to(port) as sock:
            for _ in range(chunks):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            reply = read_all(sock)
        status = child.proc("status")  # the server is still running
        peak = int(re.search(r"^VmHWM:\s*(\d+) kB$", status, re.M).group(1)) * 1024
        self.assertLess(peak, 60 * 2 ** 20, "peak RSS %.1f MiB" % (peak / 2 ** 20))
        # Each line is too long, once: its rest is dropped as it comes.
        self.assertEqual(reply, b"%d\n" % chunks)


@unittest.skipUnless(hasattr(socket, "AF_UNIX"), "no Unix-domain sockets here")
class TestUnix(ServerTestCase):
    """Servers on Unix-domain sockets: a path for a listener."""

    def setUp(self):
        super().setUp()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "server.sock")

    def unix_connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect(self.path)
        return sock

    def test_a_path_serves_thunks_and_is_removed_on_close(self):
        def thunk():
            me = tcpserver.current_connection()
            print(me.local_address, repr(me.client_address), input())

        stderr = self.capture("stderr")
        server = self.serve(tcpserver.make_tcp_server(self.path, thunk, max_requests=2,
                                                      timeout=TIMEOUT), debug=True)
        self.assertEqual(server.server_address, self.path)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        self.assertEqual(exchange(self.unix_connect(), b"hi\n"),
                         ("%s '' hi\n" % self.path).encode())
        self.stop(server)
        self.assertFalse(os.path.exists(self.path))
        self.assertIn("request 1 from uid %d;" % os.getuid(), stderr.getvalue())
        self.assertEqual(server.stats()["completed"], 1)

    def test_peer_credentials_and_the_limit_per_user(self):
        server = self.serve(tcpserver.make_tcp_server(
            self.path, lambda: print(tcpserver.peer_credentials(
                tcpserver.current_connection().connection)), max_per_client=1))
        first = self.unix_connect()
        self.assertEqual(first.makefile().readline(),
                         "%r\n" % ((os.getpid(), os.getuid(), os.getgid()),))
        with socket.socket() as tcp:
            self.assertIsNone(tcpserver.peer_credentials(tcp))
        # The first connection's request has ended with its reply; the
        # limit counts while one is open: hold one with a thunk that reads.
        self.stop(server)
        held = threading.Event()
        server = self.serve(tcpserver.make_tcp_server(
            self.path, lambda: (held.set(), input()), max_per_client=1))
        self.unix_connect()
        self.assertTrue(held.wait(TIMEOUT))
        self.assertEqual(exchange(self.unix_connect(), b""), b"")  # refused: same user
        deadline = time.monotonic() + TIMEOUT  # counted just after the close
        while server.stats()["refused"] < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(server.stats()["refused"], 1)

    def test_tls_and_timeouts(self):
        made = certificates()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(made.cert, made.key)
        server = self.serve(tcpserver.make_tcp_server(
            self.path, lambda: print(input()), ssl_context=context, timeout=0.2,
            handshake_timeout=0.2))
        client = ssl.create_default_context(cafile=made.cert)
        with client.wrap_socket(self.unix_connect(), server_hostname="localhost") as sock:
            sock.sendall(b"over TLS\n")
            self.assertEqual(sock.makefile("rb").readline(), b"over TLS\n")
        # A silent client, after its handshake, then before it: each is
        # closed after 0.2 s (Unix-domain sockets know no reset: an EOF).
        for connect in (lambda: client.wrap_socket(self.unix_connect(),
                                                   server_hostname="localhost"),
                        self.unix_connect):
            with connect() as sock:
                try:
                    self.assertEqual(read_all(sock), b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the TLS layer's answer to the close, on some Pythons
        self.stop(server)
        stats = server.stats()
        self.assertEqual((stats["completed"], stats["failed"]), (1, 2), stats)

    def test_the_socket_file_is_checked_and_a_stale_one_replaced(self):
        with open(self.path, "w"):
            pass  # a file that is not a socket
        with self.assertRaises(OSError):
            tcpserver.unix_listen(self.path)
        os.unlink(self.path)
        stale = tcpserver.unix_listen(self.path)
        stale.close()  # its file stays, and nobody accepts on it
        live = tcpserver.unix_listen(self.path)
        with live, self.assertRaises(OSError):  # a live server's file: in use
            tcpserver.unix_listen(self.path)
        with self.assertRaises(ValueError):
            tcpserver.unix_listen("")

    def test_a_socket_of_ones_own_keeps_its_file(self):
        listener = tcpserver.unix_listen(self.path)
        server = self.serve(tcpserver.make_tcp_server(listener, lambda: print("hi")))
        self.assertEqual(exchange(self.unix_connect(), b""), b"hi\n")
        self.stop(server)
        self.assertTrue(os.path.exists(self.path))  # made by us: ours to remove

    def test_threading_unix_stream_server_as_socketservers(self):
        server = self.serve(tcpserver.ThreadingUnixStreamServer(self.path, EchoHandler,
                                                                max_requests=4))
        self.assertIsInstance(server, socketserver.UnixStreamServer)
        self.assertEqual(exchange(self.unix_connect(), b"one\n"), b"4:one\n")
        self.stop(server)
        self.assertFalse(os.path.exists(self.path))

    def test_proxy_header_from_a_local_balancer(self):
        def thunk():
            me = tcpserver.current_connection()
            print(me.client_address, me.local_address)

        server = self.serve(tcpserver.make_tcp_server(self.path, thunk, proxy_protocol=True))
        self.assertEqual(exchange(self.unix_connect(),
                                  b"PROXY TCP4 192.0.2.9 192.0.2.1 4000 80\r\n"),
                         b"('192.0.2.9', 4000) ('192.0.2.1', 80)\n")
        self.assertEqual(exchange(self.unix_connect(), b"no header\n"), b"")
        self.stop(server)
        self.assertEqual(server.stats()["failed"], 1)


# ---------------------------------------------------------------------------
# Legacy socketserver code and the stdlib servers built on it
# ---------------------------------------------------------------------------

class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d:" % len(line) + line)


class ThreadingHTTPServer(tcpserver.ThreadingTCPServer, http.server.HTTPServer):
    """What a user writes to put http.server on tcpserver."""


class HTTPServerStdlibFirst(http.server.HTTPServer, tcpserver.ThreadingTCPServer):
    """The other order works too."""


class XMLRPCServer(xmlrpc.server.SimpleXMLRPCServer, tcpserver.ThreadingTCPServer):
    """The stdlib class first: its __init__ skips ours; the limit is a class attribute."""
    max_requests = 8


class XMLRPCServerOursFirst(tcpserver.ThreadingTCPServer, xmlrpc.server.SimpleXMLRPCServer):
    """Our class first: keyword arguments of both reach their __init__."""


class TestLegacy(ServerTestCase):

    def test_stream_request_handler_as_with_socketserver(self):
        request = b"one\ntwo\n\nthree"
        replies = []
        for cls in (socketserver.ThreadingTCPServer, tcpserver.ThreadingTCPServer):
            with self.subTest(cls=cls):
                server = self.serve(cls(("127.0.0.1", 0), EchoHandler))
                replies.append(self.talk(server, request))
                self.stop(server)
        self.assertEqual(replies[0], b"4:one\n4:two\n1:\n5:three")
        self.assertEqual(replies[1], replies[0])
        self.assertTrue(issubclass(tcpserver.ThreadingTCPServer, socketserver.ThreadingTCPServer))

    def test_bind_and_activate_false(self):
        server = tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, False)
        server.server_bind()
        server.server_activate()
        self.serve(server)
        self.assertEqual(self.talk(server, b"x\n"), b"2:x\n")

    def test_handle_request(self):
        server = tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, max_requests=1)
        with server, socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(b"once\n")
            sock.shutdown(socket.SHUT_WR)
            server.handle_request()
            self.assertEqual(read_all(sock), b"5:once\n")

    def test_handle_request_checks_the_settings_first(self):
        server = tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler, max_requests=1)
        with server, socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(b"once\n")
            sock.shutdown(socket.SHUT_WR)
            server.max_requests = 0
            with self.assertRaisesRegex(ValueError, "max_requests must be a positive int"):
                server.handle_request()
            self.assertEqual(server.stats()["accepted"], 0)  # the client still waits
            server.max_requests = 1
            server.max_per_client = 1
            server.handle_request()
            self.assertEqual(read_all(sock), b"5:once\n")

    def test_handle_request_reads_the_trusted_proxies_as_they_are(self):
        server = tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler,
                                              proxy_protocol=True, trusted_proxies=[])
        with server, socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000\r\nonce\n")
            sock.shutdown(socket.SHUT_WR)
            server.trusted_proxies = ["127.0.0.0/8"]
            server.handle_request()  # the header is read, not echoed
            self.assertEqual(read_all(sock), b"5:once\n")

    def test_another_sockets_timeout_in_a_legacy_handler_is_an_error(self):
        class Backend(socketserver.StreamRequestHandler):
            def handle(self):
                near, far = socket.socketpair()
                with near, far:
                    near.settimeout(0.01)
                    near.recv(1)  # a backend that does not answer: the handler's bug

        stderr = self.capture("stderr")
        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Backend,
                                                         timeout=TIMEOUT), debug=True)
        self.assert_reset(server)
        self.stop(server)
        self.assertIn("finished (error, %s: timed out)" % socket.timeout.__name__,
                      stderr.getvalue())
        self.assertIn("Traceback", stderr.getvalue())

    def test_the_idle_timeout_in_a_legacy_handler_costs_one_line(self):
        stderr = self.capture("stderr")
        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler,
                                                         timeout=0.05), debug=True)
        with self.connect(server) as sock:
            with self.assertRaises(ConnectionResetError):
                read_all(sock)  # silent: the server times out and resets
        self.stop(server)
        self.assertIn("finished (timed out, TimeoutError: timed out)".replace(
            "TimeoutError", socket.timeout.__name__), stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())
        self.assertEqual(server.stats()["failed"], 1)

    def http_server(self, directory, cls=ThreadingHTTPServer):
        with open(os.path.join(directory, "index.txt"), "w") as f:
            f.write("served by tcpserver\n")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
        server = self.serve(cls(("127.0.0.1", 0), handler, max_requests=4))
        self.assertEqual(server.max_requests, 4)
        self.assertEqual(server.server_port, server.server_address[1])  # HTTPServer's bind ran
        return "http://127.0.0.1:%d/" % server.server_address[1]

    def test_http_server_with_urllib(self):
        self.capture("stderr")  # the request log of http.server
        for cls in (ThreadingHTTPServer, HTTPServerStdlibFirst):
            with self.subTest(cls=cls.__name__), tempfile.TemporaryDirectory() as directory:
                url = self.http_server(directory, cls)
                with urllib.request.urlopen(url + "index.txt", timeout=TIMEOUT) as reply:
                    self.assertEqual(reply.read(), b"served by tcpserver\n")
                with self.assertRaises(urllib.error.HTTPError) as caught:
                    urllib.request.urlopen(url + "missing", timeout=TIMEOUT)
                self.assertEqual(caught.exception.code, 404)
                caught.exception.close()

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed (apt-get install curl)")
    def test_http_server_with_curl(self):
        self.capture("stderr")
        with tempfile.TemporaryDirectory() as directory:
            url = self.http_server(directory)
            result = subprocess.run(["curl", "-sS", "--max-time", "10", url + "index.txt",
                                     url + "index.txt"], capture_output=True, timeout=TIMEOUT)
            self.assertEqual(result.stdout, b"served by tcpserver\n" * 2, result.stderr)

    def test_xmlrpc_server(self):
        servers = [XMLRPCServer(("127.0.0.1", 0), logRequests=False),
                   XMLRPCServerOursFirst(("127.0.0.1", 0), xmlrpc.server.SimpleXMLRPCRequestHandler,
                                         logRequests=False, max_requests=3)]
        self.assertEqual([s.max_requests for s in servers], [8, 3])
        for server in servers:
            with self.subTest(server=type(server).__name__):
                server.register_function(pow)
                self.serve(server)
                url = "http://127.0.0.1:%d/" % server.server_address[1]
                with xmlrpc.client.ServerProxy(url) as proxy:
                    self.assertEqual([proxy.pow(2, n) for n in range(10)],
                                     [2 ** n for n in range(10)])

    def test_handler_error_resets_the_connection(self):
        class Failing(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"partial")
                raise RuntimeError("handler failed on purpose")

        self.capture("stderr")
        server = self.serve(tcpserver.ThreadingTCPServer(("127.0.0.1", 0), Failing))
        self.assert_reset(server)


class TestWebRecipes(ServerTestCase):
    """The README's recipes for http.server, HTTPS, wsgiref and xmlrpc.server,
    as written there, on loopback and port 0."""

    @classmethod
    def setUpClass(cls):
        cls.made = certificates()

    def recipe(self, marker, namespace=None):
        """Run the README's block that holds marker in namespace; return it."""
        code = readme_code(marker).replace('("", 8000)', '("127.0.0.1", 0)')
        code = code.replace('("", 8001)', '("127.0.0.1", 0)').replace('("", 8443)',
                                                                      '("127.0.0.1", 0)')
        code = code.replace('"cert.pem"', repr(self.made.cert)).replace('"key.pem"',
                                                                         repr(self.made.key))
        namespace = {} if namespace is None else namespace
        exec(code, namespace)
        return namespace

    def http_recipe(self):
        made = self.recipe("class ThreadingHTTPServer(tcpserver.ThreadingTCPServer, "
                           "http.server.HTTPServer):")
        self.addCleanup(made["httpd"].server_close)
        self.addCleanup(made["rpc"].server_close)
        return made

    def get(self, server, scheme="http"):
        """GET / from server; return the status."""
        context = ssl.create_default_context(cafile=self.made.cert) if scheme == "https" else None
        url = "%s://localhost:%d/" % (scheme, server.server_address[1])
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as reply:
            return reply.status

    def test_http_server_and_xmlrpc(self):
        log = self.capture("stderr")  # http.server's request log
        made = self.http_recipe()
        httpd, rpc = made["httpd"], made["rpc"]
        self.assertEqual((httpd.max_requests, httpd.idle_timeout), (64, 10))
        self.assertEqual((rpc.max_requests, rpc.idle_timeout), (64, 10))
        # What the timeout is for, faster: a silent client holds the one slot
        # until its idle timeout, then the next client is served.
        httpd.max_requests, httpd.idle_timeout = 1, 0.2
        self.serve(httpd)
        self.connect(httpd)
        self.assertEqual(self.get(httpd), 200)
        self.assertIn("Request timed out", log.getvalue())  # the silent one, first
        rpc.register_function(pow)
        self.serve(rpc)
        with xmlrpc.client.ServerProxy("http://127.0.0.1:%d/" % rpc.server_address[1]) as proxy:
            self.assertEqual(proxy.pow(2, 10), 1024)

    def check_https(self, httpsd):
        """A silent client holds up nobody: the next one is served at once."""
        self.addCleanup(httpsd.server_close)
        self.capture("stderr")
        self.serve(httpsd)
        silent = self.connect(httpsd)
        self.assertEqual(self.get(httpsd, "https"), 200)
        silent.close()

    def test_https_with_ssl_context(self):
        made = self.recipe("httpsd = ThreadingHTTPServer(", self.http_recipe())
        self.check_https(made["httpsd"])

    def test_https_with_https_server(self):
        if not hasattr(http.server, "HTTPSServer"):
            # The recipe cannot run here; what the README says of that holds.
            self.assertLess(sys.version_info, (3, 14))
            with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as readme:
                self.assertIn("Python 3.14 added ``http.server.HTTPSServer``", readme.read())
            return
        made = self.recipe("class ThreadingHTTPSServer(", self.http_recipe())
        self.check_https(made["httpsd"])

    def test_wsgi_application(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "hello_wsgi.py"), "w") as script:
            script.write(readme_code("server_class=ThreadingWSGIServer").replace(
                '"", 8000', '"127.0.0.1", 0'))
        app = Program(self, [sys.executable, "hello_wsgi.py"], cwd=directory,
                      ready=("stdout", r"\Aserving on port (\d+)\n"))
        with urllib.request.urlopen("http://127.0.0.1:%d/" % app.port, timeout=TIMEOUT) as reply:
            self.assertEqual(reply.read(), b"Hello from WSGI\n")
        code, log = app.stop()
        self.assertEqual(code, 0)
        self.assertIn('"GET / HTTP/1.1" 200', log)  # wsgiref's request log
        self.assertNotIn("Traceback", log)


# ---------------------------------------------------------------------------
# Real client programs
# ---------------------------------------------------------------------------

class TestRealClients(ServerTestCase):

    def greeter(self):
        return self.start(lambda: print("hello", input()))

    @unittest.skipUnless(shutil.which("nc"), "nc is not installed (apt-get install netcat-openbsd)")
    def test_nc(self):
        server = self.greeter()
        result = subprocess.run(["nc", "-N", "127.0.0.1", str(server.server_address[1])],
                                input=b"nc\n", capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout, b"hello nc\n", result.stderr)

    @unittest.skipUnless(shutil.which("socat"), "socat is not installed (apt-get install socat)")
    def test_socat(self):
        server = self.greeter()
        result = subprocess.run(["socat", "-t", "5", "-",
                                 "TCP:127.0.0.1:%d" % server.server_address[1]],
                                input=b"socat\n", capture_output=True, timeout=TIMEOUT)
        self.assertEqual(result.stdout, b"hello socat\n", result.stderr)


class TestExample(ServerTestCase):

    def test_daytime_example_serves_and_stops_on_ctrl_c(self):
        example = Program(self, [sys.executable, os.path.join(HERE, "example_daytime.py"),
                                 "0", "--debug"], ready=("stderr", r"\A.*port (\d+)"))
        with example.connect() as sock:
            line = read_all(sock).decode()
        self.assertRegex(line, r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n$")
        code, log = example.stop(signal.SIGINT)
        self.assertEqual(code, 0)
        self.assertIn("[tcp-server] request 1 from 127.0.0.1;", log)
        self.assertNotIn("Traceback", log)


class TestReadmeFirstScreen(unittest.TestCase):
    """The README's first screen, as written, from a directory that is not
    the clone (with port 0 for the README's fixed ports)."""

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.write("greet.py", readme_code("def greet():"))

    def write(self, name, code):
        with open(os.path.join(self.directory, name), "w") as script:
            script.write(code.replace("6504", "0").replace("6505", "0"))

    def start(self, name):
        """Run the script name; return (its Program, the port it says it serves, as text)."""
        script = Program(self, [sys.executable, name], cwd=self.directory,
                         ready=("stdout", r"\Aserving (?:TLS )?on port (\d+)\n"))
        return script, str(script.port)

    def shell(self, command, port, **kwargs):
        """Run one of the README's shell commands, with port for its own."""
        return subprocess.run(command.replace("6504", port).replace("6505", port),
                              shell=True, cwd=self.directory, capture_output=True,
                              timeout=TIMEOUT, **kwargs)

    def stop(self, script):
        self.assertEqual(script.stop(signal.SIGINT), (0, ""))  # Ctrl-C; no traceback

    def test_the_ten_lines_serve_and_stop_on_ctrl_c(self):
        process, port = self.start("greet.py")
        with socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT) as sock:
            self.assertEqual(exchange(sock, b"Ada\n"), b"Your name? Hello, Ada\n")
        one_liner = readme_code("python -c").strip()
        self.assertEqual(self.shell(one_liner, port).stdout, b"Your name? Hello, Ada\n")
        self.stop(process)

    def test_sigterm_lets_a_client_at_its_prompt_finish(self):
        process, port = self.start("greet.py")
        with socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT) as sock:
            self.assertEqual(read_exactly(sock, 11), b"Your name? ")
            process.process.send_signal(signal.SIGTERM)  # docker stop, systemctl stop
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:  # until it has stopped accepting
                try:
                    socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT).close()
                except (ConnectionRefusedError, ConnectionResetError):
                    break
                time.sleep(0.01)
            sock.sendall(b"Ada\n")  # the drain waits for us
            self.assertEqual(read_all(sock), b"Hello, Ada\n")
        self.assertEqual(process.wait(), (0, ""))

    @unittest.skipUnless(shutil.which("nc"), "nc is not installed (apt-get install netcat-openbsd)")
    def test_nc(self):
        process, port = self.start("greet.py")
        result = self.shell("nc localhost 6504", port, input=b"Ada\n")
        self.assertEqual(result.stdout, b"Your name? Hello, Ada\n")
        self.stop(process)

    def test_a_program_and_a_thunk_on_a_port(self):
        date, call = readme_code("--call greet.py:greet").strip().splitlines()
        for command, sent, expected in ((date, b"", rb"^\w{3} \w{3} .* \d{4}\n$"),
                                        (call, b"Ada\n", rb"^Your name\? Hello, Ada\n$")):
            with self.subTest(command=command):
                self.assertTrue(command.startswith("python -m tcpserver "))
                args = ["-1"] + command.split()[3:]
                server = CommandLine(self, [arg.replace("6504", "0") for arg in args],
                                     cwd=self.directory)
                self.assertRegex(server.talk(sent), expected)
                self.assertEqual(server.stop()[0], 0)

    @unittest.skipUnless(shutil.which("openssl"), "openssl is not installed "
                         "(apt-get install openssl)")
    def test_tls(self):
        self.shell(readme_code("openssl req").strip(), "", check=True)
        self.write("tls.py", readme_code("ssl_context=context) as server:"))
        process, port = self.start("tls.py")
        result = self.shell("openssl s_client -connect localhost:6505 -quiet", port,
                            input=b"Ada\n")
        self.assertEqual(result.stdout, b"Your name? Hello, Ada\n", result.stderr)
        self.stop(process)


@unittest.skipUnless(shutil.which("openssl"), "openssl is not installed (apt-get install openssl)")
class TestClientCertificateRecipe(unittest.TestCase):
    """The README's CA and client certificate, as its lines make them."""

    def test_openssl_lines_and_s_client(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)

        def shell(command, **kwargs):
            return subprocess.run(command, shell=True, cwd=directory, capture_output=True,
                                  timeout=TIMEOUT, **kwargs)

        for line in [readme_code("openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem")]\
                + readme_code("-keyout ca.key").strip().splitlines():
            result = shell(line)
            self.assertEqual(result.returncode, 0, (line, result.stderr))
        serve, connect = readme_code("--tls-ca ca.pem").strip().splitlines()
        args = serve.split()[3:]
        self.assertEqual(args[-4:-2], ["127.0.0.1", "6506"])
        args[-3] = "0"
        server = CommandLine(self, ["-1"] + args, cwd=directory)
        connect = connect.replace("6506", str(server.port))
        self.assertEqual(shell(connect, input=b"").stdout, b"hello\n")
        refused = shell(connect.replace(" -cert alice.pem -key alice.key", ""), input=b"")
        self.assertNotIn(b"hello", refused.stdout)
        self.assertEqual(server.stop()[0], 0)


class TestExampleErrors(unittest.TestCase):

    def test_port_in_use_is_one_line_and_exit_1(self):
        with tcpserver.tcp_listen(0) as taken:
            port = taken.getsockname()[1]
            result = run_python([os.path.join(HERE, "example_daytime.py"), str(port)])
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr.decode(), r"^cannot listen on port %d: .*in use.*\n$" % port)


class TestHelpers(unittest.TestCase):

    def test_exchange_with_a_peer_that_reset_first(self):
        # A server that refuses a client may reset it before the client has
        # sent or ended its side: the client's answer is then b"".
        with socket.create_server(("127.0.0.1", 0)) as listener:
            for data in (b"", b"hello"):
                with self.subTest(data=data), \
                        socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
                    reset(listener.accept()[0])
                    self.assertTrue(select.select([sock], [], [], TIMEOUT)[0])
                    self.assertEqual(exchange(sock, data), b"")

    def test_exchange_raises_a_reset_that_does_not_come_first(self):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
                conn = listener.accept()[0]
                conn.sendall(b"partial")
                # Reset once the client has ended its side: a truncated answer.
                closer = threading.Thread(target=lambda: (conn.recv(1), reset(conn)))
                closer.start()
                try:
                    with self.assertRaises(ConnectionResetError):
                        exchange(sock, b"")
                finally:
                    closer.join(TIMEOUT)


class TestModule(unittest.TestCase):

    def test_all(self):
        defined = {name for name, value in vars(tcpserver).items()
                   if not name.startswith("_")
                   and getattr(value, "__module__", None) == "tcpserver"}
        constants = {name for name in vars(tcpserver) if name.startswith("DEFAULT_")}
        self.assertEqual(set(tcpserver.__all__), defined | constants)

    def test_every_public_name_is_in_the_readme(self):
        with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as readme:
            text = readme.read()
        missing = [name for name in tcpserver.__all__ if name not in text]
        self.assertEqual(missing, [], "public names missing from README.rst")

    def test_version(self):
        self.assertRegex(tcpserver.__version__, r"^\d+\.\d+\.\d+$")

    def test_the_command_line_uses_only_the_librarys_public_names(self):
        with open(tcpserver.__file__, encoding="utf-8") as module:
            source = module.read()
        banner = source.index("# The command line: python -m tcpserver")
        library, command = source[:banner], source[banner:]
        private = {node.name for node in ast.parse(library).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        private |= {target.id for node in ast.parse(library).body
                    if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in getattr(node, "targets", [getattr(node, "target", None)])
                    if isinstance(target, ast.Name)}
        private = {name for name in private
                   if name.startswith("_") and not name.endswith("__")}
        used = {node.id for node in ast.walk(ast.parse(command)) if isinstance(node, ast.Name)}
        self.assertEqual(sorted(private & used), [])

    def test_the_library_serves_without_the_command_line(self):
        # Who vendors the file may cut it at the command line's banner.
        with open(tcpserver.__file__, encoding="utf-8") as module:
            source = module.read()
        library = source[:source.index("# The command line: python -m tcpserver")]
        vendored = types.ModuleType("vendored")
        exec(compile(library, "vendored.py", "exec"), vars(vendored))
        self.assertEqual(set(vendored.__all__), set(tcpserver.__all__) - {"main"})
        for name in vendored.__all__:
            self.assertTrue(hasattr(vendored, name), name)
        server = vendored.make_tcp_server(("127.0.0.1", 0), lambda: print("hi", input()))
        thread = threading.Thread(target=server, kwargs={"poll_interval": 0.01})
        thread.start()
        try:
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as sock:
                self.assertEqual(exchange(sock, b"you\n"), b"hi you\n")
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
            server.server_close()



# ---------------------------------------------------------------------------
# The PROXY protocol
# ---------------------------------------------------------------------------

V2 = b"\r\n\r\n\x00\r\nQUIT\n"  # the version 2 signature


def proxy_v2(command=1, family=0x11, addresses=b"", tlvs=b""):
    """A version 2 header, built field by field as the specification lays it out."""
    body = addresses + tlvs
    return V2 + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class TestProxyHeader(unittest.TestCase):
    """read_proxy_header() on the bytes of the specification's examples."""

    def read(self, data, then=b"rest"):
        """Feed data + then through a socket pair; return (result, what stayed unread)."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.settimeout(TIMEOUT)
            theirs.sendall(data + then)
            theirs.shutdown(socket.SHUT_WR)
            result = tcpserver.read_proxy_header(ours)
            return result, read_all(ours)

    def test_version_1(self):
        cases = [
            (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
             (("192.168.0.11", 443), ("192.168.0.1", 56324))),
            (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
             b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
             (("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
              ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))),
            (b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n", (("::1", 0), ("2001:db8::1", 1))),
            (b"PROXY UNKNOWN\r\n", None),
            (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
             b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n", None),  # 107 bytes
        ]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertEqual(self.read(header), (expected, b"rest"))

    def test_version_2(self):
        ipv4 = socket.inet_aton("192.168.0.1") + socket.inet_aton("192.168.0.11") \
            + struct.pack("!HH", 56324, 443)
        ipv6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1") \
            + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 1, 2)
        cases = [
            (proxy_v2(addresses=ipv4), (("192.168.0.11", 443), ("192.168.0.1", 56324))),
            (proxy_v2(addresses=ipv4, tlvs=b"\x01\x00\x02h2"),  # ALPN TLV: skipped
             (("192.168.0.11", 443), ("192.168.0.1", 56324))),
            (proxy_v2(family=0x21, addresses=ipv6), (("::1", 2), ("2001:db8::1", 1))),
            (proxy_v2(command=0, family=0), None),         # LOCAL: a health check
            (proxy_v2(command=0, addresses=ipv4), None),   # LOCAL with addresses: ignored
            (proxy_v2(family=0), None),                    # UNSPEC: ours stand
            (proxy_v2(family=0x12, addresses=ipv4), None),  # UDP: not ours to use
            (proxy_v2(addresses=ipv4, tlvs=b"\x04" + struct.pack("!H", 2000) + bytes(2000)),
             (("192.168.0.11", 443), ("192.168.0.1", 56324))),  # a large TLV
        ]
        for header, expected in cases:
            with self.subTest(header=header):
                self.assertEqual(self.read(header), (expected, b"rest"))

    def test_ipv4_mapped_sources_are_plain_ipv4(self):
        # HAProxy bound to ":::PORT v4v6" sends its IPv4 clients this way.
        mapped = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.7") \
            + socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1") + struct.pack("!HH", 1, 2)
        expected = (("192.0.2.1", 2), ("192.0.2.7", 1))
        for header in (b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:192.0.2.1 1 2\r\n",
                       b"PROXY TCP6 ::ffff:c000:207 ::FFFF:C000:201 1 2\r\n",
                       proxy_v2(family=0x21, addresses=mapped)):
            with self.subTest(header=header):
                self.assertEqual(self.read(header), (expected, b"rest"))

    def test_bad_headers(self):
        ipv4 = bytes(12)
        cases = [
            (b"GET / HTTP/1.0\r\n\r\n", "no PROXY protocol header"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "cut short"),             # no CRLF, then EOF
            (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "longer than 107"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "malformed"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),
            (V2 + b"\x31\x11\x00\x0c" + ipv4, "version 3"),
            (V2 + b"\x22\x11\x00\x0c" + ipv4, "command 2"),
            (V2 + b"\x21\x11\x00\x04" + ipv4[:4], "cut short"),
            (V2 + b"\x21\x11\x40\x01", "too long"),
            (V2 + b"\x21\x11\x00\x0c" + ipv4[:5], "cut short after 5"),
            (V2[:7], "cut short after 7"),
        ]
        for header, message in cases:
            with self.subTest(header=header):
                with self.assertRaises(tcpserver.ProxyHeaderError) as caught:
                    self.read(header, then=b"")
                self.assertIn(message, str(caught.exception))
                self.assertIsInstance(caught.exception, OSError)

    def test_a_silent_balancer_times_out(self):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.settimeout(0.1)
            theirs.sendall(b"PROXY TCP4 1.2.3.4")
            with self.assertRaises(socket.timeout):
                tcpserver.read_proxy_header(ours)

    def test_the_timeout_bounds_the_whole_header(self):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            stop = threading.Event()

            def trickle():  # a byte every 50 ms: no single read waits long
                for byte in b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n":
                    if stop.wait(0.05):
                        return
                    theirs.sendall(bytes([byte]))

            thread = threading.Thread(target=trickle)
            thread.start()
            began = time.monotonic()
            try:
                with self.assertRaises(socket.timeout):
                    tcpserver.read_proxy_header(ours, timeout=0.15)
            finally:
                stop.set()
                thread.join(TIMEOUT)
            self.assertLess(time.monotonic() - began, 1.0)


class TestProxyProtocol(ServerTestCase):

    def start_proxied(self, thunk=None, debug=False, **settings):
        def show_addresses():
            handler = tcpserver.current_connection()
            print(handler.client_address[:2], handler.local_address[:2], input())

        server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk or show_addresses,
                                           proxy_protocol=True, **settings)
        return self.serve(server, debug)

    def test_the_thunk_and_the_diagnostics_see_the_real_client(self):
        stderr = self.capture("stderr")
        server = self.start_proxied(debug=True)
        reply = self.talk(server, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 6504\r\nhi\n")
        self.assertEqual(reply, b"('203.0.113.7', 40000) ('192.0.2.1', 6504) hi\n")
        reply = self.talk(server, proxy_v2(command=0, family=0) + b"check\n")
        self.assertRegex(reply, rb"^\('127\.0\.0\.1', \d+\) \('127\.0\.0\.1', \d+\) check\n$")
        self.stop(server)
        self.assertIn("request 1 from 203.0.113.7;", stderr.getvalue())
        self.assertEqual(server.stats()["completed"], 2)

    def test_an_ipv4_mapped_source_is_the_ipv4_client(self):
        seen = []
        server = self.start_proxied(
            lambda: seen.append(tcpserver.current_connection().client_address))
        self.talk(server, b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:192.0.2.1 40000 6504\r\n")
        self.assertEqual(seen, [("192.0.2.7", 40000)])

    def test_bad_headers_close_that_connection_only(self):
        stderr = self.capture("stderr")
        server = self.start_proxied(debug=True)
        server.handshake_timeout = 0.1
        self.assertEqual(self.talk(server, b"GET / HTTP/1.0\r\n\r\n"), b"")
        with self.connect(server) as silent:
            began = time.monotonic()
            silent.sendall(b"PROXY ")
            self.assertEqual(read_all(silent), b"")  # closed after handshake_timeout
            self.assertLess(time.monotonic() - began, 5)
        reply = self.talk(server, b"PROXY TCP4 198.51.100.2 192.0.2.1 1 2\r\nok\n")
        self.assertEqual(reply, b"('198.51.100.2', 1) ('192.0.2.1', 2) ok\n")
        self.stop(server)
        log = stderr.getvalue()
        self.assertIn("tcpserver-1 (with 127.0.0.1) finished (setup failed, ProxyHeaderError: "
                      "no PROXY protocol header", log)
        self.assertRegex(log, r"tcpserver-2 \(with 127\.0\.0\.1\) finished \(setup failed, "
                              r"(timeout|TimeoutError): timed out\)")
        self.assertNotIn("Traceback", log)
        self.assertEqual(server.stats()["failed"], 2)

    def test_untrusted_sources_cannot_claim_an_address(self):
        server = self.start_proxied(trusted_proxies=["10.0.0.0/8"])
        reply = self.talk(server, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 6504\r\n")
        self.assertRegex(reply, rb"^\('127\.0\.0\.1', \d+\) \('127\.0\.0\.1', \d+\) "
                                rb"PROXY TCP4 203\.0\.113\.7 192\.0\.2\.1 40000 6504\n$")

    def test_keywords_win_over_the_class(self):
        class ProxiedServer(tcpserver.ThreadingTCPServer):
            proxy_protocol = True

        server = self.serve(ProxiedServer(("127.0.0.1", 0), tcpserver.ThunkHandler,
                                          thunk=lambda: print("plain"), proxy_protocol=False))
        self.assertEqual(self.talk(server), b"plain\n")  # no header needed

    def test_bad_settings(self):
        for value, error in (("10.0.0.0/8", TypeError), (["10.0.0.0/33"], ValueError),
                             (None, TypeError)):
            with self.subTest(value=value), self.assertRaises(error):
                tcpserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler,
                                             bind_and_activate=False, trusted_proxies=value)

    @unittest.skipUnless(shutil.which("openssl"), "openssl is not installed "
                         "(apt-get install openssl)")
    def test_header_then_tls(self):
        cert, key = certificates().cert, certificates().key
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = self.start_proxied(ssl_context=context)
        with socket.create_connection(self.address(server), timeout=TIMEOUT) as raw:
            raw.sendall(b"PROXY TCP6 2001:db8::5 2001:db8::1 5000 993\r\n")
            client = ssl.create_default_context(cafile=cert)
            with client.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"secret\n")
                self.assertEqual(read_all(sock),
                                 b"('2001:db8::5', 5000) ('2001:db8::1', 993) secret\n")


# ---------------------------------------------------------------------------
# The command line: python -m tcpserver
# ---------------------------------------------------------------------------

UCSPI = "/usr/bin/tcpserver"  # ucspi-tcp's, from the Debian package


class CommandLine(Program):
    """A tcpserver command (ours, or ucspi-tcp's) run with -1 on port 0."""

    def __init__(self, test, args, command=None, env=None, cwd=HERE,
                 ready=("stdout", r"\A(\d+)\n"), keep=1000):
        super().__init__(test, (command or [sys.executable, "-m", "tcpserver"]) + args,
                         env=env, cwd=cwd, ready=ready, keep=keep)


def call_main(args):
    """Call tcpserver.main(args) in this process; return (exit code, stdout, stderr).

    For command lines that end before serving, without the start of an
    interpreter.  tcp_listen() may fail as it does, but if it succeeds
    its socket is closed and AssertionError raised: a command line that
    would serve (until a signal) fails the test instead of hanging it.
    """
    real_tcp_listen = tcpserver.tcp_listen

    def tcp_listen(*listen_args, **kwargs):
        real_tcp_listen(*listen_args, **kwargs).close()
        raise AssertionError("main(%r) listened" % (args,))

    stdout, stderr = io.StringIO(), io.StringIO()
    with unittest.mock.patch.object(tcpserver, "tcp_listen", tcp_listen), \
            unittest.mock.patch.object(sys, "stdout", stdout), \
            unittest.mock.patch.object(sys, "stderr", stderr):
        code = tcpserver.main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def assert_usage_error(test, args, message=""):
    """Assert that main(args) exits 100 with one usage line, before it
    listens, and that the line holds message; return the line."""
    code, stdout, stderr = call_main(args)
    test.assertEqual((code, stdout), (100, ""), stderr)
    test.assertRegex(stderr, r"^tcpserver: usage error: [^\n]+\n$")
    test.assertIn(message, stderr)
    return stderr


def pid_gone(pid):
    """True if no process pid exists (it was reaped), waiting up to TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def normalise_log(text):
    """ucspi-tcp -v lines with the numbers that change from run to run made X."""
    text = re.sub(r"\b(pid|ok|end|deny) \d+", r"\1 X", text)
    return re.sub(r":\d{4,5}\b", ":X", text)


class TestCommandLine(unittest.TestCase):

    def test_cat_talks_to_the_client_and_sigterm_exits_0(self):
        server = CommandLine(self, ["-1", "127.0.0.1", "0", "cat"])
        self.assertEqual(server.talk(b"hello\nworld\n"), b"hello\nworld\n")
        self.assertEqual(server.stop(), (0, ""))

    def test_environment(self):
        server = CommandLine(self, ["-1", "-HRl0", "127.0.0.1", "0", "env"],
                             env={"TCPREMOTEHOST": "inherited", "KEEP": "me"})
        with server.connect() as sock:
            client_port = sock.getsockname()[1]
            sock.shutdown(socket.SHUT_WR)
            lines = read_all(sock).decode().splitlines()
        variables = dict(line.split("=", 1) for line in lines if "=" in line)
        tcp = {name: value for name, value in variables.items()
               if name.startswith("TCP") or name == "PROTO"}
        self.assertEqual(tcp, {"PROTO": "TCP", "TCPLOCALIP": "127.0.0.1",
                               "TCPLOCALPORT": str(server.port), "TCPLOCALHOST": "0",
                               "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": str(client_port)})
        self.assertEqual(variables["KEEP"], "me")
        self.assertEqual(server.stop()[0], 0)

    def test_remote_host_lookup(self):
        name = socket.gethostbyaddr("127.0.0.1")[0]
        server = CommandLine(self, ["-1", "-h", "-p", "-l", "here", "127.0.0.1", "0",
                                    "sh", "-c", "echo $TCPREMOTEHOST $TCPLOCALHOST"])
        self.assertEqual(server.talk(), ("%s here\n" % name).encode())
        self.assertEqual(server.stop()[0], 0)

    def test_verbose_lines_and_the_raw_wait_status(self):
        server = CommandLine(self, ["-v1HRl0", "-c", "3", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exit 3"])
        with server.connect() as sock:
            client_port = sock.getsockname()[1]
            pid = int(read_all(sock))
        code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertEqual(log, "tcpserver: status: 0/3\n"
                              "tcpserver: status: 1/3\n"
                              "tcpserver: pid %d from 127.0.0.1\n"
                              "tcpserver: ok %d 0:127.0.0.1:%d :127.0.0.1::%d\n"
                              "tcpserver: end %d status 768\n"
                              "tcpserver: status: 0/3\n"
                              % (pid, pid, server.port, client_port, pid))
        self.assertTrue(pid_gone(pid))  # reaped: no zombie left

    @unittest.skipUnless(os.access(UCSPI, os.X_OK), "ucspi-tcp is not installed "
                         "(apt-get install ucspi-tcp)")
    def test_same_as_ucspi_tcp(self):
        for program in (["cat"], ["env"], ["date", "+%Y"], ["sh", "-c", "exit 3"]):
            results = []
            for command in ([UCSPI], None):
                server = CommandLine(self, ["-v", "-1", "-HRl0", "-B", "hi\n", "127.0.0.1",
                                            "0"] + program, command=command, env={"X": "1"})
                reply = server.talk(b"a line\n" if program == ["cat"] else b"").decode()
                # ucspi-tcp may see SIGTERM before its child's end otherwise
                server.wait_for(r"end \d+ status \d+\ntcpserver: status: 0/40\n")
                reply = "".join(sorted(line + "\n" for line in reply.splitlines()
                                       if not line.startswith(("_=", "SHLVL=", "PWD="))))
                code, log = server.stop()
                results.append((re.sub(r"=\d{4,5}\n", "=X\n", reply), code, normalise_log(log)))
            with self.subTest(program=program):
                self.assertEqual(results[1], results[0])

    @unittest.skipUnless(shutil.which("tcprules"), "tcprules is not installed "
                         "(apt-get install ucspi-tcp)")
    @unittest.skipUnless(shutil.which("unixserver"),
                         "ucspi-unix is not installed (apt-get install ucspi-unix)")
    def test_same_as_ucspi_unix(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        script = os.path.join(directory, "show")
        with open(script, "w") as file:
            file.write("#!/bin/sh\necho $PROTO $UNIXLOCALPATH $UNIXREMOTEEUID $UNIXREMOTEEGID "
                       "$UNIXREMOTEPID\nexit 3\n")
        os.chmod(script, 0o755)
        seen = {}
        # Debian's unixserver writes its -v lines on stdout (ours, on
        # stderr), through a buffer a fork copies: line-buffered, or a line
        # comes twice.
        for name, command, stream in (
                ("unixserver", ["stdbuf", "-oL", "unixserver", "-v", "-c", "10"], "stdout"),
                ("tcpserver", [sys.executable, "-m", "tcpserver", "-v", "-c", "10", "--unix"],
                 "stderr")):
            path = os.path.join(directory, name + ".sock")
            server = Program(self, command + [path, script], ready=(stream, r"status: 0/10\n"))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(path)
                reply = read_all(sock).decode()
            server.wait_for(r"status: 0/10\n(.|\n)*status: 0/10\n", stream)  # its end
            log = server.text(stream)  # what stopping may add is not compared
            # Debian sid's unixserver writes its pid line twice, at times.
            log = re.sub(r"^(unixserver: pid \d+\n)\1", r"\1", log, flags=re.M)
            server.stop()
            self.assertFalse(os.path.exists(path), name)  # removed at exit
            seen[name] = (reply.replace(path, "PATH"),
                          re.sub(r"^\w+: ", "", re.sub(r"\b(pid|end) \d+", r"\1 X", log),
                                 flags=re.M))
        self.assertEqual(seen["tcpserver"], seen["unixserver"])
        self.assertEqual(seen["tcpserver"][0], "UNIX PATH %d %d %d\n"
                         % (os.getuid(), os.getgid(), os.getpid()))

    def test_workers_say_which_they_are_and_sigusr1_adds_them_up(self):
        server = CommandLine(self, ["-1", "-v", "-w", "2", "127.0.0.1", "0", "echo", "hi"])
        for _ in range(4):
            self.assertEqual(server.talk(), b"hi\n")
        server.wait_for(r"(end \d+ status 0\n(.|\n)*){4}")  # each connection's end
        lines = server.text().splitlines()
        self.assertEqual(lines[0], "tcpserver: status: 0/40")  # the supervisor's
        workers = {int(re.match(r"tcpserver\[(\d+)\]: ", line).group(1)) for line in lines[1:]}
        self.assertLessEqual(len(workers), 2)  # the rest, each a worker's, by pid
        server.process.send_signal(signal.SIGUSR1)
        found = server.wait_for(r"tcpserver: stats: accepted \d+, active \d+, completed \d+, "
                                r"failed 0, peak_active \d+, refused 0; worker \d+: .*; "
                                r"worker \d+: .*\n")
        self.assertNotIn("warning", found.group(0))
        self.assertEqual(server.stop()[0], 0)

    def test_unix_with_workers_and_usage_errors(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "w.sock")
        server = CommandLine(self, ["-v", "-w", "2", "--unix", path, "sh", "-c", "echo $PROTO"],
                             ready=None)
        server.wait_for(r"status: 0/40\n")
        for _ in range(4):  # whichever worker serves it, the file stays
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(path)
                self.assertEqual(read_all(sock), b"UNIX\n")
        self.assertEqual(server.stop()[0], 0)
        self.assertFalse(os.path.exists(path))  # the supervisor's to remove, at its end
        assert_usage_error(self, ["--unix", path, "-x", "rules.cdb", "cat"], "need TCP")
        assert_usage_error(self, ["--unix", path, "--inherit", "cat"], "go separately")

    def test_tcprules_allow_deny_and_environment(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        rules = os.path.join(directory, "rules.cdb")

        def compile_rules(text):
            subprocess.run(["tcprules", rules, rules + ".tmp"], input=text.encode(),
                           check=True, timeout=TIMEOUT)

        compile_rules("127.0.0.1:allow,GREETING=\"hello there\"\n:deny\n")
        server = CommandLine(self, ["-v1HRl0", "-x", rules, "127.0.0.1", "0",
                                    "sh", "-c", "echo $GREETING$A"])
        self.assertEqual(server.talk(), b"hello there\n")
        compile_rules("127.0.0.2:allow\n127.0.:deny\n:allow\n")  # read again per connection
        self.assertEqual(server.talk(), b"")
        compile_rules("10.:deny\n127.:allow,A=/b/\n")
        self.assertEqual(server.talk(), b"b\n")
        os.remove(rules)
        self.assertEqual(server.talk(), b"")  # no rules file: no service
        code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertEqual(len(re.findall(r"^tcpserver: deny \d+ 0:127\.0\.0\.1:\d+ "
                                        r":127\.0\.0\.1::\d+$", log, re.M)), 2)
        self.assertIn("end", log)
        self.assertRegex(log, r"warning: unable to read .*rules\.cdb")

    def test_missing_rules_allowed_with_capital_x(self):
        server = CommandLine(self, ["-1", "-X", "-x", "/nonexistent/rules.cdb",
                                    "127.0.0.1", "0", "echo", "served"])
        self.assertEqual(server.talk(), b"served\n")
        self.assertEqual(server.stop(), (0, ""))

    def test_concurrency_limit_and_banner(self):
        server = CommandLine(self, ["-1", "-c", "1", "-B", "welcome\n", "127.0.0.1", "0",
                                    "sh", "-c", "read line; echo got $line"])
        first = server.connect()
        self.addCleanup(first.close)
        self.assertEqual(read_exactly(first, 8), b"welcome\n")
        with server.connect() as second:
            second.settimeout(0.3)
            with self.assertRaises(socket.timeout):  # waits: the one slot is busy
                second.recv(1)
            first.sendall(b"one\n")
            self.assertEqual(read_all(first), b"got one\n")
            second.settimeout(TIMEOUT)
            second.sendall(b"two\n")
            self.assertEqual(read_all(second), b"welcome\ngot two\n")
        self.assertEqual(server.stop()[0], 0)

    def test_banner_bytes_go_out_as_given(self):
        banner = b"caf\xe9 ready\r\n"  # Latin-1, not UTF-8: ucspi-tcp sends the bytes
        commands = [None] + ([[UCSPI]] if os.access(UCSPI, os.X_OK) else [])
        for command in commands:
            with self.subTest(command=command):
                server = CommandLine(self, ["-1", "-B", banner, "127.0.0.1", "0",
                                            "echo", "served"], command=command)
                self.assertEqual(server.talk(), banner + b"served\n")
                server.stop()

    def test_call_a_thunk(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "greeter.py"), "w") as module:
            module.write("import socket, tcpserver\n"
                         "def greet():\n"
                         "    connection = tcpserver.current_connection().connection\n"
                         "    nodelay = connection.getsockopt(socket.IPPROTO_TCP,"
                         " socket.TCP_NODELAY)\n"
                         "    print('hello', input(), bool(nodelay))\n")
        for option, nodelay in (("-D", b"True"), ("-d", b"False")):
            server = CommandLine(self, ["-1", option, "127.0.0.1", "0", "--call", "greeter:greet"],
                                 env={"PYTHONPATH": os.pathsep.join([directory, HERE])})
            self.assertEqual(server.talk(b"you\n"), b"hello you " + nodelay + b"\n")
            self.assertEqual(server.stop(), (0, ""))

    def test_call_a_file_from_another_directory(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "words.py"), "w") as module:
            module.write("GREETING = 'hello'\n")
        with open(os.path.join(directory, "greet.py"), "w") as script:
            script.write("import sys, words\n"
                         "def greet():\n"
                         "    print(words.GREETING, input(), __name__)\n"
                         "if __name__ == '__main__':\n"
                         "    sys.exit('run as a script')\n")
        elsewhere = tempfile.mkdtemp()  # neither the clone nor the file's
        self.addCleanup(shutil.rmtree, elsewhere)
        server = CommandLine(self, ["-1", "127.0.0.1", "0", "--call",
                                    os.path.join(directory, "greet.py") + ":greet"],
                             cwd=elsewhere)
        self.assertEqual(server.talk(b"you\n"), b"hello you greet\n")
        self.assertEqual(server.stop(), (0, ""))

    def test_call_errors_are_usage_errors(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.addCleanup(setattr, sys, "path", list(sys.path))
        with open(os.path.join(directory, "broken.py"), "w") as script:
            script.write("def thunk(:\n")
        with open(os.path.join(directory, "fine.py"), "w") as script:
            script.write("NOT_A_FUNCTION = 1\n")
        missing = os.path.join(directory, "missing.py")
        for target, message in (
                (missing + ":f", "cannot load %s: FileNotFoundError: no such file" % missing),
                (os.path.join(directory, "broken.py:thunk"), "SyntaxError"),
                (os.path.join(directory, "fine.py:NOT_A_FUNCTION"), "has no function"),
                ("no_such_module:f", "cannot load no_such_module: ModuleNotFoundError"),
                ("nocolon", "--call needs FILE.py:FUNCTION or MODULE:FUNCTION")):
            with self.subTest(target=target):
                assert_usage_error(self, ["127.0.0.1", "0", "--call", target], message)
        self.assertNotIn("broken", sys.modules)

    def test_what_needs_posix_is_one_usage_line_elsewhere(self):
        for args, message in ((["127.0.0.1", "0", "cat"], "PROGRAM needs a POSIX system"),
                              (["-w", "2", "127.0.0.1", "0", "--call", "m:f"], "-w needs"),
                              (["-u", "1", "127.0.0.1", "0", "--call", "m:f"],
                               "-u, -g and -U need")):
            with self.subTest(args=args), \
                    unittest.mock.patch.object(tcpserver, "_POSIX_COMMAND", False):
                line = assert_usage_error(self, args, message)
                self.assertIn("--call FILE.py:FUNCTION", line)

    def test_the_help_examples_work_from_another_directory(self):
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, elsewhere)
        examples = call_main(["--help"])[1].split("examples:\n")[1]
        echo, call = [line.strip() for line in examples.splitlines() if "hello" in line]
        subprocess.run(echo, shell=True, cwd=elsewhere, check=True, timeout=TIMEOUT)
        self.assertEqual(call, "python -m tcpserver -1 127.0.0.1 0 --call hello.py:hello")
        server = CommandLine(self, call.split()[3:], cwd=elsewhere)
        self.assertEqual(server.talk(b"you\n"), b"name? hello, you\n")
        self.assertEqual(server.stop(), (0, ""))

    def test_drain_then_exit_0(self):
        server = CommandLine(self, ["-1", "-B", "ready\n", "127.0.0.1", "0",
                                    "sh", "-c", "read line; echo $line"])
        with server.connect() as sock:
            self.assertEqual(read_exactly(sock, 6), b"ready\n")  # it runs
            server.process.send_signal(signal.SIGTERM)
            sock.sendall(b"still served\n")
            self.assertEqual(read_all(sock), b"still served\n")
        self.assertEqual(server.process.wait(TIMEOUT), 0)
        with self.assertRaises(ConnectionRefusedError):
            server.connect()

    def test_a_program_that_outlives_the_drain_is_killed(self):
        server = CommandLine(self, ["-v1", "--drain", "0.1", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exec sleep 60"])
        with server.connect() as sock:
            pid = int(sock.makefile().readline())
            began = time.monotonic()
            code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - began, 5)
        self.assertTrue(pid_gone(pid))
        self.assertIn("warning: killing sh (pid %d)" % pid, log)
        self.assertIn("end %d status 15\n" % pid, log)  # SIGTERM was enough

    def test_a_second_signal_stops_at_once(self):
        server = CommandLine(self, ["-1", "--drain", "60", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exec sleep 60"])
        with server.connect() as sock:
            pid = int(sock.makefile().readline())
            began = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            self.wait_until_refused(server)
            server.process.send_signal(signal.SIGINT)
            self.assertEqual(server.process.wait(TIMEOUT), 0)
        self.assertLess(time.monotonic() - began, 5)
        self.assertTrue(pid_gone(pid))

    def test_stop_now_ends_a_program_just_starting(self):
        # The second signal's stop_now() comes while a PROGRAM is starting:
        # it waits for it, and ends it with the others.
        options = tcpserver._parse_command_line(["127.0.0.1", "0", "sleep", "60"])
        server = tcpserver._CommandServer(("127.0.0.1", 0), tcpserver._ProgramHandler,
                                          options=options, bind_and_activate=False)
        self.addCleanup(server.server_close)
        real_popen, started, children = subprocess.Popen, threading.Event(), []

        def slow_popen(*args, **kwargs):
            child = real_popen(*args, **kwargs)
            started.set()
            time.sleep(0.1)  # widens the gap between a start and its note
            return child

        with unittest.mock.patch.object(subprocess, "Popen", slow_popen), \
                unittest.mock.patch.object(sys, "stderr", io.StringIO()):
            spawner = threading.Thread(target=lambda: children.append(
                server.spawn(["sleep", "60"], start_new_session=True)))
            spawner.start()
            self.assertTrue(started.wait(TIMEOUT))
            server.stop_now()
            spawner.join(TIMEOUT)
            self.assertEqual(len(children), 1)
            self.assertEqual(children[0].wait(TIMEOUT), -signal.SIGKILL)
            with self.assertRaisesRegex(RuntimeError, "stopping at once"):
                server.spawn(["true"])
            server.server_close()
            self.assertEqual(sys.stderr.getvalue(), "")  # nothing left to end

    def test_a_second_signal_ends_even_a_thunk_that_never_returns(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "sleeper.py"), "w") as module:
            module.write("import time\ndef nap():\n    print('napping', flush=True)\n"
                         "    time.sleep(60)\n")
        env = {"PYTHONPATH": os.pathsep.join([directory, HERE])}
        for signals, drain in (([signal.SIGTERM, signal.SIGTERM], "60"),
                               ([signal.SIGTERM], "0.1")):
            with self.subTest(signals=len(signals)):
                server = CommandLine(self, ["-1", "--drain", drain, "127.0.0.1", "0",
                                            "--call", "sleeper:nap"], env=env)
                with server.connect() as sock:
                    self.assertEqual(sock.makefile("rb").readline(), b"napping\n")
                    began = time.monotonic()
                    server.process.send_signal(signals[0])
                    if len(signals) > 1:
                        self.wait_until_refused(server)  # the first one was handled
                        server.process.send_signal(signals[1])
                    self.assertEqual(server.process.wait(TIMEOUT), 0)
                    self.assertLess(time.monotonic() - began, 6)
                self.assertIn("warning:", server.stop()[1])

    def wait_until_refused(self, server):
        """Wait until the server has closed its listening socket (bounded)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                server.connect().close()
            except (ConnectionRefusedError, ConnectionResetError):
                return  # reset: the listener closed with our connection in its queue
            self.assertLess(time.monotonic(), deadline, "still accepting")
            time.sleep(0.02)

    def test_idle_timeout_ends_a_program_that_ignores_its_pipes(self):
        server = CommandLine(self, ["-v1", "--timeout", "0.2", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exec sleep 60"])
        with server.connect() as sock:
            pid = int(sock.makefile().readline())
            began = time.monotonic()
            with self.assertRaises(ConnectionResetError):
                read_all(sock)
            self.assertLess(time.monotonic() - began, 5)
        server.wait_for(r"end %d status 15\n" % pid)  # SIGTERM ended it
        self.assertTrue(pid_gone(pid))
        self.assertEqual(server.stop()[0], 0)

    def test_idle_timeout_ends_a_program_that_closed_its_output(self):
        server = CommandLine(self, ["-v1", "-c", "1", "--timeout", "0.2", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exec >&-; exec sleep 30"])
        pids = []
        for _ in range(2):  # the second is served only once the first frees the slot
            with server.connect() as sock, sock.makefile("rb") as lines:
                pids.append(int(lines.readline()))
                with self.assertRaises(ConnectionResetError):
                    read_all(sock)  # we stay silent: the server gives up
        for pid in pids:
            server.wait_for(r"end %d status 15\n" % pid)
        self.assertEqual(server.stop()[0], 0)

    def test_a_program_that_closed_its_output_still_gets_all_the_input(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        payload = os.urandom(2 * 1024 * 1024)
        for mode, options in (("socket", []), ("piped", ["--timeout", "5"])):
            with self.subTest(mode=mode):
                path = os.path.join(directory, mode)
                server = CommandLine(self, ["-1v"] + options + ["127.0.0.1", "0",
                                                                "sh", "-c", 'exec cat >"$0"', path])
                with server.connect() as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    self.assertEqual(read_all(sock), b"")  # an orderly end, no reset
                server.wait_for(r"end \d+ status 0\n")
                with open(path, "rb") as file:
                    received = file.read()
                self.assertEqual(len(received), len(payload))
                self.assertTrue(received == payload)
                self.assertEqual(server.stop()[0], 0)

    def test_no_connection_outlives_the_server(self):
        # sh waits for sleep, which holds the connection too: when the server
        # stops, it must end both, or the client stays connected to nothing.
        for options, signals in ((["--drain", "0.1"], [signal.SIGTERM]),
                                 (["--drain", "60"], [signal.SIGTERM, signal.SIGTERM]),
                                 (["--drain", "0.1", "-w", "2"], [signal.SIGTERM])):
            with self.subTest(options=options, signals=len(signals)):
                server = CommandLine(self, ["-1"] + options + ["127.0.0.1", "0",
                                                               "sh", "-c",
                                                               "echo up $$; sleep 20; :"])
                with server.connect() as sock:
                    with sock.makefile("rb") as lines:
                        group = int(lines.readline().split()[1])  # sh leads its group
                    self.addCleanup(self.kill_group, group)
                    server.process.send_signal(signals[0])
                    if len(signals) > 1:
                        self.wait_until_refused(server)  # the first one was handled
                        server.process.send_signal(signals[1])
                    self.assertEqual(server.process.wait(TIMEOUT), 0)
                    sock.settimeout(2)  # the server is gone: so must the connection be
                    try:
                        self.assertEqual(sock.recv(1), b"")
                    except ConnectionResetError:
                        pass

    @staticmethod
    def kill_group(group):
        """Kill what is left of a process group, if anything."""
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def test_a_rules_file_that_is_not_cdb_denies_with_a_warning(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        rules = os.path.join(directory, "rules.txt")
        with open(rules, "w") as file:
            file.write(":allow\n")  # the source, not what tcprules makes of it
        server = CommandLine(self, ["-1", "-B", "banner\n", "-x", rules, "127.0.0.1", "0", "cat"])
        self.assertEqual(server.talk(), b"banner\n")  # as ucspi-tcp: banner, then the rules
        code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertIn("warning: unable to read %s: %s is not a cdb file" % (rules, rules), log)
        self.assertNotIn("Traceback", log)

    def test_idle_timeout(self):
        server = CommandLine(self, ["-1", "--timeout", "0.2", "127.0.0.1", "0", "cat"])
        with server.connect() as sock:
            sock.sendall(b"echoed\n")
            self.assertEqual(sock.makefile("rb").readline(), b"echoed\n")
            began = time.monotonic()
            with self.assertRaises(ConnectionResetError):
                read_all(sock)  # we stay silent: the server gives up
            self.assertLess(time.monotonic() - began, 5)
        self.assertEqual(server.stop()[0], 0)

    def test_per_client_limit(self):
        server = CommandLine(self, ["-1", "--per-client", "1", "-B", "hi\n", "127.0.0.1", "0",
                                    "sh", "-c", "read line; echo $line"])
        with server.connect() as first:
            self.assertEqual(read_exactly(first, 3), b"hi\n")  # it runs
            self.assertEqual(server.talk(), b"")  # refused: closed at once
            first.sendall(b"first\n")
            self.assertEqual(read_all(first), b"first\n")
        self.assertEqual(server.stop()[0], 0)

    @unittest.skipUnless(shutil.which("openssl"), "openssl is not installed "
                         "(apt-get install openssl)")
    def test_tls_program(self):
        cert, key = certificates().cert, certificates().key
        server = CommandLine(self, ["-1", "--tls-cert", cert, "--tls-key", key,
                                    "127.0.0.1", "0", "cat"])
        context = ssl.create_default_context(cafile=cert)
        with context.wrap_socket(server.connect(), server_hostname="localhost") as sock:
            payload = os.urandom(300000)
            sock.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                received += sock.recv(65536)
            self.assertEqual(bytes(received), payload)
        self.assertEqual(server.stop()[0], 0)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "needs root to drop privileges")
    def test_drop_privileges(self):
        for options, env in ((["-u", "65534", "-g", "65533"], {}),
                             (["-U"], {"UID": "65534", "GID": "65533"})):
            server = CommandLine(self, ["-1"] + options + ["127.0.0.1", "0",
                                                           "sh", "-c", "id -u; id -g; id -G"],
                                 env=env)
            self.assertEqual(server.talk(), b"65534\n65533\n65533\n")
            self.assertEqual(server.stop()[0], 0)

    def test_options_scripts_pass_are_accepted(self):
        server = CommandLine(self, ["-1", "-P", "-o", "-O", "-r", "-R", "-t", "5", "-Q",
                                    "-b", "7", "127.0.0.1", "0",
                                    "sh", "-c", "echo to the server >&2; cat"])
        self.assertEqual(server.talk(b"x\n"), b"x\n")
        if shutil.which("ss"):  # a listening socket's Send-Q is its backlog
            listing = subprocess.run(["ss", "-ltnH", "sport = :%d" % server.port],
                                     capture_output=True, timeout=TIMEOUT).stdout.decode()
            self.assertEqual(listing.split()[2], "7")
        self.assertEqual(server.stop(), (0, "to the server\n"))  # PROGRAM's stderr is ours

    def test_quiet(self):
        server = CommandLine(self, ["-1q", "-x", "/nonexistent/rules.cdb", "127.0.0.1", "0", "cat"])
        self.assertEqual(server.talk(), b"")  # denied: no rules file, and no -X
        self.assertEqual(server.stop(), (0, ""))

    def test_all_interfaces(self):
        hosts = [("0", ["127.0.0.1"])]
        if socket.has_ipv6:
            hosts.append(("::", ["127.0.0.1", "::1"]))
        for host, addresses in hosts:
            server = CommandLine(self, ["-1", host, "0", "sh", "-c", "echo $TCPLOCALIP"])
            for address in addresses:
                with socket.create_connection((address, server.port), timeout=TIMEOUT) as sock:
                    self.assertEqual(read_all(sock), address.encode() + b"\n")
            self.assertEqual(server.stop()[0], 0)

    @unittest.skipUnless(shutil.which("openssl"), "openssl is not installed "
                         "(apt-get install openssl)")
    def test_tls_client_certificates(self):
        made = certificates()
        cert, key, client_cert, client_key = made.cert, made.key, made.client_cert, made.client_key
        server = CommandLine(self, ["-1", "--tls-cert", cert, "--tls-key", key,
                                    "--tls-ca", client_cert, "127.0.0.1", "0", "echo", "in"])
        context = ssl.create_default_context(cafile=cert)
        with self.assertRaises(OSError):  # no client certificate: refused
            with context.wrap_socket(server.connect(), server_hostname="localhost") as sock:
                read_all(sock)
        context.load_cert_chain(client_cert, client_key)
        with context.wrap_socket(server.connect(), server_hostname="localhost") as sock:
            self.assertEqual(read_all(sock), b"in\n")
        self.assertEqual(server.stop()[0], 0)

    @unittest.skipUnless(shutil.which("openssl"),
                         "openssl is not installed (apt-get install openssl)")
    def test_tls_environment_with_openssl_s_client(self):
        made = certificates()
        shown = ("SSL_PROTOCOL SSL_CIPHER SSL_CLIENT_S_DN SSL_CLIENT_S_DN_CN SSL_CLIENT_I_DN "
                 "SSL_CLIENT_M_SERIAL SSL_CLIENT_V_END SSL_TLS_SNI").split()
        server = CommandLine(self, ["-1", "--tls-cert", made.cert, "--tls-key", made.key,
                                    "--tls-ca", made.client_cert, "127.0.0.1", "0", "sh", "-c",
                                    "".join('echo "$%s";' % name for name in shown)
                                    + 'echo "$SSL_CLIENT_CERT" | openssl x509 -noout -serial'])
        client = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % server.port,
                                 "-servername", "localhost", "-cert", made.client_cert,
                                 "-key", made.client_key, "-quiet"],
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
        values = dict(zip(shown + ["PEM"], client.stdout.decode().splitlines()))
        serial = subprocess.run(["openssl", "x509", "-in", made.client_cert, "-noout", "-serial"],
                                capture_output=True, timeout=TIMEOUT).stdout.decode().strip()
        end = subprocess.run(["openssl", "x509", "-in", made.client_cert, "-noout", "-enddate"],
                             capture_output=True, timeout=TIMEOUT).stdout.decode().strip()
        self.assertRegex(values["SSL_PROTOCOL"], r"^TLSv1\.[23]$")
        self.assertTrue(values["SSL_CIPHER"])
        self.assertEqual((values["SSL_CLIENT_S_DN"], values["SSL_CLIENT_S_DN_CN"],
                          values["SSL_CLIENT_I_DN"], values["SSL_TLS_SNI"]),
                         ("/CN=client", "client", "/CN=client", "localhost"))
        self.assertEqual("serial=" + values["SSL_CLIENT_M_SERIAL"], serial)
        self.assertEqual("notAfter=" + values["SSL_CLIENT_V_END"], end)
        self.assertEqual(values["PEM"], serial)  # the whole certificate came
        self.assertEqual(server.stop()[0], 0)

    def test_proxy_protocol(self):
        server = CommandLine(self, ["-1", "-HRl0", "--proxy-protocol", "127.0.0.1", "0",
                                    "sh", "-c", "echo $TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALPORT"])
        self.assertEqual(server.talk(b"PROXY TCP4 203.0.113.9 192.0.2.1 4321 25\r\n"),
                         b"203.0.113.9 4321 25\n")
        self.assertEqual(server.talk(b"no header\n"), b"")  # closed unserved
        self.assertEqual(server.stop()[0], 0)

    def test_a_stderr_nobody_reads_costs_nothing(self):
        # A log collector that died: its end of the pipe is closed.
        read_end, write_end = os.pipe()
        os.close(read_end)
        self.addCleanup(os.close, write_end)
        for verbosity in ("-v", "-Q"):
            with self.subTest(verbosity=verbosity):
                process = subprocess.Popen(
                    [sys.executable, "-m", "tcpserver", "-1", verbosity, "--drain", "0.1",
                     "127.0.0.1", "0", "sh", "-c", "echo $$; exec cat"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=write_end,
                    env=environment(), cwd=HERE)
                self.addCleanup(process.stdout.close)
                self.addCleanup(process.wait, TIMEOUT)
                self.addCleanup(process.kill)  # if it still runs: a failure
                port = int(process.stdout.readline())
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                    lines = sock.makefile("rb")
                    pid = int(lines.readline())  # served, not reset before PROGRAM
                    sock.sendall(b"hi\n")
                    self.assertEqual(lines.readline(), b"hi\n")
                    # cat still runs: the drain ends it, with a warning nobody reads.
                    process.send_signal(signal.SIGTERM)
                    self.assertEqual(process.wait(TIMEOUT), 0)
                    lines.close()
                self.assertTrue(pid_gone(pid))

    @unittest.skipUnless(shutil.which("openssl"),
                         "openssl is not installed (apt-get install openssl)")
    def test_sighup_reloads_the_tls_files_under_load(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        pairs = {name: make_certificate(directory, name, "localhost",
                                        "DNS:localhost,IP:127.0.0.1") for name in "ab"}
        named = {}
        with open(os.path.join(directory, "both.pem"), "w") as both:
            for name, (cert, _) in pairs.items():
                with open(cert) as pem:
                    text = pem.read()
                both.write(text)
                named[hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).digest()] = name
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")

        def install(name):  # what a certificate's renewal does
            shutil.copy(pairs[name][0], cert)
            shutil.copy(pairs[name][1], key)

        context = ssl.create_default_context(cafile=os.path.join(directory, "both.pem"))
        reloads = (TEST_RELOADS if FULL_SOAK else 3)
        for workers in ([], ["-w", "2"]):
            with self.subTest(workers=workers):
                install("a")
                # Every -v line kept: five a connection, thousands in all.
                server = CommandLine(self, ["-1", "-v"] + workers + [
                    "--tls-cert", cert, "--tls-key", key, "127.0.0.1", "0", "echo", "hi"],
                    keep=10 ** 6)
                seen, errors, done = [], [], threading.Event()
                tally = {"read": 0, "reloads": 0}  # of the supervisor's lines

                def reloaded(count, lines=server.lines["stderr"], tally=tally):
                    """Have count reloads been logged?  Reads each line once."""
                    for line in lines[tally["read"]:]:
                        tally["reloads"] += "reload: TLS files read again" in line
                    tally["read"] = len(lines)
                    return tally["reloads"] >= count

                def clients(server=server, seen=seen, errors=errors, done=done):
                    # One after another, as fast as they are served.
                    while not done.is_set():
                        try:
                            with context.wrap_socket(server.connect(),
                                                     server_hostname="localhost") as sock:
                                reply = read_all(sock)
                                seen.append(named[hashlib.sha256(sock.getpeercert(True))
                                                  .digest()])
                            if reply != b"hi\n":
                                errors.append(reply)
                        except OSError as exc:
                            errors.append(exc)

                loop = threading.Thread(target=clients, name="clients")
                loop.start()
                try:
                    for count, name in enumerate("ba" * (reloads // 2) + "b" * (reloads % 2),
                                                 1):
                        install(name)
                        server.process.send_signal(signal.SIGHUP)
                        # One signal at a time: two at once would be one.
                        self.assertTrue(server.wait_until(
                            lambda count=count, reloaded=reloaded: reloaded(count)))
                        deadline = time.monotonic() + TIMEOUT
                        while not seen or seen[-1] != name:  # the new one serves
                            self.assertLess(time.monotonic(), deadline, "no reload")
                            time.sleep(0.005)
                    with open(cert, "w") as broken:
                        broken.write("not a certificate")
                    server.process.send_signal(signal.SIGHUP)
                    server.wait_for("warning: reload failed, the configuration stays as it "
                                    "was: ValueError: cannot load the TLS files")
                    served = len(seen)
                    deadline = time.monotonic() + TIMEOUT
                    # Five in a row with the last good one: with workers, the
                    # ones it replaced may serve a last client or two, between
                    # the supervisor's SIGTERM and their taking it.
                    while len(seen) < served + 5 or set(seen[-5:]) != {name}:
                        self.assertLess(time.monotonic(), deadline, "not served after")
                        time.sleep(0.005)
                finally:
                    done.set()
                    loop.join(TIMEOUT)
                code, log = server.stop()
                self.assertEqual(code, 0, log)
                self.assertEqual(errors, [])
                self.assertEqual(seen[-1], name)  # the last good one
                self.assertEqual(log.count("reload: TLS files read again"), reloads)

    def test_an_ignored_sighup_stays_ignored(self):
        # As nohup leaves it: SIGHUP ignored before the server starts.
        nohup = ["sh", "-c", 'trap "" HUP; exec "$@"', "sh", sys.executable, "-m", "tcpserver"]
        server = CommandLine(self, ["-1", "--drain", "0.1", "127.0.0.1", "0",
                                    "sh", "-c", "echo $$; exec sleep 60"], command=nohup)
        with server.connect() as sock:
            pid = int(sock.makefile().readline())
            server.process.send_signal(signal.SIGHUP)
            server.process.send_signal(signal.SIGTERM)
            code, log = server.wait()
        self.assertEqual(code, 0)
        # SIGTERM was the first stop, not a second one after SIGHUP: a drain.
        self.assertIn("still running after the drain", log)
        self.assertNotIn("a second signal", log)
        self.assertTrue(pid_gone(pid))
        workers = CommandLine(self, ["-1", "-w", "2", "127.0.0.1", "0", "echo", "up"],
                              command=nohup)
        workers.process.send_signal(signal.SIGHUP)
        for _ in range(3):  # still serving, whichever worker takes it
            self.assertEqual(workers.talk(), b"up\n")
        self.assertEqual(workers.stop()[0], 0)

    def test_the_timeout_bounds_the_wait_for_a_tls_handshake_or_proxy_header(self):
        made = certificates()
        for options in (["--tls-cert", made.cert, "--tls-key", made.key], ["--proxy-protocol"]):
            with self.subTest(options=options[0]):
                server = CommandLine(self, ["-1", "--timeout", "0.2"] + options
                                     + ["127.0.0.1", "0", "cat"])
                with server.connect() as sock:
                    began = time.monotonic()
                    try:
                        self.assertEqual(read_all(sock), b"")  # we say nothing
                    except ConnectionResetError:
                        pass
                    self.assertLess(time.monotonic() - began, 3.0)  # not the 10 s default
                self.assertEqual(server.stop()[0], 0)

    def test_a_tls_error_of_a_program_costs_no_traceback(self):
        made = certificates()
        server = CommandLine(self, ["-1", "--tls-cert", made.cert, "--tls-key", made.key,
                                    "127.0.0.1", "0", "cat"])
        with server.connect() as sock:
            tls_over(sock, made.cert)
            # An application data record whose contents decrypt to nothing.
            sock.sendall(b"\x17\x03\x03\x00\x40" + bytes(range(64)))
            with self.assertRaises(ConnectionResetError):
                read_all(sock)  # what the handshake left (session tickets), then the reset
        code, log = server.stop()
        self.assertEqual((code, log), (0, ""))

    def test_rules_deny_before_any_tls_work(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        rules = os.path.join(directory, "rules.cdb")
        write_cdb(rules, [(b"127.0.0.2", b"D")])
        made = certificates()
        server = CommandLine(self, ["-1", "-v", "-x", rules, "--tls-cert", made.cert,
                                    "--tls-key", made.key, "0", "0", "cat"])
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT,
                                      source_address=("127.0.0.2", 0)) as sock:
            began = time.monotonic()
            self.assertEqual(read_all(sock), b"")  # closed at once, silent as we are
            self.assertLess(time.monotonic() - began, 3.0)  # not the handshake's 10 s
        code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertRegex(log, r"tcpserver: deny \d+ [^ ]*:127\.0\.0\.1:\d+ [^ ]*:127\.0\.0\.2::\d+")

    def test_verbose_says_why_each_connection_is_refused(self):
        made = certificates()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        rules = os.path.join(directory, "rules.cdb")
        write_cdb(rules, [(b"192.0.2.7", b"D")])
        cases = [
            (["--tls-cert", made.cert, "--tls-key", made.key], b"plain text\n",
             r"refused :127\.0\.0\.1::\d+ \(setup failed, SSLError: .*\)"),
            (["--tls-cert", made.cert, "--tls-key", made.key, "--tls-ca", made.client_cert],
             None, r"refused :127\.0\.0\.1::\d+ \(setup failed, SSLError: .*\)"),
            (["--proxy-protocol", "-x", rules], b"PROXY TCP4 192.0.2.7 192.0.2.1 4321 25\r\n",
             r"deny \d+ [^ ]*:192\.0\.2\.1:25 [^ ]*:192\.0\.2\.7::4321"),
            (["--per-client", "1"], b"second\n",
             r"refused :127\.0\.0\.1::\d+ \(1 connections from it already\)"),
        ]
        for options, sent, line in cases:
            with self.subTest(options=options[0]):
                server = CommandLine(self, ["-1", "-vHRl0", "--drain", "0.1"] + options
                                     + ["127.0.0.1", "0", "sh", "-c", "echo hi; exec sleep 60"])
                if options[0] == "--per-client":
                    first = server.connect()  # holds its one connection
                    self.addCleanup(first.close)
                    self.assertEqual(first.recv(3), b"hi\n")
                if sent is None:  # a TLS client without a certificate
                    context = ssl.create_default_context(cafile=made.cert)
                    with self.assertRaises(OSError):
                        with context.wrap_socket(server.connect(),
                                                 server_hostname="localhost") as sock:
                            read_all(sock)
                else:
                    with server.connect() as sock:
                        try:
                            exchange(sock, sent)
                        except ConnectionResetError:
                            pass
                server.wait_for(line)
                server.stop()

    def test_usage_errors_exit_100_with_one_line(self):
        # The whole command, once: main()'s 100 is the process's exit status.
        result = run_python(["-m", "tcpserver", "-z", "127.0.0.1", "0", "cat"])
        self.assertEqual(result.returncode, 100)
        self.assertRegex(result.stderr.decode(), r"^tcpserver: usage error: [^\n]+\n$")
        # Each usage error, in this process.
        for args in (["-c", "0", "127.0.0.1", "0", "cat"], ["-z", "127.0.0.1", "0", "cat"],
                     ["127.0.0.1"], ["127.0.0.1", "0"], ["127.0.0.1", "no-such-port", "cat"],
                     ["127.0.0.1", "0", "no-such-program-here"],
                     ["--tls-cert", "c.pem", "127.0.0.1", "0", "cat"],
                     ["--timeout", "soon", "127.0.0.1", "0", "cat"],
                     ["--trusted-proxies", "10.0.0.0/33", "127.0.0.1", "0", "cat"],
                     ["--timeout", "0", "127.0.0.1", "0", "cat"],
                     ["--drain", "inf", "127.0.0.1", "0", "cat"],
                     ["-c", "99999999999999999999", "127.0.0.1", "0", "cat"],
                     ["-b", "99999999999", "127.0.0.1", "0", "cat"],
                     ["127.0.0.1", "70000", "cat"]):
            with self.subTest(args=args):
                assert_usage_error(self, args)

    def test_address_in_use_exits_111(self):
        with tcpserver.tcp_listen(0, host="127.0.0.1") as taken:
            code, _, stderr = call_main(["127.0.0.1", str(taken.getsockname()[1]), "cat"])
        self.assertEqual(code, 111)
        self.assertRegex(stderr, r"^tcpserver: fatal: unable to listen on "
                                 r"127\.0\.0\.1 port \d+: .*in use.*\n$")

    def test_help(self):
        code, text, stderr = call_main(["--help"])
        self.assertEqual((code, stderr), (0, ""))
        self.assertIn("usage: python -m tcpserver", text)
        for option in ("-c N", "-x FILE", "--call", "--per-client", "--tls-cert", "Exit codes"):
            self.assertIn(option, text)


def write_cdb(path, records):
    """Write records, (key, value) pairs of bytes, to path as a cdb file.

    The layout of cdb_make, which tcprules uses: 256 (position, slots)
    pairs, the records (key length, value length, key, value) in order,
    then a hash table per pair with two slots per key of it, each key in
    the first free slot from (hash >> 8) % slots.  tcprules' values are its
    instructions, each ended by NUL: b"D\\0" denies, b"+NAME=value\\0" sets.
    Debian's tcprules cannot parse IPv6 rules, so the tests write those.
    """
    def digest(key):
        value = 5381
        for byte in key:
            value = ((value * 33) ^ byte) & 0xFFFFFFFF
        return value

    body, entries = bytearray(), []
    for key, value in records:
        entries.append((digest(key), 2048 + len(body)))
        body += struct.pack("<II", len(key), len(value)) + key + value
    pairs, tables = bytearray(), bytearray()
    for bucket in range(256):
        keys = [entry for entry in entries if entry[0] & 255 == bucket]
        slots = [(0, 0)] * (2 * len(keys))
        for entry in keys:
            slot = (entry[0] >> 8) % len(slots)
            while slots[slot][1]:
                slot = (slot + 1) % len(slots)
            slots[slot] = entry
        pairs += struct.pack("<II", 2048 + len(body) + len(tables), len(slots))
        tables += b"".join(struct.pack("<II", *entry) for entry in slots)
    with open(path, "wb") as file:
        file.write(pairs + body + tables)


class TestRules(unittest.TestCase):
    """-x FILE: tcprules' cdb, as ucspi-tcp (and its IPv6 patch) reads it."""

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.rules = os.path.join(self.directory, "rules.cdb")

    @unittest.skipUnless(shutil.which("tcprules"), "tcprules is not installed "
                         "(apt-get install ucspi-tcp)")
    def test_the_cdb_writer_writes_what_tcprules_writes(self):
        source = ('127.0.0.1:allow,GREETING="hello there"\n10.:deny\n'
                  '127.:allow,A=/b/,B=:c:\n127.0.0.1:deny\n:deny\n')
        subprocess.run(["tcprules", self.rules, self.rules + ".tmp"], input=source.encode(),
                       check=True, timeout=TIMEOUT)
        mine = os.path.join(self.directory, "mine.cdb")
        write_cdb(mine, [(b"127.0.0.1", b"+GREETING=hello there\0"), (b"10.", b"D\0"),
                         (b"127.", b"+A=b\0+B=c\0"), (b"127.0.0.1", b"D\0"), (b"", b"D\0")])
        with open(self.rules, "rb") as theirs, open(mine, "rb") as ours:
            self.assertEqual(ours.read(), theirs.read())

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_prefixes(self):
        # As ucspi-tcp's IPv6 patch: after the address, its prefixes that end
        # in ":" (or "."), longest first.  ::1 connects as itself; from
        # 127.0.0.1, a PROXY header claims other addresses.
        write_cdb(self.rules, [(b"::", b"+WHO=loopback\0"), (b"2001:", b"+WHO=2001\0"),
                               (b"2001:db8:", b"+WHO=db8\0"), (b"2001:db8::7", b"D\0"),
                               (b"", b"D\0")])
        server = CommandLine(self, ["-1", "-HRl0", "-x", self.rules, "--proxy-protocol",
                                    "--trusted-proxies", "127.0.0.0/8", "::", "0",
                                    "sh", "-c", "echo $WHO"])
        with socket.create_connection(("::1", server.port), timeout=TIMEOUT) as sock:
            self.assertEqual(read_all(sock), b"loopback\n")
        for claimed, reply in (("2001:db8::5", b"db8\n"), ("2001:db9::5", b"2001\n"),
                               ("2001:db8::7", b""), ("2002::5", b"")):
            with self.subTest(claimed=claimed):
                header = "PROXY TCP6 %s ::1 4321 25\r\n" % claimed
                self.assertEqual(server.talk(header.encode()), reply)
        self.assertEqual(server.stop()[0], 0)

    def test_an_ipv4_mapped_proxy_source_meets_the_ipv4_rules(self):
        # HAProxy bound to ":::PORT v4v6" gives its IPv4 clients as ::ffff:...
        write_cdb(self.rules, [(b"192.0.2.", b"D\0"), (b"", b"+OK=1\0")])
        server = CommandLine(self, ["-1", "-HRl0", "-x", self.rules, "--proxy-protocol",
                                    "127.0.0.1", "0", "sh", "-c", "echo $TCPREMOTEIP"])
        for source, reply in (("::ffff:192.0.2.7", b""), ("::ffff:c000:207", b""),
                              ("::ffff:198.51.100.2", b"198.51.100.2\n")):
            with self.subTest(source=source):
                header = "PROXY TCP6 %s ::ffff:192.0.2.1 4321 25\r\n" % source
                self.assertEqual(server.talk(header.encode()), reply)
        self.assertEqual(server.stop()[0], 0)

    def test_empty_and_truncated_files_deny_with_a_warning(self):
        write_cdb(self.rules, [(b"", b"+X=1\0")])  # allows everyone: when whole
        with open(self.rules, "rb") as file:
            whole = file.read()
        server = CommandLine(self, ["-1", "-x", self.rules, "127.0.0.1", "0", "echo", "served"])
        self.assertEqual(server.talk(), b"served\n")
        for size in (0, 100, len(whole) - 12):  # nothing; half the header; half a slot
            with self.subTest(size=size):
                with open(self.rules, "wb") as file:
                    file.write(whole[:size])
                self.assertEqual(server.talk(), b"")
        code, log = server.stop()
        self.assertEqual(code, 0)
        self.assertEqual(log.count("warning: unable to read %s: %s is not a cdb file"
                                   % (self.rules, self.rules)), 3)
        self.assertNotIn("Traceback", log)

    @unittest.skipUnless(shutil.which("tcprules"), "tcprules is not installed "
                         "(apt-get install ucspi-tcp)")
    @unittest.skipUnless(os.path.exists("/proc/self/status"), "needs /proc for VmHWM")
    def test_600000_rules_and_40_clients_at_once_cost_little_memory(self):
        # 22 MB of cdb, as a large site's; about 2 s.  Each connection looks
        # its keys up in the file, not in a copy of it.
        source = "".join("10.%d.%d.%d:deny\n" % (n >> 16, (n >> 8) & 255, n & 255)
                         for n in range(600000))
        source += '127.0.0.1:allow,SEEN="yes"\n:deny\n'
        subprocess.run(["tcprules", self.rules, self.rules + ".tmp"], input=source.encode(),
                       check=True, timeout=TIMEOUT)
        server = CommandLine(self, ["-1", "-b", "64", "-x", self.rules, "127.0.0.1", "0",
                                    "sh", "-c", "echo $SEEN"])
        replies = []
        clients = [threading.Thread(target=lambda: replies.append(server.talk()))
                   for _ in range(40)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(TIMEOUT)
        peak = int(re.search(r"^VmHWM:\s+(\d+) kB", server.proc("status"), re.M).group(1))
        self.assertEqual(replies, [b"yes\n"] * 40)
        self.assertLess(peak, 60 * 1024, "peak RSS in kB")
        self.assertEqual(server.stop()[0], 0)


def free_port():
    """A port that was free a moment ago (for programs that cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@unittest.skipUnless(shutil.which("haproxy"), "haproxy is not installed (apt-get install haproxy)")
class TestHAProxy(unittest.TestCase):
    """README's HAProxy configuration, run with the real haproxy and two servers."""

    def start(self, version):
        """Start the README's setup, with PROXY protocol version 1 or 2."""
        ports = {6504: free_port(), 7001: free_port(), 7002: free_port()}
        config = readme_code("backend servers")
        if version == 1:
            config = config.replace("send-proxy-v2", "send-proxy")
        for documented, port in ports.items():
            config = config.replace("127.0.0.1:%d" % documented, "127.0.0.1:%d" % port)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "haproxy.cfg")
        with open(path, "w") as file:
            file.write(config)
        self.frontend = ports[6504]
        # Each server names itself and echoes the client's token and port.
        self.servers = {}
        for name, documented in (("one", 7001), ("two", 7002)):
            command = readme_code("--proxy-protocol 127.0.0.1 %d" % documented).splitlines()
            args = next(line for line in command if " %d " % documented in line).split()[3:]
            args[args.index(str(documented))] = str(ports[documented])
            args[-1:] = ["sh", "-c", "read token; echo $token $TCPREMOTEIP $TCPREMOTEPORT " + name]
            self.servers[name] = CommandLine(self, ["-1"] + args)
        self.haproxy = Program(self, ["haproxy", "-db", "-f", path], ready=None)

    def client(self, token):
        """One client through the balancer; return (reply fields, our port)."""
        deadline = time.monotonic() + TIMEOUT
        while True:  # haproxy may not be listening yet
            try:
                sock = socket.create_connection(("127.0.0.1", self.frontend), timeout=TIMEOUT)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sock:
            sock.sendall(token.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock).decode().split(), sock.getsockname()[1]

    def test_a_server_stops_and_every_client_is_still_served(self):
        for version in (1, 2):
            with self.subTest(version=version):
                self.start(version)
                self.stop_one_while_clients_connect()

    def stop_one_while_clients_connect(self):
        seen = set()
        for number in range(20):
            token = "before-%d" % number
            fields, port = self.client(token)
            self.assertEqual(fields[:3], [token, "127.0.0.1", str(port)])
            seen.add(fields[3])
        self.assertEqual(seen, {"one", "two"})  # balanced over both
        code, _ = self.servers["one"].stop()
        self.assertEqual(code, 0)
        self.haproxy.wait_for("one is DOWN")
        for number in range(40):
            token = "after-%d" % number
            fields, port = self.client(token)
            self.assertEqual(fields, [token, "127.0.0.1", str(port), "two"])
        self.assertEqual(self.servers["two"].stop()[0], 0)


@unittest.skipUnless(shutil.which("systemd-socket-activate"),
                     "systemd-socket-activate is not installed (apt-get install systemd)")
class TestSocketActivation(unittest.TestCase):

    def test_inherit_the_socket_of_systemd_socket_activate(self):
        port = free_port()
        unit = readme_code("ExecStart=")
        command = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
        self.assertEqual(command[:5], ["/usr/bin/python3", "-m", "tcpserver", "--inherit", "-v"])
        activator = Program(self, ["systemd-socket-activate", "-l", "127.0.0.1:%d" % port,
                                   "-E", "PYTHONPATH=" + HERE, sys.executable] + command[1:],
                            ready=("stderr", r"\A.*Listening on"))
        for _ in range(3):  # the first connection starts the server; it serves the rest
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                self.assertRegex(read_all(sock).decode(), r"^\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d "
                                                          r"\w+ \d{4}\n$")
        code, log = activator.stop()  # systemd-socket-activate has become our server
        self.assertEqual(code, 0)
        self.assertEqual(log.count("tcpserver: end "), 3)

    def test_systemd_listeners(self):
        with tcpserver.tcp_listen(0, host="127.0.0.1") as listener:
            code = ("import os, tcpserver; listeners = tcpserver.systemd_listeners(); "
                    "print(len(listeners), listeners[0].getsockname()[1], "
                    "'LISTEN_FDS' in os.environ, tcpserver.systemd_listeners())")
            result = run_python(
                ["-c", "import os; os.environ['LISTEN_PID'] = str(os.getpid()); "
                 "os.dup2(%d, 3); exec(%r)" % (listener.fileno(), code)],
                env={"LISTEN_FDS": "1"}, pass_fds=[listener.fileno()])
            self.assertEqual(result.stdout.decode(),
                             "1 %d False []\n" % listener.getsockname()[1], result.stderr)
        self.assertEqual(tcpserver.systemd_listeners(), [])  # not for this process

    def test_inherit_without_a_socket(self):
        assert_usage_error(self, ["--inherit", "cat"], "--inherit needs one socket from systemd")

    def test_inherit_a_socket_that_cannot_serve(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram, \
                socket.socket() as unlistened:
            for sock, message in ((datagram, "must be a stream socket"),
                                  (unlistened, "must be listening")):
                code = ("import os, sys; os.dup2(%d, 3); os.environ['LISTEN_PID'] = "
                        "str(os.getpid()); import tcpserver; sys.exit(tcpserver.main("
                        "['--inherit', 'cat']))" % sock.fileno())
                result = run_python(["-c", code], env={"LISTEN_FDS": "1"},
                                    pass_fds=[sock.fileno()])
                with self.subTest(message=message):
                    self.assertEqual(result.returncode, 100)
                    self.assertRegex(result.stderr.decode(),
                                     r"^tcpserver: usage error: --inherit: .*%s" % message)


WORKERS_SCRIPT = """
import os, sys, time
import tcpserver

def thunk():
    print(os.getpid(), input())

server = tcpserver.make_tcp_server(("127.0.0.1", 0), thunk, 4)
print(server.server_address[1], flush=True)
server(workers=int(sys.argv[1]))
server.server_close()
print(server.stats_line(), flush=True)
print("supervisor done", flush=True)
"""


class TestWorkers(unittest.TestCase):

    def start(self, workers, own_group=False):
        """Run WORKERS_SCRIPT (in a process group of its own if own_group); return its Program."""
        supervisor = Program(self, [sys.executable, "-c", WORKERS_SCRIPT, str(workers)],
                             start_new_session=own_group)
        self.port = supervisor.port
        return supervisor

    def ask(self, text="x"):
        """One request; return the pid of the worker that served it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(text.encode() + b"\n")
            pid, echoed = read_all(sock).decode().split()
        self.assertEqual(echoed, text)
        return int(pid)

    def pids_serving(self, count):
        """Ask until count different workers answered (bounded); return their pids."""
        pids = set()
        deadline = time.monotonic() + TIMEOUT
        while len(pids) < count:
            self.assertLess(time.monotonic(), deadline, "only %s answered" % pids)
            pids.add(self.ask())
        return pids

    def test_the_supervisor_adds_up_its_workers_counts(self):
        supervisor = self.start(2)
        asked = 0
        pids = set()
        deadline = time.monotonic() + TIMEOUT
        while len(pids) < 2 or asked < 10:
            self.assertLess(time.monotonic(), deadline, "only %s answered" % pids)
            pids.add(self.ask())
            asked += 1
        supervisor.process.send_signal(signal.SIGUSR1)
        line = supervisor.wait_for(r"\[tcp-server\] stats: accepted \d+, .*\n").group(0)
        for pid in pids:  # each running worker, by pid
            self.assertIn("; worker %d: accepted " % pid, line)
        code, log = supervisor.stop()
        self.assertEqual(code, 0, log)
        # Each worker posted its last counts as it ended: they add up.
        self.assertIn("stats: accepted %d, active 0, completed %d, failed 0, "
                      "peak_active " % (asked, asked), supervisor.text("stdout"))

    def test_workers_share_the_port_and_a_dead_one_is_replaced(self):
        supervisor = self.start(2)
        first = self.pids_serving(2)
        self.assertNotIn(supervisor.process.pid, first)
        victim = first.pop()
        os.kill(victim, signal.SIGKILL)
        self.assertTrue(pid_gone(victim))  # reaped by the supervisor
        deadline = time.monotonic() + TIMEOUT
        pids = set()
        while len(pids - first) < 1:  # a new worker serves beside the survivor
            self.assertLess(time.monotonic(), deadline, "no replacement for %d" % victim)
            pids.add(self.ask())
        self.assertNotIn(victim, pids)
        code, log = supervisor.stop()
        self.assertRegex(supervisor.text("stdout"),
                         r"\A%d\nstats: .*\nsupervisor done\n\Z" % self.port)
        self.assertEqual(code, 0)
        self.assertIn("worker %d ended (wait status 9); starting another" % victim, log)
        for pid in pids | first:
            self.assertTrue(pid_gone(pid))

    def test_sigterm_drains_every_worker(self):
        supervisor = self.start(2)
        with supervisor.connect() as sock:
            self.pids_serving(2)  # both run; our connection waits in a thunk's input()
            supervisor.process.send_signal(signal.SIGTERM)
            sock.sendall(b"late\n")  # the reply shows the drain let the thunk finish
            pid, echoed = read_all(sock).decode().split()
        self.assertEqual(echoed, "late")
        self.assertEqual(supervisor.wait()[0], 0)
        self.assertTrue(pid_gone(int(pid)))

    def test_a_stop_of_the_whole_group_still_drains(self):
        # systemd (KillMode=control-group) and Ctrl-C signal every process:
        # each worker hears it twice, from the group and from the supervisor.
        supervisor = self.start(2, own_group=True)
        with supervisor.connect() as sock:
            self.pids_serving(2)
            os.killpg(supervisor.process.pid, signal.SIGTERM)
            sock.sendall(b"late\n")
            self.assertEqual(read_all(sock).decode().split()[1], "late")
        code, log = supervisor.wait()
        self.assertEqual(code, 0)
        self.assertNotIn("stopping at once", log)

    def test_the_listener_is_as_it_was_afterwards(self):
        # serve_workers() wants no threads before it, so a child process
        # stops it: once a worker has served it, it sends SIGTERM.  The
        # supervisor reaps that child too, and must not mind.
        code = ("import os, subprocess, sys, tcpserver\n"
                "server = tcpserver.make_tcp_server(('127.0.0.1', 0), print)\n"
                "subprocess.Popen([sys.executable, '-c', sys.argv[1], "
                "str(server.server_address[1]), str(os.getpid())])\n"
                "server(workers=1)\n"
                "print(server.socket.getblocking(), server.socket.gettimeout())\n"
                "server.server_close()\n")
        stopper = ("import os, signal, socket, sys, time\n"
                   "deadline = time.monotonic() + 10\n"
                   "while True:\n"
                   "    try:\n"
                   "        sock = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
                   "        break\n"
                   "    except ConnectionRefusedError:\n"
                   "        if time.monotonic() > deadline: raise\n"
                   "sock.recv(10)\n"
                   "os.kill(int(sys.argv[2]), signal.SIGTERM)\n")
        result = run_python(["-c", code, stopper])
        self.assertEqual(result.stdout, b"True None\n", result.stderr)
        self.assertEqual(result.returncode, 0)

    def test_workers_need_posix(self):
        with tcpserver.make_tcp_server(("127.0.0.1", 0), print) as server, \
                unittest.mock.patch.object(tcpserver, "_POSIX", False):
            with self.assertRaisesRegex(NotImplementedError, "worker processes need fork"):
                server(workers=2)

    def test_bad_counts(self):
        server = tcpserver.make_tcp_server(("127.0.0.1", 0), print)
        with server:
            for value, error in ((0, ValueError), (1.5, TypeError), ("2", TypeError)):
                with self.subTest(value=value), self.assertRaises(error):
                    server(workers=value)

    def test_command_line_workers(self):
        server = CommandLine(self, ["-1", "-w", "2", "127.0.0.1", "0", "sh", "-c", "echo $PPID"])
        pids = set()
        deadline = time.monotonic() + TIMEOUT
        while len(pids) < 2:
            self.assertLess(time.monotonic(), deadline, "only %s answered" % pids)
            pids.add(int(server.talk()))
        self.assertNotIn(server.process.pid, pids)
        self.assertEqual(server.stop()[0], 0)
        for pid in pids:
            self.assertTrue(pid_gone(pid))

    def test_a_sigterm_the_moment_the_port_is_printed_exits_0(self):
        # The port line says the server is ready: a service manager may stop
        # it at once.  This stdout sends SIGTERM to its own process once the
        # line is out, so a handler installed any later is too late.
        code = ("import os, signal, sys, tcpserver\n"
                "class Stopping:\n"
                "    def write(self, text):\n"
                "        written = sys.__stdout__.write(text)\n"
                "        if text.endswith('\\n'):\n"
                "            sys.__stdout__.flush()\n"
                "            os.kill(os.getpid(), signal.SIGTERM)\n"
                "        return written\n"
                "    def flush(self):\n"
                "        sys.__stdout__.flush()\n"
                "sys.stdout = Stopping()\n"
                "sys.exit(tcpserver.main(sys.argv[1:]))\n")
        for workers in (["-w", "2"], []):
            with self.subTest(workers=workers):
                result = run_python(["-c", code, "-1", "-v"] + workers + ["127.0.0.1", "0", "cat"])
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertRegex(result.stdout, rb"^\d+\n$")
                self.assertEqual(result.stderr, b"tcpserver: status: 0/40\n")


if __name__ == "__main__":
    unittest.main()
