"""The local path a newcomer walks: the README's recipe from a fresh clone under `honcho start`,
the virtualenv the scripts make (with the `bouncer` command), and scripts that leave nothing
behind them (a PostgreSQL cluster they created goes when they stop it)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import REDIS_URL

from support.ports import free_port, wait_for_port
from support.servers import IS_ROOT, Unavailable, postgres_programs
from support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fresh_clone(directory):
    """The checkout's files as a clone has them (tracked, or new and not ignored): no .venv, no
    .env, no database, no logs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    return directory


def recipe():
    """The README's block of commands that ends with `honcho start`: the local recipe."""
    block = next(b for b in re.findall(r"\n\n((?:    .+\n)+)", README) if "honcho start" in b)
    return [line.strip().split("  #")[0].strip() for line in block.splitlines()]


def test_the_readme_gives_the_honcho_recipe_and_what_must_already_run():
    assert recipe() == ["python3 -m venv .venv && . .venv/bin/activate", "pip install -e . honcho==2.0.0",
                        "cp .env.example .env", "honcho start"]
    opening = " ".join(README[:README.index("    python3 -m venv")].split())
    assert "Redis must already run on localhost:6379" in opening and "PostgreSQL only if" in opening


def get(port, path, token=None):
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                     headers={"Authorization": "Bearer %s" % token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())


def post_text(port, path, token, body):
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=body, method="POST", headers={
        "Authorization": "Bearer %s" % token, "Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


@pytest.mark.slow
def test_the_readme_recipe_runs_the_whole_service_from_a_fresh_clone_under_honcho(tmp_path):
    """`cp .env.example .env` and `honcho start`, as written (the virtualenv step is this one's:
    a test installs nothing). Only the ports change, so as not to meet another run's: the web
    process answers on the port `.env` names (not honcho's 5000), Bouncer is the sandbox of
    Procfile.local, its callback reaches the web process (no PUBLIC_URL error), and a batch
    submitted over the API with the `.env`'s token completes."""
    clone = fresh_clone(tmp_path / "clone")
    web_port, sandbox_port = free_port(), free_port()
    for name in (".env.example", "Procfile.local"):
        text = (clone / name).read_text().replace("8000", str(web_port)).replace("8025", str(sandbox_port))
        (clone / name).write_text(text)
    token = re.search(r"^API_TOKENS=(\S+)", (clone / ".env.example").read_text(), re.M).group(1)
    shell = "cp .env.example .env && exec honcho start"
    assert recipe()[2:] == ["cp .env.example .env", "honcho start"]
    env = dict(os.environ, PATH="%s:%s" % (Path(sys.executable).parent, os.environ["PATH"]), REDIS_URL=REDIS_URL,
               STATUS_CHECK_INTERVAL="2", BATCH_CREATE_INTERVAL="1")
    for name in ("PORT", "DATABASE_URL", "BOUNCER_API_KEY", "BOUNCER_API_URL", "PROCFILE"):
        env.pop(name, None)
    honcho = subprocess.Popen(["bash", "-c", shell], cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_port(web_port, honcho, timeout=60)
        wait_for_port(sandbox_port, honcho, timeout=30)
        wait_until(lambda: (clone / "bouncer.db").exists() and get(web_port, "/health")[0] == 200,
                   "the service healthy", 60)
        status, made = post_text(web_port, "/api/v1/batches?user_id=demo&check_type=deliverable", token,
                                 (clone / "scripts" / "sample.txt").read_bytes())
        assert status == 201
        done = wait_until(lambda: get(web_port, "/api/v1/batches/%d" % made["batch_id"], token)[1]["status"]
                          == "completed", "the sample verified through the sandbox", 90)
        assert done
    except BaseException:
        os.killpg(honcho.pid, signal.SIGKILL)
        print(honcho.communicate(timeout=60)[0][-8000:])
        raise
    honcho.send_signal(signal.SIGTERM)          # what honcho does on Ctrl-C: stop them all
    output = honcho.communicate(timeout=60)[0]
    for name in ("web", "worker", "scheduler", "release", "sandbox"):
        assert "%s.1 started" % name in output, output[-3000:]
    assert " ERROR " not in output and "PUBLIC_URL" not in output, output[-3000:]
    assert "POST /bouncer/callback/*** 202" in output        # Bouncer's callback reached the web process


def test_the_scripts_venv_gets_the_checkout_editable_with_its_bouncer_command(tmp_path):
    """ensure_venv installs this checkout editable into a venv of its own that lacks the
    `bouncer` command (pip stands in here: a test installs nothing)."""
    checkout = fresh_clone(tmp_path / "clone")
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    calls = tmp_path / "pip-calls"
    (venv / "bin" / "pip").write_text("#!/bin/sh\necho \"$@\" >> %s\n" % calls)
    (venv / "bin" / "pip").chmod(0o755)
    (venv / ".installed").touch()                 # the requirements are in already
    run = subprocess.run(["bash", "-c", "source scripts/services.sh && ensure_venv && echo \"$PY\""], cwd=checkout,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert calls.read_text().split() == ["install", "-q", "--disable-pip-version-check", "--no-deps",
                                         "--no-build-isolation", "-e", "."]
    (venv / "bin" / "bouncer").write_text("")
    (venv / "bin" / "bouncer").chmod(0o755)
    calls.unlink()
    subprocess.run(["bash", "-c", "source scripts/services.sh && ensure_venv"], cwd=checkout, check=True,
                   capture_output=True, timeout=60)
    assert not calls.exists()                     # there already: nothing done


@pytest.fixture
def cluster_home():
    """A temporary directory the `postgres` user can reach (pytest's own is private to root)."""
    try:
        postgres_programs()
    except Unavailable as exc:
        pytest.skip(str(exc))
    home = Path(tempfile.mkdtemp(prefix="bouncer-scripts-", dir="/tmp"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def services(home, *commands):
    script = "source scripts/services.sh && PY=%s && %s" % (sys.executable, " && ".join(commands))
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=dict(os.environ, TMPDIR=str(home)),
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_scripts_remove_a_postgres_cluster_they_created_when_they_stop_it(cluster_home):
    port = free_port()
    cluster = cluster_home / ("bouncer-postgres-%d" % port)
    run = services(cluster_home, "ensure_postgres %d" % port, "test -f %s/data/PG_VERSION" % cluster,
                   "stop_started_servers")
    assert run.returncode == 0, run.stderr
    assert "creating a PostgreSQL cluster" in run.stderr
    assert not cluster.exists()


@pytest.mark.slow
def test_the_scripts_leave_a_cluster_they_found_as_it_was(cluster_home):
    port = free_port()
    cluster = cluster_home / ("bouncer-postgres-%d" % port)
    made = services(cluster_home, "ensure_postgres %d" % port)       # made, and left running: not stopped
    assert made.returncode == 0, made.stderr
    owner = ["runuser", "-u", "postgres", "--"] if IS_ROOT else []
    subprocess.run([*owner, str(postgres_programs() / "pg_ctl"), "-D", str(cluster / "data"), "-m", "fast", "-w",
                    "stop"], check=True, capture_output=True, timeout=60)
    again = services(cluster_home, "ensure_postgres %d" % port, "stop_started_servers")
    assert again.returncode == 0, again.stderr
    assert "creating" not in again.stderr and (cluster / "data" / "PG_VERSION").exists()
