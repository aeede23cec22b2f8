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
statistics, with Ray's token authentication (``RAY_AUTH_MODE=token``: another account on the machine
that reaches the loopback ports cannot run code as the study's user), with the workers at the driver's
priority (``RAY_worker_niceness=0``; Ray's default lowers it by 15), with its session files in a private
temporary directory (mode 0700) that is removed afterwards. The token is a fresh random one per instance,
in a file of that directory (mode 0600) that every Ray process finds through ``RAY_AUTH_TOKEN_PATH``: it
is never on a command line nor in ``~/.ray``. After a killed driver the next private instance stops every
process of the dead one, the dashboard and runtime-env agents included (they rename themselves, so they
are found by the files they hold open in its directory), and removes the directory. With
``--address`` the driver joins a running cluster (``ray start --head`` / ``ray start --address``,
docs/studies.md) and ships this package's code to it (``runtime_env`` ``py_modules``), so every
node runs the driver's version; each node needs the dependencies and the models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
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
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # with it, Ray 2.60 keeps a local node on 127.0.0.1
    # Ray runs its workers 15 nice levels below the driver; they are the work here, so they keep the driver's
    # priority (under `nice -n 5` on a shared machine they would otherwise run at 19 and barely run at all)
    "RAY_worker_niceness": "0",
}
TOKEN_FILE = "auth_token"
AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
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


def instance_processes(path: Path) -> list[Any]:
    """This user's processes of the private instance in session directory ``path``: those naming it on their
    command line (GCS, raylet, log monitor), holding a file open in it (the dashboard and runtime-env agents,
    which overwrite their command line) or given its token file (workers)."""
    import psutil  # a dependency of Ray

    inside, token, me = f"{path}{os.sep}", str(path / TOKEN_FILE), os.getpid()
    found = []
    for process in psutil.process_iter(["cmdline", "uids"]):
        if process.pid == me or process.info["uids"] is None or process.info["uids"].real != os.getuid():
            continue
        with contextlib.suppress(psutil.Error):
            if (any(str(path) in part for part in process.info["cmdline"] or ())
                    or any(f.path.startswith(inside) for f in process.open_files())
                    or process.environ().get("RAY_AUTH_TOKEN_PATH") == token):
                found.append(process)
    return found


def remove_stale_temp_dirs() -> None:
    """Session directories of private instances whose driver was killed (named after the driver's pid), and every
    Ray process still running from them: orphans that would write into the directory again, and agents that
    would listen on loopback for a minute more."""
    import psutil  # a dependency of Ray

    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = path.name[len(TEMP_PREFIX):].split("-")[0]
        if not (pid.isdigit() and not _alive(int(pid)) and path.is_dir()):
            continue
        orphans = instance_processes(path)
        for process in orphans:
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
        # Ray makes its temporary directory world-writable, so it gets one inside this private (0700) folder,
        # which also holds the token, where no other account can read, replace or reach anything
        temp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        token = Path(temp) / TOKEN_FILE
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as fh:
            fh.write(secrets.token_hex(32))
        # every Ray process of the instance inherits these (a RAY_AUTH_TOKEN would take precedence over the path;
        # a user's RAY_AUTH_MODE=disabled does not open the private instance); the driver's own are put back after
        saved = {key: os.environ.pop(key, None) for key in AUTH_KEYS}
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        self._reload_auth()
        # workers import this checkout's overtone, whatever sys.path tricks the driver was started with
        path = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")) if p)
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=OBJECT_STORE_BYTES, _temp_dir=str(Path(temp) / "ray"), log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            for key, value in saved.items():
                os.environ.pop(key, None)
                if value is not None:
                    os.environ[key] = value
            self._reload_auth()

    @staticmethod
    def _reload_auth() -> None:
        """Make this process read the authentication settings again: Ray caches them (its config and the token)
        when first imported, which a driver that used Ray before has done."""
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

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
