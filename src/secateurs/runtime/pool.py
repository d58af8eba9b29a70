"""The worker pool: replicas of the model in Ray actors, evaluating a search's independent candidates.

``--workers N`` starts a local Ray instance with N actors; ``--ray-address ADDR`` joins an existing Ray
cluster instead (the way to use several machines: ``ray start --head`` on one, ``ray start --address ...`` on
the others, every node with the same Python environment). Ray is imported lazily; without it, a pool is a
user error that says how to install it (``pip install 'secateurs[ray]'``).

- A worker (``_Replica``, one Ray actor) loads its own copy of the model with the main process's loader
  (``sources.replica_loader``: same model, same dtype, same device kind) as soon as the pool opens, while the main
  process loads its own, then builds on it the worker side of a search (``build(model, *args)``, e.g. the
  greedy search's ``CandidateScorer`` with the same calibration rows). On a CPU it reserves
  ``threads_per_worker`` CPUs and runs torch with that many threads; with ``--device cuda`` it reserves
  ``gpus_per_worker`` GPUs, which Ray makes its visible devices.
- Placement is checked before anything starts: Ray would wait forever for an actor that no node can hold, so
  ``open`` compares the N actors' needs with the nodes' resources and stops with one line when they do not
  fit. The default thread count is the largest that still places all N actors.
- Scheduling (``Workers.map``): each worker has a queue; an item goes to the worker it names as preferred
  (where it ran before, whose caches hold its states), the others round-robin; a worker whose queue is empty
  takes the last item of the longest queue. Each worker has one call in flight, so arguments built at
  dispatch time (a search's running bound) are as fresh as they can be. Results come back to ``on_result``
  and in the order of the items: the caller merges them in a fixed order, never in order of arrival.
- Failures: a worker that dies (killed, out of memory, its machine gone) is dropped; the item it was running
  and its queue go to the others, so nothing is lost. When no worker is left the job stops with an error
  that says to run it again (the searches resume from their state files).
"""
from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..progress import progress_bar

INSTALL_HINT = "pip install 'secateurs[ray]'"


@dataclass
class PoolSettings:
    workers: int
    address: str | None = None  # an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); None: start one here
    threads_per_worker: int | None = None  # CPUs (torch threads) per worker; None: the most that places all workers
    gpus_per_worker: float | None = None  # None: 1 when the device is cuda, else 0
    device: str = "cpu"

    def __post_init__(self):
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise UserError(f"--threads-per-worker must be at least 1 (got {self.threads_per_worker})")
        if self.gpus_per_worker is not None and (self.gpus_per_worker < 0 or
                                                 (self.gpus_per_worker > 0 and not self.device.startswith("cuda"))):
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker} needs --device cuda and a value > 0")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--workers needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class PoolLost(UserError):
    """Every worker of the pool died."""


class _Replica:
    """One worker (a Ray actor): a replica of the model and the object a search built on it."""

    def load(self, threads: int, loader) -> str:
        import torch

        torch.set_num_threads(threads)
        self.model = loader()
        return socket.gethostname()

    def setup(self, recipe) -> None:
        build, args = recipe
        model, self.model = self.model, None  # the replica belongs to this search (the next one loads afresh)
        self.obj = build(model, *args)

    def call(self, method: str, args: tuple):
        return getattr(self.obj, method)(*args)

    def release(self) -> None:
        """Frees the search's object (after its ``close()``, if it has one) and with it the replica."""
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()
        self.obj = None


def _host_port(address: str) -> tuple[str, int] | None:
    hp = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hp.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class WorkerPool:
    """A connection to Ray (started here, or an existing cluster) and the recipe of a model replica.

    ``open()`` connects, checks placement (user errors, before anything is written) and starts the workers
    loading their replicas; ``start(build, *args)`` sets them up for a search; ``close()`` stops them (and
    Ray, when it was started here)."""

    def __init__(self, settings: PoolSettings, loader: Callable[[], Any]):
        self.settings, self.loader = settings, loader
        self.ray = None
        self.started_ray = False
        self.threads = settings.threads_per_worker
        self.gpus = settings.gpus_per_worker if settings.gpus_per_worker is not None else (
            1.0 if settings.device.startswith("cuda") else 0.0)
        self.nodes: list[dict] = []
        self.idle: list = []  # [actor, its replica's load call or None]: workers between searches
        self.lost = 0
        self.rerun = 0

    # -- connection and placement
    def open(self, num_cpus: int | None = None, paths: tuple = ()) -> "WorkerPool":
        """Connects (a Ray session this process already has is used as it is) and checks placement. A local
        instance gets ``num_cpus`` CPUs (default: Ray's count), and its workers import from ``paths`` too."""
        ray = self.ray = import_ray()
        if self.settings.address not in (None, "auto"):
            self._check_reachable(self.settings.address)
        if not ray.is_initialized():
            self._init(ray, num_cpus, paths)
        self.nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self._check_placement()
        if self.loader is not None:  # the workers load their replicas while this process loads its model
            self._spawn(self.settings.workers)
        return self

    def _init(self, ray, num_cpus, paths) -> None:
        quiet = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        address = self.settings.address
        if address is None:
            # workers import secateurs from where this process does (they inherit the environment)
            here = str(Path(__file__).resolve().parents[2])
            old = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join([here, *map(str, paths)] + ([old] if old else []))
            try:
                ray.init(address="local", num_cpus=num_cpus, object_store_memory=256 << 20, **quiet)
            finally:
                if old is None:
                    os.environ.pop("PYTHONPATH")
                else:
                    os.environ["PYTHONPATH"] = old
        else:
            try:
                ray.init(address=address, **quiet)
            except Exception as e:  # noqa: BLE001 - Ray's connection errors have no common type
                raise UserError(f"could not join the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from None
        self.started_ray = True

    @staticmethod
    def _check_reachable(address: str) -> None:
        """Ray waits minutes for an address nobody answers at: a plain TCP connection says it at once."""
        hp = _host_port(address)
        if hp is None:
            raise UserError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
        try:
            socket.create_connection(hp, timeout=5).close()
        except OSError as e:
            raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with "
                            "`ray start --head` and give the address it prints") from None

    def _capacity(self, cpus: float, gpus: float) -> int:
        """How many workers needing ``cpus`` CPUs and ``gpus`` GPUs the nodes can hold."""
        def fit(have: float, need: float) -> float:
            return have // need if need else float("inf")
        return int(sum(min(fit(r.get("CPU", 0.0), cpus), fit(r.get("GPU", 0.0), gpus)) for r in self.nodes))

    def _check_placement(self) -> None:
        n = self.settings.workers
        where = f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''} with " + " + ".join(
            f"{int(r.get('CPU', 0))} CPU" + (f"/{r['GPU']:g} GPU" if r.get("GPU") else "") for r in self.nodes)
        if self.threads is None:
            most = int(max((r.get("CPU", 0.0) for r in self.nodes), default=0))
            fitting = [t for t in range(1, most + 1) if self._capacity(t, self.gpus) >= n]
            self.threads = 1 if self.gpus else max(fitting, default=1)
        can = self._capacity(self.threads, self.gpus)
        if can >= n:
            return
        per = f"{self.threads} CPU" + (f" and {self.gpus:g} GPU" if self.gpus else "")
        hint = f"use --workers {can}" if can else "no node can hold even one"
        if self.gpus:
            hint += " or share GPUs with --gpus-per-worker (e.g. 0.5)"
        elif self.threads > 1:
            hint += " or fewer --threads-per-worker"
        raise UserError(f"--workers {n} cannot be placed: each worker needs {per}, and the Ray pool ({where}) "
                        f"holds {can}; {hint}")

    def summary(self) -> dict:
        return asdict(self.settings) | {"threads_per_worker": self.threads, "gpus_per_worker": self.gpus,
                                        "workers_lost": self.lost, "items_rerun": self.rerun}

    # -- workers
    def _spawn(self, n: int) -> None:
        remote = self.ray.remote(_Replica)
        for _ in range(n):
            self.idle.append([remote.options(num_cpus=self.threads, num_gpus=self.gpus, max_restarts=0).remote(), None])
        for worker in self.idle:
            if worker[1] is None:  # not loading a replica yet
                worker[1] = worker[0].load.remote(self.threads, self.loader)

    def start(self, build: Callable, *args, progress: bool = True) -> "Workers":
        """Sets up the workers for one search: each builds ``build(model, *args)`` on its replica of the model;
        returns when all are ready. The worker processes stay up between the searches of this pool
        (``Workers.close`` hands them back; the next search loads its replicas afresh); missing ones are started."""
        n = self.settings.workers
        self._spawn(n - len(self.idle))
        workers = Workers(self, [a for a, _ in self.idle])
        pending = {ref: (w, "load") for w, (_, ref) in enumerate(self.idle)}
        self.idle = []
        recipe = self.ray.put((build, args))
        bar = progress_bar(total=n, desc=f"starting {n} workers (a model replica each)", enabled=progress)
        try:
            while pending:
                (w, stage), host, alive = workers._next(pending)
                if not alive:
                    workers._drop(w)
                    bar.update(1)
                    continue
                if stage == "load":  # the replica is loaded: build the search's side on it
                    workers.hosts[w] = host
                    pending[workers.actors[w].setup.remote(recipe)] = (w, "setup")
                else:
                    bar.update(1)
        except BaseException:
            workers.close(kill=True)
            raise
        finally:
            bar.close()
        return workers

    def stop_workers(self) -> None:
        """Ends the worker processes kept between searches."""
        for a, _ in self.idle:
            self.ray.kill(a)
        self.idle = []

    def close(self) -> None:
        if self.ray is not None:
            self.stop_workers()
            if self.started_ray and self.ray.is_initialized():
                self.ray.shutdown()
        self.started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Workers:
    """The started workers of one search. ``hook`` (tests) is called after every result is handled."""

    def __init__(self, pool: WorkerPool, actors: list):
        self.pool, self.ray, self.actors = pool, pool.ray, actors
        self.alive = list(range(len(actors)))
        self.hosts: dict[int, str] = {}
        self.hook: Callable[["Workers"], None] | None = None

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # an error inside the worker's code: the caller's error
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise

    def _next(self, pending: dict) -> tuple[Any, Any, bool]:
        """Waits for the first of ``pending`` (ref -> tag) to finish: (its tag, its result, whether its worker lived)."""
        [ref], _ = self.ray.wait(list(pending), num_returns=1)
        tag = pending.pop(ref)
        try:
            return tag, self._get(ref), True
        except self.ray.exceptions.RayActorError:
            return tag, None, False

    def _drop(self, w: int) -> None:
        if w in self.alive:
            self.alive.remove(w)
            self.pool.lost += 1
            self.ray.kill(self.actors[w])
        if not self.alive:
            raise PoolLost(f"all {len(self.actors)} workers of the pool died; run the same command again to resume")

    def map(self, items: list, method: str, args_of: Callable[[Any], tuple],
            on_result: Callable[[Any, int, Any], None] | None = None, prefer: Callable[[Any], int | None] | None = None,
            desc: str = "", progress: bool = True) -> list:
        """Calls ``method(*args_of(item))`` on the workers for every item; returns the results in item order.
        ``on_result(item, worker, result)`` sees each result as it comes; ``prefer(item)`` names a worker."""
        queues = {w: deque() for w in self.alive}
        rr = 0
        for k, item in enumerate(items):
            w = prefer(item) if prefer else None
            if w not in queues:
                w, rr = self.alive[rr % len(self.alive)], rr + 1
            queues[w].append(k)
        results: list = [None] * len(items)
        pending: dict = {}  # ref -> (worker, k)
        done = dict.fromkeys(self.alive, 0)  # items completed per worker (shown on the progress bar)
        bar = progress_bar(total=len(items), desc=desc, enabled=progress)

        def feed(w: int) -> None:
            donor = w if queues[w] else max(queues, key=lambda v: len(queues[v]))
            if queues[donor]:  # its own next item, else the last item of the longest queue
                k = queues[donor].popleft() if donor == w else queues[donor].pop()
                pending[self.actors[w].call.remote(method, args_of(items[k]))] = (w, k)

        for w in list(queues):
            feed(w)
        while pending:
            (w, k), res, alive = self._next(pending)
            if not alive:
                self.pool.rerun += 1
                orphans = list(queues.pop(w))
                self._drop(w)
                queues[self.alive[0]].appendleft(k)  # the interrupted item first, the dead worker's queue shared out
                for j, o in enumerate(orphans):
                    queues[self.alive[j % len(self.alive)]].append(o)
                busy = {v for v, _ in pending.values()}
                for v in self.alive:
                    if v not in busy:
                        feed(v)
                continue
            results[k] = res
            done[w] += 1
            if on_result is not None:
                on_result(items[k], w, res)
            feed(w)
            bar.update(1)
            bar.set_postfix_str(" ".join(f"w{v}:{done[v]}" for v in self.alive)
                                + (f" (lost {self.pool.lost})" if self.pool.lost else ""), refresh=False)
            if self.hook is not None:
                self.hook(self)
        bar.close()
        return results

    def call(self, method: str, *args):
        """``method(*args)`` on one worker (another one if it dies)."""
        return self.map([None], method, lambda _: args, progress=False)[0]

    def close(self, kill: bool = False) -> None:
        """Hands the living workers back to the pool (their replicas freed), or ends them (``kill``)."""
        for w in self.alive:
            if kill:
                self.ray.kill(self.actors[w])
            else:
                self.actors[w].release.remote()
                self.pool.idle.append([self.actors[w], None])
        self.alive = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # a worker still busy finishes its call before the next search's set-up (calls run in order)
