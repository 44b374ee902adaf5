"""What every stage task shares: one decorator and how a cached stage shows in Prefect.

The artifact store's manifests are the only cache (:func:`pipeline.cache.run_cached`): Prefect runs every
stage task, and the task returns at once when the store already holds a verified artifact under the stage's
content key. Such a run finishes in a ``Completed`` state *named* ``Cached`` (Prefect's own name for a cache
hit), so the UI and ``prefect task-run ls`` tell served stages from computed ones.
"""
from __future__ import annotations

from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from pipeline.cache import retry_on_storage_error
from pipeline.results import StageResult

__all__ = ["stage_task", "as_state"]


def stage_task(name: str, *, retries: int = 2, retry_delay_seconds: float = 2) -> Callable:
    """``@task`` for a pipeline stage: no Prefect cache (the store decides), retries on storage errors only."""
    return task(name=name, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=retry_delay_seconds,
                retry_condition_fn=retry_on_storage_error)


def as_state(result: StageResult) -> State:
    """The stage's final state: ``Cached`` when the store served it, ``Completed`` when it computed."""
    if result.computed:
        return Completed(data=result)
    return Completed(data=result, name="Cached", message="served from the artifact store (verified manifest)")
