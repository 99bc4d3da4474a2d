"""The service's own processes, started and stopped the way the platform does it.

A `Supervisor` starts `python -m bouncer <command>` (or any program) under a name, with an
environment and a log file of its own (`<name>.log`, appended to, so a restarted process
continues its predecessor's log), and stops it with SIGTERM as Heroku and Render do, or kills
it with everything it forked. Tests, the soak run and the throughput script all supervise their
processes with it.
"""
import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # where `python -m bouncer` finds the package
COMMAND_TIMEOUT = 60       # seconds for a command run to completion (init-db, submit, status)
KILL_WAIT = 10             # seconds for a killed process to be reaped


# What the service's processes in a test run with unless told otherwise: cycles every second, so
# a batch goes through in seconds, and the log lines a failing test wants to show.
TEST_SETTINGS = {"BATCH_CREATE_INTERVAL": "1", "STATUS_CHECK_INTERVAL": "1", "LOG_LEVEL": "INFO"}


def service_env(database_url, redis_url, api_url, api_key, **settings):
    """The environment of the service's processes in a test or a measurement: the caller's,
    the four connections, TEST_SETTINGS, and `settings` (by their environment names) on top."""
    return dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis_url, BOUNCER_API_URL=api_url,
                BOUNCER_API_KEY=api_key, **{**TEST_SETTINGS, **settings})


def bouncer_command(*args):
    return [sys.executable, "-m", "bouncer", *[str(a) for a in args]]


def run_bouncer(*args, env, stdin=None, stderr=subprocess.PIPE, prefix=(), timeout=COMMAND_TIMEOUT):
    """`python -m bouncer ARGS` to completion from the repository root: the CompletedProcess,
    stdout as text, stderr too unless it goes to an open file. `prefix` wraps the command
    (`setpriv ... --`)."""
    return subprocess.run([*prefix, *bouncer_command(*args)], cwd=ROOT, env=env, input=stdin,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8",
                          timeout=timeout)


class Process:
    """One started program: its name, its command, its log file."""

    def __init__(self, name, argv, log_path, env=None, cwd=ROOT):
        self.name, self.argv, self.log_path, self.env = name, list(argv), Path(log_path), env
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C meant for the caller reaches it only through the
            # caller's orderly stop, and the whole group can be killed at once.
            self.popen = subprocess.Popen(self.argv, cwd=cwd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=DIE_WITH_PARENT)

    @property
    def pid(self):
        return self.popen.pid

    @property
    def returncode(self):
        return self.popen.returncode

    def poll(self):
        return self.popen.poll()

    def is_running(self):
        return self.popen.poll() is None

    def terminate(self):
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout):
        """The exit code; subprocess.TimeoutExpired when it is still running after `timeout`."""
        return self.popen.wait(timeout=timeout)

    def kill(self):
        """SIGKILL to the process and what it forked (a worker's horse running a cycle), then
        reap it."""
        kill_with_descendants(self.popen.pid)
        self.popen.wait(timeout=KILL_WAIT)

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars=6000):
        return self.log()[-chars:]


class Supervisor:
    """The processes of one test or run, by name, each logging to `<directory>/<name>.log`."""

    def __init__(self, directory, env):
        self.directory = Path(directory)
        self.env = env
        self.running = {}       # name: the latest Process started under it
        self.exit_codes = {}    # name: its exit code, once asked to stop

    def start(self, name, *args, env=None):
        """`python -m bouncer ARGS` in the background."""
        return self.launch(name, bouncer_command(*args), env=env)

    def launch(self, name, argv, env=None):
        """Any program in the background."""
        process = Process(name, argv, self.log_path(name), env=env or self.env)
        self.running[name] = process
        return process

    def log_path(self, name):
        return self.directory / ("%s.log" % name)

    def run(self, *args, stdin=None, log=None, timeout=COMMAND_TIMEOUT):
        """`python -m bouncer ARGS` to completion; its stderr goes to the log file `log` names
        when one does (a long run's chatter stays out of memory)."""
        if log is None:
            return run_bouncer(*args, env=self.env, stdin=stdin, timeout=timeout)
        with open(self.log_path(log), "a", encoding="utf-8") as stderr:
            return run_bouncer(*args, env=self.env, stdin=stdin, stderr=stderr, timeout=timeout)

    def restart(self, name):
        """SIGKILL to the process and its descendants, then the same command again under the
        same name and environment, its output appended to the same log."""
        process = self.running[name]
        process.kill()
        return self.launch(name, process.argv, env=process.env)

    def stop_and_restart(self, name, grace):
        """SIGTERM, as a deploy sends, and the same command again once the process has ended;
        its exit code (a sentence if it outlived `grace`, and was then killed)."""
        process = self.running[name]
        process.terminate()
        try:
            code = process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "still running %ds after SIGTERM" % grace
        self.launch(name, process.argv, env=process.env)
        return code

    def exited(self):
        """{name: exit code} of the processes that stopped without being asked."""
        return {name: process.returncode for name, process in self.running.items()
                if name not in self.exit_codes and process.poll() is not None}

    def any_exited(self):
        return bool(self.exited())

    def stop(self, names, grace):
        """SIGTERM to each, then wait for all of them together within `grace` seconds; their
        exit codes (a sentence for one still running), also kept in `exit_codes`."""
        for name in names:
            self.running[name].terminate()
        deadline = time.monotonic() + grace
        codes = {}
        for name in names:
            try:
                codes[name] = self.running[name].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = "still running %ds after SIGTERM" % grace
            self.exit_codes.setdefault(name, codes[name])
        return codes

    def stop_all(self, grace=KILL_WAIT):
        """The last resort, for a finally block: SIGTERM to what still runs, and SIGKILL with
        its descendants to what is left of it after `grace` seconds."""
        alive = [process for process in self.running.values() if process.is_running()]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in alive:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def kill_all(self):
        """SIGKILL to every process still running, and to what it forked."""
        for process in self.running.values():
            if process.is_running():
                process.kill()

    def print_logs(self, chars=6000):
        for process in self.running.values():
            print("---- %s (exit %s) ----\n%s" % (process.name, process.poll(), process.log_tail(chars)))

    @contextlib.contextmanager
    def logs_on_failure(self, chars=6000):
        """The tail of every log printed when the block fails (pytest shows it with the
        failure)."""
        try:
            yield self
        except BaseException:
            self.print_logs(chars)
            raise


def descendants(pid):
    """Pids of the processes below `pid`, read from /proc (Linux; elsewhere none are found).
    rq's work horse puts itself in a process group of its own, so a group kill misses it."""
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name, in parentheses, may hold spaces: the parent pid follows it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found


def kill_with_descendants(pid):
    """SIGKILL to what `pid` forked first (so nothing is re-parented unseen), then to its
    process group."""
    for below in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(below, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def parent_death_signal():
    """What runs in a child before exec: if the parent is killed (-9), the child gets SIGTERM
    instead of running on (Linux's PR_SET_PDEATHSIG; it fires when the thread that started the
    child ends, so start processes from the main thread). Elsewhere, None: the caller's finally
    block is the only guard. libc is looked up here, in the parent: a child forked from a
    threaded parent must not import anything."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


DIE_WITH_PARENT = parent_death_signal()
