"""Exit statuses of every ``aniserve`` command: one table, documented in docs/serving.md
and checked by ``tests/test_exits.py``.  Every failure prints one line saying why."""

OK = 0
FAILED = 1  # the work could not be done: a bad data or structure file, a failed calculation, an unwritable output
PROTOCOL = 2  # drive: a server broke the i-PI protocol, or left a message or our reply hanging past --timeout
BAD_STRUCTURE = 3  # a structure the model cannot evaluate (unknown element, NaN, a too-thin cell, a non-finite result)
NO_SERVER = 4  # drive: no server to connect to within --connect-timeout
BAD_MODEL = 5  # the model cannot be loaded: unknown name, missing, corrupt or inconsistent file
USAGE = 64  # wrong options or arguments (sysexits' EX_USAGE; click's own 2 would collide with PROTOCOL)
INTERRUPTED = 130  # Ctrl-C (SIGINT); 128 + 2, as shells report it
TERMINATED = 143  # SIGTERM (a batch system's stop), after closing connections cleanly; 128 + 15

#: (status, name, meaning), for the documentation and the tests.
TABLE = [
    (value, name, text)
    for name, value, text in (
        ("OK", OK, "success"),
        (
            "FAILED",
            FAILED,
            "the work could not be done; the line printed says why (a bad data or structure file, a "
            "failed calculation, an output that cannot be written)",
        ),
        (
            "PROTOCOL",
            PROTOCOL,
            "drive: a server broke the i-PI protocol, or left a message or our reply hanging past "
            "--timeout or was silent past --idle-timeout",
        ),
        (
            "BAD_STRUCTURE",
            BAD_STRUCTURE,
            "a structure the model cannot evaluate: an element it lacks, NaN positions, a "
            "cell too thin, a non-finite result",
        ),
        ("NO_SERVER", NO_SERVER, "drive: no server to connect to within --connect-timeout"),
        (
            "BAD_MODEL",
            BAD_MODEL,
            "the model cannot be loaded: an unknown name, a missing, corrupt or inconsistent file",
        ),
        ("USAGE", USAGE, "wrong options or arguments"),
        ("INTERRUPTED", INTERRUPTED, "interrupted by Ctrl-C (SIGINT)"),
        ("TERMINATED", TERMINATED, "drive: stopped by SIGTERM, connections closed cleanly"),
    )
]
