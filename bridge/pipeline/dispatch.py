"""The request pipeline's orchestrator: decide -> recall -> execute -> render -> deliver.

`Dispatcher.submit` is called for every message on the request subscription. It runs each request
as its own task (bounded by `[limits] max_concurrency`) through the stages, each its own module:

- decide (decide.py): topic, size, JSON, `transaction`, `_bridge` reply options, method, access,
  request building;
- recall (recall.py): the reply a repeated or redelivered request already had, from the reply
  cache or the journal;
- execute (bridge/service/client.py, or waiting.py for `_bridge.wait`): the HTTP request to the
  service host, with retries;
- render (render.py): the reply data and the envelope around it;
- deliver (deliver.py): redact, size, publish, PUBACK, then ack; cache, journal, stats, log line.

Streamed events go out through the sink (sink.py) while execute reads them. Whatever fails on
the way becomes the request's one error reply (`_outcome`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.config import BridgeConfig
from bridge.errors import (
    BridgeError,
    InternalError,
    PoisonRequest,
    TooManyWaits,
    UnknownTool,
    UpstreamBadResponse,
)
from bridge.jsoncodec import dumps, loads
from bridge.messages import InboundMessage, Publisher, PublishFailed
from bridge.methods.jobs import job_kind
from bridge.methods.model import MethodTable, Operation
from bridge.pipeline import render
from bridge.pipeline.access import AccessRules, ReplyTopicRules
from bridge.pipeline.build import RequestBuilder
from bridge.pipeline.decide import Call, Decider, Rejection, Route
from bridge.pipeline.dedup import ReplyCache
from bridge.pipeline.deliver import Deliverer
from bridge.pipeline.model import MISSING, JournalEntry, JournalLike, Observed
from bridge.pipeline.options import ReplyOptions, parse_options
from bridge.pipeline.recall import Recall, Recalled
from bridge.pipeline.sink import TopicStreamSink
from bridge.pipeline.stats import Stats
from bridge.pipeline.waiting import JobState, JobWaiter, WaitRecord
from bridge.presets import conversation
from bridge.presets.book import PresetBook
from bridge.redact import Redactor
from bridge.service.client import ServiceClient, ServiceResult
from bridge.service.models import HttpRequest
from bridge.tools.loop import run_loop
from bridge.tools.runner import CallContext, ToolRunner
from bridge.topics import Topics

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


OBSERVED_HEAD = 4096
"""Request bytes kept for an observer (the console's detail view)."""


class Dispatcher:
    """Turns request messages into API calls and replies; owns the per-request tasks."""

    def __init__(
        self,
        *,
        config: BridgeConfig,
        table: MethodTable,
        service: ServiceClient,
        publisher: Publisher,
        topics: Topics,
        log: FilteringBoundLogger,
        redactor: Redactor | None = None,
        journal: JournalLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observer: Callable[[Observed], None] | None = None,
        tools: ToolRunner | None = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.owner = owner or config.mqtt.effective_client_id
        """Who holds this process's detached waits in the journal (stable across restarts)."""
        self.observer = observer
        """Told of every answered request (the web console), None when nobody looks."""
        self.tools = tools
        """Runs `_bridge.tools` calls (None: no tools configured)."""
        self.conversations = conversation.ConversationStore(journal, wall_clock)
        """Preset conversations, kept in the journal."""
        self.service = service
        self.publisher = publisher
        self.log = log
        self.redactor = redactor or Redactor(config.secrets())
        """Scrubs replies and stream events: this bridge's own secrets, from its config."""
        self.cache = ReplyCache(config.limits.dedup_entries, config.limits.dedup_seconds)
        self.recall = Recall(self.cache, journal, config.limits.dedup_seconds, wall_clock)
        self.journal = journal
        """Answers and job ids on disk; None when off or unusable (said at start)."""
        self.stats = Stats()
        self.decider = Decider(
            topics=topics,
            table=table,
            access=AccessRules(config.access.allow_methods, config.access.deny_methods),
            builder=RequestBuilder(config.service),
            max_request_bytes=config.limits.max_request_bytes,
            log=log,
            max_select_steps=config.limits.max_select_steps,
            presets=PresetBook(config.presets) if config.presets else None,
            reply_topics=ReplyTopicRules(
                topics,
                config.access.reply_topics,
                # Discovery: a forged config could add or delete Home Assistant entities.
                protected=[f"{config.homeassistant.discovery_prefix}/#"],
            ),
        )
        self.deliverer = Deliverer(
            publisher=publisher,
            cache=self.cache,
            stats=self.stats,
            redactor=self.redactor,
            log=log,
            journal=journal,
        )
        self._clock = clock
        self._sem = asyncio.Semaphore(config.limits.max_concurrency)
        self.waiter = JobWaiter(
            table=table,
            builder=self.decider.builder,
            service=service,
            publisher=publisher,
            redactor=self.redactor,
            journal=journal,
            config=config.jobs,
            log=log,
        )
        self._waiting: collections.Counter[str] = collections.Counter()
        """Waits being followed, by caller (the request topic's first suffix level)."""
        self._tracked_waits: set[asyncio.Task[Any]] = set()
        """Waits whose job id is journaled: stopped at once on shutdown, resumed after it."""
        self._detached: dict[bytes, _Detached] = {}
        """Detached waits this process follows (their requests acknowledged), by request key."""
        self._lease_task: asyncio.Task[None] | None = None
        self._released = False
        """A detached wait's reply could not go out: the next claim round takes it again."""
        self._online = asyncio.Event()
        """Set once connected: resumed waits are claimed (and counted) before the first request
        comes, and publish only from then on."""
        self._wall = wall_clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._running: dict[bytes, asyncio.Event] = {}
        """Requests with a `transaction` being executed, by key: a repeat that arrives meanwhile
        (a QoS 0 device resending) waits for that answer instead of calling again."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the first request (asyncio.create_task would ask for it every time)."""
        self.accepting = True
        self.idle = asyncio.Event()
        self.idle.set()

    # --- intake -----------------------------------------------------------------------------------

    def submit(self, message: InboundMessage) -> None:
        """Start handling one inbound message (called from the MQTT callback; never raises)."""
        if not self.accepting:
            return  # left unacked: the broker redelivers it to the next start
        self.log.debug(
            "request received",
            topic=message.topic[:200],
            bytes=len(message.payload),
            qos=message.qos,
            dup=message.dup or None,
        )
        if message.retain:
            self.log.warning(
                "retained request ignored",
                topic=message.topic,
                hint="requests are never executed from retained messages; publish without retain",
            )
            self.publisher.ack(message)
            return
        key = (message.generation, message.mid)
        if message.qos > 0 and key in self._in_flight:
            # The broker redelivered a request we are still working on; the running task acks it.
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(self._handle(message))
        self._tasks.add(task)
        if message.qos > 0:
            self._in_flight[key] = task
        self.idle.clear()
        task.add_done_callback(functools.partial(self._done, key=key))

    def _done(self, task: asyncio.Task[None], *, key: tuple[int, int]) -> None:
        self._tasks.discard(task)
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not self._tasks:
            self.idle.set()

    async def drain(self, grace: float) -> bool:
        """Stop accepting and wait up to `grace` s for in-flight requests; True when all done.

        Waits on jobs whose id is journaled stop at once (their requests stay unacknowledged and
        the next start resumes polling them); a job may run for hours.
        """
        self.accepting = False
        stopped = len(self._tracked_waits) + len(self._detached)
        if stopped:
            self.log.info("job waits stopped; resumed after restart", jobs=stopped)
        for task in list(self._tracked_waits):
            task.cancel()
        self._stop_detached()
        if not self._tasks:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), grace)
        return not self._tasks

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered (including those queued behind the limit)."""
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel unfinished requests (left unacked, so the broker redelivers them) and the
        detached waits (left in the journal for the next start)."""
        tasks = list(self._tasks) + self._stop_detached()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- one request ------------------------------------------------------------------------------

    async def _handle(self, message: InboundMessage) -> None:
        slot = _Slot(self._sem)
        await slot.acquire()
        try:
            if not self.accepting:
                return  # queued behind the limit when shutdown began: left for redelivery
            self.stats.in_flight += 1
            try:
                await self._handle_one(message, slot)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("request handling failed", topic=message.topic)
            finally:
                self.stats.in_flight -= 1
        finally:
            slot.release()

    async def _handle_one(self, message: InboundMessage, slot: _Slot) -> None:
        started = self._clock()
        route = self.decider.route(message)
        if route is None:
            self.deliverer.drop(message)
            return
        # Taken before decide consumes the payload, and only when someone looks.
        head = message.payload[:OBSERVED_HEAD] if self.observer is not None else b""
        size = len(message.payload)
        key = self.recall.key(message)
        if route.topic.preset is not None and self.decider.presets is not None:
            # A conversation's "yes" twice is two turns, not a repeat: no reply reuse.
            preset = self.decider.presets.presets.get(route.topic.preset)
            if preset is not None and preset.conversation:
                key = None
        recalled = self.recall.redelivered(key, message)
        # A redelivery is answered before it is decided; decided then only for its log line.
        decision = self.decider.decide(message, route)
        if recalled is None:
            recalled = await self._recalled(key, message, route, decision)
        if recalled is not None:
            await self.deliverer.replay(
                message,
                route,
                recalled.payload,
                recalled.content_type,
                recalled.source,
                decision.transaction,
            )
            return
        counted = await self._count_start(message, route, decision, key)
        if isinstance(counted, Rejection):
            decision = counted
        running = None
        if key is not None and isinstance(decision, Call) and decision.transaction is not MISSING:
            running = self._running[key] = asyncio.Event()
        try:
            outcome = await self._outcome(message, route, decision, key, slot)
            if outcome is not None:
                outcome = await self.deliverer.deliver(message, route, outcome, key)
        except asyncio.CancelledError:
            # Stopped by a shutdown, not killed by the request: that start does not count.
            if counted is not None and key is not None and self.journal is not None:
                await asyncio.shield(self.journal.settle_attempt(key))
            raise
        finally:
            if running is not None and key is not None:
                del self._running[key]
                running.set()
        if counted is not None and key is not None and self.journal is not None:
            await self.journal.settle_attempt(key)
        if outcome is None:
            return  # a detached wait: its request is acknowledged, its reply comes later
        elapsed_ms = round((self._clock() - started) * 1000, 2)
        self.deliverer.account(message, route, outcome, elapsed_ms)
        self._observe(route, outcome, elapsed_ms, head, size)

    def _observe(
        self, route: Route, outcome: render.Outcome, elapsed_ms: float, head: bytes, size: int
    ) -> None:
        """Tell the observer (the web console), if any, of an answered request."""
        if self.observer is not None:
            self.observer(
                Observed(
                    outcome.method,
                    route.topic.suffix,
                    None if outcome.transaction is MISSING else outcome.transaction,
                    outcome.error.code if outcome.error is not None else None,
                    outcome.http_status,
                    elapsed_ms,
                    head,
                    size,
                    outcome.payload,
                    outcome.content_type,
                )
            )

    async def _count_start(
        self, message: InboundMessage, route: Route, decision: Call | Rejection, key: bytes | None
    ) -> Rejection | bool | None:
        """Journal that `decision`'s upstream call starts, before it does (None: not counted).

        A request the broker redelivers after every crash it causes (a memory blow-up, say)
        would otherwise be executed, and paid for, forever: once its call was started
        `[journal] poison_after` times without an answer, the Rejection to send instead.
        """
        journal = self.journal
        if (
            journal is None
            or key is None
            or message.qos == 0  # never redelivered, so never a loop
            or not isinstance(decision, Call)
            or decision.options.wait is not None  # a resumed wait does not call again
            or (journal.scope == "jobs" and job_kind(decision.op.name) is None)
        ):
            return None
        starts = await journal.begin_attempt(key, route.reply_topic, redelivered=message.dup)
        if starts is None:
            return None
        unfinished = starts - 1
        if unfinished < self.config.journal.poison_after:
            return True
        self.log.error(
            "poison request refused",
            topic=message.topic[:200],
            unfinished_starts=unfinished,
            hint="this request was being executed each time the bridge died; it is not run again",
        )
        error = PoisonRequest(
            f"this request was being executed when the bridge stopped {unfinished} times "
            f"([journal] poison_after = {self.config.journal.poison_after}); it is not "
            "executed again"
        )
        return Rejection(decision.op.name, decision.transaction, error, decision.options)

    async def _recalled(
        self, key: bytes | None, message: InboundMessage, route: Route, decision: Call | Rejection
    ) -> Recalled | None:
        """The answer a repeat already has; a repeat of a request still running waits for it."""
        journaled = isinstance(decision, Call)
        running = self._running.get(key) if key is not None and journaled else None
        if running is not None and decision.transaction is not MISSING:
            await running.wait()
        return await self.recall.repeated(
            key, message, route.reply_topic, decision.transaction, journaled=journaled
        )

    async def _outcome(
        self,
        message: InboundMessage,
        route: Route,
        decision: Call | Rejection,
        key: bytes | None,
        slot: _Slot,
    ) -> render.Outcome | None:
        """Execute (or follow the job of) a call; any failure becomes the request's error reply.
        None: the call became a detached wait (its request acknowledged, its reply comes later)."""
        if isinstance(decision, Rejection):
            return render.failure(
                decision.method, decision.transaction, decision.error, decision.options
            )
        try:
            if decision.options.wait is not None:
                return await self._wait(message, route, decision, key, slot)
            if decision.options.tools or decision.ask is not None:
                return await self._tool_loop(route, decision, key, replay=message.dup)
            return await self._execute(route, decision)
        except BridgeError as exc:
            return render.failure(decision.op.name, decision.transaction, exc, decision.options)
        except Exception as exc:  # the request still gets its one reply
            self.log.exception("unexpected failure", topic=message.topic)
            error = InternalError(f"internal error: {type(exc).__name__}")
            return render.failure(decision.op.name, decision.transaction, error, decision.options)

    async def _wait(
        self, message: InboundMessage, route: Route, call: Call, key: bytes | None, slot: _Slot
    ) -> render.Outcome | None:
        """Follow the job `call` starts in the wait pool, leaving the request slot free.

        The pool is bounded in total and per caller, and a wait that finds it full is refused
        (`too_many_waits`, before the job is created) rather than queued. With the journal, the
        request is acknowledged as soon as the job and everything its reply needs are journaled,
        and the wait goes on detached from it (None): waits never hold the broker's in-flight
        window, and the next start resumes them from the journal. A redelivered copy of such a
        request joins its wait. Without the journal the wait holds its request until the reply
        is out, so that a restart gets it again. A resumed wait was admitted before and is
        followed whatever the counts.
        """
        slot.release()  # a job may take hours: the wait pool bounds these instead
        journal = self.journal
        if journal is not None and key is not None and await self._join(key):
            self.publisher.ack(message)
            call.take_request()  # never sent
            return None
        task = asyncio.current_task()
        caller = route.topic.suffix.partition("/")[0]
        resumed = await self.waiter.resumable(key)
        if resumed is None:
            self._admit_wait(caller)
        self._waiting[caller] += 1
        try:
            if resumed is None and journal is not None and key is not None:
                return await self._detach(message, route, call, key, caller)

            def tracked() -> None:
                if task is not None and self.journal is not None:
                    self._tracked_waits.add(task)

            return await self.waiter.follow(call, route, key, resumed, tracked)
        finally:
            self._count_wait(caller, -1)
            if task is not None:
                self._tracked_waits.discard(task)

    async def _detach(
        self, message: InboundMessage, route: Route, call: Call, key: bytes, caller: str
    ) -> render.Outcome | None:
        """Create the job, journal it with its request's reply details, acknowledge the request
        and go on polling in a task of its own (None); followed here when it cannot be
        journaled."""
        assert self.journal is not None
        timeout = self.waiter.timeout(call.options)
        state, result = await self.waiter.create(call)
        state.wait = WaitRecord(
            message.topic,
            route.reply_topic,
            route.correlation,
            call.raw_options,
            call.transaction,
            caller,
            self._wall() + timeout,
        )
        lease = self._wall() + self.config.jobs.claim_lease
        if not await self.journal.record_job(
            key, route.reply_topic, state.record(), self.owner, lease
        ):
            state.wait = None  # not journaled: this request stays unacknowledged until the end
            deadline = self.waiter.deadline_in(timeout)
            return await self.waiter.poll(
                call.op, call.transaction, call.options, route, state, result, deadline, None
            )
        self._follow(_Detached(key, state, state.wait, call.op, call.options, route), result)
        self.publisher.ack(message)
        return None

    async def _join(self, key: bytes) -> bool:
        """Whether `key`'s request is a detached wait already (a redelivered copy): it is then
        followed here (resumed if no process holds it) or by the process that holds it."""
        if key in self._detached:
            return True
        assert self.journal is not None
        entry = await self.journal.lookup(key)
        if entry is None or not entry.waiting:
            return False
        lease = self._wall() + self.config.jobs.claim_lease
        for taken in await self.journal.claim_waits(self.owner, lease, key=key) or []:
            await self._resume(taken)
        return True

    async def resume_waits(self) -> int:
        """Take the detached waits in the journal that no live process follows, at start before
        any request comes (so they count in the wait pool from the first request on); how many.
        They go on once `online()` is called."""
        journal = self.journal
        if journal is None:
            return 0
        lease = self._wall() + self.config.jobs.claim_lease
        taken = await journal.claim_waits(self.owner, lease) or []
        for entry in taken:
            await self._resume(entry)
        if taken:
            self.log.info("job waits resumed from the journal", jobs=len(taken))
        return len(taken)

    def online(self) -> None:
        """Connected: resumed waits may poll and publish; claims are renewed from now on."""
        self._online.set()
        if self.journal is not None and self._lease_task is None:
            self._lease_task = asyncio.get_running_loop().create_task(self._keep_claims())

    async def _resume(self, entry: JournalEntry) -> None:
        """Follow a detached wait taken from the journal (not again when already followed)."""
        assert self.journal is not None
        if entry.key in self._detached:
            return
        detached = self._detached_from(entry)
        if detached is None:
            self.log.error(
                "journaled job wait unusable; dropped", reason="record not written by this bridge"
            )
            await self.journal.end_wait(entry.key, self.owner, delivered=True)
            return
        self.log.info(
            "job resumed", method=detached.op.name, job_id=detached.state.id, detached=True
        )
        self._follow(detached, None, entry.answer, entry.content_type)

    def _detached_from(self, entry: JournalEntry) -> _Detached | None:
        """The wait journaled in `entry`, or None when the record cannot be used."""
        state = JobState.from_record(entry.job) if entry.job is not None else None
        wait = state.wait if state is not None else None
        if state is None or wait is None:
            return None
        op = self.decider.table.find(state.operation)
        parsed = self.decider.topics.parse(wait.request_topic)
        if op is None or job_kind(op.name) is None or parsed is None:
            return None
        try:
            options = parse_options(wait.options, self.config.limits.max_select_steps)
        except BridgeError:
            return None
        if options.wait is None:
            return None
        route = Route(parsed, wait.reply_topic, wait.correlation)
        return _Detached(entry.key, state, wait, op, options, route)

    def _follow(
        self,
        detached: _Detached,
        result: ServiceResult | None,
        answer: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        """Run a detached wait in a task of its own, counted in the wait pool."""
        loop = self._loop or asyncio.get_running_loop()
        detached.task = loop.create_task(self._run_detached(detached, result, answer, content_type))
        self._detached[detached.key] = detached
        self._count_wait(detached.wait.caller, 1)

    async def _run_detached(
        self,
        detached: _Detached,
        result: ServiceResult | None,
        answer: bytes | None,
        content_type: str | None,
    ) -> None:
        """Poll a detached wait to its end, publish its reply, then mark it answered.

        Cancelled (a shutdown, or the claim lost to another process) it stays in the journal
        for whoever resumes it.
        """
        await self._online.wait()
        started = self._clock()
        wait, route = detached.wait, detached.route
        assert self.journal is not None
        try:
            outcome: render.Outcome | None = None
            if answer is None:
                outcome = await self._detached_outcome(detached, result)
            if not await self._still_held(detached):
                return  # another process took it over meanwhile: its reply, not this one
            if answer is not None:
                # Journaled before a crash cut its delivery short: published from the journal.
                sent = await self.deliverer.publish_journaled(route, answer, content_type)
            else:
                assert outcome is not None
                outcome, sent = await self.deliverer.deliver_detached(route, outcome, detached.key)
            detached.ending = True
            # Not published now (no broker): given up, so the next claim round publishes it.
            await self.journal.end_wait(detached.key, self.owner, delivered=sent is not None)
            if sent is None:
                self._released = True
            if outcome is not None:
                elapsed_ms = round((self._clock() - started) * 1000, 2)
                self.deliverer.account(None, route, outcome, elapsed_ms)
                self._observe(route, outcome, elapsed_ms, b"", 0)
        except Exception:  # a bug must not end the process; the journal keeps the wait
            self.log.exception("job wait failed", job_id=detached.state.id)
        finally:
            if self._detached.get(detached.key) is detached:
                del self._detached[detached.key]
                self._count_wait(wait.caller, -1)

    async def _still_held(self, detached: _Detached) -> bool:
        """Whether this process still holds `detached`'s claim (renewed now), so that a process
        that stalled past its lease does not publish a second reply; a journal error: yes."""
        assert self.journal is not None
        lease = self._wall() + self.config.jobs.claim_lease
        held = await self.journal.claim_waits(self.owner, lease, key=detached.key)
        if held is None or held:
            return True
        self.log.warning(
            "job wait taken over by another process; stopped here", job_id=detached.state.id
        )
        return False

    async def _detached_outcome(
        self, detached: _Detached, result: ServiceResult | None
    ) -> render.Outcome:
        """The detached wait's reply: the job's end, or its error (`job_timeout` once the
        journaled deadline passed, also while the bridge was down)."""
        wait, op, options = detached.wait, detached.op, detached.options
        deadline = self.waiter.deadline_in(wait.deadline - self._wall())
        try:
            return await self.waiter.poll(
                op,
                wait.transaction,
                options,
                detached.route,
                detached.state,
                result,
                deadline,
                detached.key,
            )
        except BridgeError as exc:
            return render.failure(op.name, wait.transaction, exc, options)
        except Exception as exc:  # the wait still gets its one reply
            self.log.exception("unexpected failure", topic=wait.request_topic[:200])
            error = InternalError(f"internal error: {type(exc).__name__}")
            return render.failure(op.name, wait.transaction, error, options)

    async def _keep_claims(self) -> None:
        """Renew this process's claims on its detached waits every third of the lease; stop a
        wait whose claim another process took (this one stalled past its lease), and take the
        waits whose holder's lease ran out (a process that died), as far as the pool allows."""
        journal = self.journal
        assert journal is not None
        lease_s = self.config.jobs.claim_lease
        while True:
            await asyncio.sleep(lease_s / 3)
            # Only when there is something to do: each is a write (a commit) on the journal.
            held = (
                await journal.renew_waits(self.owner, self._wall() + lease_s)
                if self._detached
                else frozenset()
            )
            if held is None:
                continue  # a journal error: keep following, try again next round
            for key, detached in list(self._detached.items()):
                if key not in held and not detached.ending and detached.task is not None:
                    self.log.warning(
                        "job wait taken over by another process; stopped here",
                        job_id=detached.state.id,
                    )
                    detached.task.cancel()
                    del self._detached[key]
                    self._count_wait(detached.wait.caller, -1)
            # Another process's waits can only be in a journal shared with it (PostgreSQL);
            # this process's own, when a reply it gave up on (no broker) waits for a retry.
            free = self.config.jobs.max_waiting - sum(self._waiting.values())
            if free > 0 and (journal.recent is None or self._released):
                self._released = False
                lease = self._wall() + lease_s
                for entry in await journal.claim_waits(self.owner, lease, limit=free) or []:
                    await self._resume(entry)

    def _stop_detached(self) -> list[asyncio.Task[Any]]:
        """Cancel the detached waits and the claim renewal (their journal entries stay); the
        tasks to await."""
        tasks: list[asyncio.Task[Any]] = [
            d.task for d in self._detached.values() if d.task is not None
        ]
        if self._lease_task is not None:
            tasks.append(self._lease_task)
            self._lease_task = None
        for task in tasks:
            task.cancel()
        return tasks

    def _count_wait(self, caller: str, change: int) -> None:
        self._waiting[caller] += change
        if self._waiting[caller] <= 0:
            del self._waiting[caller]

    def _admit_wait(self, caller: str) -> None:
        """Raise TooManyWaits when the wait pool, or this caller's share of it, is full."""
        jobs = self.config.jobs
        total = sum(self._waiting.values())
        if total >= jobs.max_waiting:
            raise TooManyWaits(
                f"{total} jobs are being waited on already ([jobs] max_waiting = "
                f"{jobs.max_waiting}); nothing was started: try again later, or start the job "
                "without wait and retrieve it yourself"
            )
        if self._waiting[caller] >= jobs.max_waiting_per_caller:
            who = f"caller {caller[:100]!r}" if caller else "requests without a topic suffix"
            raise TooManyWaits(
                f"{who} waits on {self._waiting[caller]} jobs already ([jobs] "
                f"max_waiting_per_caller = {jobs.max_waiting_per_caller}); nothing was started"
            )

    async def _execute(self, route: Route, call: Call) -> render.Outcome:
        """Send the call (its events to a sink when it streams) and render the answer."""
        sink = (
            TopicStreamSink(
                call.op.name,
                self.publisher,
                call.stream_topic,
                call.transaction,
                route.correlation,
                self.redactor,
                call.options,
            )
            if call.stream_topic is not None
            else None
        )
        result = await self.service.send(call.take_request(), sink)
        if not call.options.is_default:
            # Redacted whole before it is selected, cut or split into chunks: a secret must not
            # slip through half cut, reversed, or straddling two chunks.
            result.body = self.redactor.data(result.body)
        outcome = render.answer(call.op, call.transaction, result, sink, call.options)
        if sink is not None:
            await sink.flushed()
        return outcome

    async def _tool_loop(
        self, route: Route, call: Call, key: bytes | None, *, replay: bool
    ) -> render.Outcome:
        """Run the model/tool loop (docs/tools.md) and a preset's conversation turn; the final
        answer takes the reply options; a redelivery (`replay`) replays what was journaled."""
        options, ask = call.options, call.ask
        if ask is not None and ask.reset:
            await self.conversations.reset(ask)
            result = ServiceResult(b'"conversation reset"', "application/json", 200, None)
            reply_options = dataclasses.replace(options, select=None)
            return render.answer(call.op, call.transaction, result, None, reply_options)
        if options.tools and self.tools is None:
            raise UnknownTool("no tools are configured on this bridge ([tools.<name>])")
        offered = self.tools.offer(options.tools, route.topic.suffix) if self.tools else {}
        base = call.take_request()
        body = _json_body(base)
        state = None
        if ask is not None and ask.remembers:
            state = await self.conversations.load(ask)
            conversation.apply(body, state, ask)
            if self.journal is not None:
                key = conversation.turn_key(ask, state)
        stream_topic = route.topic.stream

        def progress(event: dict[str, Any]) -> None:
            if call.transaction is not MISSING:
                event["transaction"] = call.transaction
            data = self.redactor.data(dumps(event))
            with contextlib.suppress(PublishFailed):
                self.publisher.publish(stream_topic, data, correlation_data=route.correlation)

        async def send(step_body: dict[str, Any]) -> bytes:
            request = dataclasses.replace(base, json_body=dumps(step_body))
            result = await self.service.send(request, None)
            return result.body

        if options.tools and self.tools is not None:
            ctx = CallContext(
                key=key,
                caller=route.topic.suffix,
                tools=offered,
                allow_dangerous=options.allow_dangerous,
                dry_run=options.dry_run,
                progress=progress,
                replay=replay,
            )
            loop = self.config.tool_loop
            answer = await run_loop(
                call.op.name, body, send, self.tools, ctx, loop.max_steps, loop.max_calls_per_step
            )
        else:
            answer = await send(body)
        if ask is not None and ask.remembers:
            answered = _json_object(answer)
            await self.conversations.save(ask, conversation.advance(state, answered, ask))
        result = ServiceResult(self.redactor.data(answer), "application/json", 200, None)
        return render.answer(call.op, call.transaction, result, None, options)


def _json_body(request: HttpRequest) -> dict[str, Any]:
    """The JSON object body of a built request (a loop request always has one)."""
    return _json_object(request.json_body or b"{}")


def _json_object(data: bytes) -> dict[str, Any]:
    """`data` as a JSON object; UpstreamBadResponse when it is not one."""
    try:
        value = loads(data)
    except ValueError:
        raise UpstreamBadResponse("not a JSON answer") from None
    if not isinstance(value, dict):
        raise UpstreamBadResponse("not a JSON object")
    return value


@dataclass(slots=True)
class _Detached:
    """A detached wait this process follows."""

    key: bytes
    state: JobState
    wait: WaitRecord
    op: Operation
    options: ReplyOptions
    route: Route
    task: asyncio.Task[None] | None = None
    ending: bool = False
    """Its reply is out (or given up): no longer stopped when its claim is gone."""


class _Slot:
    """One request's hold on the concurrency semaphore, released once (early for waits)."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = False

    async def acquire(self) -> None:
        await self._semaphore.acquire()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()
