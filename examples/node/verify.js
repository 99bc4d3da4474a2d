// A host application's side of the SQL door: write one user batch with plain SQL, wait until
// the queue has verified it, print its results. Needs only PostgreSQL (the `pg` package), the
// queue's database and its tables; no Python, no Redis, no call to the queue.
//
//   DATABASE_URL=postgresql://user:pass@host/db node verify.js alice deliverable a@x.com b@y.com
//
// With no addresses on the command line it reads them from stdin, one a line.

const { Client } = require("pg");

const ENDED = ["completed", "failed", "cancelled"];
const POLL_MS = Number(process.env.POLL_MS || 2000);
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS || 15 * 60 * 1000);

async function readAddresses(args) {
  if (args.length) return args;
  let text = "";
  for await (const chunk of process.stdin) text += chunk;
  return text.split(/\r?\n/).map((line) => line.trim()).filter(Boolean);
}

// One transaction: the batch, then its rows. Positions number the rows 1..n; every other
// column (status, counts, created_at) has a database-side default.
async function submitBatch(db, userId, checkType, emails) {
  await db.query("BEGIN");
  try {
    const { rows } = await db.query(
      "INSERT INTO user_batches (user_id, check_type) VALUES ($1, $2) RETURNING id",
      [userId, checkType]);
    const batchId = rows[0].id;
    // One statement for the lot: unnest turns the two arrays into rows.
    await db.query(
      "INSERT INTO user_batch_emails (batch_id, position, email)" +
      " SELECT $1, position, email FROM unnest($2::int[], $3::text[]) AS t(position, email)",
      [batchId, emails.map((_, i) => i + 1), emails]);
    await db.query("COMMIT");
    return batchId;
  } catch (error) {
    await db.query("ROLLBACK");
    throw error;
  }
}

async function waitUntilEnded(db, batchId) {
  const deadline = Date.now() + TIMEOUT_MS;
  for (;;) {
    const { rows } = await db.query(
      "SELECT status, total, invalid, duplicates, failure_reason FROM user_batches WHERE id = $1",
      [batchId]);
    const batch = rows[0];
    console.error(`batch ${batchId}: ${batch.status}, ${batch.total} rows, ${batch.invalid} invalid`);
    if (ENDED.includes(batch.status)) return batch;
    if (Date.now() > deadline) throw new Error(`batch ${batchId} did not end in time`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function main() {
  const [userId, checkType, ...rest] = process.argv.slice(2);
  if (!userId || !["deliverable", "catchall"].includes(checkType)) {
    console.error("usage: node verify.js USER_ID deliverable|catchall [ADDRESS ...]");
    process.exit(2);
  }
  const emails = await readAddresses(rest);
  const db = new Client({ connectionString: process.env.DATABASE_URL });
  await db.connect();
  try {
    const batchId = await submitBatch(db, userId, checkType, emails);
    console.error(`submitted batch ${batchId} with ${emails.length} rows`);
    const batch = await waitUntilEnded(db, batchId);
    const { rows } = await db.query(
      "SELECT position, email, status, reason, score FROM user_batch_results" +
      " WHERE batch_id = $1 ORDER BY position", [batchId]);
    console.log(JSON.stringify({ batch_id: batchId, status: batch.status,
                                 failure_reason: batch.failure_reason, results: rows }));
  } finally {
    await db.end();
  }
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
