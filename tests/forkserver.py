"""A process that imports the training stack once and forks one child per command (test infrastructure only).

Importing Lightning, torch and transformers takes 8-9 s of CPU per process on our 2-core CI machine, more than
most of the tiny training runs the tests start (about 80 `train.py` runs per suite). tests/helpers.py starts this
server once per pytest worker and sends it the commands `train()` would run; each one runs in a child forked from
the already imported server, as a process of its own: its own pid and session, working directory, environment,
stdout/stderr files, fresh random states, and the script executed as `__main__` (so that multiprocessing's spawn,
Lightning's popen launcher and Hydra see what `python train.py ...` shows them). Ranks that the run spawns or
launches are fresh interpreters as usual. `LIGHTNING_ZO_TEST_FORKSERVER=0` turns it off.

Protocol, one JSON line each way: {"argv": [script, *args] or ["-m", module, *args], "cwd", "env", "stdout",
"stderr"} -> {"pid"}, then {"returncode"} (negative: killed by that signal, as subprocess reports it).
"""

from __future__ import annotations

import json
import os
import sys


def _child(request: dict) -> None:
    """Becomes the command's process; never returns into the server's loop."""
    os.setsid()  # the client kills the whole group on a timeout, ranks included
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])

    import random
    import runpy

    import numpy

    random.seed()  # a fresh interpreter seeds these from the OS; the server's copies would be shared by every child
    numpy.random.seed()
    argv = request["argv"]
    if argv[0] == "-m":  # `python -m module args`: the module's file as argv[0], the working directory on the path
        sys.argv, sys.path[0] = argv[1:], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # `python script.py args`: the script's directory on the path
        script = os.path.abspath(argv[0])
        sys.argv, sys.path[0] = [script, *argv[1:]], os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
    # An exception or SystemExit leaves through serve()'s loop, which catches nothing, and ends the interpreter as it
    # would end `python script.py`: traceback and exit code 1, or the code; atexit handlers, logging flushed.
    sys.exit(0)


def serve() -> None:
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nothing printed by an import can corrupt the replies

    import lightning_zo.cli  # noqa: F401  what every train.py run imports first
    import helpers  # noqa: F401  the test callbacks that runs load through Hydra overrides

    replies.write(b'{"ready": true}\n')
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            _child(request)
        replies.write(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


if __name__ == "__main__":
    serve()
