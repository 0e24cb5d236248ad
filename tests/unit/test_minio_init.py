"""deploy/minio/init.sh with a stand-in `mc` that records its calls: IMGQ_ALLOWED_BUCKETS is a
comma-separated list, and the script took it for one bucket name ("a,b")."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "minio" / "init.sh"


def test_every_allowed_bucket_is_created_and_in_both_policies(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    policies = tmp_path / "policies"
    policies.mkdir()
    # The stand-in keeps the policy files it is given (the script writes them to /tmp).
    (tmp_path / "mc").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                 f'case "$*" in *"policy create"*) cp "$6" {policies}/"$5".json;; esac\n')
    (tmp_path / "mc").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "MINIO_ROOT_USER": "root",
           "MINIO_ROOT_PASSWORD": "p1", "MINIO_WORKER_SECRET": "p2", "MINIO_PRODUCER_SECRET": "p3",
           "BUCKET": "images,archive"}
    out = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    made = [line.split()[-1] for line in calls.read_text().splitlines() if line.startswith("mb ")]
    assert made == ["imgq/images", "imgq/archive"]
    read = json.loads((policies / "imgq-read.json").read_text())
    listing = json.loads((policies / "imgq-list.json").read_text())
    assert read["Statement"][0]["Resource"] == ["arn:aws:s3:::images/*", "arn:aws:s3:::archive/*"]
    assert listing["Statement"][0]["Resource"] == ["arn:aws:s3:::images", "arn:aws:s3:::archive"]
