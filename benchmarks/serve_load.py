"""Load on the IRG Serve application with the tiny model: latency, throughput, 503s and autoscaling.

Prints one JSON object to stdout (progress goes to stderr). Starts a local Ray and Serve on
127.0.0.1 (a free port), deploys ``serve_apps.irg_app``'s ``Ingress`` in front of its ``Generator``
with the tiny checkpoint on CPU, and with a faster autoscaling config than the app's default (so
that a short run shows the generator scaling up and back down) and the batching of
``--max-batch-size`` / ``--batch-wait`` (the Generator's ``user_config``). ``--clients`` threads then loop
``POST /v1/images/generations`` for ``--seconds``, while the generator's RUNNING replicas are
sampled every 0.5 s, during the load and for up to ``--cooldown`` seconds after it, until they are
back at the minimum. Serve and Ray are shut down at the end, also on error or Ctrl-C.

API keys are on, as on a cluster: every client sends its own key (``Authorization: Bearer``, from
``$IRG_BENCH_API_KEYS``, which the replicas inherit), so the per-key concurrency is the app's default;
``--no-keys`` turns them off. A 503 (every replica busy and the queue full) counts as
``rejected_503``; any other non-200 (a 401 or a 429 included) or a client-side exception counts as a
failure, and a healthy run has none.

    PYTHONPATH=. python benchmarks/serve_load.py                              # defaults: ~1.5 min on 2 cores
    PYTHONPATH=. python benchmarks/serve_load.py --clients 16 --seconds 60 --max-replicas 3 --cpus 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
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
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each one request at a time")
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


def client(url: str, index: int, args: argparse.Namespace, deadline: float, t0: float, results: list,
           stop: threading.Event, key: str | None) -> None:
    """Send requests one after another until ``deadline`` (or ``stop``), with API key ``key`` if any; append
    (start_s, latency_s, outcome, detail)."""
    import requests

    with requests.Session() as session:
        if key is not None:
            session.headers["authorization"] = f"Bearer {key}"
        i = 0
        while time.perf_counter() < deadline and not stop.is_set():
            body = {"prompt": f"{PROMPTS[(index + i) % len(PROMPTS)]} #{index}.{i}", "n": args.n,
                    "size": args.size, "steps": args.steps, "rounds": args.rounds,
                    "seed": index * 1_000_000 + i, "max_think_tokens": args.max_think_tokens}
            start = time.perf_counter()
            try:
                response = session.post(url, json=body, timeout=args.request_timeout + 30)
                latency = time.perf_counter() - start
                if response.status_code == 200:
                    data = response.json()["data"]
                    ok = len(data) == args.n and all(len(d["rounds"]) == args.rounds for d in data)
                    outcome, detail = ("ok", None) if ok else ("failed", "200 with an unexpected body")
                elif response.status_code == 503:
                    outcome, detail = "rejected", None
                    retry_after = float(response.headers.get("retry-after", 1))
                    stop.wait(min(retry_after, max(0.0, deadline - time.perf_counter())))
                else:
                    outcome, detail = "failed", f"HTTP {response.status_code}: {response.text[:200]}"
            except Exception as e:  # noqa: BLE001 - counted as a failure
                latency = time.perf_counter() - start
                outcome, detail = "failed", f"{type(e).__name__}: {e}"
            results.append((start - t0, latency, outcome, detail))
            if detail:
                log(f"client {index}: {detail}")
                stop.wait(0.5)  # no busy loop against a server that is down
            i += 1


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
    threads = [threading.Thread(target=client, args=(url, i, args, deadline, t0, results, stop, keys[i]),
                                daemon=True) for i in range(args.clients)]
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


def main(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from serve_apps.irg_app import Generator, bind_app

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
        log(f"Serve on 127.0.0.1:{port}; deploying the app with {args.model} (autoscaling {autoscaling})")
        app = bind_app(AppArgs(model=args.model, device="cpu", request_timeout_s=args.request_timeout,
                               require_api_key=args.keys, api_keys_env=KEYS_ENV),
                       autoscaling_config=autoscaling, user_config=batching.model_dump(),
                       max_ongoing_requests=max(Generator.max_ongoing_requests, batching.max_batch_size))
        serve.run(app, name=APP, route_prefix="/")
        handle = serve.get_deployment_handle("Generator", app_name=APP)
        deploy_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/v1/images/generations"

        log(f"deployed in {deploy_s:.1f} s; {args.clients} clients for {args.seconds:g} s "
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
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.cpus, "platform": platform.platform()},
        "settings": {"clients": args.clients, "seconds": args.seconds, "cooldown_s": args.cooldown,
                     "request": {"size": args.size, "n": args.n, "steps": args.steps, "rounds": args.rounds,
                                 "max_think_tokens": args.max_think_tokens},
                     "autoscaling": autoscaling, "batching": batching.model_dump(),
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
                      for q, v in (("p50", percentile(latencies, 50)), ("p90", percentile(latencies, 90)),
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


if __name__ == "__main__":
    arguments = parse_args()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON
            report = main(arguments)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    print(json.dumps(report, indent=2))
