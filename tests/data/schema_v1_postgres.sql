-- The schema of the first release (v1), as its init-db made it on PostgreSQL: the starting point
-- of the upgrade test. Do not edit: it is history.
CREATE TABLE IF NOT EXISTS "bouncer_batches" ("id" SERIAL NOT NULL PRIMARY KEY, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "bouncer_id" TEXT, "quantity" INTEGER NOT NULL, "reserved_at" TIMESTAMP NOT NULL, "sent_at" TIMESTAMP, "last_checked_at" TIMESTAMP, "bouncer_status" TEXT, "finished_at" TIMESTAMP, "failure_reason" TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS "bouncer_batches_bouncer_id" ON "bouncer_batches" ("bouncer_id");
CREATE INDEX IF NOT EXISTS "bouncer_batches_check_type_status" ON "bouncer_batches" ("check_type", "status");
CREATE TABLE IF NOT EXISTS "bouncer_batch_emails" ("id" SERIAL NOT NULL PRIMARY KEY, "bouncer_batch_id" INTEGER NOT NULL, "email_global_id" INTEGER NOT NULL, "check_type" TEXT NOT NULL, "email_sent" TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS "bouncer_batch_emails_bouncer_batch_id" ON "bouncer_batch_emails" ("bouncer_batch_id");
CREATE UNIQUE INDEX IF NOT EXISTS "bouncer_batch_emails_check_type_email_global_id" ON "bouncer_batch_emails" ("check_type", "email_global_id");
CREATE TABLE IF NOT EXISTS "email_catchall_results" ("email_global_id" INTEGER NOT NULL PRIMARY KEY, "status" TEXT NOT NULL, "reason" TEXT, "score" INTEGER, "accept_all" TEXT, "disposable" TEXT, "free" TEXT, "role" TEXT, "disabled" TEXT, "full_mailbox" TEXT, "provider" TEXT, "raw" TEXT NOT NULL, "checked_at" TIMESTAMP NOT NULL, "bouncer_batch_id" INTEGER);
CREATE INDEX IF NOT EXISTS "email_catchall_results_bouncer_batch_id" ON "email_catchall_results" ("bouncer_batch_id");
CREATE TABLE IF NOT EXISTS "email_deliverable_results" ("email_global_id" INTEGER NOT NULL PRIMARY KEY, "status" TEXT NOT NULL, "reason" TEXT, "score" INTEGER, "accept_all" TEXT, "disposable" TEXT, "free" TEXT, "role" TEXT, "disabled" TEXT, "full_mailbox" TEXT, "provider" TEXT, "raw" TEXT NOT NULL, "checked_at" TIMESTAMP NOT NULL, "bouncer_batch_id" INTEGER);
CREATE INDEX IF NOT EXISTS "email_deliverable_results_bouncer_batch_id" ON "email_deliverable_results" ("bouncer_batch_id");
CREATE TABLE IF NOT EXISTS "emails_global" ("id" SERIAL NOT NULL PRIMARY KEY, "email" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS "emails_global_email" ON "emails_global" ("email");
CREATE TABLE IF NOT EXISTS "rate_limit_tracker" ("id" SERIAL NOT NULL PRIMARY KEY, "requested_at" TIMESTAMP NOT NULL, "kind" TEXT NOT NULL, "check_type" TEXT);
CREATE INDEX IF NOT EXISTS "rate_limit_tracker_requested_at" ON "rate_limit_tracker" ("requested_at");
CREATE TABLE IF NOT EXISTS "user_batches" ("id" SERIAL NOT NULL PRIMARY KEY, "user" TEXT NOT NULL, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "total" INTEGER NOT NULL, "invalid" INTEGER NOT NULL, "duplicates" INTEGER NOT NULL, "created_at" TIMESTAMP NOT NULL, "completed_at" TIMESTAMP, "failure_reason" TEXT);
CREATE INDEX IF NOT EXISTS "user_batches_status_id" ON "user_batches" ("status", "id");
CREATE TABLE IF NOT EXISTS "user_batch_emails" ("id" SERIAL NOT NULL PRIMARY KEY, "batch_id" INTEGER NOT NULL, "position" INTEGER NOT NULL, "email" TEXT NOT NULL, "email_global_id" INTEGER, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "bouncer_batch_id" INTEGER, "failure_reason" TEXT, "completed_at" TIMESTAMP);
CREATE UNIQUE INDEX IF NOT EXISTS "user_batch_emails_batch_id_position" ON "user_batch_emails" ("batch_id", "position");
CREATE INDEX IF NOT EXISTS "user_batch_emails_bouncer_batch_id_batch_id" ON "user_batch_emails" ("bouncer_batch_id", "batch_id");
CREATE INDEX IF NOT EXISTS "user_batch_emails_fifo" ON "user_batch_emails" ("check_type", "batch_id", "position") WHERE ("status" = 'queued');
CREATE INDEX IF NOT EXISTS "user_batch_emails_pending" ON "user_batch_emails" ("batch_id") WHERE ("status" IN ('queued', 'sent'));
