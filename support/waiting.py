"""Waiting for something to happen, with a bound."""
import time


class WaitFailed(AssertionError):
    """What was waited for did not happen in time, or can no longer happen. An AssertionError,
    so a test that waits fails with the message."""


def wait_until(condition, what, timeout, interval=0.2):
    """Poll `condition` until it returns something true, and return that; fail naming `what`
    after `timeout` seconds. `condition` may raise WaitFailed itself when waiting is pointless."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitFailed("%s: not within %ss" % (what, timeout))
        time.sleep(interval)


def at_once(work, count, timeout=60):
    """`work()` in `count` threads let go together: (results, errors), each in the order the
    threads ended. For races: two cycles, eight registrations at the same moment."""
    import threading
    start = threading.Barrier(count)
    results, errors = [], []

    def run():
        try:
            start.wait()
            results.append(work())
        except Exception as exc:  # handed back to the caller, who asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return results, errors
