"""The performance targets, one row each, from the measurements of one run of the benchmark.

    python -m scripts.targets OUT/sqlite.json OUT/postgresql.json

Each database's run of `python -m scripts.bench` writes its measurements as JSON; this reads
them and prints every target beside what was measured (medians, with min-max) and whether it is
met. A target whose measurements are missing (a part not run, or failed) reads "not measured"
and is not met.
"""
import json
import statistics
import sys
from dataclasses import dataclass

RSS_LIMIT_MB = 200
WAIT_LIMIT_S = 1.0


@dataclass
class Target:
    item: int
    what: str
    measured: str = "not measured"
    target: str = ""
    met: bool = False


class Missing(Exception):
    """A measurement a target needs is not in the files."""


def load(paths):
    """{backend: its measurements}."""
    found = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        found[data["backend"]] = data
    return found


def median(values):
    if not values:
        raise Missing("no values")
    return statistics.median(values)


def seconds(values):
    """'median s (min-max)'."""
    text = "%.2f s" % median(values)
    return text if len(values) == 1 else "%s (%.2f-%.2f)" % (text, min(values), max(values))


def part(data, name):
    """The measurements of part `name`, or Missing saying why they are not there."""
    if data is None:
        raise Missing("database not measured")
    if name in data.get("errors", {}):
        raise Missing("%s failed: %s" % (name, data["errors"][name]))
    if name not in data:
        raise Missing("part %r not run" % name)
    return data[name]


def step(data, key):
    for row in part(data, "steps"):
        if row["name"] and row_key(row) == key:
            return row
    raise Missing("no %s row" % key)


def row_key(row):
    """The step a row of the steps table measures (by the start of its name)."""
    name = row["name"]
    for key, start in (("submit", "submit "), ("creation", "one creation cycle"), ("status", "one status cycle")):
        if name.startswith(start):
            return key
    return None


# -- the rows ---------------------------------------------------------------------------------

STEPS = (("submit", "submit 200k lines as 40 processes"), ("creation", "one creation cycle, 15 x 10k from 200k queued"),
         ("status", "one status cycle, 150k results"))


def postgres_against_sqlite(found):
    rows = []
    for key, name in STEPS:
        row = Target(1, "%s: PostgreSQL / SQLite, same run" % name, target="<= 1.25x")
        with measuring(row):
            measured = step(found.get("SQLite"), key)
            pg, lite = step(found.get("PostgreSQL"), key)["ours"]["seconds"], measured["ours"]["seconds"]
            row.what = "%s: PostgreSQL / SQLite, same run" % measured["name"]
            value = median(pg) / median(lite)
            row.measured = "%.2fx (PostgreSQL %s, SQLite %s)" % (value, seconds(pg), seconds(lite))
            row.met = value <= 1.25
        rows.append(row)
    return rows


def intake(found):
    lite, pg = found.get("SQLite"), found.get("PostgreSQL")
    rows = []
    row = Target(2, "submit 200k lines as 40 processes on SQLite: ours / the straightforward implementation",
                 target="<= 0.60x")
    with measuring(row):
        submit = step(lite, "submit")
        row.what = "%s on SQLite: ours / the straightforward implementation" % submit["name"]
        value = median(submit["ours"]["seconds"]) / median(submit["straightforward"]["seconds"])
        row.measured = "%.2fx (%s against %s)" % (value, seconds(submit["ours"]["seconds"]),
                                                   seconds(submit["straightforward"]["seconds"]))
        row.met = value <= 0.6
    rows.append(row)
    rows += large_submit_rows(pg)
    for backend in ("SQLite", "PostgreSQL"):
        rows.append(admission_row(backend, found.get(backend)))
    return rows


def large_submit_rows(pg):
    floor = Target(2, "`submit` of the large file on PostgreSQL / a raw psql `\\copy` of the same lines into a "
                      "one-column table, same server", target="<= 10x")
    plain = Target(2, "`submit` of the large file on PostgreSQL / the straightforward implementation's",
                   target="< 1.00x")
    with measuring(floor):
        intakes = part(pg, "intakes")
        ours = [run["seconds"] for run in intakes["submit"]["ours"]]
        floor.what = floor.what.replace("the large file", "%s lines" % format(intakes["rows"], ","))
        value = median(ours) / median(intakes["copy_floor"])
        floor.measured = "%.1fx (%s against %s)" % (value, seconds(ours), seconds(intakes["copy_floor"]))
        floor.met = value <= 10
    with measuring(plain):
        intakes = part(pg, "intakes")
        ours = [run["seconds"] for run in intakes["submit"]["ours"]]
        theirs = [run["seconds"] for run in intakes["submit"]["straightforward"]]
        plain.what = plain.what.replace("the large file", "%s lines" % format(intakes["rows"], ","))
        value = median(ours) / median(theirs)
        plain.measured = "%.2fx (%s against %s)" % (value, seconds(ours), seconds(theirs))
        plain.met = value < 1.0
    return [floor, plain]


def admission_row(backend, data):
    row = Target(2, "admission of the host-written rows on %s: rows/s with creation cycles beside it / alone"
                 % backend, target=">= 80%")
    with measuring(row):
        admission = part(data, "intakes")["admission"]
        row.what = row.what.replace("the host-written rows", "%s host-written rows" % format(
            part(data, "intakes")["rows"], ","))
        beside = median([run["rows_per_s"] for run in admission["with_cycles"]])
        alone = median([run["rows_per_s"] for run in admission["alone"]])
        row.measured = "%.0f%% (%s rows/s against %s)" % (100 * beside / alone, format(round(beside), ","),
                                                          format(round(alone), ","))
        row.met = beside >= 0.8 * alone
    return row


def long_history(found):
    rows = []
    for backend in ("SQLite", "PostgreSQL"):
        data = found.get(backend)
        for key, name in STEPS:
            row = Target(3, "%s on a long history / on an empty database, %s" % (name, backend), target="<= 1.15x")
            with measuring(row):
                measured = part(data, "history")
                empty, filled = (measured["steps"][key][side]["seconds"] for side in ("empty", "history"))
                value = median(filled) / median(empty)
                row.measured = "%.2fx (%s against %s)" % (value, seconds(filled), seconds(empty))
                row.met = value <= 1.15
            rows.append(row)
    if any(found.get(backend, {}).get("history") for backend in found):
        size = next(found[b]["history"]["fill"]["size"] for b in found if found[b].get("history"))
        rows[0].what += " (history: %s ended rows, %s verdicts, %s ended Bouncer batches)" % tuple(
            format(size[k], ",") for k in ("rows", "verdicts", "ledger"))
    return rows


# Where each process's peak RSS is read: (what, [(part, how to find the values in it)]).
def process_rss(data):
    """{process: [MB, ...]} of every process of ours the bench started on one database."""
    found = {}

    def add(name, values):
        found.setdefault(name, []).extend(v for v in values if v)

    if "steps" in data:
        for row in data["steps"]:
            key = row_key(row)
            if key:
                add(PROCESS_OF_STEP[key], row["ours"]["rss_mb"])
    if "history" in data:
        for key, sides in data["history"]["steps"].items():
            for side in sides.values():
                add(PROCESS_OF_STEP[key], side["rss_mb"])
    if "intakes" in data:
        intakes = data["intakes"]
        add("`submit` of the large file", [run["rss_mb"] for run in intakes["submit"]["ours"]])
        add("the admitter (a host's large batch)", [run["rss_mb"] for runs in intakes["admission"].values()
                                                    for run in runs])
        add("creation cycles beside a large intake (a worker's)", [
            run["probe"]["rss_mb"] for run in intakes["submit"]["ours"] + intakes["admission"]["with_cycles"]])
        add("`web`, a streamed submit", [run["rss_mb"] for run in intakes["web"]])
    if "imports" in data:
        add("`status --json`", [data["imports"]["status | ours"]["rss_mb"]])
    if "in-process" in data:
        add("in-process: a creation cycle or an ingest of 150k (a process each)",
            [row["rss_mb"] for row in data["in-process"] if row.get("rss_mb")])
    return found


PROCESS_OF_STEP = {"submit": "`submit` of a 5,000-line file", "creation": "`create-batches` (15 x 10k)",
                   "status": "`check-batches` (150k results)"}


def memory(found):
    rows = []
    per_backend = {backend: process_rss(data) for backend, data in found.items()}
    names = []
    for processes in per_backend.values():
        names += [name for name in processes if name not in names]
    for name in names:
        row = Target(4, "peak RSS: %s" % name, target="<= %d MB" % RSS_LIMIT_MB)
        peaks = {backend: max(processes[name]) for backend, processes in per_backend.items() if processes.get(name)}
        row.measured = ", ".join("%s %.0f MB" % (backend, mb) for backend, mb in sorted(peaks.items()))
        row.met = max(peaks.values()) <= RSS_LIMIT_MB
        rows.append(row)
    if not rows:
        rows.append(Target(4, "peak RSS of every process", target="<= %d MB" % RSS_LIMIT_MB))
    return rows


def cycle_waits(found):
    rows = []
    for backend in ("SQLite", "PostgreSQL"):
        row = Target(5, "longest wait of a creation cycle on the database during the large intakes, %s" % backend,
                     target="< %.0f s" % WAIT_LIMIT_S)
        with measuring(row):
            intakes = part(found.get(backend), "intakes")
            runs = [("the admission", run["probe"]) for run in intakes["admission"]["with_cycles"]]
            runs += [("the `submit`", run["probe"]) for run in intakes["submit"]["ours"]]
            where, worst = max(runs, key=lambda item: item[1]["longest_wait"])
            errors = [e for _, probe in runs for e in probe["errors"]]
            row.measured = "%.2f s (in `%s`, during %s; longest cycle %.2f s)%s" % (
                worst["longest_wait"], worst["longest_statement"][:60], where,
                max(probe["longest_cycle"] for _, probe in runs),
                "; %d cycle(s) failed: %s" % (len(errors), errors[0]) if errors else "")
            row.met = worst["longest_wait"] < WAIT_LIMIT_S and not errors
        rows.append(row)
    return rows


class measuring:
    """A row's measurements read in the block; one missing leaves the row 'not measured: why'."""

    def __init__(self, row):
        self.row = row

    def __enter__(self):
        return self.row

    def __exit__(self, kind, exc, tb):
        if kind in (Missing, KeyError, ZeroDivisionError, TypeError):
            self.row.measured, self.row.met = "not measured: %s" % (exc if kind is Missing else repr(exc)), False
            return True
        return False


def all_targets(found):
    return (postgres_against_sqlite(found) + intake(found) + long_history(found) + memory(found)
            + cycle_waits(found))


def print_table(paths):
    found = load(paths)
    rows = all_targets(found)
    quick = any(data.get("quick") for data in found.values())
    first = next(iter(found.values()), {}).get("machine", {})
    print("#### Targets%s\n" % (" (QUICK run: smaller intakes and history, one repetition; the targets are "
                                "judged on a full run)" if quick else ""))
    print("| # | what | measured (median, min-max) | target | met |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| %d | %s | %s | %s | %s |" % (row.item, row.what, row.measured, row.target,
                                              "yes" if row.met else "**no**"))
    print("\n%d of %d targets met. Measured from %s on %s cores, %s GiB; load average %s at the start, %s at the end."
          % (sum(row.met for row in rows), len(rows), first.get("started", "?"), first.get("cores", "?"),
             first.get("memory_gib", "?"), first.get("load_at_the_start", "?"),
             next(iter(found.values()), {}).get("machine", {}).get("load_at_the_end", "?")))
    return rows


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print_table(sys.argv[1:])


if __name__ == "__main__":
    main()
