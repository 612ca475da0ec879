"""Taking over the sessions of workers that no longer run (issue 23: a switch runs nothing twice).

Worker *i* (`<client id>-i`, bridge/workers/protocol.py) keeps a persistent session in the
workers' shared group. When workers are switched off or reduced, that session would keep its
`$share` subscription: the broker would go on queueing requests for it (answered again, or never,
when workers come back). Before the bridge subscribes on its first connect it connects as each
such id with its session kept, UNSUBSCRIBEs the group (nothing more is queued there), hands what
the broker had queued or in flight for it to this bridge's own dispatcher, and once a fence
message has come through and every handed-over request is acknowledged, ends the session
(DISCONNECT with session expiry 0). Stopped before that, the session stays, unsubscribed, with
its unacknowledged requests: the next start takes them over again. Nothing is stranded and,
since the group is unsubscribed before the bridge subscribes, nothing arrives both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.config import BridgeConfig
from bridge.messages import InboundMessage
from bridge.mqtt.client import MqttTransport
from bridge.mqtt.reconnect import ConnectionLost, ConnectRefused
from bridge.topics import Topics
from bridge.workers import protocol as workers

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

MAX_INDEX = 64
"""The most workers `[runtime] workers` allows: no dormant session can have a higher index."""
FENCE_SECONDS = 15.0
"""How long the fence may take to come through before the handover is left to the next start."""


class DormantSession:
    """One dormant worker's session, connected with its client id until it is drained."""

    def __init__(
        self,
        config: BridgeConfig,
        index: int,
        protocol: str,
        submit: Callable[[InboundMessage], None],
        log: FilteringBoundLogger,
    ) -> None:
        self.index = index
        self.client_id = workers.worker_client_id(config, index)
        topics = Topics(config.mqtt.topic_prefix, config.mqtt.instance_name)
        self.group_filter = f"$share/{workers.group(config)}/{topics.request_filter}"
        self.fence_topic = f"{topics.probe(self.client_id)}/fence/{uuid.uuid4().hex}"
        self._submit = submit
        self.log = log.bind(dormant_worker=index)
        self.fenced = asyncio.Event()
        self.settled = asyncio.Event()
        self.settled.set()
        self._unacked: set[int] = set()
        self.handed_over = 0
        self.transport = MqttTransport(
            config.mqtt.model_copy(update={"client_id": self.client_id}),
            subscription=None,
            receive_maximum=config.limits.max_concurrency,
            will=None,
            on_message=self._on_message,
            on_connected=lambda: None,
            log=self.log,
            protocol=protocol,
        )
        self._finisher: asyncio.Task[None] | None = None

    def _on_message(self, message: InboundMessage) -> None:
        if message.topic == self.fence_topic:
            self.transport.ack(message)
            self.fenced.set()
            return
        self.handed_over += 1
        self._unacked.add(message.mid)
        self.settled.clear()
        # A generation of its own: its packet ids never meet the bridge's own in the dispatcher.
        self._submit(dataclasses.replace(message, generation=-self.index, ack_with=self._ack))

    def _ack(self, message: InboundMessage) -> None:
        if message.qos == 1:
            self.transport.ack(
                dataclasses.replace(message, generation=self.transport.generation, ack_with=None)
            )
        self._unacked.discard(message.mid)
        if not self._unacked:
            self.settled.set()

    async def open(self) -> bool:
        """Connect; with a session there, drop its group subscription and send the fence.
        Whether there was a session (False: it is ended and closed already)."""
        await self.transport.connect_once()
        if not self.transport.session_present:
            await self.transport.close(end_session=True)
            return False
        await self.transport.unsubscribe_now([self.group_filter])
        await self.transport.subscribe_now([(self.fence_topic, 1)])
        await self.transport.publish(self.fence_topic, b"fence")
        self._finisher = asyncio.create_task(self._finish(), name=f"takeover-{self.index}")
        return True

    async def _finish(self) -> None:
        """Once the fence came and every handed-over request is acknowledged: end the session."""
        try:
            await asyncio.wait_for(self.fenced.wait(), FENCE_SECONDS)
        except TimeoutError:
            self.log.warning("dormant worker's session not drained; the next start takes it over")
            await self.transport.close()
            return
        await self.settled.wait()
        await self.transport.close(end_session=True)
        self.log.info("dormant worker's session ended", requests_taken_over=self.handed_over)

    async def close(self) -> None:
        """Stop waiting; a session not yet drained stays for the next start."""
        if self._finisher is not None and not self._finisher.done():
            self._finisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._finisher
        await self.transport.close()


async def take_over(
    config: BridgeConfig,
    first: int,
    protocol: str,
    submit: Callable[[InboundMessage], None],
    log: FilteringBoundLogger,
) -> list[DormantSession]:
    """Take over the sessions of workers `first`.. (to AUTO_MAX, further while sessions are
    found); the ones still draining in the background (close them at shutdown)."""
    draining: list[DormantSession] = []
    index = first
    while index <= MAX_INDEX:
        session = DormantSession(config, index, protocol, submit, log)
        try:
            present = await session.open()
        except (ConnectRefused, ConnectionLost, OSError, TimeoutError) as exc:
            log.warning("cannot take over a dormant worker's session", worker=index, error=str(exc))
            await session.close()
            present = False
        if present:
            draining.append(session)
        elif index >= workers.AUTO_MAX:
            break
        index += 1
    return draining
