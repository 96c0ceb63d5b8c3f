"""The tcp-server egg's example: a daytime server.

    python example_daytime.py [PORT] [--debug]

Serves the current time, one line per connection, on PORT (default 6504,
all interfaces).  Try it with ``nc localhost 6504``.  --debug writes the
egg's diagnostic lines to stderr.  Ctrl-C stops it.
"""

import argparse
import sys
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
    with server:
        print("daytime server on port %d; Ctrl-C stops it" % server.server_address[1],
              file=sys.stderr, flush=True)
        try:
            server(debug=args.debug)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
