"""`python -m bouncer ARGS` run inside the test's process (with the test's App and database),
its output captured as a terminal would show it: stdout, stderr, and the two as they were
interleaved."""
import io
import os
import sys
from dataclasses import dataclass

from bouncer.cli import main


@dataclass
class Result:
    exit_code: int
    exception: BaseException | None   # the SystemExit of a failure, or what escaped the command
    stdout_bytes: bytes
    stderr_bytes: bytes
    output_bytes: bytes

    @property
    def stdout(self):
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self):
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def output(self):
        return self.output_bytes.decode("utf-8", "replace")


class Tee(io.RawIOBase):
    def __init__(self, *targets):
        self.targets = targets

    def writable(self):
        return True

    def write(self, data):
        for target in self.targets:
            target.write(data)
        return len(data)


def captured(own, mixed):
    return io.TextIOWrapper(Tee(own, mixed), encoding="utf-8", newline="", write_through=True)


def invoke(args, env=None, input=None):
    """Run the command line `args` with `env` (None unsets a variable) and `input` on stdin."""
    own_out, own_err, mixed = io.BytesIO(), io.BytesIO(), io.BytesIO()
    data = input.encode("utf-8") if isinstance(input, str) else (input or b"")
    saved_streams, saved_env = (sys.stdin, sys.stdout, sys.stderr), dict(os.environ)
    sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    sys.stdout, sys.stderr = captured(own_out, mixed), captured(own_err, mixed)
    for name, value in (env or {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    exception = None
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        exception = exc if code else None
    except Exception as exc:
        code, exception = 1, exc
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, exception, own_out.getvalue(), own_err.getvalue(), mixed.getvalue())
