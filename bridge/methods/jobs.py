"""The table of job operations: per operation that starts a job, how to follow it to its end.

A job operation answers at once with an object that has an id and a `status`; the matching
retrieve operation is then polled until the status is terminal. The table says, per job
operation, which retrieve operation to poll, where its path parameters come from, which
statuses end the wait (and which of them are failures), and how to read a progress percentage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.errors import InvalidParameter


def _percent(done: Any, total: Any) -> int | None:
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        return max(0, min(100, int(done * 100 // total)))
    return None


def _video_progress(job: Mapping[str, Any]) -> int | None:
    value = job.get("progress")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0, min(100, int(value)))
    return None


def _batch_progress(job: Mapping[str, Any]) -> int | None:
    counts = job.get("request_counts")
    if not isinstance(counts, dict):
        return None
    return _percent(counts.get("completed", 0) + counts.get("failed", 0), counts.get("total"))


def _file_batch_progress(job: Mapping[str, Any]) -> int | None:
    counts = job.get("file_counts")
    if not isinstance(counts, dict):
        return None
    done = sum(counts.get(k, 0) for k in ("completed", "failed", "cancelled"))
    return _percent(done, counts.get("total"))


def _no_progress(job: Mapping[str, Any]) -> int | None:
    return None


@dataclass(frozen=True, slots=True)
class JobKind:
    """How to follow the job one operation starts."""

    retrieve: str
    """The operation polled for the job's state."""
    path: Mapping[str, str]
    """Retrieve path parameter -> field of the job object holding it (`id`, `thread_id`, ...)."""
    succeeded: frozenset[str]
    """Terminal statuses that end with the final object as an `ok` reply."""
    failed: frozenset[str]
    """Terminal statuses that end with a `job_failed` error reply carrying the final object."""
    progress: Callable[[Mapping[str, Any]], int | None] = _no_progress
    needs: str | None = None
    """A request field that must be true for the operation to start a job (`background`)."""

    @property
    def terminal(self) -> frozenset[str]:
        """Every status that ends the wait."""
        return self.succeeded | self.failed

    def retrieve_params(self, job: Mapping[str, Any]) -> dict[str, str]:
        """Path parameters for the retrieve call, read from the job object (KeyError: missing)."""
        params: dict[str, str] = {}
        for name, field in self.path.items():
            value = job.get(field)
            if not isinstance(value, str) or not value:
                raise KeyError(field)
            params[name] = value
        return params


_VIDEO = JobKind(
    retrieve="GetVideo",
    path={"video_id": "id"},
    succeeded=frozenset({"completed"}),
    failed=frozenset({"failed"}),
    progress=_video_progress,
)
_RUN = JobKind(
    retrieve="getRun",
    path={"thread_id": "thread_id", "run_id": "id"},
    # requires_action ends the wait: the caller must submit tool outputs (a job of its own).
    succeeded=frozenset({"completed", "requires_action", "incomplete"}),
    failed=frozenset({"failed", "cancelled", "expired"}),
)

JOBS: dict[str, JobKind] = {
    "createVideo": _VIDEO,
    "CreateVideoRemix": _VIDEO,
    "CreateVideoEdit": _VIDEO,
    "CreateVideoExtend": _VIDEO,
    "createBatch": JobKind(
        retrieve="retrieveBatch",
        path={"batch_id": "id"},
        succeeded=frozenset({"completed"}),
        failed=frozenset({"failed", "expired", "cancelled"}),
        progress=_batch_progress,
    ),
    "createFineTuningJob": JobKind(
        retrieve="retrieveFineTuningJob",
        path={"fine_tuning_job_id": "id"},
        succeeded=frozenset({"succeeded"}),
        failed=frozenset({"failed", "cancelled"}),
    ),
    "createVectorStoreFileBatch": JobKind(
        retrieve="getVectorStoreFileBatch",
        path={"vector_store_id": "vector_store_id", "batch_id": "id"},
        succeeded=frozenset({"completed"}),
        failed=frozenset({"failed", "cancelled"}),
        progress=_file_batch_progress,
    ),
    "createResponse": JobKind(
        retrieve="getResponse",
        path={"response_id": "id"},
        succeeded=frozenset({"completed", "incomplete"}),
        failed=frozenset({"failed", "cancelled"}),
        needs="background",
    ),
    "createRun": _RUN,
    "createThreadAndRun": _RUN,
    "submitToolOuputsToRun": _RUN,
}
"""Job operation (operationId) -> how to follow its job."""


def job_kind(operation: str) -> JobKind | None:
    """The job kind an operation starts, or None when it answers at once."""
    return JOBS.get(operation)


def check_wait(operation: str, params: Mapping[str, Any], *, streams: bool) -> None:
    """Raise InvalidParameter unless `_bridge.wait` can apply to this call."""
    kind = job_kind(operation)
    if kind is None:
        names = ", ".join(sorted(JOBS))
        raise InvalidParameter(
            "_bridge.wait",
            f"_bridge.wait applies to job operations only ({names}); {operation} answers at once",
        )
    if kind.needs is not None and params.get(kind.needs) is not True:
        raise InvalidParameter(
            "_bridge.wait", f'_bridge.wait with {operation} needs "{kind.needs}": true'
        )
    if streams:
        raise InvalidParameter("_bridge.wait", "_bridge.wait and a stream exclude each other")
