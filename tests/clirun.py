"""`python -m bouncer ARGS` run inside the test's process (with the test's App and database),
its output captured as a terminal would show it: stdout, stderr, and the two as they were
interleaved. The isolation (streams, stdin, environment) is click's test runner's; the command
line itself is the project's argparse `main`."""
import sys
from dataclasses import dataclass

from click.testing import CliRunner

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


def invoke(args, env=None, input=None):
    """Run the command line `args` with `env` (None unsets a variable) and `input` on stdin."""
    exception = None
    with CliRunner().isolation(input=input, env=env) as (stdout, stderr, output):
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
    return Result(code, exception, stdout.getvalue(), stderr.getvalue(), output.getvalue())
