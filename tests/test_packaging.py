"""The project installs as a package (`pip install .`): its dependencies, the `bouncer` command
and `--version`; the pins of requirements*.txt (what Heroku installs) and pyproject.toml agree;
the Procfile brings the whole service up under plain `honcho start`."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from clirun import invoke
from conftest import REDIS_URL

from bouncer import __version__
from support.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def pins(path):
    lines = (ROOT / path).read_text().splitlines()
    return sorted(line.split("#")[0].strip().lower() for line in lines
                  if line.strip() and not line.startswith(("#", "-r")))


def test_requirements_and_pyproject_pin_the_same_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(d.lower() for d in project["dependencies"]) == pins("requirements.txt")
    assert sorted(d.lower() for d in project["optional-dependencies"]["test"]) == pins("requirements-test.txt")
    assert all(re.fullmatch(r"[a-z0-9_.-]+==[0-9][0-9a-z.]*", pin) for pin in pins("requirements-test.txt"))


def test_the_wheel_holds_the_package_its_pages_and_the_command(tmp_path):
    # Built from a copy (a build writes into its source tree), with the setuptools at hand: a
    # test reaches nothing beyond loopback.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".local", ".git", "node_modules",
                                                                  "__pycache__", "*.db", "*.db-*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("bouncer_queue-%s-*.whl" % __version__)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bouncer/cli.py" in names and "bouncer/sandbox/simulator.py" in names
    assert not any(n.startswith(("tests/", "support/", "scripts/")) for n in names)
    assert "bouncer = bouncer.cli:main" in entry_points
    assert "Requires-Dist: peewee==4.5.3\n" in metadata
    assert "Requires-Dist: pytest==9.2.0; extra == \"test\"" in metadata   # test tools only as an extra


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.strip().endswith(__version__)


def test_procfile_runs_web_first_and_a_release_step_that_stays_up_locally():
    lines = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert list(lines)[0] == "web"            # honcho gives the first line $PORT itself
    assert set(lines) == {"web", "worker", "scheduler", "release"}
    assert lines["release"] == "python -m bouncer release"


@pytest.mark.slow
def test_plain_honcho_start_brings_the_whole_service_up_and_keeps_it_up(tmp_path):
    port = free_port()
    env = dict(os.environ, DATABASE_URL="sqlite:///%s" % (tmp_path / "bouncer.db"), REDIS_URL=REDIS_URL,
               PORT=str(port), BOUNCER_API_KEY="sk-local-sandbox", BOUNCER_API_URL="http://127.0.0.1:9",
               PATH="%s:%s" % (Path(sys.executable).parent, os.environ["PATH"]))
    honcho = subprocess.Popen([str(Path(sys.executable).parent / "honcho"), "start"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_port(port, timeout=60)
        time.sleep(3)                                # the release step has long migrated by now
        assert honcho.poll() is None, honcho.stdout.read()
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=10) as answer:
            assert answer.status == 200
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        output = honcho.communicate(timeout=60)[0]
    assert "schema created" in output and "staying up" in output
    for name in ("web", "worker", "scheduler", "release"):
        assert re.search(r"%s\.1 +\| " % name, output), output[-3000:]


def test_the_version_is_written_in_one_place():
    """`bouncer/__init__.py` alone writes the version; the package's metadata, --version, the
    API's description and the User-Agent read it from there."""
    from bouncer.names import USER_AGENT
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    written = []
    for name in tracked:
        if name.startswith(("examples/", "tests/data/")) or not name.endswith((".py", ".toml", ".cfg", ".txt", ".md")):
            continue
        text = (ROOT / name).read_text(errors="replace")
        if re.search(r"(?im)^\s*(__version__|version)\s*=\s*[\"']\d", text) or re.search(r"bouncer-queue/\d", text):
            written.append(name)
    assert written == ["bouncer/__init__.py"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dynamic"] == ["version"]
    assert USER_AGENT == "bouncer-queue/%s" % __version__


def test_the_changelog_keeps_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "keepachangelog.com" in text
    releases = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert releases[0] == "Unreleased"
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", r) for r in releases[1:]), releases
    assert set(re.findall(r"^### (\w+)", text, re.M)) <= {"Added", "Changed", "Deprecated", "Removed", "Fixed",
                                                         "Security"}
