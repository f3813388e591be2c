"""Event bus between upload, ingest workers and cluster workers: in-process or Kafka.

``connect(settings.bus_url)`` picks the backend, so the same worker code runs embedded and in
the cloud:

- ``memory://[name]``: an in-process broker (one per name), for the embedded setup and unit tests.
- ``kafka://host:port[,host:port...][/namespace]``: Apache Kafka through kafka-python. A
  namespace prefixes every topic and consumer group (``ns.photo.uploaded``), so several
  deployments or test runs can share one cluster without seeing each other's events.

Both have the semantics the workers rely on: topics of ``PARTITIONS`` partitions, messages
placed by their key's murmur2 hash (Kafka's own partitioner), so the events of one key stay in
one partition and are handled in order by one worker; consumer groups that split partitions
between their members; and offsets committed only when the consumer says so. Delivery is
therefore at least once, and every consumer must be idempotent.

Messages are JSON objects in UTF-8. Clustering needs a user's events in order, detection and
embedding do not, so ``photo.uploaded`` is keyed by the photo (``user/sha256``: one user's bulk
upload spreads over every partition and so every ingest worker, while a re-upload of the same
bytes meets the first in one partition) and every other topic by the user name:

``photo.uploaded``  ``{"user": str, "uri": str, "object_key": str, "sha256": str}``
    The photo's bytes are durable in the object store under ``object_key`` (content-addressed);
    ``uri`` is the user's name for the photo (stored as ``photos.uri``).
``faces.indexed``   ``{"user": str, "photo_id": int, "sha256": str, "face_ids": [int, ...]}``
    The photo row and its faces are committed to the database (``face_ids`` may be empty).
``photo.dead``      ``{"reason": str, "topic": str, "partition": int, "offset": int,
                     "key": str | null, "value": str}``
    A message that could not be handled (malformed, or a photo that cannot be indexed), with
    where it came from and its raw value, for inspection and replay; keyed as that message.
``recluster.requested``  ``{"user": str}``
    Re-cluster this user's faces from scratch (``facecluster recluster --all --enqueue``; the
    recluster worker, ``services/recluster.py``).

Unknown extra fields are allowed (older workers keep reading newer producers). Messages are
validated on write and again on read: a consumer gets a malformed message as a ``Message`` with
``error`` set instead of an exception, and sends it to ``photo.dead`` (``dead_letter``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import sqlalchemy.exc as sa_exc

with warnings.catch_warnings():
    # kafka-python loads its protocol schemas through the deprecated importlib.resources API.
    warnings.simplefilter("ignore", DeprecationWarning)
    import kafka.errors as kafka_errors
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, OffsetSpec
    from kafka.consumer.subscription_state import ConsumerRebalanceListener
    from kafka.partitioner.default import murmur2
    from kafka.serializer import DefaultSerializer
    from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

UPLOADED = "photo.uploaded"
INDEXED = "faces.indexed"
DEAD = "photo.dead"
RECLUSTER = "recluster.requested"
TOPICS = (UPLOADED, INDEXED, DEAD, RECLUSTER)
PARTITIONS = 4

_SHA256 = re.compile(r"[0-9a-f]{64}")
# A relative key of plain path segments: it can never leave the object store's folder.
_OBJECT_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")

# kafka-python backs off reconnects exponentially up to 30 s by default, which leaves a client
# idle long after a restarted broker is back; 1 s caps that wait.
_KAFKA_COMMON = {"reconnect_backoff_max_ms": 1000}
# A killed worker's partitions move to the others once its session expires (default 45 s).
SESSION_TIMEOUT_MS = 10_000
# How long a publish may wait for a broker before the caller's retry loop takes over.
PUBLISH_TIMEOUT_S = 30.0


class BusUnavailable(Exception):
    """The broker could not be reached or did not answer in time; retrying may succeed."""


class InvalidMessage(ValueError):
    """A message value that does not match its topic's schema."""


class Stopped(Exception):
    """A stop was requested while waiting for a transient error to clear."""


@dataclass(frozen=True)
class Message:
    """One consumed message. ``error`` says why ``value`` is unusable (it is then None)."""

    topic: str  # logical name, without the namespace
    partition: int
    offset: int
    key: str | None
    value: dict | None
    raw: bytes
    error: str | None = None


# ------------------------------------------------------------------------------ schemas


def _check_str(value: dict, name: str, max_len: int = 4096) -> None:
    if not isinstance(value.get(name), str) or not value[name] or len(value[name]) > max_len:
        raise InvalidMessage(f"{name!r} must be a non-empty string of at most {max_len} characters")


def _check_int(value: dict, name: str) -> None:
    if type(value.get(name)) is not int:
        raise InvalidMessage(f"{name!r} must be an integer")


def _check_sha256(value: dict) -> None:
    if not isinstance(value.get("sha256"), str) or not _SHA256.fullmatch(value["sha256"]):
        raise InvalidMessage("'sha256' must be 64 lowercase hex digits")


def _validate_uploaded(value: dict) -> None:
    _check_str(value, "user", 255)
    _check_str(value, "uri")
    _check_sha256(value)
    _check_str(value, "object_key", 1024)
    if not _OBJECT_KEY.fullmatch(value["object_key"]) or ".." in value["object_key"].split("/"):
        raise InvalidMessage("'object_key' must be a relative key of plain path segments")


def _validate_indexed(value: dict) -> None:
    _check_str(value, "user", 255)
    _check_int(value, "photo_id")
    _check_sha256(value)
    ids = value.get("face_ids")
    if not isinstance(ids, list) or any(type(i) is not int for i in ids):
        raise InvalidMessage("'face_ids' must be a list of integers")


def _validate_dead(value: dict) -> None:
    _check_str(value, "reason")
    _check_str(value, "topic", 255)
    _check_int(value, "partition")
    _check_int(value, "offset")
    if value.get("key") is not None and not isinstance(value["key"], str):
        raise InvalidMessage("'key' must be a string or null")
    if not isinstance(value.get("value"), str):
        raise InvalidMessage("'value' must be a string")


def _validate_recluster(value: dict) -> None:
    _check_str(value, "user", 255)


_VALIDATORS: dict[str, Callable[[dict], None]] = {
    UPLOADED: _validate_uploaded, INDEXED: _validate_indexed, DEAD: _validate_dead, RECLUSTER: _validate_recluster}


def validate(topic: str, value: Any) -> None:
    """Raise InvalidMessage unless ``value`` is a valid message for ``topic``."""
    if topic not in _VALIDATORS:
        raise InvalidMessage(f"unknown topic {topic!r}")
    if not isinstance(value, dict):
        raise InvalidMessage("message must be a JSON object")
    _VALIDATORS[topic](value)


def encode(topic: str, value: dict) -> bytes:
    validate(topic, value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def decode(topic: str, partition: int, offset: int, key: str | None, raw: bytes | None) -> Message:
    """Parse and validate one message; a bad one comes back with ``error`` set, never raises."""
    raw = raw or b""
    try:
        value = json.loads(raw.decode("utf-8"))
        validate(topic, value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return Message(topic, partition, offset, key, None, raw, f"malformed message: not JSON ({e})")
    except InvalidMessage as e:
        return Message(topic, partition, offset, key, None, raw, f"malformed message: {e}")
    return Message(topic, partition, offset, key, value, raw)


def dead_letter(message: Message, reason: str) -> tuple[str | None, dict]:
    """(key, value) for ``photo.dead`` saying why ``message`` could not be handled."""
    return message.key, {
        "reason": reason, "topic": message.topic, "partition": message.partition, "offset": message.offset,
        "key": message.key, "value": message.raw.decode("utf-8", errors="replace"),
    }


def partition_for(key: str, partitions: int = PARTITIONS) -> int:
    """The partition Kafka's default partitioner gives ``key``; the memory bus uses it too."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


# ------------------------------------------------------------------------------ interface


class Consumer(ABC):
    """A member of a consumer group on one topic."""

    @abstractmethod
    def poll(self, timeout_s: float) -> list[Message]:
        """Up to ``max_records`` next messages of the partitions this member owns ([] on timeout)."""

    @abstractmethod
    def commit(self, messages: Sequence[Message]) -> bool:
        """Mark ``messages`` (and everything before them in their partitions) as done.

        False if the partitions were handed to another member in the meantime: the new owner
        gets the messages again, which the consumer's idempotence makes harmless.
        """

    @abstractmethod
    def close(self) -> None:
        """Leave the group; uncommitted messages go to the next owner of their partition."""


class Bus(ABC):
    @abstractmethod
    def ensure_topics(self, partitions: int = PARTITIONS) -> None:
        """Create the topics that do not exist yet (nothing creates them implicitly)."""

    @abstractmethod
    def publish(self, topic: str, items: Iterable[tuple[str | None, dict | bytes]]) -> None:
        """Send (key, value) pairs and return once all are durable on the broker.

        Dict values are validated and JSON-encoded; bytes go out unchanged (tools and tests).
        """

    @abstractmethod
    def consumer(self, topic: str, group: str, *, max_records: int,
                 on_revoke: Callable[[set[int]], None] | None = None) -> Consumer:
        """Join ``group`` on ``topic``. ``on_revoke`` gets the partitions this member loses."""

    @abstractmethod
    def pending(self, topic: str, group: str) -> int:
        """Messages of ``topic`` that ``group`` has not committed yet (its lag)."""

    def close(self) -> None:
        pass


def connect(url: str) -> Bus:
    parts = urlsplit(url)
    namespace = parts.path.strip("/")
    if parts.scheme == "memory":
        return _memory_broker(parts.netloc + parts.path)
    if parts.scheme == "kafka":
        if not parts.netloc:
            raise ValueError(f"bus URL {url!r} names no broker (kafka://host:port[/namespace])")
        if namespace and not re.fullmatch(r"[A-Za-z0-9_-]+", namespace):
            raise ValueError(f"bus namespace {namespace!r} may only hold letters, digits, '_' and '-'")
        return KafkaBus(parts.netloc.split(","), namespace)
    raise ValueError(f"unknown bus URL {url!r}: use memory://[name] or kafka://host:port[/namespace]")


# ------------------------------------------------------------------------------ memory


class _Partition:
    def __init__(self):
        self.log: list[tuple[str | None, bytes]] = []


class MemoryBus(Bus):
    """Kafka's semantics in one process: partitions, groups, explicit commits, rebalances.

    Members of a group own the partitions ``p`` with ``p % members == their join position``;
    a join or leave starts a new generation, and a member notices it on its next poll or commit.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._topics: dict[str, list[_Partition]] = {}
        self._committed: dict[tuple[str, str], dict[int, int]] = {}
        self._members: dict[tuple[str, str], list[_MemoryConsumer]] = {}
        self._generation: dict[tuple[str, str], int] = {}

    def ensure_topics(self, partitions: int = PARTITIONS) -> None:
        with self._cond:
            for topic in TOPICS:
                self._topics.setdefault(topic, [_Partition() for _ in range(partitions)])

    def publish(self, topic, items):
        encoded = [(key, value if isinstance(value, bytes) else encode(topic, value)) for key, value in items]
        with self._cond:
            partitions = self._topics.get(topic)
            if partitions is None:
                raise BusUnavailable(f"topic {topic!r} does not exist")
            for key, data in encoded:
                index = partition_for(key, len(partitions)) if key is not None else 0
                partitions[index].log.append((key, data))
            self._cond.notify_all()

    def consumer(self, topic, group, *, max_records, on_revoke=None):
        with self._cond:
            if topic not in self._topics:
                raise BusUnavailable(f"topic {topic!r} does not exist")
            member = _MemoryConsumer(self, topic, group, max_records, on_revoke)
            self._members.setdefault((group, topic), []).append(member)
            self._bump((group, topic))
            return member

    def pending(self, topic, group):
        with self._cond:
            committed = self._committed.get((group, topic), {})
            return sum(len(p.log) - committed.get(i, 0) for i, p in enumerate(self._topics.get(topic, [])))

    def _bump(self, group_topic):
        self._generation[group_topic] = self._generation.get(group_topic, 0) + 1
        self._cond.notify_all()

    def _owned(self, member: _MemoryConsumer) -> set[int]:
        members = self._members.get((member.group, member.topic), [])
        if member not in members:
            return set()
        n, position = len(members), members.index(member)
        return {p for p in range(len(self._topics[member.topic])) if p % n == position}


class _MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, topic, group, max_records, on_revoke):
        self.bus, self.topic, self.group, self.max_records = bus, topic, group, max_records
        self.on_revoke = on_revoke
        self.generation = -1
        self.positions: dict[int, int] = {}

    def _sync(self) -> None:
        """Pick up a rebalance: drop lost partitions, start new ones at the committed offset."""
        key = (self.group, self.topic)
        if self.generation == self.bus._generation[key]:
            return
        self.generation = self.bus._generation[key]
        owned = self.bus._owned(self)
        lost = set(self.positions) - owned
        committed = self.bus._committed.get(key, {})
        # Eager rebalancing, as Kafka's classic protocol: every partition restarts at its commit.
        self.positions = {p: committed.get(p, 0) for p in owned}
        if lost and self.on_revoke:
            self.on_revoke(lost)

    def poll(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        with self.bus._cond:
            while True:
                self._sync()
                out = []
                for p in sorted(self.positions):
                    log_ = self.bus._topics[self.topic][p].log
                    while self.positions[p] < len(log_) and len(out) < self.max_records:
                        key, data = log_[self.positions[p]]
                        out.append(decode(self.topic, p, self.positions[p], key, data))
                        self.positions[p] += 1
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self.bus._cond.wait(left)

    def commit(self, messages):
        with self.bus._cond:
            if self.generation != self.bus._generation[(self.group, self.topic)]:
                return False
            committed = self.bus._committed.setdefault((self.group, self.topic), {})
            for m in messages:
                committed[m.partition] = max(committed.get(m.partition, 0), m.offset + 1)
            return True

    def close(self):
        with self.bus._cond:
            members = self.bus._members.get((self.group, self.topic), [])
            if self in members:
                members.remove(self)
                self.bus._bump((self.group, self.topic))


_MEMORY_BUSES: dict[str, MemoryBus] = {}
_MEMORY_LOCK = threading.Lock()


def _memory_broker(name: str) -> MemoryBus:
    with _MEMORY_LOCK:
        return _MEMORY_BUSES.setdefault(name, MemoryBus())


# ------------------------------------------------------------------------------ Kafka


def _transient(e: kafka_errors.KafkaError) -> BusUnavailable:
    return BusUnavailable(f"{type(e).__name__}: {e}")


class KafkaBus(Bus):
    """Kafka through kafka-python: an idempotent acks=all producer and manual-commit consumers."""

    def __init__(self, servers: list[str], namespace: str = ""):
        self.servers = servers
        self.namespace = namespace
        self._producer: KafkaProducer | None = None

    def _name(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    def _admin(self) -> KafkaAdminClient:
        # A new client each time: one that lived through a broker restart stays NodeNotReady.
        try:
            return KafkaAdminClient(bootstrap_servers=self.servers, client_id="facecluster-admin", **_KAFKA_COMMON)
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e

    def ensure_topics(self, partitions: int = PARTITIONS) -> None:
        admin = self._admin()
        try:
            existing = set(admin.list_topics())
            missing = {self._name(t): {"num_partitions": partitions, "replication_factor": 1}
                       for t in TOPICS if self._name(t) not in existing}
            if missing:
                # Another worker may create the same topics at the same moment; that is fine.
                admin.create_topics(missing, raise_errors=False, wait_for_metadata=True)
                log.info("created topics %s", sorted(missing))
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e
        finally:
            admin.close()

    def _get_producer(self) -> KafkaProducer:
        if self._producer is None:
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.servers, acks="all", enable_idempotence=True, linger_ms=5,
                    max_block_ms=int(PUBLISH_TIMEOUT_S * 1000), key_serializer=DefaultSerializer(),
                    **_KAFKA_COMMON)
            except kafka_errors.KafkaError as e:
                raise _transient(e) from e
        return self._producer

    def publish(self, topic, items):
        encoded = [(key, value if isinstance(value, bytes) else encode(topic, value)) for key, value in items]
        if not encoded:
            return
        producer = self._get_producer()
        try:
            futures = [producer.send(self._name(topic), key=key, value=data) for key, data in encoded]
            producer.flush(timeout=PUBLISH_TIMEOUT_S)
            for future in futures:
                future.get(timeout=PUBLISH_TIMEOUT_S)
        except kafka_errors.KafkaError as e:
            # Start over with a fresh producer; records it still held may arrive twice, which
            # at-least-once consumers tolerate.
            self._producer = None
            producer.close(timeout=0)
            raise _transient(e) from e

    def consumer(self, topic, group, *, max_records, on_revoke=None):
        return _KafkaConsumer(self, topic, self._name(group), max_records, on_revoke)

    def pending(self, topic, group):
        name, admin = self._name(topic), self._admin()
        try:
            (described,) = admin.describe_topics([name])
            partitions = [TopicPartition(name, p["partition_index"]) for p in described["partitions"]]
            ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in partitions})
            (committed,) = admin.list_group_offsets({self._name(group): None}).values()
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e
        finally:
            admin.close()
        done = {tp: om.offset for tp, om in committed.items() if om.offset >= 0}
        return sum(ends[tp].offset - done.get(tp, 0) for tp in partitions)

    def close(self):
        if self._producer is not None:
            self._producer.close(timeout=PUBLISH_TIMEOUT_S)
            self._producer = None


class _Revoked(ConsumerRebalanceListener):
    def __init__(self, callback):
        self.callback = callback

    def on_partitions_revoked(self, revoked):
        if self.callback and revoked:
            self.callback({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned):
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))


class _KafkaConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topic: str, group: str, max_records: int, on_revoke):
        self.topic, self.name = topic, bus._name(topic)
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bus.servers, group_id=group, enable_auto_commit=False,
                auto_offset_reset="earliest", allow_auto_create_topics=False, max_poll_records=max_records,
                session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=SESSION_TIMEOUT_MS // 4,
                key_deserializer=DefaultSerializer(), **_KAFKA_COMMON)
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e
        self._consumer.subscribe([self.name], listener=_Revoked(on_revoke))

    def poll(self, timeout_s):
        try:
            records = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e
        return [decode(self.topic, r.partition, r.offset, r.key, r.value)
                for batch in records.values() for r in batch]

    def commit(self, messages):
        ends: dict[int, int] = {}
        for m in messages:
            ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
        offsets = {TopicPartition(self.name, p): OffsetAndMetadata(o, "", -1) for p, o in ends.items()}
        try:
            self._consumer.commit(offsets)
        except kafka_errors.CommitFailedError as e:
            log.warning("offset commit refused after a rebalance; the new owner redelivers: %s", e)
            return False
        except kafka_errors.KafkaError as e:
            raise _transient(e) from e
        return True

    def close(self):
        self._consumer.close(autocommit=False)


# ------------------------------------------------------------------------------ worker plumbing

T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    """Errors that go away when the broker or the database comes back."""
    if isinstance(e, (BusUnavailable, sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)):
        return True
    return isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated


def retry(fn: Callable[[], T], what: str, stop: threading.Event, *, first_s: float = 0.2,
          most_s: float = 5.0) -> T:
    """``fn()``, retried with exponential backoff while it fails with a transient error.

    Other errors propagate (a bug should crash the worker so its supervisor restarts it and the
    uncommitted messages are redelivered). Raises Stopped if ``stop`` is set while waiting.
    """
    delay = first_s
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, str(e).splitlines()[0][:300], delay)
        if stop.wait(delay):
            raise Stopped(what)
        delay = min(delay * 2, most_s)


def worker_args(prog: str, description: str, group: str, group_help: str, argv: list[str] | None,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Command line and logging shared by every worker process."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--group", default=group, help=group_help)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    return args


def consume(consumer: Consumer, handle: Callable[[list[Message]], None], stop: threading.Event,
            *, poll_s: float = 1.0, idle: Callable[[], None] | None = None) -> None:
    """Poll -> handle -> commit until ``stop`` is set; the batch in hand is always finished.

    ``handle`` makes its effects durable (retrying transient errors) before it returns, so the
    commit after it can never lose a message; a crash in between only causes a redelivery.
    ``idle`` runs after each poll that brought nothing.
    """
    while not stop.is_set():
        batch = retry(lambda: consumer.poll(poll_s), "poll", stop)
        if not batch:
            if idle is not None:
                idle()
            continue
        handle(batch)
        retry(lambda: consumer.commit(batch), "offset commit", stop)
