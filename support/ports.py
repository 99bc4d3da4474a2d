"""Loopback ports: a free one for a server to take, and waiting until one answers."""
import contextlib
import socket

from support.waiting import WaitFailed, wait_until

HOST = "127.0.0.1"


def free_port():
    """A port nothing listens on now. Another process may take it before the caller does; on
    loopback, with the kernel handing out ports in turn, that has not been seen to happen."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def port_answers(port):
    with contextlib.suppress(OSError):
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    return False


def wait_for_port(port, process=None, timeout=30):
    """Until something accepts connections on `port`. With `process` (anything with `poll()`
    and `returncode`), fail at once when it exits first: a server that died never answers."""
    def answered():
        if process is not None and process.poll() is not None:
            raise WaitFailed("exited with code %s before port %d answered" % (process.returncode, port))
        return port_answers(port)

    wait_until(answered, "port %d to answer" % port, timeout)
