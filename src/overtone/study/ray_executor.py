"""The Ray executor: one actor per worker keeps its model loaded and pulls shards from the driver.

Each actor is a ``Worker`` (study/worker.py) in its own process. The driver gives an idle actor the
next shard, preferring one of the cell (then the model) it already has loaded; the actor streams one
``Delivery`` per finished chunk back (a Ray streaming generator) and the driver stores it, so the
driver is the only writer and a cluster needs no shared file system. An actor that dies (killed, out
of memory, its node lost) is replaced, and the chunks of its shard it had not delivered go back to
the queue for any worker.

Without ``--address`` a private Ray instance is started on this machine for the run and shut down at
its end: on loopback (127.0.0.1; Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the machine's
network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), without dashboard or usage
statistics, without an auth token file (``RAY_AUTH_MODE=disabled``), with the workers at the driver's
priority (``RAY_worker_niceness=0``; Ray's default lowers it by 15), with its session files in a
temporary directory that is removed afterwards (or, after a killed driver, by the next run). With
``--address`` the driver joins a running cluster (``ray start --head`` / ``ray start --address``,
docs/studies.md) and ships this package's code to it (``runtime_env`` ``py_modules``), so every
node runs the driver's version; each node needs the dependencies and the models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from overtone.study.driver import Scheduler
from overtone.study.executors import ExecutorOptions
from overtone.study.worker import TaskError, Worker

log = logging.getLogger(__name__)

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with it, Ray 2.60 keeps a local node on 127.0.0.1
    # Ray runs its workers 15 nice levels below the driver; they are the work here, so they keep the driver's
    # priority (under `nice -n 5` on a shared machine they would otherwise run at 19 and barely run at all)
    "RAY_worker_niceness": "0",
}
TEMP_PREFIX = "overtone-ray-"
OBJECT_STORE_BYTES = 256 * 2**20  # records are small; the default (30 % of RAM) would compete with the models
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../overtone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs() -> None:
    """Session directories of local instances whose driver was killed (named after the driver's pid), and the Ray
    processes (GCS, raylet, workers) still running from them: orphans that would write into the directory again."""
    import psutil  # a dependency of Ray

    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = path.name[len(TEMP_PREFIX):].split("-")[0]
        if not (pid.isdigit() and not _alive(int(pid)) and path.is_dir()):
            continue
        orphans = []
        for process in psutil.process_iter(["cmdline"]):
            if any(str(path) in part for part in process.info["cmdline"] or ()):
                orphans.append(process)
                with contextlib.suppress(psutil.Error):
                    process.kill()
        psutil.wait_procs(orphans, timeout=10)
        log.info("removed the session directory %s of a killed run (%d leftover process(es) stopped)", path,
                 len(orphans))
        shutil.rmtree(path, ignore_errors=True)


class RayExecutor:
    """Run a study's shards on Ray actors: a private local instance, or a cluster given by ``address``."""

    def __init__(self, options: ExecutorOptions) -> None:
        if not options.address:
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
        try:
            import ray
        except ImportError as exc:
            raise ValueError("the ray executor needs Ray: pip install 'overtone[ray]' (ray==2.60.0)") from exc
        self.ray = ray
        self.options = options

    @contextlib.contextmanager
    def _connected(self) -> Iterator[None]:
        """Connect for the run: to the cluster at ``address``, or a new private local instance (shut down and
        cleaned up afterwards)."""
        ray = self.ray
        if self.options.address:
            ray.init(address=self.options.address, runtime_env={"py_modules": [str(PACKAGE_DIR)]},
                     log_to_driver=True)
            try:
                yield
            finally:
                ray.shutdown()
            return
        remove_stale_temp_dirs()
        temp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        # workers import this checkout's overtone, whatever sys.path tricks the driver was started with
        path = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")) if p)
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=OBJECT_STORE_BYTES, _temp_dir=temp, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)

    def _resources(self, scheduler: Scheduler) -> tuple[float, float, int]:
        """CPUs and GPUs per worker, and the number of workers."""
        opts = self.options
        cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else float(opts.threads)
        cuda = any(c.model.device.startswith("cuda") for c in scheduler.study.cells)
        gpus = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if cuda else 0.0)
        workers = opts.workers
        if workers is None:
            total = self.ray.cluster_resources()
            fits = [total.get("CPU", 1.0) / cpus] if cpus else []
            if gpus:
                fits.append(total.get("GPU", 0.0) / gpus)
            workers = max(1, int(min(fits)) if fits else 1)
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        return cpus, gpus, workers

    def run(self, scheduler: Scheduler) -> None:
        ray = self.ray
        with self._connected():
            cpus, gpus, count = self._resources(scheduler)
            remote = ray.remote(Worker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)

            def start() -> Any:
                return remote.remote(self.options.threads)

            actors = [start() for _ in range(count)]
            from overtone.version import __version__

            try:
                infos = ray.get([a.identity.remote() for a in actors])
            except ray.exceptions.RayActorError as exc:
                raise ValueError(f"a Ray worker could not start: {exc}") from exc
            for info in infos:
                if info["version"] != __version__:
                    raise ValueError(f"a worker on {info['host']} runs overtone {info['version']}, the driver "
                                     f"{__version__}")
            log.info("%d Ray worker(s): %s", count, ", ".join(f"pid {i['pid']} on {i['host']}" for i in infos))
            self._loop(scheduler, actors, start)
            for actor in actors:
                ray.kill(actor)

    def _loop(self, scheduler: Scheduler, actors: list[Any], start: Any) -> None:
        """Keep every actor busy with a shard until none is left; replace actors that die."""
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        idle = list(actors)
        loaded: dict[Any, tuple[Any, str]] = {}  # actor -> (model, cell id) of its last shard
        running: dict[Any, tuple[Any, Any]] = {}  # stream -> (actor, task)
        while True:
            for actor in list(idle):
                task = scheduler.next_task(*loaded.get(actor, (None, None)))
                if task is None:
                    break
                idle.remove(actor)
                running[actor.run.remote(task)] = (actor, task)
                loaded[actor] = (task.cell.model, task.cell.id)
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            stream = ready[0]
            actor, task = running[stream]
            try:
                delivery = ray.get(next(stream))
            except StopIteration:
                del running[stream]
                scheduler.task_done(task)
                idle.append(actor)
            except RayActorError as exc:
                del running[stream]
                scheduler.task_lost(task, type(exc).__name__)
                actors[actors.index(actor)] = replacement = start()
                loaded.pop(actor, None)
                idle.append(replacement)
            except (TaskError, RayTaskError) as exc:
                del running[stream]
                # a TaskError names the cell and case; anything else is a bug, kept with its traceback
                scheduler.task_failed(task, str(exc.args[0]) if isinstance(exc, TaskError) and exc.args else str(exc))
                idle.append(actor)
            else:
                scheduler.deliver(delivery)
