"""Spreading independent per-layer work over a Ray cluster (or running it here).

``ray=""`` runs everything in this process.  ``ray="auto"`` joins the Ray runtime already started
in this process or the cluster named by ``$RAY_ADDRESS``, else starts a local one; any other value
is a cluster address (``ray://host:10001`` or ``host:6379``).  Tasks are pure functions of their
arguments (a weight, its XᵀX, the options), so a Ray run returns exactly what the local run
returns, in the same order.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from lowbit.errors import LowbitError

__all__ = ["ray_runtime", "map_tasks", "map_actors"]

logger = logging.getLogger(__name__)


def ray_runtime(address: str):
    """The ``ray`` module, initialised for ``address`` ('auto' or a cluster address)."""
    try:
        import ray
    except ImportError as exc:
        raise LowbitError("ray=... needs the Ray package", hint="pip install 'lowbit[ray]'") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "auto" else address, ignore_reinit_error=True,
                     log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise LowbitError(f"cannot reach the Ray cluster at '{address}': {exc}",
                              hint="start one with 'ray start --head' or pass ray=auto") from exc
    return ray


def map_tasks(fn: Callable, items: Iterable[tuple], ray: str = "") -> list[Any]:
    """``[fn(*item) for item in items]``, as one Ray task per item when ``ray`` is set."""
    items = list(items)
    if not ray or not items:
        return [fn(*item) for item in items]
    rt = ray_runtime(ray)
    remote = rt.remote(fn)
    logger.info("%d tasks of %s on Ray", len(items), getattr(fn, "__name__", fn))
    return rt.get([remote.remote(*item) for item in items])


def map_actors(cls: type, init: tuple, method: str, items: list[tuple], ray: str, workers: int = 0) -> list[Any]:
    """``[getattr(cls(*init), method)(*item) for item in items]`` with one ``cls`` per Ray worker
    (it is built once per worker — e.g. an ORT session — and then serves many items)."""
    rt = ray_runtime(ray)
    n = workers or max(1, int(rt.available_resources().get("CPU", 1)))
    actor = rt.remote(num_cpus=1)(cls)
    shared = tuple(rt.put(a) for a in init)
    pool = [actor.remote(*shared) for _ in range(min(n, len(items)) or 1)]
    futures = [getattr(pool[i % len(pool)], method).remote(*item) for i, item in enumerate(items)]
    return rt.get(futures)
