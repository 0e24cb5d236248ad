#!/bin/sh
# Least privilege for each service (run once by the postgres image on an empty data directory).
# imgq_owner runs the migrations and owns the schema; producers may add and update jobs (migration
# 0011 adds deleting what a failed acceptance of theirs left, and dead letters: the operators' CLI);
# workers and the API also delete (dead-letter retry, jobs-page sessions); analysts only read, and
# never the tenants' keys and callback secrets (migration 0007 revokes those tables from imgq_reader). No service is a superuser.
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
SQL
