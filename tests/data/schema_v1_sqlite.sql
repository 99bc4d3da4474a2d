-- The schema of the first release (v1), as its init-db made it on SQLite: the starting point
-- of the upgrade test. Do not edit: it is history.
CREATE TABLE "bouncer_batches" ("id" INTEGER NOT NULL PRIMARY KEY, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "bouncer_id" TEXT, "quantity" INTEGER NOT NULL, "reserved_at" DATETIME NOT NULL, "sent_at" DATETIME, "last_checked_at" DATETIME, "bouncer_status" TEXT, "finished_at" DATETIME, "failure_reason" TEXT);
CREATE UNIQUE INDEX "bouncer_batches_bouncer_id" ON "bouncer_batches" ("bouncer_id");
CREATE INDEX "bouncer_batches_check_type_status" ON "bouncer_batches" ("check_type", "status");
CREATE TABLE "bouncer_batch_emails" ("id" INTEGER NOT NULL PRIMARY KEY, "bouncer_batch_id" INTEGER NOT NULL, "email_global_id" INTEGER NOT NULL, "check_type" TEXT NOT NULL, "email_sent" TEXT NOT NULL);
CREATE INDEX "bouncer_batch_emails_bouncer_batch_id" ON "bouncer_batch_emails" ("bouncer_batch_id");
CREATE UNIQUE INDEX "bouncer_batch_emails_check_type_email_global_id" ON "bouncer_batch_emails" ("check_type", "email_global_id");
CREATE TABLE "email_catchall_results" ("email_global_id" INTEGER NOT NULL PRIMARY KEY, "status" TEXT NOT NULL, "reason" TEXT, "score" INTEGER, "accept_all" TEXT, "disposable" TEXT, "free" TEXT, "role" TEXT, "disabled" TEXT, "full_mailbox" TEXT, "provider" TEXT, "raw" TEXT NOT NULL, "checked_at" DATETIME NOT NULL, "bouncer_batch_id" INTEGER);
CREATE INDEX "email_catchall_results_bouncer_batch_id" ON "email_catchall_results" ("bouncer_batch_id");
CREATE TABLE "email_deliverable_results" ("email_global_id" INTEGER NOT NULL PRIMARY KEY, "status" TEXT NOT NULL, "reason" TEXT, "score" INTEGER, "accept_all" TEXT, "disposable" TEXT, "free" TEXT, "role" TEXT, "disabled" TEXT, "full_mailbox" TEXT, "provider" TEXT, "raw" TEXT NOT NULL, "checked_at" DATETIME NOT NULL, "bouncer_batch_id" INTEGER);
CREATE INDEX "email_deliverable_results_bouncer_batch_id" ON "email_deliverable_results" ("bouncer_batch_id");
CREATE TABLE "emails_global" ("id" INTEGER NOT NULL PRIMARY KEY, "email" TEXT NOT NULL, "created_at" DATETIME NOT NULL);
CREATE UNIQUE INDEX "emails_global_email" ON "emails_global" ("email");
CREATE TABLE "rate_limit_tracker" ("id" INTEGER NOT NULL PRIMARY KEY, "requested_at" DATETIME NOT NULL, "kind" TEXT NOT NULL, "check_type" TEXT);
CREATE INDEX "rate_limit_tracker_requested_at" ON "rate_limit_tracker" ("requested_at");
CREATE TABLE "user_batches" ("id" INTEGER NOT NULL PRIMARY KEY, "user" TEXT NOT NULL, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "total" INTEGER NOT NULL, "invalid" INTEGER NOT NULL, "duplicates" INTEGER NOT NULL, "created_at" DATETIME NOT NULL, "completed_at" DATETIME, "failure_reason" TEXT);
CREATE INDEX "user_batches_status_id" ON "user_batches" ("status", "id");
CREATE TABLE "user_batch_emails" ("id" INTEGER NOT NULL PRIMARY KEY, "batch_id" INTEGER NOT NULL, "position" INTEGER NOT NULL, "email" TEXT NOT NULL, "email_global_id" INTEGER, "check_type" TEXT NOT NULL, "status" TEXT NOT NULL, "bouncer_batch_id" INTEGER, "failure_reason" TEXT, "completed_at" DATETIME);
CREATE UNIQUE INDEX "user_batch_emails_batch_id_position" ON "user_batch_emails" ("batch_id", "position");
CREATE INDEX "user_batch_emails_bouncer_batch_id_batch_id" ON "user_batch_emails" ("bouncer_batch_id", "batch_id");
CREATE INDEX "user_batch_emails_fifo" ON "user_batch_emails" ("check_type", "batch_id", "position") WHERE ("status" = 'queued');
CREATE INDEX "user_batch_emails_pending" ON "user_batch_emails" ("batch_id") WHERE ("status" IN ('queued', 'sent'));
