"""The soak run: the whole system on loopback under injected faults, bounded in time
(`python -m scripts.soak`, or `bash scripts/soak`, starts it).

One module per concern, in the order a run uses them:
- `settings`: the service compressed so a minute exercises every path, and the run's timings;
- `records`: what the run says, the errors it survives, the violations it sees;
- `stores`: the run's database (fresh, dropped after) and its claimed Redis database;
- `traffic`: the addresses, the user batches, and the submitter that sends them in;
- `watching`: what looks while the run goes on (invariants 2-5, /health, the worker killer),
  and the last look once everything stopped;
- `report`: what is counted at the end, the table, and the secret-leak check;
- `run`: the phases, start to finish.

How each invariant is judged (the checks live in support/invariants.py):
1. After the drain: every row has a verdict, or is failed or invalid with a reason, and every
   row submitted is stored and counted.
2. Each sample: no address in two in-flight batches of a check type, none twice in a batch.
3. Each sample, and at the end over the ledger's whole history (overlaps of reserved_at to
   finished_at), which also catches a peak between two samples.
4. From the sandbox's request log, every request kind, faulted ones included: no request
   arrives with RATE_LIMIT_BUFFER others in the 60 s before it (strictly: the limiter counts a
   62 s window, so the milliseconds between taking a slot and arriving are covered;
   --transit-tolerance shortens the judged window if ever needed). And, strictly, the service's
   own record of slots (rate_limit_tracker).
5. Each Bouncer batch once its id is stored: no row older than the youngest address it sent
   was pending and visible when it was reserved, yet left for a later batch, unless a failed
   call of the same cycle or an in-flight batch holding its address explains it. Visibility
   comes from the submitter (the time its commit returned), so a user batch still being
   written is never judged. This needs neither cycle boundaries nor a sampling rate: the ledger
   and the rows say what each reservation passed over. The simpler "nothing stays queued while
   a user batch N s younger is all sent" would flag the design's own exception: a call that
   fails leaves its emails for the next cycle, and with the budget used up that can be long.
"""
