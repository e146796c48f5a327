"""Running one generation job: attempt, upstream call, decode, upload, record.

``JobRunner.run`` is what a worker does with a task id. It never raises for a job's own failure: the
outcome is written to the store, and the return value says whether the caller should run the job again
later (``Retry``) or is done (``None``). Only ``StoreUnavailable`` escapes: without the store there is
nothing to record, and the caller must redeliver the message.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from services.config import Config
from services.errors import JobError, ServiceError, StorageUnavailable, StoreUnavailable
from services.images import inspect_image
from services.storage import Storage, output_key
from services.store import JobStore
from services.upstream_client import UpstreamClient
from services.upstream_response import UpstreamResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retry:
    delay: float


def backoff_delay(attempt: int, config: Config, hint: float | None = None) -> float:
    """Exponential backoff with jitter after ``attempt`` failed attempts; ``hint`` is the upstream's floor."""
    ceiling = min(config.retry_max_delay, config.retry_base_delay * 2 ** max(attempt - 1, 0))
    delay = random.uniform(ceiling / 2, ceiling)
    if hint is not None:
        delay = max(delay, hint * random.uniform(1.0, 1.1))
    return delay


class JobRunner:
    def __init__(
        self, config: Config, store: JobStore, storage: Storage, upstream: UpstreamClient, worker: str
    ) -> None:
        self._config = config
        self._store = store
        self._storage = storage
        self._upstream = upstream
        self._worker = worker

    def run(self, task_id: str) -> Retry | None:
        task = self._store.begin_attempt(task_id, max_attempts=self._config.max_attempts, worker=self._worker)
        if task is None:
            log.info("task %s: nothing to run (final, or out of attempts)", task_id)
            return None
        attempt = len(task["attempts"])
        started = time.monotonic()
        try:
            status, result = self._upstream.generate(self._store.load_payload(task_id))
            outputs = self._store_outputs(task_id, result)
        except StoreUnavailable:
            raise
        except JobError as error:
            return self._after_failure(task_id, attempt, error)
        except StorageUnavailable as exc:
            error = JobError(exc.message, code=exc.code, retryable=True)
            return self._after_failure(task_id, attempt, error)
        except ServiceError as exc:
            log.exception("task %s: unexpected service error", task_id)
            return self._after_failure(
                task_id, attempt, JobError(exc.message, code=exc.code, retryable=False)
            )
        except Exception as exc:
            log.exception("task %s: unexpected error", task_id)
            error = JobError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
            return self._after_failure(task_id, attempt, error)
        self._store.succeed(
            task_id, outputs=outputs, text=result.texts, usage=result.usage, upstream_status=status
        )
        log.info(
            "task %s: succeeded in %.2fs, %d output(s)", task_id, time.monotonic() - started, len(outputs)
        )
        return None

    def _store_outputs(self, task_id: str, result: UpstreamResult) -> list[dict]:
        outputs = []
        for index, part in enumerate(result.images):
            data = part.data if part.data is not None else self._upstream.download(part.url or "")
            info = inspect_image(data)
            stored = self._storage.put_image(output_key(task_id, index, info.extension), data, info)
            outputs.append(
                {
                    "index": index,
                    "bucket": stored.bucket,
                    "key": stored.key,
                    "mime_type": stored.mime_type,
                    "bytes": stored.bytes,
                    "width": stored.width,
                    "height": stored.height,
                    "sha256": stored.sha256,
                }
            )
        return outputs

    def _after_failure(self, task_id: str, attempt: int, error: JobError) -> Retry | None:
        if error.retryable and attempt < self._config.max_attempts:
            delay = backoff_delay(attempt, self._config, error.retry_after)
            self._store.schedule_retry(task_id, error, delay=delay)
            log.warning(
                "task %s: attempt %d failed (%s), retry in %.2fs", task_id, attempt, error.code, delay
            )
            return Retry(delay)
        self._store.fail(task_id, error)
        log.warning("task %s: failed (%s): %s", task_id, error.code, error.message)
        return None
