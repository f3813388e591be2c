"""Round trips through the real PostgreSQL and Kafka started by scripts/services.sh (no mocks)."""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections import Counter

import psycopg2
import pytest
import sqlalchemy as sa

with warnings.catch_warnings():
    # kafka-python loads its protocol schemas through the deprecated importlib.resources API.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError
    from kafka.serializer import DefaultSerializer  # str <-> UTF-8 bytes

pytestmark = pytest.mark.cloud

# kafka-python backs off reconnects exponentially up to 30 s by default; while the broker is
# restarting that would leave a client idle long after it is back. 1 s caps the wait.
RECONNECT = {"reconnect_backoff_max_ms": 1000}

PARTITIONS = 4


def _libpq_dsn(sqlalchemy_url: str) -> str:
    # psycopg2 takes a libpq URL; the "+psycopg2" driver suffix is SQLAlchemy's.
    return sa.make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


# ------------------------------------------------------------------------------ PostgreSQL

def test_postgres_round_trip(pg_url):
    with psycopg2.connect(_libpq_dsn(pg_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), current_user, host(inet_server_addr())")
        assert cur.fetchone() == ("facecluster", "facecluster", "127.0.0.1")
        cur.execute("CREATE TEMP TABLE faces (id serial PRIMARY KEY, person text NOT NULL)")
        cur.executemany("INSERT INTO faces (person) VALUES (%s)", [("ann",), ("bob",), ("ann",)])
        cur.execute("SELECT person, count(*) FROM faces GROUP BY person ORDER BY person")
        assert cur.fetchall() == [("ann", 2), ("bob", 1)]
    conn.close()


def test_postgres_survives_restart(pg_url, restart_service):
    # A table of its own, dropped at the end: the database is shared with migration tests.
    table = f"restart_probe_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(pg_url, pool_pre_ping=True)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (token text PRIMARY KEY)"))
            conn.execute(sa.text(f"INSERT INTO {table} VALUES ('before-restart')"))
        restart_service("pg")
        # The pooled connection died with the server; pre-ping replaces it, and the committed row
        # is still there (fsync is off, but a clean shutdown writes everything out).
        with engine.begin() as conn:
            rows = conn.execute(sa.text(f"SELECT token FROM {table}")).scalars().all()
        assert rows == ["before-restart"]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


# ------------------------------------------------------------------------------ Kafka

def _admin(bootstrap):
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-admin", **RECONNECT)


@pytest.fixture
def admin(kafka_bootstrap):
    client = _admin(kafka_bootstrap)
    yield client
    client.close()


@pytest.fixture
def topic(kafka_bootstrap):
    """A fresh 4-partition topic per test; auto-creation is off on the broker, so it must be made."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = _admin(kafka_bootstrap)
    try:
        client.create_topics({name: {"num_partitions": PARTITIONS, "replication_factor": 1}},
                             wait_for_metadata=True)
    finally:
        client.close()
    yield name
    # A fresh client: one that lived through a broker restart raises NodeNotReadyError at once
    # instead of reconnecting (kafka-python 3 admin behaviour).
    client = _admin(kafka_bootstrap)
    try:
        client.delete_topics([name], raise_errors=False)
    finally:
        client.close()


def _producer(bootstrap):
    return KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **RECONNECT,
        key_serializer=DefaultSerializer(), value_serializer=DefaultSerializer(),
    )


def _consumer(bootstrap, topic, group):
    return KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, **RECONNECT,
        auto_offset_reset="earliest", enable_auto_commit=False,
        key_deserializer=DefaultSerializer(), value_deserializer=DefaultSerializer(),
    )


def _drain(consumer, want: int, timeout_s: float = 60.0) -> list:
    """Poll until ``want`` records arrived (or time out), committing what was read."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    consumer.commit()
    return got


def _produce(producer, topic, start: int, count: int) -> list:
    futures = [producer.send(topic, key=f"person-{i % 10}", value=f"face-{i}")
               for i in range(start, start + count)]
    producer.flush(timeout=60)
    return [f.get(timeout=60) for f in futures]


def test_kafka_topic_has_four_partitions_and_no_auto_create(admin, topic, kafka_bootstrap):
    (described,) = admin.describe_topics([topic])
    assert len(described["partitions"]) == PARTITIONS
    # Producing to an unknown topic must not create it (auto.create.topics.enable=false): the
    # producer never gets metadata for it and gives up after max_block_ms.
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_block_ms=2000)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send(missing, b"x").get(timeout=5)
    finally:
        producer.close()
    assert topic in admin.list_topics()
    assert missing not in admin.list_topics()


def test_kafka_produce_consume_with_committed_offsets(admin, topic, kafka_bootstrap):
    group = f"group-{uuid.uuid4().hex[:8]}"
    producer = _producer(kafka_bootstrap)
    try:
        metas = _produce(producer, topic, 0, 100)
        # Keys pick partitions: the same key always lands on the same one, and the 10 keys spread.
        by_key = {}
        for i, m in enumerate(metas):
            assert by_key.setdefault(f"person-{i % 10}", m.partition) == m.partition
        assert len(set(by_key.values())) > 1

        consumer = _consumer(kafka_bootstrap, topic, group)
        try:
            got = _drain(consumer, 100)
        finally:
            consumer.close()
        assert sorted(r.value for r in got) == sorted(f"face-{i}" for i in range(100))
        assert all(r.partition == by_key[r.key] for r in got)

        # The group's committed offsets add up to everything produced, per partition.
        (offsets,) = admin.list_group_offsets({group: None}).values()
        per_partition = Counter(m.partition for m in metas)
        assert {tp.partition: om.offset for tp, om in offsets.items()} == dict(per_partition)

        # A new member of the same group resumes from the commit: it sees only the new records.
        _produce(producer, topic, 100, 10)
        consumer = _consumer(kafka_bootstrap, topic, group)
        try:
            again = _drain(consumer, 10)
            assert consumer.poll(timeout_ms=1000) == {}
        finally:
            consumer.close()
        assert sorted(r.value for r in again) == sorted(f"face-{i}" for i in range(100, 110))
    finally:
        producer.close()


def test_kafka_clients_recover_from_broker_restart(topic, kafka_bootstrap, restart_service):
    group = f"group-{uuid.uuid4().hex[:8]}"
    producer = _producer(kafka_bootstrap)
    consumer = _consumer(kafka_bootstrap, topic, group)
    try:
        _produce(producer, topic, 0, 50)
        first = _drain(consumer, 50)
        assert sorted(r.value for r in first) == sorted(f"face-{i}" for i in range(50))

        # Restart the broker while the producer keeps sending: records sent while it is down wait
        # in the producer and are retried; idempotence keeps retries from duplicating them.
        errors: list[BaseException] = []

        def restart():
            try:
                restart_service("kafka")
            except BaseException as e:  # pytest.fail raises a BaseException
                errors.append(e)

        thread = threading.Thread(target=restart)
        thread.start()
        futures, i = [], 50
        while thread.is_alive() or i < 100:
            futures.append(producer.send(topic, key=f"person-{i % 10}", value=f"face-{i}"))
            i += 1
            time.sleep(0.05)
        thread.join()
        if errors:
            raise errors[0]
        producer.flush(timeout=120)
        for f in futures:
            f.get(timeout=1)

        # The same consumer object reconnects on its own and carries on where it left off.
        second = _drain(consumer, i - 50, timeout_s=120)
        assert sorted(r.value for r in second) == sorted(f"face-{n}" for n in range(50, i))
        assert consumer.poll(timeout_ms=1000) == {}
    finally:
        consumer.close()
        producer.close()
