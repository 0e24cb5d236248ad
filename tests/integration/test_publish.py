"""Publishing to a real Redis: pipelined in batches, nothing lost at the batch boundaries."""

import base64
import json
import uuid

import pytest
import redis
from sqlalchemy import text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.contract import CaptionParams, TaskMessage
from imgq.db.admin import Admin
from imgq.db.store import DeadRow, Store
from imgq.params import EmbedParams, ValidateParams
from imgq.publish import PIPELINE, chunk_messages, publish
from tests.jobs import caption_task, create_job, record

pytestmark = pytest.mark.integration


def test_every_message_arrives_in_order_across_pipeline_flushes(broker_url: str, redis_server) -> None:
    settings = Settings(_env_file=None, broker_url=broker_url, queue="publish-test")
    app = make_celery(settings)
    job = str(uuid.uuid4())
    n_messages = 2 * PIPELINE + 37  # two full flushes and a partial one at the end
    items = [(seq, f"s3://bucket/{seq:06d}.jpg") for seq in range(n_messages * 3)]
    sent = publish(app, chunk_messages(job=job, tasks=[caption_task("m")], items=items, per_message=3),
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


def _queued(redis_server, queue: str) -> list[TaskMessage]:
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    raw = client.lrange(queue, 0, -1)
    client.close()
    return [TaskMessage.model_validate(_task_kwargs(r)["msg"]) for r in reversed(raw)]


@pytest.mark.parametrize("kinds", [["embed"], ["caption", "embed"], ["validate"]])
def test_dead_letter_retry_and_lost_items_go_out_with_every_task_of_the_job(
    kinds: list[str], broker_url: str, redis_server, database_url: str
) -> None:
    from imgq.contract import make_task
    from imgq.worker.feeder import Feeder

    settings = Settings(_env_file=None, broker_url=broker_url, queue="republish-test")
    app = make_celery(settings)
    store = Store.from_url(database_url)
    params = {"caption": CaptionParams(num_beams=2), "embed": EmbedParams(resize="letterbox"),
              "validate": ValidateParams()}
    tasks = [make_task(k, f"model-{k}", params[k]) for k in kinds]
    refs = [("s3://b/0.jpg", "a dog"), ("s3://b/1.jpg", "a cat")] if kinds == ["validate"] else ["s3://b/0.jpg",
                                                                                                  "s3://b/1.jpg"]
    job = store.create_job(tasks=[record(t) for t in tasks], refs=refs, queue="republish-test")
    admin = Admin(store.engine)
    feeder = Feeder(admin=admin, app=app, queue="republish-test", window=100, per_message=16)
    assert feeder.feed().items == 2

    store.claim(job, [0], "w")
    store.write_dead([DeadRow(job, 0, "wrong_model", "no worker served it", "w")])
    assert [len(b.items) for b in admin.take_dead_letters(code="wrong_model", job=None, seq=None)] == [1]
    assert feeder.feed().items == 1  # the retried item, back from the backlog
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    client.delete("republish-test")  # the broker loses everything it held
    client.close()
    report = feeder.feed(sweep=True, lost_after_s=0)  # the queue is empty: published + queued = lost
    messages = _queued(redis_server, "republish-test")
    store.engine.dispose()
    assert (report.lost, report.items) == (2, 2)
    assert len(messages) == 1
    for msg in messages:
        assert msg.tasks == tasks, "a re-published item must keep its job's kinds, models and params"
    assert messages[0].items == ([(0, *refs[0]), (1, *refs[1])] if isinstance(refs[0], tuple)
                                 else [(0, refs[0]), (1, refs[1])])


def test_chunking_keeps_the_last_partial_chunk() -> None:
    items = [(seq, f"/x/{seq}") for seq in range(10)]
    chunks = list(chunk_messages(job="j", tasks=[caption_task("m")], items=items, per_message=4))
    assert [len(c.items) for c in chunks] == [4, 4, 2]
    assert [item for c in chunks for item in c.items] == items


def test_reconcile_of_one_job_leaves_the_others_alone(database_url: str) -> None:
    store = Store.from_url(database_url)
    mine = create_job(store, [caption_task("m")], ["/a/0.jpg", "/a/1.jpg"])
    other = create_job(store, [caption_task("m")], ["/b/0.jpg"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'running', worker = 'w', published_at = now()"))  # claimed
    with Admin(store.engine).feeding("imgq") as tx:
        assert tx.lost(queued_older_than_s=0, running_older_than_s=0, job=mine) == 2
    counts = store.counts(mine), store.counts(other)
    store.engine.dispose()
    assert counts == ({"queued": 2, "running": 0, "done": 0, "dead": 0},
                      {"queued": 0, "running": 1, "done": 0, "dead": 0})
