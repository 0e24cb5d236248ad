#!/bin/sh
# One-shot: create the buckets that IMGQ_ALLOWED_BUCKETS names and one MinIO user per service,
# each with only what it needs: workers read objects, producers list and read them.
set -eu
for var in MINIO_ROOT_PASSWORD MINIO_WORKER_SECRET MINIO_PRODUCER_SECRET; do
  eval "value=\${$var:-}"
  case "$value" in ""|*change-me*) echo "$var is unset or still the example's placeholder" >&2; exit 1;; esac
done
mc alias set imgq http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
# BUCKET is IMGQ_ALLOWED_BUCKETS: comma-separated, like the variable (one name was assumed, so a
# list made one bucket named "a,b" and policies for it).
buckets=$(printf '%s' "$BUCKET" | tr ',' ' ')
objects="" listing=""
for b in $buckets; do
  mc mb --ignore-existing "imgq/$b"
  objects="$objects${objects:+, }\"arn:aws:s3:::$b/*\""
  listing="$listing${listing:+, }\"arn:aws:s3:::$b\""
done
cat > /tmp/read.json <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion"], "Resource": [$objects]}]}
JSON
cat > /tmp/list.json <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListBucketVersions"], "Resource": [$listing]},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion"], "Resource": [$objects]}]}
JSON
mc admin policy create imgq imgq-read /tmp/read.json 2>/dev/null || true
mc admin policy create imgq imgq-list /tmp/list.json 2>/dev/null || true
mc admin user add imgq imgq-worker "$MINIO_WORKER_SECRET"
mc admin user add imgq imgq-producer "$MINIO_PRODUCER_SECRET"
mc admin policy attach imgq imgq-read --user imgq-worker 2>/dev/null || true
mc admin policy attach imgq imgq-list --user imgq-producer 2>/dev/null || true
echo "buckets $buckets ready; users imgq-worker (read) and imgq-producer (list+read)"
