"""The in-process bus keeps Kafka's semantics: keyed partitions, groups, explicit commits."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from services import bus as busmod
from services.bus import DEAD, INDEXED, UPLOADED, BusUnavailable, InvalidMessage, Stopped

SHA = "ab" * 32


def uploaded(user: str, n: int) -> dict:
    return {"user": user, "uri": f"photo-{n}.jpg", "object_key": f"ab/{SHA}", "sha256": SHA}


@pytest.fixture
def bus():
    b = busmod.connect(f"memory://test-{uuid.uuid4().hex}")
    b.ensure_topics()
    return b


def drain(consumer, timeout_s: float = 0.05) -> list:
    out = []
    while batch := consumer.poll(timeout_s):
        out.extend(batch)
    return out


def test_one_users_events_stay_in_one_partition_in_order(bus):
    users = [f"user-{i}" for i in range(12)]
    bus.publish(UPLOADED, [(u, uploaded(u, n)) for n in range(5) for u in users])
    got = drain(bus.consumer(UPLOADED, "g", max_records=100))
    assert len(got) == 60
    partitions = {}
    for m in got:
        assert partitions.setdefault(m.key, m.partition) == m.partition == busmod.partition_for(m.key)
    assert len(set(partitions.values())) == busmod.PARTITIONS  # 12 users spread over all 4
    for u in users:
        assert [m.value["uri"] for m in got if m.key == u] == [f"photo-{n}.jpg" for n in range(5)]


def test_poll_returns_at_most_max_records(bus):
    bus.publish(UPLOADED, [("u", uploaded("u", n)) for n in range(10)])
    consumer = bus.consumer(UPLOADED, "g", max_records=4)
    assert [len(consumer.poll(0.05)) for _ in range(4)] == [4, 4, 2, 0]


def test_only_committed_messages_are_skipped_by_the_next_member(bus):
    bus.publish(UPLOADED, [("u", uploaded("u", n)) for n in range(6)])
    first = bus.consumer(UPLOADED, "g", max_records=3)
    batch = first.poll(0.05)
    assert first.commit(batch)
    first.poll(0.05)  # read but never committed: a crash here loses nothing
    assert bus.pending(UPLOADED, "g") == 3
    first.close()
    second = bus.consumer(UPLOADED, "g", max_records=10)
    assert [m.value["uri"] for m in drain(second)] == [f"photo-{n}.jpg" for n in range(3, 6)]
    # another group has its own offsets
    assert len(drain(bus.consumer(UPLOADED, "other", max_records=10))) == 6


def test_members_of_a_group_split_the_partitions(bus):
    users = [f"user-{i}" for i in range(12)]
    bus.publish(UPLOADED, [(u, uploaded(u, 0)) for u in users])
    a = bus.consumer(UPLOADED, "g", max_records=100)
    b = bus.consumer(UPLOADED, "g", max_records=100)
    got_a, got_b = drain(a), drain(b)
    assert got_a and got_b
    assert {m.partition for m in got_a}.isdisjoint({m.partition for m in got_b})
    assert sorted(m.key for m in got_a + got_b) == sorted(users)


def test_commit_after_a_rebalance_is_refused_and_the_new_owner_gets_the_messages(bus):
    bus.publish(UPLOADED, [("u", uploaded("u", n)) for n in range(3)])
    a = bus.consumer(UPLOADED, "g", max_records=10)
    batch = a.poll(0.05)
    assert len(batch) == 3
    bus.consumer(UPLOADED, "g", max_records=10)  # joins: a rebalance starts
    assert not a.commit(batch)
    a.close()  # leaves: everything goes to the new member, uncommitted messages included
    assert bus.pending(UPLOADED, "g") == 3


def test_a_member_hears_which_partitions_it_lost(bus):
    revoked = []
    a = bus.consumer(UPLOADED, "g", max_records=10, on_revoke=revoked.append)
    a.poll(0.01)
    bus.consumer(UPLOADED, "g", max_records=10)
    a.poll(0.01)
    assert revoked == [{1, 3}]  # a keeps the even partitions, the new member takes the odd ones


def test_poll_wakes_up_when_a_message_arrives(bus):
    consumer = bus.consumer(UPLOADED, "g", max_records=10)
    timer = threading.Timer(0.1, lambda: bus.publish(UPLOADED, [("u", uploaded("u", 0))]))
    timer.start()
    try:
        assert len(consumer.poll(5.0)) == 1
    finally:
        timer.cancel()


def test_malformed_messages_arrive_flagged_and_their_dead_letter_is_valid(bus):
    bus.publish(UPLOADED, [("u", b"not json"), ("u", b'{"user": "u"}'), ("u", b"\xff\xfe"),
                           ("u", uploaded("u", 0))])
    got = drain(bus.consumer(UPLOADED, "g", max_records=10))
    assert [m.error is None for m in got] == [False, False, False, True]
    assert "not JSON" in got[0].error and "'uri'" in got[1].error
    bus.publish(DEAD, [busmod.dead_letter(m, m.error) for m in got[:3]])
    dead = drain(bus.consumer(DEAD, "g", max_records=10))
    assert [m.value["value"] for m in dead][:2] == ["not json", '{"user": "u"}']
    assert all(m.error is None and m.value["topic"] == UPLOADED for m in dead)


@pytest.mark.parametrize("topic, value, fragment", [
    (UPLOADED, [], "JSON object"),
    (UPLOADED, {**uploaded("u", 0), "sha256": "AB" * 32}, "sha256"),
    (UPLOADED, {**uploaded("u", 0), "object_key": "../etc/passwd"}, "object_key"),
    (UPLOADED, {**uploaded("u", 0), "object_key": "/abs/key"}, "object_key"),
    (UPLOADED, {**uploaded("u", 0), "user": ""}, "user"),
    (INDEXED, {"user": "u", "photo_id": "7", "sha256": SHA, "face_ids": []}, "photo_id"),
    (INDEXED, {"user": "u", "photo_id": 7, "sha256": SHA, "face_ids": [1, True]}, "face_ids"),
    (DEAD, {"reason": "x", "topic": UPLOADED, "partition": 0, "offset": 1, "key": 3, "value": ""}, "key"),
    ("photo.other", {}, "unknown topic"),
])
def test_validate_rejects(topic, value, fragment):
    with pytest.raises(InvalidMessage, match=fragment.replace(".", r"\.")):
        busmod.validate(topic, value)


def test_valid_messages_pass_and_extra_fields_are_allowed(bus):
    busmod.validate(UPLOADED, {**uploaded("u", 0), "added_later": 1})
    busmod.validate(INDEXED, {"user": "u", "photo_id": 7, "sha256": SHA, "face_ids": [1, 2]})
    with pytest.raises(InvalidMessage):
        bus.publish(INDEXED, [("u", {"user": "u"})])  # producers are checked too


def test_unknown_topic_and_urls():
    bus = busmod.connect(f"memory://{uuid.uuid4().hex}")
    with pytest.raises(BusUnavailable):
        bus.publish(UPLOADED, [("u", uploaded("u", 0))])  # topics exist only once created
    assert busmod.connect("memory://same") is busmod.connect("memory://same")
    kafka = busmod.connect("kafka://127.0.0.1:1,127.0.0.1:2/ns-1")
    assert kafka.servers == ["127.0.0.1:1", "127.0.0.1:2"] and kafka._name(UPLOADED) == "ns-1.photo.uploaded"
    for bad in ("kafka:///ns", "kafka://h:1/a.b", "redis://h"):
        with pytest.raises(ValueError):
            busmod.connect(bad)


def test_retry_waits_out_transient_errors_only():
    stop = threading.Event()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "ok"

    assert busmod.retry(flaky, "flaky", stop, first_s=0.001) == "ok" and len(calls) == 3
    with pytest.raises(KeyError):
        busmod.retry(lambda: {}["missing"], "buggy", stop)
    stop.set()
    with pytest.raises(Stopped):
        busmod.retry(lambda: (_ for _ in ()).throw(BusUnavailable("down")), "down", stop)


def test_consume_commits_after_each_handled_batch_and_stops(bus):
    bus.publish(UPLOADED, [("u", uploaded("u", n)) for n in range(5)])
    consumer = bus.consumer(UPLOADED, "g", max_records=2)
    stop, seen = threading.Event(), []

    def handle(batch):
        seen.append(len(batch))
        assert bus.pending(UPLOADED, "g") == 5 - sum(seen[:-1])  # not committed before handling
        if sum(seen) == 5:
            stop.set()

    busmod.consume(consumer, handle, stop, poll_s=0.01)
    assert seen == [2, 2, 1] and bus.pending(UPLOADED, "g") == 0
