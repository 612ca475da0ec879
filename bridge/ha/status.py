"""The bridge as others see it: the retained state, info, stats and Home Assistant discovery.

One bridge publishes these itself; with workers (bridge/runtime/supervisor.py) only the supervisor
does, so the outside sees one bridge whatever the number of processes behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yarl

from bridge import __version__
from bridge.config import BridgeConfig
from bridge.ha import discovery as homeassistant
from bridge.jsoncodec import dumps
from bridge.messages import InboundMessage, StatusTransport
from bridge.pipeline.stats import Stats
from bridge.topics import Topics

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

ONLINE = b'{"state":"online"}'
OFFLINE = b'{"state":"offline"}'


class StatusPublisher:
    """Publishes state, info, discovery and stats on one transport; re-publishes discovery when
    Home Assistant announces it restarted."""

    def __init__(
        self,
        config: BridgeConfig,
        topics: Topics,
        log: FilteringBoundLogger,
        stats: Callable[[], Stats],
        *,
        workers: int = 1,
    ) -> None:
        self.config = config
        self.topics = topics
        self.log = log
        self.stats = stats
        """The counters to publish, read at each publish."""
        self.workers = workers
        self.ha_status_topic = homeassistant.status_topic(config)
        self.transport: StatusTransport | None = None
        self.broker: dict[str, Any] = {}
        """What the broker's CONNACK stated (bridge/mqtt/grants.py), shown in the info document."""
        self.broker_warnings: list[str] = []
        """The promises the broker weakens, shown in the info and stats documents."""

    def subscriptions(self) -> list[tuple[str, int]]:
        """The (filter, QoS) pairs to subscribe to: Home Assistant's birth topic, if discovery."""
        return [(self.ha_status_topic, 0)] if self.config.homeassistant.discovery else []

    def info_payload(self, protocol: str, methods: int) -> bytes:
        """The retained info document: version, methods, service URL, broker protocol, limits."""
        cfg = self.config
        document: dict[str, Any] = {
            "version": __version__,
            "instance": cfg.mqtt.instance_name,
            "methods": methods,
            # Credentials in the URL (http://user:pass@host) stay out of a retained topic.
            "service": str(yarl.URL(cfg.service.api_base).with_user(None)),
            "protocol": protocol,
            "topic_prefix": cfg.mqtt.topic_prefix,
            "shared_group": cfg.mqtt.shared_group or None,
            "limits": cfg.limits.model_dump(mode="json"),
        }
        if self.workers > 1:
            document["workers"] = self.workers
        if self.broker:
            document["broker"] = self.broker
        if self.broker_warnings:
            document["broker_warnings"] = self.broker_warnings
        return dumps(document)

    def announce(self, methods: int, *, online: bool = True) -> None:
        """On (re)connect: state (`online` unless told otherwise), info, discovery, stats."""
        transport = self._transport()
        protocol = transport.protocol_label
        if online:
            self.publish_state(ONLINE)
        self._settle(
            transport.publish(self.topics.info, self.info_payload(protocol, methods), retain=True)
        )
        self.publish_discovery()
        if self.config.homeassistant.stats_interval > 0:
            # At once, so Home Assistant never shows the previous run's counters meanwhile.
            self.publish_stats()

    def publish_state(self, state: bytes) -> None:
        """Publish the retained availability state (`ONLINE` or `OFFLINE`)."""
        self._settle(self._transport().publish(self.topics.state, state, retain=True))

    def publish_discovery(self) -> None:
        """Publish the retained HA discovery config, or the empty one that removes the device."""
        if self.config.homeassistant.discovery:
            topic, payload = homeassistant.discovery_message(self.config, self.topics, __version__)
        else:
            topic, payload = homeassistant.removal_message(self.config)
        self._settle(self._transport().publish(topic, payload, retain=True))

    def publish_stats(self) -> None:
        """Publish the retained stats document now (a starting Home Assistant gets it at once)."""
        payload = homeassistant.stats_payload(
            self.stats(), self.config.secrets(), self.broker_warnings
        )
        self._settle(self._transport().publish(self.topics.stats, payload, qos=0, retain=True))

    def on_ha_status(self, message: InboundMessage) -> None:
        """Re-publish discovery when Home Assistant announces `online` (it restarted)."""
        self._transport().ack(message)
        # A retained birth comes with every (re)subscribe, just after the on-connect discovery.
        if message.retain or message.payload.strip() != b"online":
            return
        if self.config.homeassistant.discovery:
            self.log.info("home assistant is online; discovery re-published")
            self.publish_discovery()

    async def stats_loop(self, interval: float) -> None:
        """Publish the stats document every `interval` s while connected."""
        while True:
            await asyncio.sleep(interval)
            if self._transport().connected.is_set():
                self.publish_stats()

    def _transport(self) -> StatusTransport:
        assert self.transport is not None, "StatusPublisher used before its transport was set"
        return self.transport

    def _settle(self, future: asyncio.Future[None]) -> None:
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[None]) -> None:
        """Done callback for publishes nobody awaits: log a failure instead of losing it."""
        if not future.cancelled() and (exc := future.exception()) is not None:
            self.log.warning("status publish failed", error=str(exc)[:200])
