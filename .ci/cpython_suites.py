"""CPython's own server tests, on the stdlib's classes and on tcpserver's.

    python cpython_suites.py --control SUITE   the suite as CPython ships it
    python cpython_suites.py --swap SUITE      the same, its servers on ours
    python cpython_suites.py --compare CONTROL SWAPPED [LABEL]
                                               what two such runs' outputs say

SUITE is socketserver, httpservers, xmlrpc or docxmlrpc (test.test_SUITE).
A run prints one line per test as it starts (START id) and one as it ends
(PASS id, FAIL id or SKIP id), a failure's traceback below its FAIL line
with each line prefixed "| ", and DONE at the end (then, swapped, SERVERS
and how many servers of ours the tests made): a run that a timeout killed
still tells how far it got and where it hung.  --compare counts a
test as failed only if it passes on the control and not on ours.

Written for Python 3.8 to 3.15, standard library only.
"""

import faulthandler
import os
import re
import shutil
import sys
import tempfile
import types
import unittest

SUITES = ("socketserver", "httpservers", "xmlrpc", "docxmlrpc")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def rebuild(cls, bases):
    """Return cls made anew with bases, as its class statement would have.

    Methods keep their code; those that use super() without arguments get a
    __class__ cell naming the new class (theirs names the old one, which
    the new class's instances are not instances of).
    """
    namespace = {key: value for key, value in vars(cls).items()
                 if key not in ("__dict__", "__weakref__")}
    new = type(cls)(cls.__name__, bases, namespace)
    for key, value in namespace.items():
        wrapper = type(value) if isinstance(value, (classmethod, staticmethod)) else None
        func = value.__func__ if wrapper else value
        if isinstance(value, property):
            for part in (value.fget, value.fset, value.fdel):
                if part is not None and "__class__" in part.__code__.co_freevars:
                    raise RuntimeError("%s.%s: a property using super() is not handled"
                                       % (cls.__name__, key))
            continue
        if not isinstance(func, types.FunctionType) or func.__closure__ is None:
            continue
        names = func.__code__.co_freevars
        if "__class__" not in names:
            continue
        cells = list(func.__closure__)
        cells[names.index("__class__")] = types.CellType(new)
        copy = types.FunctionType(func.__code__, func.__globals__, func.__name__,
                                  func.__defaults__, tuple(cells))
        copy.__kwdefaults__ = func.__kwdefaults__
        copy.__dict__.update(func.__dict__)
        copy.__qualname__ = func.__qualname__
        copy.__doc__ = func.__doc__
        copy.__module__ = func.__module__
        setattr(new, key, wrapper(copy) if wrapper else copy)
    new.__qualname__ = cls.__qualname__
    return new


def rebase_module(module, replaced):
    """Replace, in module, each class deriving from a key of replaced.

    replaced maps old classes to their replacements and gains the classes
    made here: a class is rebuilt with its bases mapped (ThreadingHTTPServer
    on the new HTTPServer, ThreadingHTTPSServer on the new HTTPSServer).
    Bases come before the classes deriving from them, by MRO length.
    """
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and value.__module__ == module.__name__
               and value not in replaced and value not in replaced.values()]
    for cls in sorted(classes, key=lambda c: len(c.__mro__)):
        if any(base in replaced for base in cls.__bases__):
            bases = [replaced.get(base, base) for base in cls.__bases__]
            # ThreadingMixIn is in ours already, after it: listed before
            # it, as ThreadingHTTPServer lists it, no MRO would fit.
            bases = [base for base in bases
                     if not any(base in other.__mro__[1:] for other in bases)]
            new = rebuild(cls, tuple(bases))
            replaced[cls] = new
            setattr(module, cls.__name__, new)


# Servers made from the swapped classes: none would mean the swap missed.
MADE = []


def swap(suite):
    """Put the suite's servers on tcpserver.ThreadingTCPServer (and
    ThreadingUnixStreamServer on tcpserver's).

    Done before the test module is imported: test_httpservers and
    test_docxmlrpc take the classes by name at import time.
    """
    sys.path.insert(0, REPO)
    import tcpserver  # before socketserver is patched: it derives from the original
    ours = tcpserver.ThreadingTCPServer

    def counted(cls, *args, **kwargs):  # __new__ of the classes made here
        MADE.append(cls)
        return ours.__new__(cls, *args, **kwargs)

    if suite == "socketserver":
        import socketserver
        # Ours as it is, under socketserver's module name: MiscTestCase.test_all
        # takes socketserver's public classes to be those that say so.
        socketserver.ThreadingTCPServer = type("ThreadingTCPServer", (ours,), {
            "__module__": "socketserver", "__new__": counted,
            "__qualname__": "ThreadingTCPServer(tcpserver.ThreadingTCPServer)"})
        socketserver.ThreadingUnixStreamServer = type(
            "ThreadingUnixStreamServer", (tcpserver.ThreadingUnixStreamServer,), {
                "__module__": "socketserver", "__new__": counted,
                "__qualname__": "ThreadingUnixStreamServer"
                                "(tcpserver.ThreadingUnixStreamServer)"})
        return "socketserver.%s and %s" % (
            socketserver.ThreadingTCPServer.__qualname__,
            socketserver.ThreadingUnixStreamServer.__qualname__)
    import http.server
    import xmlrpc.server
    # As the README combines them: ours first for HTTPServer; for
    # SimpleXMLRPCServer ours second, its __init__ not passing keywords on.
    old_http, old_rpc = http.server.HTTPServer, xmlrpc.server.SimpleXMLRPCServer
    # Their qualified names say so in a traceback: the module's stays.
    new_http = type("HTTPServer", (ours, old_http), {
        "__module__": "http.server", "__new__": counted,
        "__qualname__": "HTTPServer(tcpserver.ThreadingTCPServer, http.server.HTTPServer)"})
    new_rpc = type("SimpleXMLRPCServer", (old_rpc, ours), {
        "__module__": "xmlrpc.server", "__new__": counted,
        "__qualname__": "SimpleXMLRPCServer(xmlrpc.server.SimpleXMLRPCServer,"
                        " tcpserver.ThreadingTCPServer)"})
    http.server.HTTPServer = new_http
    xmlrpc.server.SimpleXMLRPCServer = new_rpc
    replaced = {old_http: new_http, old_rpc: new_rpc}
    rebase_module(http.server, replaced)
    rebase_module(xmlrpc.server, replaced)
    return "; ".join(sorted("%s.%s" % (new.__module__, new.__qualname__)
                            for new in replaced.values()))


class LineResult(unittest.TextTestResult):
    """A result that prints START, PASS, FAIL and SKIP lines as tests go.

    A test's subtests count as the test: it fails if one of them fails.
    """

    def __init__(self, stream, descriptions, verbosity):
        super().__init__(stream, descriptions, 0)
        self.out = stream
        self.failed_ids = {}  # test id -> tracebacks
        self.skipped_reason = None

    def emit(self, line):
        self.out.write(line + "\n")
        self.out.flush()

    def startTest(self, test):
        super().startTest(test)
        self.emit("START " + test.id())

    def _failed(self, test, err):
        self.failed_ids.setdefault(test.id(), []).append(
            self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._failed(test, err)
        else:  # a class or module fixture: setUpClass, setUpModule
            self.emit("FAIL " + re.sub(r"\s+", "_", str(test)))
            self.emit_traceback(self._exc_info_to_string(err, None))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._failed(test, err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.failed_ids.setdefault(test.id(), []).append(
                "%s\n%s" % (subtest.id(), self._exc_info_to_string(err, test)))

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.failed_ids.setdefault(test.id(), []).append("unexpected success\n")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        if isinstance(test, unittest.TestCase):
            self.skipped_reason = reason
        else:  # setUpClass or setUpModule skipped a whole class or module
            self.emit("SKIP %s %s" % (re.sub(r"\s+", "_", str(test)), " ".join(reason.split())))

    def printErrors(self):
        pass  # each traceback is printed under its FAIL line already

    def emit_traceback(self, text):
        for line in text.rstrip("\n").split("\n"):
            self.emit("| " + line)

    def stopTest(self, test):
        super().stopTest(test)
        test_id = test.id()
        if test_id in self.failed_ids:
            self.emit("FAIL " + test_id)
            self.emit_traceback("\n".join(self.failed_ids.pop(test_id)))
        elif getattr(self, "skipped_reason", None) is not None:
            self.emit("SKIP %s %s" % (test_id, " ".join(self.skipped_reason.split())))
        else:
            self.emit("PASS " + test_id)
        self.skipped_reason = None


def run(suite, swapped, timeout):
    if swapped:
        print("SWAPPED " + swap(suite), flush=True)
    # Where the run is killed by timeout, every thread's stack first.
    if timeout:
        faulthandler.dump_traceback_later(timeout, exit=False, file=sys.__stderr__)
    name = "test.test_" + suite
    directory = tempfile.mkdtemp(prefix="cpython-suite-")
    cwd = os.getcwd()
    os.chdir(directory)  # test files (TESTFN) land here, not in the clone
    try:
        __import__(name)
        tests = unittest.defaultTestLoader.loadTestsFromName(name)
        # buffer: the servers' log lines go with a failure, not in between
        runner = unittest.TextTestRunner(stream=sys.stdout, resultclass=LineResult,
                                         buffer=True, verbosity=0)
        result = runner.run(tests)
    finally:
        os.chdir(cwd)
        shutil.rmtree(directory, ignore_errors=True)
    print("DONE ran=%d" % result.testsRun, flush=True)
    if swapped:
        print("SERVERS %d" % len(MADE), flush=True)
    return 0


def parse(path):
    """Return what a run's output says: ({test id: (status, traceback lines,
    skip reason)}, the test it started last and did not end, whether it got
    to the end, its other lines)."""
    results, tracebacks, other = {}, [], []
    started, done, servers = None, False, None
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            lines = log.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("| "):
            tracebacks.append(line[2:])
            continue
        match = re.match(r"(START|PASS|FAIL|SKIP|DONE|SWAPPED|SERVERS) (\S+)(?: (.*))?$", line)
        if not match:
            other.append(line)  # the interpreter's own: an import error, a hang's stacks
            continue
        kind, test_id, rest = match.groups()
        if kind == "START":
            started = test_id
        elif kind == "DONE":
            done = True
        elif kind == "SERVERS":
            servers = int(test_id)
        elif kind != "SWAPPED":
            tracebacks = []
            results[test_id] = (kind, tracebacks, rest)
            if started == test_id:
                started = None
    return results, started, done, other, servers


def compare(control_path, swapped_path, label):
    """Print what the runs say; last line: COUNTS passed failed skipped
    stdlib-failures servers-of-ours."""
    control, control_hung, control_done, control_other, _ = parse(control_path)
    ours, ours_hung, ours_done, ours_other, servers = parse(swapped_path)
    passed = failed = skipped = stdlib_failures = 0
    bad = []
    if not control:
        print("!! %s: the control run gave no result (see %s)" % (label, control_path))
        for line in control_other[-40:]:
            print("   " + line)
        failed += 1
    for test_id in sorted(set(control) | set(ours)):
        mine, theirs = ours.get(test_id, ("MISSING", [], None)), control.get(test_id)
        if mine[0] == "PASS":
            passed += 1
        elif theirs is None or theirs[0] != "PASS":
            if mine[0] == "SKIP" and theirs is not None and theirs[0] == "SKIP":
                skipped += 1
            else:  # fails (or is skipped) on the stdlib's class as well
                passed += 1
                stdlib_failures += 1
                print("%s: also fails on the stdlib: %s (%s there, %s on ours)"
                      % (label, test_id, theirs[0] if theirs else "not run", mine[0]))
        else:
            failed += 1
            bad.append((test_id, mine))
    for test_id, (status, lines, reason) in bad:
        print("!! %s: %s passes on the stdlib's class, %s on ours%s"
              % (label, test_id, {"SKIP": "is skipped", "MISSING": "did not run"}.get(
                  status, "fails"), ": " + reason if reason else ""))
        for line in lines:
            print("   " + line)
    if not ours_done:
        failed += 1
        print("!! %s: the swapped run did not finish%s (see %s); its last lines:"
              % (label, ", hung in " + ours_hung if ours_hung else "", swapped_path))
        for line in ours_other[-40:]:
            print("   " + line)
    if ours_done and not servers:
        failed += 1
        print("!! %s: the swapped run made no server of ours: the swap missed" % label)
    if control and not control_done:
        print("!! %s: the control run did not finish%s (see %s); tests it did not"
              " run are not checked" % (label, ", hung in " + control_hung
                                        if control_hung else "", control_path))
    print("COUNTS %d %d %d %d %d" % (passed, failed, skipped, stdlib_failures, servers or 0))
    return 0 if failed == 0 else 1


def main(argv):
    if len(argv) >= 3 and argv[0] == "--compare":
        return compare(argv[1], argv[2], argv[3] if len(argv) > 3 else "suite")
    if len(argv) == 2 and argv[0] in ("--control", "--swap") and argv[1] in SUITES:
        timeout = float(os.environ.get("CPYTHON_SUITE_TIMEOUT", "0"))
        return run(argv[1], argv[0] == "--swap", timeout)
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
