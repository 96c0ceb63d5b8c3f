"""The tcp-server egg's example: a daytime server.

    python example_daytime.py [PORT] [--debug]

Serves the current time, one line per connection, on PORT (default 6504,
all interfaces).  Try it with ``nc localhost 6504``.  --debug writes the
egg's diagnostic lines to stderr.  Ctrl-C or SIGTERM stops it: running
requests get the drain timeout to finish, then it exits 0.
"""

import argparse
import signal
import sys
import threading
import time

import tcpserver


def daytime() -> None:
    """The thunk: its print() goes to the client."""
    print(time.ctime())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A daytime server: the tcp-server egg's example.")
    parser.add_argument("port", nargs="?", type=int, default=6504,
                        help="TCP port to listen on (default 6504; 0 picks a free one)")
    parser.add_argument("--debug", action="store_true",
                        help="write diagnostic lines to stderr")
    args = parser.parse_args(argv)
    try:
        server = tcpserver.make_tcp_server(args.port, daytime)
    except (OSError, ValueError) as exc:
        print("cannot listen on port %d: %s" % (args.port, exc), file=sys.stderr)
        return 1
    # shutdown() must come from another thread than the one serving.
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
        target=server.shutdown, name="sigterm").start())
    with server:  # server_close() at the end drains running requests
        print("daytime server on port %d; Ctrl-C stops it" % server.server_address[1],
              file=sys.stderr, flush=True)
        try:
            server(debug=args.debug)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
