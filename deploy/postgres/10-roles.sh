#!/bin/sh
# Least privilege for each service (run once by the postgres image on an empty data directory).
# imgq_owner runs the migrations and owns the schema; producers may add and update jobs (migration
# 0011 adds deleting what a failed acceptance of theirs left, and dead letters: the operators' CLI);
# workers and the API also delete (dead-letter retry, jobs-page sessions); analysts only read, and
# never the tenants' keys and callback secrets (migration 0007 revokes those tables from imgq_reader). No service is a superuser.
# PUBLIC keeps none of PostgreSQL's defaults that let any role reach past its tables: advisory locks
# (an analyst took the feeder's lock and stalled feeding), large objects (they outlive the session)
# and temporary tables. The lock functions imgq's code calls are granted back only to the roles whose
# code calls them; no service uses large objects or temporary tables.
set -eu
for var in POSTGRES_OWNER_PASSWORD POSTGRES_PRODUCER_PASSWORD POSTGRES_WORKER_PASSWORD POSTGRES_READER_PASSWORD POSTGRES_API_PASSWORD; do
  eval "value=\${$var:-}"
  case "$value" in ""|*change-me*) echo "$var is unset or still the example's placeholder" >&2; exit 1;; esac
done
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner_pw="$POSTGRES_OWNER_PASSWORD" -v producer_pw="$POSTGRES_PRODUCER_PASSWORD" \
  -v worker_pw="$POSTGRES_WORKER_PASSWORD" -v reader_pw="$POSTGRES_READER_PASSWORD" -v api_pw="$POSTGRES_API_PASSWORD" <<'SQL'
CREATE EXTENSION IF NOT EXISTS vector;  -- needs a superuser once; the migrations then find it
CREATE ROLE imgq_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE imgq_producer LOGIN PASSWORD :'producer_pw';
CREATE ROLE imgq_worker LOGIN PASSWORD :'worker_pw';
CREATE ROLE imgq_reader LOGIN PASSWORD :'reader_pw';
CREATE ROLE imgq_api LOGIN PASSWORD :'api_pw';
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO imgq_owner;
GRANT USAGE ON SCHEMA public TO imgq_producer, imgq_worker, imgq_reader, imgq_api;
ALTER DEFAULT PRIVILEGES FOR ROLE imgq_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE ON TABLES TO imgq_producer;
ALTER DEFAULT PRIVILEGES FOR ROLE imgq_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO imgq_worker, imgq_api;
ALTER DEFAULT PRIVILEGES FOR ROLE imgq_owner IN SCHEMA public GRANT SELECT ON TABLES TO imgq_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE imgq_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO imgq_producer, imgq_worker, imgq_api;
ALTER DEFAULT PRIVILEGES FOR ROLE imgq_owner IN SCHEMA public
  GRANT EXECUTE ON FUNCTIONS TO imgq_producer, imgq_worker, imgq_reader, imgq_api;
-- Every overload of the advisory-lock and large-object functions, as this database's catalog lists
-- them (function and database privileges are per database: a database created later has the defaults).
DO $$
DECLARE f text;
BEGIN
  FOR f IN SELECT 'pg_catalog.' || quote_ident(proname) || '(' || pg_get_function_identity_arguments(oid) || ')'
           FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace
             AND (proname ~ '^pg_(try_)?advisory_' OR proname ~ '^lo_' OR proname IN ('loread', 'lowrite'))
  LOOP
    EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || f || ' FROM PUBLIC';
  END LOOP;
  EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database()) || ' FROM PUBLIC';
END
$$;
-- The lock functions back, by what each role's code calls (db/locks.py: a two-key lock is
-- (integer, integer), the reaper's single key bigint). A grant covers every key, not one class.
-- Waits: the feed lock of a first window or an operator's feed (Admin.feeding with wait_s: enqueue,
-- POST /v1/jobs, imgq backfill, dlq retry, reconcile), the acceptance lock (Store.create_job with side
-- streams, Store._drop_items), a cancel's chunk (cancelling.cancel_job: DELETE /v1/jobs/{id}, imgq cancel).
GRANT EXECUTE ON FUNCTION pg_catalog.pg_advisory_xact_lock(integer, integer) TO imgq_producer, imgq_api;
-- Tries, in every feed cycle: the feed lock, a cut-short cancel's take-over (cancelling.cancel_waiting),
-- an abandoned acceptance (store.drop_acceptance from Admin.drop_abandoned).
GRANT EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(integer, integer)
  TO imgq_producer, imgq_worker, imgq_api;
-- Session locks: a backfill's run (db/backfills.py: imgq backfill, imgq beat) and the worker that
-- leads a queue's feeder (worker/feeder.py).
GRANT EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_lock(integer, integer),
  pg_catalog.pg_advisory_unlock(integer, integer) TO imgq_producer, imgq_worker;
-- The reaper (Admin.take_orphans: the worker's heartbeat, waiting at start).
GRANT EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_xact_lock(bigint), pg_catalog.pg_advisory_xact_lock(bigint)
  TO imgq_worker;
-- Analysts' defaults (a session may SET its own): a forgotten transaction holds back vacuum everywhere
-- and its locks block migrations; a runaway query holds a connection. KEDA's count reads as this role too.
ALTER ROLE imgq_reader SET statement_timeout = '5min';
ALTER ROLE imgq_reader SET idle_in_transaction_session_timeout = '10min';
SQL
