"""What a cycle did: one report per cycle kind, filled by its steps and summed up in one line."""

import logging
from dataclasses import dataclass, field

from bouncer.names import CREATION, STATUS

log = logging.getLogger(__name__)

HELD = ("paused", "not sending")   # how a cycle held back by a standing state says so


@dataclass
class CycleReport:
    check_type: str
    skipped: bool = False      # another process held the lock: nothing done
    stopped: str | None = None
    refused: tuple | None = None   # (status, message): Bouncer's 401, 402 or 429 ended the cycle
    seconds: float = 0.0

    def worth_telling(self):
        """Whether the cycle's line is for INFO: it did something, or Bouncer or a stop ended it
        (a pause, or a missing key, held since the last cycle is no news). An idle cycle's line is
        for DEBUG."""
        ended_early = self.stopped is not None and not self.stopped.startswith(HELD)
        return not self.skipped and (self.did_something() or self.refused is not None or ended_early)

    def summary(self):
        if self.skipped:
            return "%s: another %s cycle is running; nothing done" % (self.check_type, self.kind)
        parts = [self.done()]
        if self.stopped:
            parts.append("stopped: %s" % self.stopped)
        return "; ".join(parts)


@dataclass
class CreationReport(CycleReport):
    kind = CREATION
    free_slots: int = 0
    created: list = field(default_factory=list)        # (ledger id, bouncer id, addresses)
    failed_calls: list = field(default_factory=list)   # (ledger id, reason)
    cached: int = 0
    attached: int = 0
    requeued: int = 0
    abandoned: list = field(default_factory=list)      # (ledger id, addresses): possible orphans
    released: list = field(default_factory=list)       # (ledger id, addresses): a dead cycle's, never sent
    admission: object = None                           # admission.AdmissionReport
    reordered: int | None = None                       # rows in line numbered anew (QUEUE_POLICY, weights)

    def did_something(self):
        admission = self.admission
        admitted = admission is not None and bool(admission.admitted or admission.invalid or admission.noticed
                                                  or admission.removed or admission.failed)
        return admitted or bool(self.created or self.failed_calls or self.cached or self.attached
                                or self.requeued or self.abandoned or self.released)

    def done(self):
        parts = ["%s: %d Bouncer batch(es) created (%d addresses)" % (
            self.check_type, len(self.created), sum(n for _, _, n in self.created))]
        if self.admission is not None and (self.admission.admitted or self.admission.invalid
                                           or self.admission.noticed or self.admission.removed):
            parts.append(self.admission.summary())
        if self.failed_calls:
            parts.append("%d call(s) failed, emails queued again" % len(self.failed_calls))
        if self.cached:
            parts.append("%d email(s) completed from cached verdicts" % self.cached)
        if self.attached:
            parts.append("%d email(s) joined batches in flight" % self.attached)
        if self.abandoned:
            parts.append("%d abandoned reservation(s) released (possible orphans)" % len(self.abandoned))
        if self.released:
            parts.append("%d unsent reservation(s) of a dead cycle released" % len(self.released))
        if self.reordered is not None:
            parts.append("line ordered anew (%d row(s) took a new turn)" % self.reordered)
        parts.append("%d free slot(s) at start" % self.free_slots)
        return "; ".join(parts)


@dataclass
class StatusReport(CycleReport):
    kind = STATUS
    checked: int = 0
    ingested: list = field(default_factory=list)   # IngestReport per completed batch
    failed: list = field(default_factory=list)     # (ledger id, reason)
    finishing: list = field(default_factory=list)  # ledger ids Bouncer was asked to finish
    waiting: int = 0
    errors: int = 0
    deleted: int = 0                               # batches deleted at Bouncer

    def did_something(self):
        return bool(self.checked or self.ingested or self.failed or self.errors)

    def done(self):
        parts = ["%s: %d Bouncer batch(es) checked, %d ingested (%d emails verified), %d waiting" % (
            self.check_type, self.checked, len(self.ingested),
            sum(r.verified for r in self.ingested), self.waiting)]
        rechecking = sum(r.rechecking for r in self.ingested)
        if rechecking:
            parts.append("%d email(s) greylisted, back in line for a re-check" % rechecking)
        if self.finishing:
            parts.append("%d finished at Bouncer" % len(self.finishing))
        if self.failed:
            parts.append("%d failed" % len(self.failed))
        if self.deleted:
            parts.append("%d deleted at Bouncer" % self.deleted)
        if self.errors:
            parts.append("%d call(s) failed, retried next cycle" % self.errors)
        return "; ".join(parts)


REPORTS = {CREATION: CreationReport, STATUS: StatusReport}

