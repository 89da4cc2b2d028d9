"""Load on the IRG Serve application with the tiny model: latency, throughput, 503s and autoscaling.

Prints one JSON object to stdout (progress goes to stderr). Starts a local Ray and Serve on
127.0.0.1 (a free port), deploys ``serve_apps.irg_app``'s ``Ingress`` in front of its ``Generator``
with the tiny checkpoint on CPU, and with a faster autoscaling config than the app's default (so
that a short run shows the generator scaling up and back down). The Generator's scheduler is
``--scheduler``: ``engine`` (continuous batching, the default), ``call`` (one pipeline call at a time,
same-shape requests batched by ``--max-batch-size`` / ``--batch-wait``, its ``user_config``) or ``both``,
one after the other on the same load, with a comparison. The load is either ``--clients`` threads
that loop ``POST /v1/images/generations`` for ``--seconds`` (closed loop), or, with ``--rate``, Poisson
arrivals at that many requests per second for ``--seconds`` (open loop: the same arrival times and
bodies for every scheduler, drawn from ``--arrival-seed``), each request waited for to the end. The
generator's RUNNING replicas are sampled every 0.5 s, during the load and for up to ``--cooldown``
seconds after it, until they are back at the minimum. Serve and Ray are shut down at the end of
each run, also on error or Ctrl-C.

API keys are on, as on a cluster: every client sends its own key (``Authorization: Bearer``, from
``$IRG_BENCH_API_KEYS``, which the replicas inherit), so the per-key concurrency is the app's default;
``--no-keys`` turns them off. A 503 (every replica busy and the queue full) counts as
``rejected_503``; any other non-200 (a 401 or a 429 included) or a client-side exception counts as a
failure, and a healthy run has none.

    PYTHONPATH=. python benchmarks/serve_load.py                              # defaults: ~1.5 min on 2 cores
    PYTHONPATH=. python benchmarks/serve_load.py --clients 16 --seconds 60 --max-replicas 3 --cpus 4
    # the engine against one call at a time, the same Poisson arrivals, one replica, the shapes model
    # (results/serve_load_engine_vs_call_cpu_shapes.json, ~9 min on 2 cores):
    PYTHONPATH=. python benchmarks/serve_load.py --scheduler both --model irg:shapes --rate 0.38 --seconds 200 \
        --max-think-tokens 400 --min-replicas 1 --max-replicas 1 --cooldown 0 --cpus 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

from irg.embedded_store import free_port
from irg.serve.options import AppArgs, BatchOptions

MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bagel_tiny"
APP = "irg-bench"
KEYS_ENV = "IRG_BENCH_API_KEYS"
PROMPTS = ["a red cube on a table", "two blue balls", "a green cone in the snow", "a yellow star over a hill",
           "a cat made of glass", "three stacked boxes", "a small boat at sunset", "an orange circle and a square"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", choices=("engine", "call", "both"), default="engine",
                        help="the Generator's scheduler (AppArgs.scheduler); both: one run each, compared")
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrivals at this many requests/s (open loop) instead of looping clients")
    parser.add_argument("--arrival-seed", type=int, default=0, help="seed of the Poisson arrival times")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent clients, each one request at a time (with --rate: API keys in turn)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long clients keep sending requests")
    parser.add_argument("--cooldown", type=float, default=20.0,
                        help="most seconds to keep sampling replicas after the load, until back at the minimum")
    parser.add_argument("--cpus", type=int, default=3,
                        help="ray.init(num_cpus=...): logical CPUs; every generator replica takes 1")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target-ongoing", type=float, default=1.0, help="autoscaling target_ongoing_requests")
    parser.add_argument("--upscale-delay", type=float, default=1.0, help="autoscaling upscale_delay_s")
    parser.add_argument("--downscale-delay", type=float, default=5.0, help="autoscaling downscale_delay_s")
    parser.add_argument("--metrics-interval", type=float, default=0.5, help="autoscaling metrics_interval_s")
    parser.add_argument("--look-back", type=float, default=2.0, help="autoscaling look_back_period_s")
    parser.add_argument("--max-batch-size", type=int, default=BatchOptions().max_batch_size,
                        help="same-shape requests in one pipeline call (user_config max_batch_size)")
    parser.add_argument("--batch-wait", type=float, default=BatchOptions().batch_wait_timeout_s,
                        help="seconds the first request of a batch waits for company (batch_wait_timeout_s)")
    parser.add_argument("--size", default="64x64", help="image WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--max-think-tokens", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="server-side request timeout (504 beyond it); the client waits 30 s longer")
    parser.add_argument("--model", default=str(MODEL), help="checkpoint path (the tiny fixture by default)")
    parser.add_argument("--no-keys", dest="keys", action="store_false",
                        help="serve without API keys (by default every client has its own)")
    args = parser.parse_args(argv)
    for name in ("clients", "cpus", "max_replicas", "max_batch_size", "steps", "rounds", "n", "max_think_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.min_replicas <= args.max_replicas:
        parser.error("need 0 <= --min-replicas <= --max-replicas")
    if args.seconds <= 0 or args.cooldown < 0 or args.batch_wait < 0:
        parser.error("--seconds must be > 0, --cooldown and --batch-wait >= 0")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    return args


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def running_replicas(deployment: str = "Generator") -> int | None:
    """RUNNING replicas of ``deployment`` in the benchmark's application (None if it is not there yet)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return None
    states = app.deployments[deployment].replica_states
    return sum(count for state, count in states.items() if getattr(state, "value", state) == "RUNNING")


class ReplicaSampler:
    """The generator's RUNNING replica count every ``interval`` seconds, as [[t, replicas], ...] from ``t0``."""

    def __init__(self, t0: float, interval: float = 0.5):
        self.t0, self.interval = t0, interval
        self.samples: list[tuple[float, int]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int | None:
        try:
            replicas = running_replicas()
        except Exception as e:  # noqa: BLE001 - a missed sample is counted, not fatal
            self.errors += 1
            log(f"replica sample failed: {type(e).__name__}: {e}")
            return None
        if replicas is not None:
            t = time.perf_counter() - self.t0
            if self.samples and replicas != self.samples[-1][1]:
                log(f"t={t:5.1f} s: Generator replicas {self.samples[-1][1]} -> {replicas}")
            self.samples.append((t, replicas))
        return replicas

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def current(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def timeline(self) -> list[list]:
        """Only the changes, plus the first and the last sample."""
        out: list[list] = []
        for i, (t, replicas) in enumerate(self.samples):
            if i == 0 or i == len(self.samples) - 1 or replicas != self.samples[i - 1][1]:
                out.append([round(t, 1), replicas])
        return out


def request_body(args: argparse.Namespace, index: int, i: int) -> dict:
    """Request ``i`` of client (or arrival) ``index``: its own prompt and seed."""
    return {"prompt": f"{PROMPTS[(index + i) % len(PROMPTS)]} #{index}.{i}", "n": args.n, "size": args.size,
            "steps": args.steps, "rounds": args.rounds, "seed": index * 1_000_000 + i,
            "max_think_tokens": args.max_think_tokens}


def send(session, url: str, body: dict, args: argparse.Namespace) -> tuple[float, str, str | None, float]:
    """POST one request: (latency_s, outcome ok/rejected/failed, detail, the 503's Retry-After)."""
    start = time.perf_counter()
    try:
        response = session.post(url, json=body, timeout=args.request_timeout + 30)
        latency = time.perf_counter() - start
        if response.status_code == 200:
            data = response.json()["data"]
            ok = len(data) == args.n and all(len(d["rounds"]) == args.rounds for d in data)
            return (latency, "ok", None, 0.0) if ok else (latency, "failed", "200 with an unexpected body", 0.0)
        if response.status_code == 503:
            return latency, "rejected", None, float(response.headers.get("retry-after", 1))
        return latency, "failed", f"HTTP {response.status_code}: {response.text[:200]}", 0.0
    except Exception as e:  # noqa: BLE001 - counted as a failure
        return time.perf_counter() - start, "failed", f"{type(e).__name__}: {e}", 0.0


def session_for(key: str | None):
    import requests

    session = requests.Session()
    if key is not None:
        session.headers["authorization"] = f"Bearer {key}"
    return session


def client(url: str, index: int, args: argparse.Namespace, deadline: float, t0: float, results: list,
           stop: threading.Event, key: str | None) -> None:
    """Send requests one after another until ``deadline`` (or ``stop``), with API key ``key`` if any; append
    (start_s, latency_s, outcome, detail)."""
    with session_for(key) as session:
        i = 0
        while time.perf_counter() < deadline and not stop.is_set():
            start = time.perf_counter()
            latency, outcome, detail, retry_after = send(session, url, request_body(args, index, i), args)
            results.append((start - t0, latency, outcome, detail))
            if outcome == "rejected":
                stop.wait(min(retry_after, max(0.0, deadline - time.perf_counter())))
            if detail:
                log(f"client {index}: {detail}")
                stop.wait(0.5)  # no busy loop against a server that is down
            i += 1


def arrival_times(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrivals: exponential gaps of mean 1/rate, from 0 up to ``seconds``."""
    rng, times, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        times.append(t)
    return times


def arrival(url: str, i: int, at: float, args: argparse.Namespace, t0: float, results: list,
            stop: threading.Event, key: str | None) -> None:
    """Arrival ``i``: wait until ``at`` s after ``t0``, send its one request, append its result."""
    if stop.wait(max(0.0, t0 + at - time.perf_counter())):
        return
    with session_for(key) as session:
        latency, outcome, detail, _ = send(session, url, request_body(args, i, 0), args)
    results.append((at, latency, outcome, detail))
    if detail:
        log(f"arrival {i}: {detail}")


def generator_stats(handle, calls: int) -> list[dict]:
    """Distinct ``stats()`` answers over ``calls`` calls: each call reaches one replica, chosen by Serve's router,
    so with several replicas up this usually sees each of them (equal answers of two replicas show as one)."""
    seen: list[dict] = []
    for _ in range(calls):
        stats = handle.stats.remote().result(timeout_s=60)
        if stats not in seen:
            seen.append(stats)
    return seen


def run_load(args: argparse.Namespace, url: str, sampler: ReplicaSampler, t0: float,
             keys: list[str | None]) -> tuple[list, float]:
    results: list = []
    deadline = t0 + args.seconds
    stop = threading.Event()
    if args.rate is None:
        threads = [threading.Thread(target=client, args=(url, i, args, deadline, t0, results, stop, keys[i]),
                                    daemon=True) for i in range(args.clients)]
    else:
        threads = [threading.Thread(target=arrival, args=(url, i, at, args, t0, results, stop, keys[i % len(keys)]),
                                    daemon=True)
                   for i, at in enumerate(arrival_times(args.rate, args.seconds, args.arrival_seed))]
    for t in threads:
        t.start()
    try:
        next_log = t0 + 5
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            if time.perf_counter() >= next_log:
                next_log += 5
                done = sum(1 for r in results if r[2] == "ok")
                log(f"t={time.perf_counter() - t0:5.1f} s: {done} ok, {len(results) - done} not ok, "
                    f"{sampler.current} Generator replica(s)")
    finally:
        stop.set()  # on error or Ctrl-C: clients send nothing more while Serve shuts down
    for t in threads:
        t.join()
    return results, time.perf_counter()


def main(args: argparse.Namespace, scheduler: str) -> dict:
    import ray
    from ray import serve

    from serve_apps.irg_app import CallGenerator, Generator, bind_app

    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": args.upscale_delay,
                   "downscale_delay_s": args.downscale_delay, "metrics_interval_s": args.metrics_interval,
                   "look_back_period_s": args.look_back}
    batching = BatchOptions(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait)
    port = free_port()
    started = time.perf_counter()
    keys: list[str | None] = [f"sk-bench-{i}-{secrets.token_hex(8)}" if args.keys else None
                              for i in range(args.clients)]
    if args.keys:  # before Ray starts, so that the replicas inherit it
        os.environ[KEYS_ENV] = ",".join(f"client{i}:{key}" for i, key in enumerate(keys))
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        log(f"Serve on 127.0.0.1:{port}; deploying the app with {args.model}, scheduler {scheduler} "
            f"(autoscaling {autoscaling})")
        app_args = AppArgs(model=args.model, device="cpu", request_timeout_s=args.request_timeout,
                           require_api_key=args.keys, api_keys_env=KEYS_ENV, scheduler=scheduler)
        if scheduler == "call":
            app = bind_app(app_args, autoscaling_config=autoscaling, user_config=batching.model_dump(),
                           max_ongoing_requests=max(CallGenerator.max_ongoing_requests, batching.max_batch_size))
        else:
            app = bind_app(app_args, autoscaling_config=autoscaling,
                           max_ongoing_requests=Generator.max_ongoing_requests)
        serve.run(app, name=APP, route_prefix="/")
        handle = serve.get_deployment_handle("Generator", app_name=APP)
        deploy_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/v1/images/generations"

        load = f"{args.clients} clients" if args.rate is None else f"Poisson arrivals at {args.rate:g}/s"
        log(f"deployed in {deploy_s:.1f} s; {load} for {args.seconds:g} s "
            f"({args.size}, {args.steps} steps, {args.rounds} rounds, {args.max_think_tokens} think tokens)")
        t0 = time.perf_counter()
        sampler = ReplicaSampler(t0)
        sampler.start()
        try:
            results, load_end = run_load(args, url, sampler, t0, keys)
            load_wall = load_end - t0
            replicas_at_load_end = sampler.current
            stats_at_load_end = generator_stats(handle, calls=4 * max(1, replicas_at_load_end or 1))
            log(f"load over after {load_wall:.1f} s with {replicas_at_load_end} Generator replica(s); "
                f"cooling down (up to {args.cooldown:g} s) until back at {args.min_replicas}")
            cooldown_deadline = load_end + args.cooldown
            back_at_min_s = None
            while time.perf_counter() < cooldown_deadline:
                time.sleep(0.5)
                if sampler.current is not None and sampler.current <= args.min_replicas:
                    back_at_min_s = time.perf_counter() - load_end
                    break
        finally:
            sampler.stop()
        stats_at_end = generator_stats(handle, calls=1)
    finally:
        log("shutting down Serve and Ray")
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()

    ok = [r for r in results if r[2] == "ok"]
    failed = [r for r in results if r[2] == "failed"]
    rejected = [r for r in results if r[2] == "rejected"]
    latencies = [r[1] for r in ok]
    replicas_seen = [replicas for _, replicas in sampler.samples]
    failure_kinds: dict[str, int] = {}
    for r in failed:
        kind = r[3].split(":")[0]
        failure_kinds[kind] = failure_kinds.get(kind, 0) + 1
    return {
        "scheduler": scheduler,
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.cpus, "platform": platform.platform()},
        "settings": {"load": "closed loop" if args.rate is None else f"Poisson {args.rate:g}/s",
                     "arrival_seed": args.arrival_seed, "clients": args.clients, "seconds": args.seconds,
                     "cooldown_s": args.cooldown,
                     "request": {"size": args.size, "n": args.n, "steps": args.steps, "rounds": args.rounds,
                                 "max_think_tokens": args.max_think_tokens},
                     "autoscaling": autoscaling,
                     "batching": batching.model_dump() if scheduler == "call" else "engine iterations",
                     "request_timeout_s": args.request_timeout, "model": args.model,
                     "api_keys": "one per client" if args.keys else "off"},
        "deploy_s": round(deploy_s, 2),
        "load_wall_s": round(load_wall, 2),
        "requests": {"sent": len(results), "completed": len(ok), "failed": len(failed), "rejected_503": len(rejected)},
        "failures": len(failed),
        "failure_kinds": failure_kinds,
        "rejected_503": len(rejected),
        "throughput": {"requests_per_s": round(len(ok) / load_wall, 3),
                       "images_per_s": round(len(ok) * args.n / load_wall, 3)},
        "latency_s": {q: (round(v, 3) if v is not None else None)
                      for q, v in (("mean", statistics.fmean(latencies) if latencies else None),
                                   ("p50", percentile(latencies, 50)), ("p90", percentile(latencies, 90)),
                                   ("p99", percentile(latencies, 99)), ("max", max(latencies, default=None)))},
        "replicas": {
            "timeline": sampler.timeline(),
            "max_seen": max(replicas_seen, default=None),
            "at_load_end": replicas_at_load_end,
            "at_end": sampler.current,
            "back_at_min_after_load_s": None if back_at_min_s is None else round(back_at_min_s, 1),
            "sample_errors": sampler.errors,
        },
        "generator_stats": {
            "largest_batch": max((s["largest_batch"] for s in stats_at_load_end + stats_at_end), default=None),
            "at_load_end": stats_at_load_end,
            "at_end": stats_at_end[0] if stats_at_end else None,
        },
        "total_wall_s": round(time.perf_counter() - started, 1),
    }


def compare(call: dict, engine: dict) -> dict:
    """How the engine's latency and throughput compare with one call at a time on the same load."""
    def lower_by(key: str) -> float | None:
        before, after = call["latency_s"][key], engine["latency_s"][key]
        return None if not before or after is None else round(1 - after / before, 3)

    rates = call["throughput"]["requests_per_s"], engine["throughput"]["requests_per_s"]
    return {"p99_latency_lower_by": lower_by("p99"), "mean_latency_lower_by": lower_by("mean"),
            "throughput_requests_per_s": {"call": rates[0], "engine": rates[1]},
            "throughput_ratio": round(rates[1] / rates[0], 3) if rates[0] else None,
            "completed": {"call": call["requests"]["completed"], "engine": engine["requests"]["completed"]}}


if __name__ == "__main__":
    arguments = parse_args()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON
            if arguments.scheduler == "both":
                runs = {name: main(arguments, name) for name in ("call", "engine")}
                report = {**runs, "comparison": compare(runs["call"], runs["engine"])}
            else:
                report = main(arguments, arguments.scheduler)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    print(json.dumps(report, indent=2))
