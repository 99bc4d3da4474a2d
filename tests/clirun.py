"""`python -m bouncer ARGS` run inside the test's process (with the test's App and database) by
click's test runner: its Result holds the exit code, the exception (the SystemExit of a failure,
or what escaped the command), stdout, stderr, and the two as they were interleaved (output)."""
from click.testing import CliRunner

from bouncer.cli import cli

PROG = "python -m bouncer"


def invoke(args, env=None, input=None):
    """Run the command line `args` with `env` (None unsets a variable) and `input` on stdin."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env, prog_name=PROG)
