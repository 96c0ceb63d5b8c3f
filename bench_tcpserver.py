#!/usr/bin/env python3
"""Benchmark: tcpserver against stdlib socketserver, asyncio and ucspi-tcp.

Usage::

    python bench_tcpserver.py                   # everything: about 10 minutes
    python bench_tcpserver.py --quick           # fewer, shorter runs: under a minute
    python bench_tcpserver.py --only conn       # one scenario (repeat --only for more)
    python bench_tcpserver.py --json out.json   # also write every raw figure

Scenarios (issue 9):

conn     Connection rate.  N clients (1, 32, 256) each loop: connect, read
         until EOF, close, against a daytime server.  conn/s, and the
         latency of each connection (connect to EOF) at p50 and p99.
ping     Ping-pong.  N persistent connections (1, 32) each loop: send a
         line, read the echoed line.  Round trips/s, p50, p99; tcpserver
         with and without an idle timeout.
bulk     One connection reads 100 MB of 64-byte lines.  MB/s of tcpserver's
         print() (line- and block-buffered) and sys.stdout.buffer.write()
         against socketserver's wfile (unbuffered as it ships, buffered,
         and print() to a TextIOWrapper over the buffered wfile).
http     http.server.SimpleHTTPRequestHandler serving a small file, on
         tcpserver.ThreadingTCPServer against socketserver.ThreadingTCPServer,
         loaded by ab (apache2-utils) or wrk.  Requests/s, p50, p99.
growth   1,000, 5,000 and 10,000 idle connections held open; meanwhile
         the rate of extra short connections, and the server's RSS per
         idle connection.  tcpserver against socketserver.
workers  Connection rate of conn's daytime thunk, 32 and 256 clients, with
         serve_workers(1) against serve_workers(2): one worker process
         against two.  These servers are not pinned: they run on every CPU,
         the load generator's too.  Stopped by SIGTERM, not by closing
         stdin; a run fails unless the server exits 0 with no worker left.

How it measures: every server runs in a process of its own (this script
with --serve KIND), pinned to the first CPU (but workers' servers, which
use every CPU); the load generator is pinned to the second.  The load
generator is a small C program compiled at run
time with gcc, cc or clang, else a multi-process Python client: the output
says which.  Everything runs on 127.0.0.1, on a port the OS picks.  Each
figure is the median of --runs runs (3) per server; the servers' runs
alternate (A B C A B C ...), each against a fresh server process.  Every
step has a timeout, and the whole benchmark stops at --time-limit.

Optional tools: ucspi-tcp (``apt-get install ucspi-tcp``) adds djb's
tcpserver running ``date`` or ``cat`` per connection; the http scenario
needs ab (``apt-get install apache2-utils``) or wrk.

Internal modes, used by the script itself: ``--serve KIND`` runs one server
until its stdin closes (a workers server: until SIGTERM); ``--client MODE``
runs one process of the Python load generator.
"""

import argparse
import functools
import hashlib
import http.server
import io
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
SCRIPT = os.path.abspath(__file__)
HERE = os.path.dirname(SCRIPT)

SCENARIOS = ["conn", "ping", "bulk", "http", "growth", "workers"]

# Bulk: 64-byte lines, 63 characters and the newline that print() adds.
LINE = ("0123456789" * 7)[:63]
LINE_BYTES = (LINE + "\n").encode("ascii")
BULK_LINES = 0  # lines per bulk connection; set by --serve from --bulk-bytes

PING_MESSAGE = "ping 0123456789\n"  # ping: each round trip sends and gets this
ECHO_IDLE_TIMEOUT = 60  # seconds: ping's "idle timeout" row, which never hits it
HOLD_MESSAGE = "x\n"   # growth: short connections send it, held ones send nothing
HTTP_FILE = "small.html"  # http: the file served, of HTTP_FILE_SIZE bytes
HTTP_FILE_SIZE = 1024

POLL_INTERVAL = 0.05        # serve_forever(): how soon a server sees shutdown()
IO_TIMEOUT = 10             # seconds a client's connect, read or write may take
SERVER_START_TIMEOUT = 15.0  # seconds a server has to report its port
SERVER_STOP_TIMEOUT = 5.0    # seconds a server has to exit once told
OUTPUT_CAP = 8 * 1024        # bytes kept of a child's output, at each end
BUCKETS_PER_E = 100          # latency histogram: bucket = int(100 * ln(us))
STALL_MS = 500               # an operation this slow gets a note


class BenchError(Exception):
    """A step of the benchmark failed: the run is reported as failed."""


# ---------------------------------------------------------------------------
# The servers, each run by this script with --serve KIND in its own process.
# ---------------------------------------------------------------------------

# tcpserver's thunks: they talk to the client through print() and input().

def daytime_thunk():
    print(time.ctime())


def echo_thunk():
    while True:
        print(input())  # EOFError at the end of input ends the request


def hold_thunk():
    input()  # idle connections wait here; short ones send a line first
    print(time.ctime())


def print_lines_thunk():
    for _ in range(BULK_LINES):
        print(LINE)


def buffer_write_thunk():
    for _ in range(BULK_LINES):
        sys.stdout.buffer.write(LINE_BYTES)


# socketserver's handlers: the same, through rfile and wfile.

class SocketserverServer(socketserver.ThreadingTCPServer):
    """socketserver.ThreadingTCPServer as it ships, but with tcpserver's
    listen queue (socket.SOMAXCONN instead of 5), so a burst of clients is
    not lost to a full backlog.  daemon_threads stays False."""

    request_queue_size = socket.SOMAXCONN


class DaytimeHandler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write((time.ctime() + "\n").encode())


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline()
            if not line:
                return
            self.wfile.write(line)


class HoldHandler(socketserver.StreamRequestHandler):
    def handle(self):
        if self.rfile.readline():  # empty: a held connection was closed
            self.wfile.write((time.ctime() + "\n").encode())


class UnbufferedWfileHandler(socketserver.StreamRequestHandler):
    """wfile as socketserver ships it: unbuffered, one send per write."""

    def handle(self):
        for _ in range(BULK_LINES):
            self.wfile.write(LINE_BYTES)


class BufferedWfileHandler(socketserver.StreamRequestHandler):
    wbufsize = -1  # a BufferedWriter of io.DEFAULT_BUFFER_SIZE, as ThunkHandler's

    def handle(self):
        for _ in range(BULK_LINES):
            self.wfile.write(LINE_BYTES)


class TextIOWrapperHandler(socketserver.StreamRequestHandler):
    """print() to a TextIOWrapper over the buffered wfile: what a thunk's
    block-buffered print() is, without the per-thread sys.stdout."""

    wbufsize = -1

    def handle(self):
        out = io.TextIOWrapper(self.wfile, encoding="utf-8", newline="\n")
        for _ in range(BULK_LINES):
            print(LINE, file=out)
        out.flush()
        out.detach()  # finish() flushes and closes wfile itself


class QuietHTTPRequestHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without its log line on stderr per request."""

    def log_message(self, format, *args):
        pass


class SocketserverHTTPServer(socketserver.ThreadingTCPServer,
                             http.server.HTTPServer):
    """http.server.ThreadingHTTPServer, spelled as legacy code would with
    socketserver.ThreadingTCPServer; daemon_threads True as in
    ThreadingHTTPServer, and the listen queue of SocketserverServer."""

    daemon_threads = True
    request_queue_size = socket.SOMAXCONN


SOCKETSERVER_HANDLERS = {
    "socketserver-daytime": DaytimeHandler,
    "socketserver-echo": EchoHandler,
    "socketserver-hold": HoldHandler,
    "socketserver-wfile-unbuffered": UnbufferedWfileHandler,
    "socketserver-wfile-buffered": BufferedWfileHandler,
    "socketserver-print-textio": TextIOWrapperHandler,
}

TCPSERVER_THUNKS = {
    "tcpserver-daytime": daytime_thunk,
    "tcpserver-echo": echo_thunk,
    "tcpserver-echo-timeout": echo_thunk,
    "tcpserver-hold": hold_thunk,
    "tcpserver-print-line": print_lines_thunk,
    "tcpserver-print-block": print_lines_thunk,
    "tcpserver-buffer-write": buffer_write_thunk,
}

UCSPI_PROGRAMS = {"ucspi-daytime": "date", "ucspi-echo": "cat"}


def make_tcpserver_server(kind, args):
    """Return the tcpserver server of this kind, on HOST, port 0."""
    import tcpserver  # here, so a broken tcpserver.py fails only its runs

    address = (HOST, 0)
    if kind == "tcpserver-http":
        class TcpserverHTTPServer(tcpserver.ThreadingTCPServer,
                                  http.server.HTTPServer):
            daemon_threads = True  # as SocketserverHTTPServer

        handler = functools.partial(QuietHTTPRequestHandler, directory=args.dir)
        return TcpserverHTTPServer(address, handler)
    thunk = TCPSERVER_THUNKS[kind]
    if kind == "tcpserver-print-block":
        class BlockBufferedThunkHandler(tcpserver.ThunkHandler):
            line_buffering = False

        return tcpserver.ThreadingTCPServer(
            address, BlockBufferedThunkHandler, thunk=thunk,
            max_requests=args.max_requests)
    if kind == "tcpserver-echo-timeout":
        return tcpserver.make_tcp_server(address, thunk, idle_timeout=ECHO_IDLE_TIMEOUT,
                                         max_requests=args.max_requests)
    return tcpserver.make_tcp_server(address, thunk,
                                     max_requests=args.max_requests)


def make_threaded_server(kind, args):
    """Return the tcpserver or socketserver server of this kind."""
    if kind.startswith("tcpserver-"):
        return make_tcpserver_server(kind, args)
    if kind == "socketserver-http":
        handler = functools.partial(QuietHTTPRequestHandler, directory=args.dir)
        return SocketserverHTTPServer((HOST, 0), handler)
    return SocketserverServer((HOST, 0), SOCKETSERVER_HANDLERS[kind])


def wait_for_stdin_eof():
    """Block until the parent closes our stdin, or dies."""
    while True:
        try:
            if not os.read(0, 4096):
                return
        except OSError:
            return


def write_port_file(path, port, pid):
    """Tell the parent the port, and which process to watch, atomically."""
    with open(path + ".tmp", "w") as f:
        f.write("%d %d\n" % (port, pid))
    os.replace(path + ".tmp", path)


def serve_threaded(kind, args):
    server = make_threaded_server(kind, args)
    write_port_file(args.port_file, server.server_address[1], os.getpid())

    def stop_when_told():
        wait_for_stdin_eof()
        server.shutdown()

    threading.Thread(target=stop_when_told, name="stdin-watcher", daemon=True).start()
    server.serve_forever(POLL_INTERVAL)
    if hasattr(server, "stats"):  # tcpserver's counters, for the notes
        with open(args.stats_file, "w") as f:
            json.dump(server.stats(), f)
    server.server_close()


WORKERS_KIND = "tcpserver-workers-"  # and the number of worker processes


def serve_workers(kind, args):
    """tcpserver's daytime thunk in serve_workers(N) processes, until SIGTERM.

    serve_workers() forks, and a fork copies only the calling thread: so no
    stdin-watcher thread here, nor any other.  The parent stops this server
    with SIGTERM, which serve_workers() passes on to every worker; it
    returns once all have drained and ended.
    """
    import tcpserver

    workers = int(kind[len(WORKERS_KIND):])
    server = tcpserver.make_tcp_server((HOST, 0), daytime_thunk,
                                       max_requests=args.max_requests)
    if threading.active_count() != 1:
        sys.exit("%d threads before serve_workers(): a fork would lose them"
                 % threading.active_count())
    write_port_file(args.port_file, server.server_address[1], os.getpid())
    server.serve_workers(workers, POLL_INTERVAL)
    server.server_close()


async def asyncio_daytime(reader, writer):
    writer.write((time.ctime() + "\n").encode())
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def asyncio_echo(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve_asyncio(kind, args):
    import asyncio  # here: importing it costs every other server 60 ms
    handler = {"asyncio-daytime": asyncio_daytime, "asyncio-echo": asyncio_echo}[kind]
    server = await asyncio.start_server(handler, HOST, 0, backlog=socket.SOMAXCONN)
    write_port_file(args.port_file, server.sockets[0].getsockname()[1], os.getpid())
    await asyncio.get_running_loop().run_in_executor(None, wait_for_stdin_eof)
    server.close()


def serve_ucspi(kind, args):
    """Run ucspi-tcp's tcpserver with a small program per connection."""
    program = shutil.which(UCSPI_PROGRAMS[kind])
    if program is None:
        sys.exit("%s not found" % UCSPI_PROGRAMS[kind])
    command = ["/usr/bin/tcpserver", "-1", "-H", "-R", "-l", "0", "-D",
               "-b", str(socket.SOMAXCONN), "-c", str(args.max_requests),
               HOST, "0", program]
    ucspi = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([ucspi.stdout], [], [], SERVER_START_TIMEOUT)
        line = ucspi.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            sys.exit("ucspi-tcp did not print its port: %r" % line[:200])
        write_port_file(args.port_file, int(line), ucspi.pid)
        wait_for_stdin_eof()
    finally:
        ucspi.terminate()
        try:
            ucspi.wait(2)
        except subprocess.TimeoutExpired:
            ucspi.kill()
            ucspi.wait()


def serve_main(args):
    """The --serve process: one server, until the parent closes our stdin."""
    global BULK_LINES
    if args.cpu is not None:
        pin_to_cpus(args.cpu)
    raise_nofile_limit()
    BULK_LINES = args.bulk_bytes // len(LINE_BYTES)
    kind = args.serve
    if kind.startswith("asyncio-"):
        import asyncio
        asyncio.run(serve_asyncio(kind, args))
    elif kind.startswith("ucspi-"):
        serve_ucspi(kind, args)
    elif kind.startswith(WORKERS_KIND):
        serve_workers(kind, args)
    else:
        serve_threaded(kind, args)
    return 0


# ---------------------------------------------------------------------------
# The load generator: C where a compiler exists, else Python processes.
# Both print the same JSON: ops, bytes, seconds, cpu_seconds, errors,
# first_error, hist (a latency histogram: [bucket, count] pairs).
# ---------------------------------------------------------------------------

C_CLIENT = r'''
/* The load generator of bench_tcpserver.py, compiled by it at run time.
 *
 *   client conn HOST PORT CLIENTS WARMUP DURATION MESSAGE
 *       CLIENTS threads each loop: connect, send MESSAGE (if not empty),
 *       read until EOF, close.  An operation: connect to EOF.
 *   client ping HOST PORT CLIENTS WARMUP DURATION MESSAGE
 *       CLIENTS threads each hold one connection and loop: send the line
 *       MESSAGE, read as many bytes back.  An operation: one round trip.
 *   client bulk HOST PORT 1 0 TIMEOUT ""
 *       One connection, read until EOF.  An operation: connect to EOF.
 *
 * Operations that start after WARMUP seconds and end within the next
 * DURATION seconds are counted.  Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 2400     /* latency histogram: bucket = (int)(100 * ln(us)) */
#define IO_TIMEOUT 10    /* seconds a connect, read or write may take */

struct worker {
    pthread_t thread;
    long ops;            /* operations counted */
    long long bytes;     /* bytes read by counted operations */
    long err_connect, err_io, err_timeout, err_empty;
    int first_errno;
    double slowest;      /* longest operation started in the window, even if
                            it ended after it: shows stalls */
    long hist[BUCKETS];
};

static char mode;        /* 'c' conn, 'p' ping, 'b' bulk */
static struct sockaddr_in server;
static const char *message;
static size_t message_len;
static double window_start, window_end;   /* CLOCK_MONOTONIC seconds */
static double bulk_seconds;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_until(double when)
{
    double left;
    while ((left = when - now()) > 0) {
        struct timespec ts;
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - ts.tv_sec) * 1e9);
        nanosleep(&ts, NULL);
    }
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
         + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* Count an operation from t0 to t1, if it lies within the window. */
static void record(struct worker *w, double t0, double t1, long long bytes)
{
    double us = (t1 - t0) * 1e6;
    int b = us <= 1.0 ? 0 : (int)(100.0 * log(us));
    if (t0 >= window_start && t0 < window_end && t1 - t0 > w->slowest)
        w->slowest = t1 - t0;
    if (t0 < window_start || t1 > window_end)
        return;
    if (b >= BUCKETS)
        b = BUCKETS - 1;
    w->hist[b]++;
    w->ops++;
    w->bytes += bytes;
}

/* Count a failure; EAGAIN after SO_RCVTIMEO or SO_SNDTIMEO is a timeout. */
static void failed(struct worker *w, long *counter, int err)
{
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINPROGRESS)
        counter = &w->err_timeout;
    (*counter)++;
    if (!w->first_errno)
        w->first_errno = err;
}

static int open_connection(struct worker *w)
{
    struct timeval tv = { IO_TIMEOUT, 0 };
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        failed(w, &w->err_connect, errno);
        usleep(10000);
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) < 0) {
        failed(w, &w->err_connect, errno);
        close(fd);
        usleep(10000);   /* refused, or out of ports: do not spin */
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= n;
    }
    return 0;
}

/* Read fd to its end, count the operation begun at t0 (or its failure),
   close fd; return when the end came. */
static double read_to_end(struct worker *w, int fd, char *buf, size_t size,
                          double t0)
{
    long long got = 0;
    ssize_t n;
    double t1;
    while ((n = read(fd, buf, size)) > 0)
        got += n;
    t1 = now();
    if (n < 0)
        failed(w, &w->err_io, errno);
    else if (got == 0)
        failed(w, &w->err_empty, 0);
    else
        record(w, t0, t1, got);
    close(fd);
    return t1;
}

static void conn_loop(struct worker *w)
{
    char buf[16384];
    while (now() < window_end) {
        double t0 = now();
        int fd = open_connection(w);
        if (fd < 0)
            continue;
        if (message_len && send_all(fd, message, message_len) < 0) {
            failed(w, &w->err_io, errno);
            close(fd);
            continue;
        }
        read_to_end(w, fd, buf, sizeof buf, t0);
    }
}

static void ping_loop(struct worker *w)
{
    char buf[4096];
    int fd = -1;
    while (now() < window_end) {
        double t0;
        size_t got = 0;
        ssize_t n = 0;
        if (fd < 0 && (fd = open_connection(w)) < 0)
            continue;
        t0 = now();
        if (send_all(fd, message, message_len) < 0) {
            failed(w, &w->err_io, errno);
            close(fd);
            fd = -1;
            continue;
        }
        while (got < message_len && (n = read(fd, buf, sizeof buf)) > 0)
            got += n;
        if (got < message_len) {
            if (n < 0)
                failed(w, &w->err_io, errno);
            else
                failed(w, &w->err_empty, 0);
            close(fd);
            fd = -1;
            continue;
        }
        record(w, t0, now(), got);
    }
    if (fd >= 0)
        close(fd);
}

static void bulk_read(struct worker *w)
{
    size_t size = 1 << 18;
    char *buf = malloc(size);
    double t0 = now();
    int fd = open_connection(w);
    if (fd < 0 || buf == NULL) {
        free(buf);
        return;
    }
    bulk_seconds = read_to_end(w, fd, buf, size, t0) - t0;
    free(buf);
}

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    if (mode == 'c')
        conn_loop(w);
    else if (mode == 'p')
        ping_loop(w);
    else
        bulk_read(w);
    return NULL;
}

int main(int argc, char **argv)
{
    struct worker *workers;
    struct rlimit rl;
    pthread_attr_t attr;
    double warmup, duration, cpu0, cpu1 = 0, start, slowest = 0;
    long ops = 0, err_connect = 0, err_io = 0, err_timeout = 0, err_empty = 0;
    long long bytes = 0;
    int clients, i, b, first_errno = 0;
    const char *sep = "";

    if (argc != 8 || strchr("cpb", argv[1][0]) == NULL) {
        fprintf(stderr, "usage: client conn|ping|bulk HOST PORT CLIENTS WARMUP DURATION MESSAGE\n");
        return 2;
    }
    mode = argv[1][0];
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &server.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", argv[2]);
        return 2;
    }
    clients = atoi(argv[4]);
    warmup = atof(argv[5]);
    duration = atof(argv[6]);
    message = argv[7];
    message_len = strlen(message);
    if (clients < 1 || (mode == 'p' && message_len == 0)) {
        fprintf(stderr, "need CLIENTS >= 1, and a MESSAGE for ping\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    workers = calloc(clients, sizeof *workers);
    if (workers == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    start = now();
    window_start = start + warmup;
    window_end = window_start + duration;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    cpu0 = cpu_seconds();
    for (i = 0; i < clients; i++) {
        if (pthread_create(&workers[i].thread, &attr, run_worker, &workers[i]) != 0) {
            fprintf(stderr, "cannot start thread %d\n", i);
            return 1;
        }
    }
    if (mode != 'b') {   /* CPU time within the window only */
        sleep_until(window_start);
        cpu0 = cpu_seconds();
        sleep_until(window_end);
        cpu1 = cpu_seconds();
    }
    for (i = 0; i < clients; i++)
        pthread_join(workers[i].thread, NULL);
    if (mode == 'b')
        cpu1 = cpu_seconds();
    for (i = 0; i < clients; i++) {
        struct worker *w = &workers[i];
        ops += w->ops;
        bytes += w->bytes;
        err_connect += w->err_connect;
        err_io += w->err_io;
        err_timeout += w->err_timeout;
        err_empty += w->err_empty;
        if (!first_errno)
            first_errno = w->first_errno;
        if (w->slowest > slowest)
            slowest = w->slowest;
        if (i > 0)
            for (b = 0; b < BUCKETS; b++)
                workers[0].hist[b] += w->hist[b];
    }
    printf("{\"ops\": %ld, \"bytes\": %lld, \"seconds\": %.6f, \"cpu_seconds\": %.6f, "
           "\"errors\": {\"connect\": %ld, \"io\": %ld, \"timeout\": %ld, \"empty\": %ld}, "
           "\"max_ms\": %.3f, \"first_error\": \"%s\", \"hist\": [",
           ops, bytes, mode == 'b' ? bulk_seconds : duration, cpu1 - cpu0,
           err_connect, err_io, err_timeout, err_empty, slowest * 1000,
           first_errno ? strerror(first_errno) : "");
    for (b = 0; b < BUCKETS; b++) {
        if (workers[0].hist[b]) {
            printf("%s[%d, %ld]", sep, b, workers[0].hist[b]);
            sep = ", ";
        }
    }
    printf("]}\n");
    return 0;
}
'''


def histogram_bucket(seconds):
    """The bucket of a latency in the histogram, as the C client computes it."""
    us = seconds * 1e6
    return 0 if us <= 1.0 else int(BUCKETS_PER_E * math.log(us))


def percentile_ms(hist, fraction):
    """The latency in ms below which fraction of the operations in hist fall."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= fraction * total:
            return math.exp((bucket + 0.5) / BUCKETS_PER_E) / 1000.0
    return None


class WorkerResult:
    """What one Python client thread counted."""

    def __init__(self):
        self.ops = 0
        self.bytes = 0
        self.hist = {}
        self.errors = {"connect": 0, "io": 0, "timeout": 0, "empty": 0}
        self.first_error = ""
        self.bulk_seconds = 0.0
        self.slowest = 0.0  # longest operation started in the window

    def record(self, t0, t1, nbytes, window):
        if window[0] <= t0 < window[1]:
            self.slowest = max(self.slowest, t1 - t0)
        if t0 >= window[0] and t1 <= window[1]:
            bucket = histogram_bucket(t1 - t0)
            self.hist[bucket] = self.hist.get(bucket, 0) + 1
            self.ops += 1
            self.bytes += nbytes

    def failed(self, kind, exc=None):
        if isinstance(exc, socket.timeout):
            kind = "timeout"
        self.errors[kind] += 1
        if not self.first_error:
            self.first_error = str(exc) if exc else kind
        time.sleep(0.001 if kind == "io" else 0.01)


def python_conn_loop(result, address, message, window):
    while time.monotonic() < window[1]:
        t0 = time.monotonic()
        try:
            sock = socket.create_connection(address, timeout=IO_TIMEOUT)
        except OSError as exc:
            result.failed("connect", exc)
            continue
        got = 0
        try:
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if message:
                    sock.sendall(message)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
        except OSError as exc:
            result.failed("io", exc)
            continue
        if got:
            result.record(t0, time.monotonic(), got, window)
        else:
            result.failed("empty")


def python_ping_loop(result, address, message, window):
    sock = None
    while time.monotonic() < window[1]:
        if sock is None:
            try:
                sock = socket.create_connection(address, timeout=IO_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                result.failed("connect", exc)
                sock = None
                continue
        t0 = time.monotonic()
        got = 0
        try:
            sock.sendall(message)
            while got < len(message):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += len(chunk)
        except OSError as exc:
            result.failed("io", exc)
        else:
            if got == len(message):
                result.record(t0, time.monotonic(), got, window)
                continue
            result.failed("empty")
        sock.close()  # after a failure: start again on a new connection
        sock = None
    if sock is not None:
        sock.close()


def python_bulk_read(result, address, message, window):
    t0 = time.monotonic()
    buffer = bytearray(1 << 18)
    got = 0
    try:
        with socket.create_connection(address, timeout=IO_TIMEOUT) as sock:
            while True:
                count = sock.recv_into(buffer)
                if not count:
                    break
                got += count
    except OSError as exc:
        result.failed("io", exc)
        return
    result.bulk_seconds = time.monotonic() - t0
    result.record(t0, time.monotonic(), got, window)


def client_main(args):
    """The --client process: part of the Python load generator; prints JSON."""
    loop = {"conn": python_conn_loop, "ping": python_ping_loop,
            "bulk": python_bulk_read}[args.client]
    raise_nofile_limit()
    start = time.monotonic()
    window = (start + args.warmup, start + args.warmup + args.duration)
    results = [WorkerResult() for _ in range(args.clients)]
    threads = [threading.Thread(target=loop, daemon=True,
                                args=(result, (HOST, args.port), args.message.encode(), window))
               for result in results]
    cpu0 = sum(os.times()[:2])
    for thread in threads:
        thread.start()
    if args.client != "bulk":  # CPU time within the window only
        time.sleep(max(0.0, window[0] - time.monotonic()))
        cpu0 = sum(os.times()[:2])
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu1 = sum(os.times()[:2])
    for thread in threads:
        thread.join(max(0.0, window[1] - time.monotonic()) + 3 * IO_TIMEOUT)
    if args.client == "bulk":
        cpu1 = sum(os.times()[:2])
    hist = {}
    errors = {"connect": 0, "io": 0, "timeout": 0, "empty": 0}
    for result in results:
        for bucket, count in result.hist.items():
            hist[bucket] = hist.get(bucket, 0) + count
        for kind, count in result.errors.items():
            errors[kind] += count
    seconds = results[0].bulk_seconds if args.client == "bulk" else args.duration
    print(json.dumps({
        "ops": sum(r.ops for r in results), "bytes": sum(r.bytes for r in results),
        "seconds": seconds, "cpu_seconds": cpu1 - cpu0, "errors": errors,
        "max_ms": 1000.0 * max(r.slowest for r in results),
        "first_error": next((r.first_error for r in results if r.first_error), ""),
        "hist": sorted(hist.items())}))
    return 0


class CLoadGenerator:
    """Runs the C client compiled from C_CLIENT."""

    def __init__(self, binary, description):
        self.binary = binary
        self.description = description

    def run(self, mode, port, clients, warmup, duration, message):
        command = [self.binary, mode, HOST, str(port), str(clients),
                   "%.3f" % warmup, "%.3f" % duration, message]
        code, out, err = run_command(command, warmup + duration + 3 * IO_TIMEOUT + 10,
                                     cap=1 << 20)
        if code != 0:
            raise BenchError("load generator exited with %s: %s"
                             % (code, (err or out)[-300:].strip()))
        return parse_load_result(out)


class PythonLoadGenerator:
    """Runs the Python client (this script with --client) in several processes."""

    def __init__(self, processes):
        self.processes = processes
        self.description = "Python multi-process (%d processes, threads in each)" % processes

    def run(self, mode, port, clients, warmup, duration, message):
        count = min(self.processes, clients)
        shares = [clients // count + (1 if i < clients % count else 0) for i in range(count)]
        procs = []
        try:
            for share in shares:
                command = [sys.executable, SCRIPT, "--client", mode, "--port", str(port),
                           "--clients", str(share), "--warmup", str(warmup),
                           "--duration", str(duration), "--message", message]
                proc = spawn(command, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                procs.append((proc, CappedOutput(proc.stdout, 1 << 20),
                              CappedOutput(proc.stderr)))
            deadline = time.monotonic() + warmup + duration + 3 * IO_TIMEOUT + 10
            results = []
            for proc, out, err in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError("Python load generator timed out") from None
                if proc.returncode != 0:
                    raise BenchError("Python load generator exited with %s: %s"
                                     % (proc.returncode, err.text()[-300:].strip()))
                results.append(parse_load_result(out.text()))
        finally:
            for proc, _, _ in procs:
                reap(proc, 0)
        return merge_load_results(results)


def parse_load_result(text):
    try:
        result = json.loads(text)
    except ValueError:
        raise BenchError("load generator printed no result: %r" % text[:200]) from None
    result["hist"] = {int(bucket): count for bucket, count in result["hist"]}
    return result


def merge_load_results(results):
    """Add up the results of several client processes that ran at once."""
    merged = {"ops": 0, "bytes": 0, "cpu_seconds": 0.0, "hist": {},
              "errors": {"connect": 0, "io": 0, "timeout": 0, "empty": 0},
              "seconds": max(r["seconds"] for r in results),
              "max_ms": max(r["max_ms"] for r in results),
              "first_error": next((r["first_error"] for r in results if r["first_error"]), "")}
    for result in results:
        for key in ("ops", "bytes", "cpu_seconds"):
            merged[key] += result[key]
        for kind, count in result["errors"].items():
            merged["errors"][kind] += count
        for bucket, count in result["hist"].items():
            merged["hist"][bucket] = merged["hist"].get(bucket, 0) + count
    return merged


def compiler_command():
    """The C compiler to use, or None."""
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def make_load_generator(tmp, load_cpus, force_python):
    """Compile the C client if we can; else fall back to Python processes.

    Returns (load generator, CPUs to pin the load to, a note or "").
    """
    compiler = None if force_python else compiler_command()
    note = ""
    if compiler:
        source = os.path.join(tmp, "client.c")
        binary = os.path.join(tmp, "client")
        with open(source, "w") as f:
            f.write(C_CLIENT)
        code, out, err = run_command([compiler, "-O2", "-pthread", "-o", binary,
                                      source, "-lm"], 120)
        if code == 0:
            _, version, _ = run_command([compiler, "--version"], 20)
            description = "C (%s, -O2, one thread per client)" % (
                version.splitlines()[0].strip() if version.strip() else compiler)
            return CLoadGenerator(binary, description), load_cpus[:1], ""
        note = "C client did not compile (%s), so: " % (err or out).strip()[-200:]
    processes = max(2, len(load_cpus))
    return PythonLoadGenerator(processes), load_cpus, note


# ---------------------------------------------------------------------------
# Child processes: each in a session of its own, killed as a group; output
# read by a thread that keeps only the first and last OUTPUT_CAP bytes.
# ---------------------------------------------------------------------------

_children = []  # every Popen started and not yet reaped


def spawn(command, **kwargs):
    """Start command in a new session, so it and its children die together."""
    proc = subprocess.Popen(command, start_new_session=True, **kwargs)
    _children.append(proc)
    return proc


def reap(proc, timeout):
    """Wait up to timeout for proc, then kill its process group and forget it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # it, if alive, and what it left
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _children:
        _children.remove(proc)


def kill_children():
    for proc in list(_children):
        reap(proc, 0)


class CappedOutput:
    """Reads a child's pipe in a thread, keeping at most cap bytes at each end."""

    def __init__(self, pipe, cap=OUTPUT_CAP):
        self.cap = cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.lines = 0
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        try:
            while True:
                chunk = os.read(pipe.fileno(), 65536)
                if not chunk:
                    break
                self.total += len(chunk)
                self.lines += chunk.count(b"\n")
                room = self.cap - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                if chunk:
                    self.tail = (self.tail + chunk)[-self.cap:]
        except (OSError, ValueError):
            pass
        finally:
            pipe.close()

    def text(self, wait=2.0):
        self.thread.join(wait)
        text = self.head.decode("utf-8", "replace")
        if self.tail:
            left_out = self.total - len(self.head) - len(self.tail)
            if left_out > 0:
                text += "\n[... %d bytes left out ...]\n" % left_out
            text += self.tail.decode("utf-8", "replace")
        return text


def run_command(command, timeout, cap=OUTPUT_CAP):
    """Run command, killed after timeout seconds; return (exit code or None, out, err)."""
    proc = spawn(command, stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = CappedOutput(proc.stdout, cap), CappedOutput(proc.stderr)
    try:
        proc.wait(timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        reap(proc, 0)
    return code, out.text(), err.text()


# ---------------------------------------------------------------------------
# A server under test, seen from the parent.
# ---------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_stat(pid):
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def stat_cpu_seconds(fields):
    """utime + stime + cutime + cstime of a process_stat(), in seconds."""
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def process_group(pgid):
    """{pid: stat fields} of the live processes (not zombies) in group pgid."""
    members = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        fields = process_stat(int(name)) if name.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members[int(name)] = fields
    return members


class ServerProcess:
    """This script with --serve KIND, started and ready: port and pid known.

    cpus: the CPUs it runs on, if not the benchmark's server CPU.  forks: it
    serves in worker processes (serve_workers()), so it is stopped by
    SIGTERM instead of by closing its stdin, must then exit 0 leaving no
    process behind (else stop_error says why), and its CPU time is that of
    its process group (it runs in a session of its own).
    """

    def __init__(self, bench, kind, extra_args=(), cpus=None, forks=False):
        self.kind = kind
        self.forks = forks
        self.stats = None
        self.stop_error = None
        bench.servers_started += 1
        base = os.path.join(bench.tmp, "server-%d" % bench.servers_started)
        self.port_file = base + ".port"
        self.stats_file = base + ".stats"
        command = [sys.executable, SCRIPT, "--serve", kind,
                   "--port-file", self.port_file, "--stats-file", self.stats_file]
        if cpus is None and bench.server_cpu is not None:
            cpus = [bench.server_cpu]
        if cpus:
            command += ["--cpu", ",".join(map(str, cpus))]
        self.proc = spawn(command + list(extra_args), cwd=HERE, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = CappedOutput(self.proc.stdout)
        self.port, self.pid = self._wait_for_port()

    def _wait_for_port(self):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            if os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    port, pid = f.read().split()
                return int(port), int(pid)
            time.sleep(0.01)
        self.stop()
        raise BenchError("server %s did not start: %s"
                         % (self.kind, self.output.text()[-400:].strip() or "no output"))

    def cpu_seconds(self):
        """CPU time of the server process and its reaped children, or None;
        with forks, of every process in its group (its live workers too)."""
        if self.forks:
            members = process_group(self.proc.pid)
            return sum(map(stat_cpu_seconds, members.values())) if members else None
        fields = process_stat(self.pid)
        return None if fields is None else stat_cpu_seconds(fields)

    def workers(self):
        """With forks: how many processes run beside the supervising one."""
        return len([pid for pid in process_group(self.proc.pid) if pid != self.proc.pid])

    def status(self):
        """The server's VmRSS (KiB) and thread count from /proc, or Nones."""
        found = {"rss_kib": None, "threads": None}
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        found["rss_kib"] = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        found["threads"] = int(line.split()[1])
        except OSError:
            pass
        return found

    def stop(self, timeout=SERVER_STOP_TIMEOUT):
        """Close the server's stdin (its signal to stop), wait, then kill."""
        if self.forks:
            self._stop_by_signal(timeout)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        reap(self.proc, timeout)
        try:
            with open(self.stats_file) as f:
                self.stats = json.load(f)
        except (OSError, ValueError):
            pass

    def _stop_by_signal(self, timeout):
        """SIGTERM the supervising process; within timeout it must exit 0,
        having reaped every worker.  Sets stop_error if not; stop() then
        kills the whole process group in any case."""
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        code = self.proc.returncode
        left = sorted(pid for pid in process_group(self.proc.pid) if pid != self.proc.pid)
        problems = []
        if code is None:
            problems.append("did not exit within %.0f s of SIGTERM" % timeout)
        elif code != 0:
            problems.append("exited with %s after SIGTERM" % code)
        if left:
            problems.append("left %d worker process(es) running: %s"
                            % (len(left), " ".join(map(str, left))))
        if problems:
            self.stop_error = "; ".join(problems) + " (killed)"

    def report(self):
        """What the server said and counted, for the JSON and the notes."""
        return {"server_stats": self.stats,
                "server_output": {"bytes": self.output.total, "lines": self.output.lines,
                                  "text": self.output.text()[:2000]}}


# ---------------------------------------------------------------------------
# Measurements: each starts a fresh server, loads it, stops it.
# ---------------------------------------------------------------------------

def load_figures(result, rate_key):
    """conn/s (or rt/s), p50, p99 and client CPU from a load generator's result."""
    seconds = result["seconds"] or float("nan")
    return {rate_key: result["ops"] / seconds,
            "p50_ms": percentile_ms(result["hist"], 0.50),
            "p99_ms": percentile_ms(result["hist"], 0.99),
            "client_cpu_pct": 100.0 * result["cpu_seconds"] / seconds,
            "max_ms": result["max_ms"],
            "errors": sum(result["errors"].values())}


def load_server(bench, server, mode, clients, message, warmup, duration):
    """Run the load generator against server; return its result and the server's CPU %."""
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    result = bench.load.run(mode, server.port, clients, warmup, duration, message)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    cpu = None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / (t1 - t0)
    return result, cpu


def measure_rate(bench, kind, mode, clients, message, rate_key):
    """conn and ping: rate and latency of kind's server under clients."""
    server = ServerProcess(bench, kind)
    try:
        result, cpu = load_server(bench, server, mode, clients, message,
                                  bench.settings.warmup, bench.settings.duration)
    finally:
        server.stop()
    figures = load_figures(result, rate_key)
    figures["server_cpu_pct"] = cpu
    result["hist"] = sorted(result["hist"].items())
    return dict(figures=figures, client=result, **server.report())


def measure_workers(bench, kind, clients):
    """workers: conn's rate and latency of a serve_workers() server.

    The server runs on every CPU, not pinned; it is stopped by SIGTERM,
    and the run fails unless it exits 0 and leaves no worker behind.
    """
    server = ServerProcess(bench, kind, cpus=bench.all_cpus, forks=True)
    try:
        result, cpu = load_server(bench, server, "conn", clients, "",
                                  bench.settings.warmup, bench.settings.duration)
        workers = server.workers()
    finally:
        server.stop()
    if server.stop_error:
        raise BenchError("server %s: %s" % (kind, server.stop_error))
    figures = load_figures(result, "conn_s")
    figures["server_cpu_pct"] = cpu
    figures["workers"] = workers
    result["hist"] = sorted(result["hist"].items())
    return dict(figures=figures, client=result, **server.report())


def measure_bulk(bench, kind):
    """bulk: MB/s of one connection reading bulk_bytes of lines."""
    expected = bench.settings.bulk_bytes // len(LINE_BYTES) * len(LINE_BYTES)
    server = ServerProcess(bench, kind, ["--bulk-bytes", str(bench.settings.bulk_bytes)])
    try:
        result, cpu = load_server(bench, server, "bulk", 1, "", 0.0,
                                  bench.settings.bulk_timeout)
    finally:
        server.stop()
    result["hist"] = sorted(result["hist"].items())
    if result["ops"] != 1 or result["bytes"] != expected:
        raise BenchError("bulk read %d of %d bytes (%s)"
                         % (result["bytes"], expected, result["first_error"] or "timed out"))
    figures = {"mb_s": result["bytes"] / 1e6 / result["seconds"],
               "server_cpu_pct": cpu,
               "client_cpu_pct": 100.0 * result["cpu_seconds"] / result["seconds"],
               "errors": sum(result["errors"].values())}
    return dict(figures=figures, client=result, **server.report())


def run_ab(ab, url, clients, duration):
    command = [ab, "-q", "-r", "-s", str(IO_TIMEOUT), "-c", str(clients),
               "-t", str(max(1, int(round(duration)))), url]
    code, out, err = run_command(command, duration + 60)
    if code != 0:
        raise BenchError("ab exited with %s: %s" % (code, (err or out)[-300:].strip()))

    def number(pattern):
        found = re.search(pattern, out, re.MULTILINE)
        return float(found.group(1)) if found else None

    rate = number(r"^Requests per second:\s+([\d.]+)")
    if rate is None:
        raise BenchError("ab printed no rate: %r" % out[-300:])
    errors = ((number(r"^Failed requests:\s+(\d+)") or 0)
              + (number(r"^Non-2xx responses:\s+(\d+)") or 0))
    return {"req_s": rate, "p50_ms": number(r"^\s+50%\s+(\d+)"),
            "p99_ms": number(r"^\s+99%\s+(\d+)"), "errors": errors}, out[-3000:]


def run_wrk(wrk, url, clients, duration):
    command = [wrk, "-t1", "-c%d" % clients, "-d%ds" % max(1, int(round(duration))),
               "--latency", "--timeout", "%ds" % IO_TIMEOUT, url]
    code, out, err = run_command(command, duration + 60)
    if code != 0:
        raise BenchError("wrk exited with %s: %s" % (code, (err or out)[-300:].strip()))
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if rate is None:
        raise BenchError("wrk printed no rate: %r" % out[-300:])

    def latency_ms(percent):
        found = re.search(r"^\s+%d%%\s+([\d.]+)(us|ms|s)\s*$" % percent, out, re.MULTILINE)
        if not found:
            return None
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return {"req_s": float(rate.group(1)), "p50_ms": latency_ms(50),
            "p99_ms": latency_ms(99), "errors": errors}, out[-3000:]


def measure_http(bench, kind):
    """http: requests/s of http.server on kind's server class, from ab or wrk."""
    tool, path = bench.http_tool
    server = ServerProcess(bench, kind, ["--dir", bench.http_dir])
    try:
        url = "http://%s:%d/%s" % (HOST, server.port, HTTP_FILE)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        run = run_ab if tool == "ab" else run_wrk
        figures, output = run(path, url, bench.settings.http_clients, bench.settings.duration)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
    finally:
        server.stop()
    if cpu0 is not None and cpu1 is not None:
        figures["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
    return dict(figures=figures, client={"tool": tool, "output": output}, **server.report())


def open_idle_connections(port, count, timeout):
    """Open count connections to port that send nothing; close them all on failure."""
    deadline = time.monotonic() + timeout
    sockets = []
    try:
        for _ in range(count):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("opened only %d of %d idle connections in %d s"
                                 % (len(sockets), count, timeout))
            sockets.append(socket.create_connection((HOST, port), timeout=min(left, IO_TIMEOUT)))
    except OSError as exc:
        close_all(sockets)
        raise BenchError("opened only %d of %d idle connections: %s"
                         % (len(sockets), count, exc)) from exc
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets):
    for sock in sockets:
        sock.close()
    del sockets[:]


def wait_for_threads(server, count, timeout):
    """Wait until the server runs at least count threads, steady for 0.2 s."""
    deadline = time.monotonic() + timeout
    last, steady_since = None, time.monotonic()
    while time.monotonic() < deadline:
        threads = server.status()["threads"]
        if threads is None:
            return  # no /proc: nothing to wait on
        if threads != last:
            last, steady_since = threads, time.monotonic()
        elif threads >= count and time.monotonic() - steady_since >= 0.2:
            return
        time.sleep(0.05)
    raise BenchError("after %d s the server runs %s threads, not the %d its idle "
                     "connections need" % (timeout, last, count))


def measure_growth(bench, kind, counts):
    """growth: one server, grown to each count of idle connections in turn.

    At each count: the server's RSS, and the rate of extra short
    connections.  Returns {"levels": {count: {"figures", "client"}}}, and
    "error" if a count could not be reached: the counts before it stand.
    """
    server = ServerProcess(bench, kind, ["--max-requests", str(max(counts) + 10000)])
    sockets = []
    levels = {}
    record = {"levels": levels}
    try:
        before = server.status()
        for held in counts:
            try:
                step = step_timeout(bench, 30 + held / 100.0)
                sockets += open_idle_connections(server.port, held - len(sockets), step)
                wait_for_threads(server, held + 1, step_timeout(bench, 30 + held / 100.0))
                holding = server.status()
                result, cpu = load_server(bench, server, "conn", bench.settings.growth_clients,
                                          HOLD_MESSAGE, bench.settings.warmup,
                                          bench.settings.growth_duration)
            except BenchError as exc:
                record["error"] = "at %d idle connections: %s" % (held, exc)
                break
            figures = load_figures(result, "conn_s")
            figures["server_cpu_pct"] = cpu
            figures["threads"] = holding["threads"]
            if before["rss_kib"] is not None and holding["rss_kib"] is not None:
                figures["rss_kib_per_conn"] = (holding["rss_kib"] - before["rss_kib"]) / held
                figures["rss_mib"] = holding["rss_kib"] / 1024.0
            result["hist"] = sorted(result["hist"].items())
            levels[held] = {"figures": figures, "client": result}
    finally:
        close_all(sockets)
        server.stop(timeout=2.0)  # 10,000 threads take long to wind down
    record.update(server.report())
    return record


def step_timeout(bench, seconds):
    """seconds, but no later than the benchmark's time limit (and at least 10 s)."""
    return max(10.0, min(seconds, bench.deadline - time.monotonic()))


# ---------------------------------------------------------------------------
# Running the comparisons: alternate the servers, run after run.
# ---------------------------------------------------------------------------

class Settings:
    """What to measure, and for how long, from the command line."""

    def __init__(self, args):
        quick = args.quick
        self.quick = quick
        self.runs = args.runs
        self.duration = args.duration or (0.5 if quick else 2.0)
        self.warmup = 0.2 if quick else 0.5
        self.conn_clients = [32] if quick else [1, 32, 256]
        self.ping_clients = [1] if quick else [1, 32]
        self.bulk_bytes = (10 if quick else 100) * 10**6
        self.bulk_pairs = BULK_PAIRS[1:] if quick else BULK_PAIRS  # quick: the targets
        self.with_ucspi = not quick
        self.bulk_timeout = 30.0 if quick else 120.0
        self.http_clients = 32
        self.held_counts = [1000] if quick else [1000, 5000, 10000]
        self.growth_clients = 32
        self.growth_duration = self.duration if quick else self.duration * 2 / 3
        self.workers_clients = [32] if quick else [32, 256]
        self.scenarios = args.only or (["conn", "ping", "bulk", "growth", "workers"]
                                       if quick else SCENARIOS)
        self.time_limit = args.time_limit or (90.0 if quick else 900.0)


class Bench:
    """The state of one benchmark run: settings, tools, results."""

    def __init__(self, settings, tmp):
        self.settings = settings
        self.tmp = tmp
        self.deadline = time.monotonic() + settings.time_limit
        self.servers_started = 0
        self.results = []      # one dict per run, for --json
        self.skipped = []      # what the time limit or missing tools left out
        self.server_cpu = None
        self.all_cpus = None   # the CPUs workers' servers run on
        self.load = None
        self.http_tool = None
        self.http_dir = None
        self.ucspi = None

    def out_of_time(self):
        return time.monotonic() > self.deadline


def compare(bench, scenario, config, servers, measure):
    """Run measure(kind) runs times per server, alternating; return {label: [records]}."""
    records = {label: [] for label, _ in servers}
    for run in range(1, bench.settings.runs + 1):
        for label, kind in servers:
            if bench.out_of_time():
                if not bench.skipped or bench.skipped[-1] != (scenario, config):
                    bench.skipped.append((scenario, config))
                continue
            record = {"scenario": scenario, "config": config, "server": label,
                      "kind": kind, "run": run}
            try:
                record.update(measure(kind))
            except BenchError as exc:
                record["error"] = str(exc)
            bench.results.append(record)
            records[label].append(record)
            progress(scenario, config, run, bench.settings.runs, label, record)
    return records


RATE_UNITS = {"conn_s": "conn/s", "rt_s": "rt/s", "mb_s": "MB/s", "req_s": "req/s"}


def progress(scenario, config, run, runs, label, record):
    """One line on stderr per run, so a long benchmark shows it is alive."""
    if "levels" in record:
        what = "; ".join("%s held: %s conn/s"
                         % ("{:,}".format(held), fmt(level["figures"]["conn_s"]))
                         for held, level in sorted(record["levels"].items()))
        if "error" in record:
            what += "; FAILED " + record["error"][:150]
    elif "error" in record:
        what = "FAILED: " + record["error"][:150]
    else:
        figures = record["figures"]
        key = next(k for k in RATE_UNITS if k in figures)
        what = "%s %s" % (fmt(figures[key]), RATE_UNITS[key])
    print("  [%s %s] run %d/%d  %-45s %s" % (scenario, config, run, runs, label, what),
          file=sys.stderr, flush=True)


def daytime_servers(bench):
    servers = [("tcpserver", "tcpserver-daytime"),
               ("socketserver", "socketserver-daytime"),
               ("asyncio", "asyncio-daytime")]
    if bench.ucspi and bench.settings.with_ucspi:
        servers.append(("ucspi-tcp (date)", "ucspi-daytime"))
    return servers


def echo_servers(bench):
    servers = [("tcpserver", "tcpserver-echo"),
               ("tcpserver, idle timeout", "tcpserver-echo-timeout"),
               ("socketserver", "socketserver-echo"),
               ("asyncio", "asyncio-echo")]
    if bench.ucspi and bench.settings.with_ucspi:
        servers.append(("ucspi-tcp (cat)", "ucspi-echo"))
    return servers


RATE_COLUMNS = [("p50_ms", "p50 ms", "main"), ("p99_ms", "p99 ms", "main"),
                ("server_cpu_pct", "srv CPU%", "value"),
                ("client_cpu_pct", "cli CPU%", "value"), ("errors", "errors", "sum")]


def scenario_conn(bench):
    s = bench.settings
    for clients in s.conn_clients:
        config = "c=%d" % clients
        records = compare(bench, "conn", config, daytime_servers(bench),
                          lambda kind, clients=clients: measure_rate(bench, kind, "conn",
                                                                     clients, "", "conn_s"))
        print_table("Connection rate, daytime, %d concurrent clients (%d runs of %.1f s)"
                    % (clients, s.runs, s.duration),
                    rows_against(records, "socketserver"),
                    [("conn_s", "conn/s", "main")] + RATE_COLUMNS,
                    "x ss: the median over socketserver's (latency: lower is better)")


def scenario_ping(bench):
    s = bench.settings
    for clients in s.ping_clients:
        config = "c=%d" % clients
        records = compare(bench, "ping", config, echo_servers(bench),
                          lambda kind, clients=clients: measure_rate(bench, kind, "ping", clients,
                                                                     PING_MESSAGE, "rt_s"))
        print_table("Ping-pong, %d persistent connections, %d-byte lines (%d runs of %.1f s)"
                    % (clients, len(PING_MESSAGE), s.runs, s.duration),
                    rows_against(records, "socketserver"),
                    [("rt_s", "rt/s", "main")] + RATE_COLUMNS,
                    "x ss: the median over socketserver's (latency: lower is better)")


# Bulk: each tcpserver variant against the socketserver variant it mirrors.
BULK_PAIRS = [
    (("tcpserver print(), line-buffered", "tcpserver-print-line"),
     ("socketserver wfile, unbuffered (wbufsize 0)", "socketserver-wfile-unbuffered")),
    (("tcpserver print(), block-buffered", "tcpserver-print-block"),
     ("socketserver print() to TextIOWrapper(wfile)", "socketserver-print-textio")),
    (("tcpserver sys.stdout.buffer.write()", "tcpserver-buffer-write"),
     ("socketserver wfile.write(), buffered", "socketserver-wfile-buffered")),
]


def scenario_bulk(bench):
    s = bench.settings
    servers = [server for pair in s.bulk_pairs for server in pair]
    records = compare(bench, "bulk", "%dMB" % (s.bulk_bytes // 10**6), servers,
                      lambda kind: measure_bulk(bench, kind))
    rows = []
    for (label, _), (reference, _) in s.bulk_pairs:
        rows.append((label, records[label], records[reference]))
        rows.append((reference, records[reference], None))
    print_table("Bulk: one connection reads %d MB of 64-byte lines (%d runs)"
                % (s.bulk_bytes // 10**6, s.runs), rows,
                [("mb_s", "MB/s", "main"), ("server_cpu_pct", "srv CPU%", "value"),
                 ("client_cpu_pct", "cli CPU%", "value"), ("errors", "errors", "sum")],
                "x ref: each tcpserver row's median over the socketserver row below it",
                ratio_name="x ref")


def scenario_http(bench):
    s = bench.settings
    if bench.http_tool is None:
        print("\nhttp: skipped, neither ab nor wrk is installed; install one with\n"
              "    apt-get install apache2-utils     # ab\n"
              "    apt-get install wrk               # or wrk\n")
        bench.skipped.append(("http", "no ab or wrk"))
        return
    servers = [("tcpserver.ThreadingTCPServer", "tcpserver-http"),
               ("socketserver.ThreadingTCPServer", "socketserver-http")]
    records = compare(bench, "http", "c=%d" % s.http_clients, servers,
                      lambda kind: measure_http(bench, kind))
    print_table("Legacy: http.server SimpleHTTPRequestHandler, %d-byte file, %s -c %d "
                "(%d runs of %d s)" % (HTTP_FILE_SIZE, bench.http_tool[0], s.http_clients,
                                        s.runs, max(1, int(round(s.duration)))),
                rows_against(records, "socketserver.ThreadingTCPServer"),
                [("req_s", "req/s", "main"), ("p50_ms", "p50 ms", "main"),
                 ("p99_ms", "p99 ms", "main"), ("server_cpu_pct", "srv CPU%", "value"),
                 ("errors", "errors", "sum")],
                "x ss: the median over socketserver's; both classes add "
                "http.server.HTTPServer, daemon_threads True")


def scenario_growth(bench):
    s = bench.settings
    limit = nofile_limit()
    counts = [held for held in s.held_counts if limit is None or held + 500 <= limit]
    if counts != s.held_counts:
        print("\ngrowth: RLIMIT_NOFILE is %s, too low for %s idle connections: left out"
              % (limit, ", ".join(str(held) for held in s.held_counts if held not in counts)))
        bench.skipped.append(("growth", "counts above RLIMIT_NOFILE"))
    if not counts:
        return
    servers = [("tcpserver", "tcpserver-hold"), ("socketserver", "socketserver-hold")]
    records = compare(bench, "growth", "to %d held" % counts[-1], servers,
                      lambda kind: measure_growth(bench, kind, counts))
    rows = []
    for held in counts:
        level_records = {label: growth_level(records[label], held) for label, _ in servers}
        for label, _ in servers:
            first = growth_level(records[label], counts[0])
            for record in level_records[label]:
                rate, base = record.get("figures", {}).get("conn_s"), median_of(first, "conn_s")
                if rate is not None and base:
                    record["figures"]["conn_s_vs_first"] = rate / base
            reference = None if label == "socketserver" else level_records["socketserver"]
            rows.append(("%-12s %6s held" % (label, "{:,}".format(held)),
                         level_records[label], reference))
    print_table("Growth: idle connections held open; meanwhile %d clients loop connect, "
                "send a line, read to EOF (%d runs of %.1f s; each run grows one server)"
                % (s.growth_clients, s.runs, s.growth_duration), rows,
                [("conn_s", "conn/s", "main"),
                 ("conn_s_vs_first", "vs %s" % "{:,}".format(counts[0]), "value"),
                 ("p99_ms", "p99 ms", "main"), ("rss_kib_per_conn", "KiB/idle", "main"),
                 ("rss_mib", "RSS MiB", "value"), ("threads", "threads", "value"),
                 ("errors", "errors", "sum")],
                "x ss: the median over socketserver's with as many held (KiB/idle: "
                "lower is better); vs: conn/s over the same server's with the fewest held")


def growth_level(records, held):
    """The records of one count of idle connections, from measure_growth()'s runs.

    A run that failed before reaching held gives a failed record, so the
    table's notes say why; the server's output goes with the last level.
    """
    level = []
    for record in records:
        if held in record.get("levels", {}):
            entry = dict(record["levels"][held], run=record["run"])
            if held == max(record["levels"]):
                entry["server_output"] = record.get("server_output")
                entry["server_stats"] = record.get("server_stats")
            level.append(entry)
        elif "error" in record:
            level.append({"run": record["run"], "error": record["error"]})
    return level


WORKERS_SERVERS = [("tcpserver, 1 worker", WORKERS_KIND + "1"),
                   ("tcpserver, 2 workers", WORKERS_KIND + "2")]


def scenario_workers(bench):
    s = bench.settings
    cpus = ",".join(map(str, bench.all_cpus)) if bench.all_cpus else "all"
    for clients in s.workers_clients:
        config = "c=%d" % clients
        records = compare(bench, "workers", config, WORKERS_SERVERS,
                          lambda kind, clients=clients: measure_workers(bench, kind, clients))
        print_table("Workers: connection rate, daytime thunk, serve_workers(1) against "
                    "serve_workers(2), %d concurrent clients (%d runs of %.1f s; servers "
                    "NOT pinned: on CPUs %s, the load generator's too)"
                    % (clients, s.runs, s.duration, cpus),
                    rows_against(records, WORKERS_SERVERS[0][0]),
                    [("conn_s", "conn/s", "main")] + RATE_COLUMNS[:3]
                    + [("workers", "workers", "value")] + RATE_COLUMNS[3:],
                    "x 1w: the median over 1 worker's (latency: lower is better); "
                    "srv CPU%: the supervisor and its workers together",
                    ratio_name="x 1w")


SCENARIO_FUNCTIONS = {"conn": scenario_conn, "ping": scenario_ping, "bulk": scenario_bulk,
                      "http": scenario_http, "growth": scenario_growth,
                      "workers": scenario_workers}


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------

def fmt(value):
    """A figure with 3 or 4 significant digits; "-" for none."""
    if value is None or value != value:  # None or NaN
        return "-"
    if isinstance(value, int):  # a count: the workers column
        return "{:,}".format(value)
    size = abs(value)
    if size >= 1000:
        return "{:,.0f}".format(value)
    if size >= 100:
        return "%.0f" % value
    if size >= 10:
        return "%.1f" % value
    if size >= 1:
        return "%.2f" % value
    return "%.3f" % value


def values_of(records, key):
    return [r["figures"][key] for r in records
            if "error" not in r and r["figures"].get(key) is not None]


def median_of(records, key):
    values = values_of(records, key)
    return statistics.median(values) if values else None


def rows_against(records, reference):
    """Table rows, each compared with the reference server's records."""
    return [(label, runs, None if label == reference else records[reference])
            for label, runs in records.items()]


def print_table(title, rows, columns, legend, ratio_name="x ss"):
    """Print one table: for each row its median, min-max and ratio per figure.

    rows: (label, records, reference records or None); columns: (key,
    header, how), how being "main" (median, min-max, ratio), "value"
    (median) or "sum" (over the runs).
    """
    header = ["server"]
    for _key, name, how in columns:
        header += [name, "min-max", ratio_name] if how == "main" else [name]
    lines = [header]
    notes = []
    for label, records, reference in rows:
        line = [label]
        for key, _name, how in columns:
            values = values_of(records, key)
            if how == "sum":
                line.append("{:,}".format(int(sum(values))) if values else "-")
                continue
            middle = statistics.median(values) if values else None
            line.append(fmt(middle))
            if how == "main":
                line.append("%s-%s" % (fmt(min(values)), fmt(max(values))) if values else "-")
                base = median_of(reference, key) if reference is not None else None
                line.append("%.2fx" % (middle / base) if middle is not None and base else "")
        lines.append(line)
        notes += notes_for(label, records)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("\n" + title)
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width
                                              in zip(line[1:], widths[1:])]
        print("  " + "  ".join(cells).rstrip())
        if n == 0:
            print("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
    print("  " + legend)
    for note in notes[:8]:
        print("  note: " + note)
    if len(notes) > 8:
        print("  note: ... and %d more notes in --json" % (len(notes) - 8))
    sys.stdout.flush()


def notes_for(label, records):
    """Failed runs, client errors, tcpserver's failed requests, server output."""
    notes = []
    for record in records:
        where = "%s, run %d" % (label, record["run"])
        if "error" in record:
            notes.append("%s failed: %s" % (where, one_line(record["error"])))
            continue
        client = record.get("client", {})
        if record["figures"].get("errors") and client.get("errors"):
            kinds = ", ".join("%s %d" % item for item in client["errors"].items() if item[1])
            notes.append("%s: client errors %s (first: %s)"
                         % (where, kinds, client.get("first_error") or "-"))
        slowest = record["figures"].get("max_ms")
        if slowest is not None and slowest >= STALL_MS:
            notes.append("%s: slowest operation took %s ms (a stall)" % (where, fmt(slowest)))
        stats = record.get("server_stats") or {}
        if stats.get("failed") or stats.get("refused"):
            notes.append("%s: tcpserver stats() %s" % (where, stats))
        output = record.get("server_output") or {}
        if output.get("bytes"):
            notes.append("%s: server wrote %d lines (%d bytes); first: %s"
                         % (where, output["lines"], output["bytes"], one_line(output["text"])))
    return notes


def one_line(text, width=160):
    text = " | ".join(line.strip() for line in text.strip().splitlines()[:3])
    return text if len(text) <= width else text[:width - 3] + "..."


# ---------------------------------------------------------------------------
# The machine, limits and pinning.
# ---------------------------------------------------------------------------

def pin_to_cpus(cpus):
    """Run this process (and what it starts later) on cpus, where the OS allows."""
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(cpus))
        except OSError:
            pass


def raise_nofile_limit():
    """Raise RLIMIT_NOFILE to its hard limit; return the new soft limit or None."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def nofile_limit():
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tcpserver_identity():
    """Version and a hash of tcpserver.py as it is now (it may be edited)."""
    try:
        with open(os.path.join(HERE, "tcpserver.py"), "rb") as f:
            data = f.read()
    except OSError as exc:
        return "tcpserver.py not readable: %s" % exc
    version = re.search(rb'^__version__ = "([^"]*)"', data, re.MULTILINE)
    return "tcpserver.py %s, sha1 %s, %d lines" % (
        version.group(1).decode() if version else "?",
        hashlib.sha1(data).hexdigest()[:12], data.count(b"\n"))


def load_average():
    """The 1-minute load average, or None."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe_load(when):
    """A line on how busy the machine is: other load makes the figures noisy."""
    load = load_average()
    if load is None:
        return "load average %s: unknown" % when
    warning = ""
    if load > 0.5:
        warning = " (other processes are using the CPUs: expect noisy figures)"
    return "load average %s: %.2f%s" % (when, load, warning)


def describe_machine():
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
            "kernel": "%s %s" % (platform.system(), platform.release()),
            "somaxconn": socket.SOMAXCONN, "nofile_limit": nofile_limit(),
            "tcpserver": tcpserver_identity()}


def setup_tools(bench, force_python_client):
    """Pinning, load generator, ucspi-tcp, ab/wrk, the http file: print what runs."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) >= 2:
        bench.server_cpu, load_cpus = allowed[0], allowed[1:]
        bench.all_cpus = allowed  # before pin_to_cpus() below narrows ours
    else:
        load_cpus = []
    bench.load, load_pin, note = make_load_generator(bench.tmp, load_cpus, force_python_client)
    pin_to_cpus(load_pin)
    print("load generator: %s%s" % (note, bench.load.description))
    if bench.server_cpu is not None:
        print("pinning: each server on CPU %d (workers' servers on CPUs %s); "
              "load generator on CPU %s" % (bench.server_cpu, ",".join(map(str, bench.all_cpus)),
                                            ",".join(map(str, load_pin))))
    else:
        print("pinning: none (%s); servers and load share the CPUs"
              % ("one CPU" if allowed else "no os.sched_setaffinity"))
    if os.access("/usr/bin/tcpserver", os.X_OK) and shutil.which("date") and shutil.which("cat"):
        bench.ucspi = "/usr/bin/tcpserver"
        if bench.settings.with_ucspi:
            print("ucspi-tcp: runs (/usr/bin/tcpserver: date per connection in conn, "
                  "cat in ping)")
        else:
            print("ucspi-tcp: installed, left out of --quick")
    else:
        print("ucspi-tcp: not installed, left out (apt-get install ucspi-tcp)")
    for tool in ("ab", "wrk"):
        if shutil.which(tool):
            bench.http_tool = (tool, shutil.which(tool))
            break
    if bench.http_tool:
        print("http load: %s (%s)" % bench.http_tool)
    else:
        print("http load: neither ab nor wrk installed; the http scenario is skipped "
              "(apt-get install apache2-utils, or wrk)")
    bench.http_dir = os.path.join(bench.tmp, "www")
    os.mkdir(bench.http_dir)
    with open(os.path.join(bench.http_dir, HTTP_FILE), "w") as f:
        f.write(("<p>tcpserver benchmark</p>\n" * 100)[:HTTP_FILE_SIZE - 1] + "\n")


def print_header(bench, machine):
    s = bench.settings
    print("tcpserver benchmark, %s" % time.strftime("%Y-%m-%d %H:%M:%S"))
    print("machine: %s, %s CPUs; %s; %s; somaxconn %s, RLIMIT_NOFILE %s"
          % (machine["cpu_model"], machine["cpus"], machine["kernel"], machine["python"],
             machine["somaxconn"], machine["nofile_limit"]))
    print("under test: %s" % machine["tcpserver"])
    print(describe_load("at start"))
    print("mode: %s; %d runs per server, alternating; runs of %.1f s after %.1f s warm-up; "
          "scenarios %s" % ("quick" if s.quick else "full", s.runs, s.duration, s.warmup,
                           ", ".join(s.scenarios)))


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark tcpserver against socketserver, asyncio and ucspi-tcp "
                    "on loopback; see the module docstring.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer scenarios and shorter runs: under a minute")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                        help="run only this scenario: %s (repeatable)" % ", ".join(SCENARIOS))
    parser.add_argument("--json", metavar="FILE", help="also write every raw figure to FILE")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per server and configuration (default 3)")
    parser.add_argument("--duration", type=float,
                        help="seconds each rate is measured (default 2, --quick 0.5)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="stop starting runs after this long (default 900, --quick 90)")
    parser.add_argument("--python-client", action="store_true",
                        help="use the Python load generator even if a C compiler exists")
    internal = parser.add_argument_group("internal, used by the script itself")
    internal.add_argument("--serve", metavar="KIND", help="run one server of this kind")
    internal.add_argument("--port-file", help="--serve: where to write 'PORT PID'")
    internal.add_argument("--stats-file", help="--serve: where tcpserver's stats() go")
    internal.add_argument("--cpu", type=cpu_list,
                          help="--serve: the CPU to run on (or CPUs, comma-separated)")
    internal.add_argument("--max-requests", type=int, default=10000,
                          help="--serve: tcpserver's max_requests, ucspi-tcp's -c")
    internal.add_argument("--bulk-bytes", type=int, default=0, help="--serve: bulk size")
    internal.add_argument("--dir", help="--serve: the directory http.server serves")
    internal.add_argument("--client", choices=["conn", "ping", "bulk"],
                          help="run one process of the Python load generator")
    internal.add_argument("--port", type=int, help="--client: the server's port")
    internal.add_argument("--clients", type=int, default=1, help="--client: threads")
    internal.add_argument("--warmup", type=float, default=0.0, help="--client")
    internal.add_argument("--message", default="", help="--client: what to send")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.client and args.duration is None:
        args.duration = 1.0
    return args


def cpu_list(text):
    """--cpu's value: "0" or "0,1"."""
    return [int(cpu) for cpu in text.split(",")]


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.client:
        return client_main(args)
    signal.signal(signal.SIGTERM, on_sigterm)
    began = time.monotonic()
    settings = Settings(args)
    raise_nofile_limit()
    machine = describe_machine()
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bench_tcpserver-") as tmp:
            bench = Bench(settings, tmp)
            print_header(bench, machine)
            setup_tools(bench, args.python_client)
            sys.stdout.flush()
            try:
                for name in settings.scenarios:
                    started = time.monotonic()
                    SCENARIO_FUNCTIONS[name](bench)
                    print("  (%s took %.0f s)" % (name, time.monotonic() - started))
            finally:
                kill_children()
            if bench.skipped:
                print("\nleft out: %s" % "; ".join("%s %s" % item for item in bench.skipped))
            print("\n" + describe_load("at the end"))
            print("total time: %.0f s" % (time.monotonic() - began))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"machine": machine, "load_generator": bench.load.description,
                               "ucspi_tcp": bench.ucspi, "http_tool": bench.http_tool,
                               "settings": vars(settings), "skipped": bench.skipped,
                               "results": bench.results}, f, indent=1)
                print("raw figures: %s" % args.json)
    except KeyboardInterrupt:
        print("\ninterrupted; servers and clients stopped, temporary files removed",
              file=sys.stderr)
        code = 130
    finally:
        kill_children()
    return code


if __name__ == "__main__":
    sys.exit(main())
