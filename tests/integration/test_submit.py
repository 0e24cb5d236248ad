"""`submit` (what `imgq enqueue` runs) against real Postgres and Redis: nothing is published before
the job's transaction commits, and a refused job publishes nothing."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import text

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.errors import RefRefused
from imgq.producer.submit import accept_refs, submit
from tests.jobs import caption_task

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server):
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    yield client
    client.close()


def test_every_message_names_items_already_committed(store, client, broker_url, monkeypatch) -> None:
    import imgq.worker.feeder as feeder_module

    queue = "submit-order-test"
    settings = Settings(_env_file=None, broker_url=broker_url, queue=queue, broker_window=5, refs_per_message=3,
                        allowed_buckets=["b"])
    real_publish = feeder_module.publish
    seen: list[tuple[int, int]] = []  # (items in the messages, of them visible to another session)

    def checked_publish(app, messages, **kwargs):
        messages = list(messages)
        pairs = [(m.job, seq) for m in messages for seq, *_ in m.items]
        with store.engine.connect() as other:  # another session sees only committed rows
            visible = other.execute(text(
                "SELECT count(*) FROM job_items WHERE (job_id::text, seq) IN "
                "(SELECT * FROM unnest(CAST(:jobs AS text[]), CAST(:seqs AS int[])))"),
                {"jobs": [j for j, _ in pairs], "seqs": [s for _, s in pairs]}).scalar_one()
        seen.append((len(pairs), visible))
        return real_publish(app, messages, **kwargs)

    monkeypatch.setattr(feeder_module, "publish", checked_publish)
    refs = accept_refs([f"s3://b/{i}.jpg" for i in range(40)], settings, skip_invalid=False, rejected=[])
    result = submit(settings=settings, store=store, app=make_celery(settings), refs=refs, tasks=[caption_task("m")])
    assert (result.items, result.messages, result.published) == (40, 5, 15)
    assert seen == [(15, 15)], "a message went out for an item another session could not see yet"
    assert client.llen(queue) == 5
    client.delete(queue)


def test_a_refused_ref_late_in_the_stream_publishes_nothing(store, client, broker_url) -> None:
    queue = "submit-refused-test"
    settings = Settings(_env_file=None, broker_url=broker_url, queue=queue, allowed_buckets=["b"])
    raw = [f"s3://b/{i}.jpg" for i in range(12_000)] + ["s3://elsewhere/x.jpg"]  # past the first COPY chunks
    with pytest.raises(RefRefused, match="IMGQ_ALLOWED_BUCKETS"):
        submit(settings=settings, store=store, app=make_celery(settings), tasks=[caption_task("m")],
               refs=accept_refs(raw, settings, skip_invalid=False, rejected=[]))
    with store.engine.connect() as conn:
        jobs = conn.execute(text("SELECT count(*) FROM jobs WHERE queue = :q"), {"q": queue}).scalar_one()
    assert jobs == 0
    assert client.llen(queue) == 0
