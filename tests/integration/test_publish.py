"""Publishing to a real Redis: pipelined in batches, nothing lost at the batch boundaries."""

import base64
import json
import uuid

import pytest
import redis

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.contract import CaptionParams, TaskMessage
from imgq.publish import PIPELINE, chunk_messages, publish

pytestmark = pytest.mark.integration


def test_every_message_arrives_in_order_across_pipeline_flushes(broker_url: str, redis_server) -> None:
    settings = Settings(_env_file=None, broker_url=broker_url, queue="publish-test")
    app = make_celery(settings)
    job = str(uuid.uuid4())
    n_messages = 2 * PIPELINE + 37  # two full flushes and a partial one at the end
    items = [(seq, f"s3://bucket/{seq:06d}.jpg") for seq in range(n_messages * 3)]
    sent = publish(app, chunk_messages(job=job, model="m", params=CaptionParams(), items=items, per_message=3),
                   queue="publish-test")
    assert sent == n_messages
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    raw = client.lrange("publish-test", 0, -1)
    client.close()
    assert len(raw) == n_messages
    # kombu LPUSHes and consumers BRPOP: the oldest message is at the right-hand end.
    bodies = [TaskMessage.model_validate(_task_kwargs(r)["msg"]) for r in raw]
    seqs = [seq for body in reversed(bodies) for seq, _ in body.items]
    assert seqs == list(range(n_messages * 3))


def _task_kwargs(raw: bytes) -> dict:
    """The task's kwargs from a kombu envelope as the Redis transport stores it."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    _args, kwargs, _embed = json.loads(body)
    return kwargs
