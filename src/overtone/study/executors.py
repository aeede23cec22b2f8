"""Executors run a study's tasks on workers; each is a class with ``run(scheduler)``, registered by name.

* ``local``: one worker in the driver's own process; tasks one after the other.
* ``ray``: one Ray actor per worker, on this machine or on a cluster (study/ray_executor.py); needs the
  optional extra ``pip install 'overtone[ray]'``. It is imported only when chosen, so the package
  works without Ray.

A new executor is a module with such a class plus one line in ``EXECUTORS``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from overtone.study.driver import Executor, Scheduler
from overtone.study.worker import TaskError, Worker

log = logging.getLogger(__name__)

# name -> "module:class", imported on use
EXECUTORS = {
    "local": "overtone.study.executors:LocalExecutor",
    "ray": "overtone.study.ray_executor:RayExecutor",
}


@dataclass(frozen=True)
class ExecutorOptions:
    """How workers run: torch threads each, how many, and (Ray) where and with which resources."""

    threads: int = 1
    workers: int | None = None  # None: the executor's default (local: 1; Ray: as many as the resources allow)
    address: str | None = None  # Ray: a running cluster ("auto", "ray://host:10001", "host:6379"); None: start one
    cpus_per_worker: float | None = None  # Ray: CPUs each worker reserves (default: threads)
    gpus_per_worker: float | None = None  # Ray: GPUs each worker reserves (default: 1 when device is cuda, else 0)


class LocalExecutor:
    """One worker in this process: the model is loaded once and every task runs here, in plan order."""

    def __init__(self, options: ExecutorOptions) -> None:
        if options.workers not in (None, 1):
            raise ValueError("the local executor runs one worker; use --executor ray for more")
        if options.address:
            raise ValueError("--address needs --executor ray")
        self.threads = options.threads

    def run(self, scheduler: Scheduler) -> None:
        worker = Worker(self.threads)
        cell_id = None
        while (task := scheduler.next_task(worker.model, cell_id)) is not None:
            cell_id = task.cell.id
            try:
                for delivery in worker.run(task):
                    scheduler.deliver(delivery)
            except TaskError as exc:
                scheduler.task_failed(task, str(exc))
            else:
                scheduler.task_done(task)


def make_executor(name: str, options: ExecutorOptions) -> Executor:
    """Build executor ``name``; a bad option or a missing optional dependency is a ``ValueError``."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(options)
