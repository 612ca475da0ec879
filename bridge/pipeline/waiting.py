"""Waiting for jobs (`_bridge` `wait`): start or resume a job, poll it to its end, report progress.

The job operation is called once; its id is committed to the journal before the first poll, so a
request redelivered after a crash or a restart resumes polling that id and never creates the job
again. Every change of status (or progress) is published on the request's stream topic as
`{"transaction"?, "seq", "event": "job.progress", "data": {"id", "status", "progress"?}}`; the
one reply is the job's final object (as the retrieve operation returned it), a `job_failed`
error for a failed, cancelled or expired job, or `job_timeout` when the wait's timeout passes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.config import JobsConfig
from bridge.errors import BridgeError, JobFailed, JobTimeout, UpstreamBadResponse
from bridge.jsoncodec import dumps, loads
from bridge.messages import StreamPublisher
from bridge.methods.jobs import JobKind, job_kind
from bridge.methods.model import MethodTable, Operation
from bridge.pipeline import render
from bridge.pipeline.build import RequestBuilder
from bridge.pipeline.decide import Call, Route
from bridge.pipeline.model import MISSING, JournalEntry, JournalLike
from bridge.pipeline.options import ReplyOptions
from bridge.redact import Redactor
from bridge.service.client import ServiceClient, ServiceResult

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

PROGRESS_EVENT = "job.progress"


@dataclass(slots=True)
class WaitRecord:
    """What a detached wait needs to finish without its request message (journaled with the job)."""

    request_topic: str
    reply_topic: str
    correlation: bytes | None
    options: Any
    """The request's `_bridge` value as it was sent (parsed again on resume)."""
    transaction: Any
    """The request's `transaction`, MISSING when it had none."""
    caller: str
    """The request topic's first suffix level (the per-caller bound)."""
    deadline: float
    """Wall-clock time (Unix seconds) at which the wait ends with `job_timeout`."""

    def record(self) -> dict[str, Any]:
        """The journal's copy (JSON)."""
        record: dict[str, Any] = {
            "request_topic": self.request_topic,
            "reply_topic": self.reply_topic,
            "correlation": None
            if self.correlation is None
            else base64.b64encode(self.correlation).decode("ascii"),
            "options": self.options,
            "caller": self.caller,
            "deadline": self.deadline,
        }
        if self.transaction is not MISSING:
            record["transaction"] = self.transaction
        return record

    @classmethod
    def from_record(cls, record: Any) -> WaitRecord | None:
        """The wait in a journal record, or None when the record is not one we wrote."""
        if not isinstance(record, dict):
            return None
        fields = (record.get("request_topic"), record.get("reply_topic"), record.get("caller"))
        correlation, deadline = record.get("correlation"), record.get("deadline")
        if not (
            all(isinstance(field, str) for field in fields)
            and (correlation is None or isinstance(correlation, str))
            and isinstance(deadline, int | float)
            and not isinstance(deadline, bool)
        ):
            return None
        try:
            data = None if correlation is None else base64.b64decode(correlation, validate=True)
        except ValueError:
            return None
        return cls(
            record["request_topic"],
            record["reply_topic"],
            data,
            record.get("options"),
            record.get("transaction", MISSING),
            record["caller"],
            float(deadline),
        )


@dataclass(slots=True)
class JobState:
    """What the journal keeps of a waited job, and where the wait stands."""

    operation: str
    id: str
    params: dict[str, str]
    """Path parameters of the retrieve operation."""
    status: str | None = None
    progress: int | None = None
    seq: int = 0
    """The `seq` of the next progress message (a resumed wait goes on counting)."""
    wait: WaitRecord | None = None
    """A detached wait's request (None: the wait holds its request message)."""

    def record(self) -> dict[str, Any]:
        """The journal's copy (enough to resume polling and the progress count)."""
        record: dict[str, Any] = {
            "operation": self.operation,
            "id": self.id,
            "params": self.params,
            "seq": self.seq,
            "status": self.status,
        }
        if self.wait is not None:
            record["wait"] = self.wait.record()
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobState | None:
        """The state in a journal record, or None when the record is not one we wrote."""
        params = record.get("params")
        if not (
            isinstance(record.get("operation"), str)
            and isinstance(record.get("id"), str)
            and isinstance(params, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
        ):
            return None
        seq = record.get("seq")
        status = record.get("status")
        return cls(
            record["operation"],
            record["id"],
            dict(params),
            status=status if isinstance(status, str) else None,
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0,
            wait=WaitRecord.from_record(record["wait"]) if "wait" in record else None,
        )


def job_object(result: ServiceResult) -> dict[str, Any]:
    """The job object in an answer (a JSON object), else UpstreamBadResponse."""
    try:
        data = loads(result.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamBadResponse("the job operation did not answer with a JSON object")
    return data


class Poller:
    """Polling intervals: from `poll_min`, half again as long each time, up to `poll_max`."""

    def __init__(self, config: JobsConfig) -> None:
        self.next = config.poll_min
        self.maximum = config.poll_max

    def delay(self, hint: float | None) -> float:
        """Seconds to wait before the next poll; the service host's hint wins when it sent one."""
        if hint is not None:
            return hint
        delay, self.next = self.next, min(self.next * 1.5, self.maximum)
        return delay


class JobWaiter:
    """Follows jobs to their end; one `follow` per waited request."""

    def __init__(
        self,
        *,
        table: MethodTable,
        builder: RequestBuilder,
        service: ServiceClient,
        publisher: StreamPublisher,
        redactor: Redactor,
        journal: JournalLike | None,
        config: JobsConfig,
        log: FilteringBoundLogger,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.builder = builder
        self.service = service
        self.publisher = publisher
        self.redactor = redactor
        self.journal = journal
        self.config = config
        self.log = log
        self._sleep = sleep
        self._clock = clock

    async def resumable(self, key: bytes | None) -> JobState | None:
        """The job a redelivered request already started (journaled, not answered, and held by
        its request message rather than detached), if any."""
        if key is None or self.journal is None:
            return None
        entry: JournalEntry | None = await self.journal.lookup(key)
        if entry is None or entry.job is None or entry.answer is not None or entry.waiting:
            return None
        return JobState.from_record(entry.job)

    async def create(self, call: Call) -> tuple[JobState, ServiceResult]:
        """Call the job-creating operation (once); the job's state and the answer."""
        kind = job_kind(call.op.name)
        assert kind is not None
        result = await self.service.send(call.take_request())
        state = self._state(call.op.name, kind, job_object(result))
        self.log.info("job started", method=call.op.name, job_id=state.id)
        return state, result

    def deadline_in(self, seconds: float) -> float:
        """The deadline `seconds` from now on this waiter's clock (what `poll` takes)."""
        return self._clock() + seconds

    def timeout(self, options: ReplyOptions) -> float:
        """The wait's timeout in seconds (the request's, else `[jobs] wait_timeout`)."""
        wait = options.wait
        return (wait.timeout if wait is not None else None) or self.config.wait_timeout

    async def follow(
        self,
        call: Call,
        route: Route,
        key: bytes | None,
        resumed: JobState | None,
        tracked: Callable[[], None] = lambda: None,
    ) -> render.Outcome:
        """Create (or resume) the job, poll it to its end, and render the one reply (the wait
        holds its request message throughout)."""
        assert call.options.wait is not None
        timeout = self.timeout(call.options)
        deadline = self._clock() + timeout
        if resumed is not None:
            self.log.info("job resumed", method=call.op.name, job_id=resumed.id)
            call.take_request()  # never sent again
            tracked()
            return await self.poll(
                call.op, call.transaction, call.options, route, resumed, None, deadline, key
            )
        state, result = await self.create(call)
        journal = self.journal
        journaled = False
        if key is not None and journal is not None:
            # Committed before the first poll: from here on a crash resumes, never recreates.
            journaled = await journal.record_job(key, route.reply_topic, state.record())
            if journaled:
                tracked()
        return await self.poll(
            call.op,
            call.transaction,
            call.options,
            route,
            state,
            result,
            deadline,
            key if journaled else None,
        )

    async def poll(
        self,
        op: Operation,
        transaction: Any,
        options: ReplyOptions,
        route: Route,
        state: JobState,
        result: ServiceResult | None,
        deadline: float,
        key: bytes | None,
    ) -> render.Outcome:
        """Poll the job to its end or `deadline` (this waiter's clock) and render the reply.

        `result` is the creating call's answer (None for a resumed job); with `key` the state
        is journaled as it changes, so a resumed wait goes on counting its progress messages.
        """
        kind = job_kind(state.operation)
        assert kind is not None
        progress = _ProgressTopic(self, route, transaction)
        progress.resume(state, key)
        if result is not None:
            await progress.update(state, job_object(result))
        retrieve = self.table.find(kind.retrieve)
        assert retrieve is not None, kind.retrieve
        poller = Poller(self.config)
        job: dict[str, Any] | None = job_object(result) if result is not None else None
        polled_ok = True
        while job is None or job.get("status") not in kind.terminal:
            hint = result.poll_after if result is not None and polled_ok else None
            delay = poller.delay(hint) if job is not None or not polled_ok else 0.0
            remaining = deadline - self._clock()
            if remaining <= delay:
                raise JobTimeout(
                    f"job {state.id} did not end within {self.timeout(options):g} s (last status "
                    f"{state.status!r}); it goes on upstream: retrieve it with {kind.retrieve}",
                    job_id=state.id,
                    job_status=state.status,
                )
            await self._sleep(delay)
            try:
                result = await self.service.send(self.builder.build(retrieve, dict(state.params)))
            except BridgeError as exc:
                if not exc.is_retryable:
                    raise
                # The job goes on upstream while the service host is briefly unreachable or
                # overloaded: keep polling until the wait's timeout.
                polled_ok = False
                self.log.warning(
                    "job poll failed; polling on", job_id=state.id, code=exc.code, error=str(exc)
                )
                continue
            polled_ok = True
            job = job_object(result)
            await progress.update(state, job)
        status = str(job.get("status"))
        if status in kind.failed:
            raise JobFailed(
                f"job {state.id} ended {status}",
                job_id=state.id,
                job_status=status,
                upstream=job,
            )
        assert result is not None
        result.body = dumps(job)
        return render.answer(op, transaction, result, None, options)

    def _state(self, operation: str, kind: JobKind, job: dict[str, Any]) -> JobState:
        try:
            params = kind.retrieve_params(job)
        except KeyError as exc:
            raise UpstreamBadResponse(
                f"the {operation} answer has no {exc.args[0]!r} to follow the job by"
            ) from None
        return JobState(operation, str(job["id"]), params)


class _ProgressTopic:
    """Publishes a progress message on the stream topic whenever status or progress changes."""

    def __init__(self, waiter: JobWaiter, route: Route, transaction: Any) -> None:
        self.waiter = waiter
        self.topic = route.topic.stream
        self.correlation = route.correlation
        self.reply_topic = route.reply_topic
        self.seq = 0
        self._framer = render.StreamFramer(transaction)
        self._journal_key: bytes | None = None

    def resume(self, state: JobState, key: bytes | None) -> None:
        """Count on from the journaled state's `seq`, and journal it as it grows."""
        self.seq = state.seq
        self._journal_key = key

    async def update(self, state: JobState, job: dict[str, Any]) -> None:
        kind = job_kind(state.operation)
        assert kind is not None
        status = job.get("status")
        status = status if isinstance(status, str) else None
        percent = kind.progress(job)
        if (status, percent) == (state.status, state.progress) and self.seq:
            return
        state.status, state.progress = status, percent
        data: dict[str, Any] = {"id": state.id, "status": status}
        if percent is not None:
            data["progress"] = percent
        payload = self._framer.frame(self.seq, PROGRESS_EVENT, data)
        self.seq += 1
        state.seq = self.seq
        journal = self.waiter.journal
        if self._journal_key is not None and journal is not None:
            # So a wait resumed after a restart goes on counting instead of starting at 0 again.
            await journal.record_job(self._journal_key, self.reply_topic, state.record())
        payload = self.waiter.redactor.data(payload)
        # Progress is best effort: a lost progress message must not fail the wait.
        future = self.waiter.publisher.publish(
            self.topic, payload, correlation_data=self.correlation
        )
        future.add_done_callback(_ignore_failure)


def _ignore_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
