"""Kafka clean-up for cloud tests that give themselves a topic namespace of their own."""

from __future__ import annotations

from services import bus as busmod


def drop_topics(bus: busmod.KafkaBus) -> None:
    """Delete every topic of ``bus``'s namespace (those it never created are ignored)."""
    admin = bus._admin()
    try:
        admin.delete_topics([bus._name(t) for t in busmod.TOPICS], raise_errors=False)
    finally:
        admin.close()
