"""The service's metrics on Ray's Prometheus endpoint, scraped after real requests to a local Serve app,
and the Grafana dashboard that reads them (every series it asks for is one Ray exports)."""

import json
import re
import time

import pytest
import requests
from conftest import REPO, serving

from irg.embedded_store import free_port

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "infra" / "grafana" / "irg-serve.json"
SMALL = {"size": "64x64", "steps": 4, "rounds": 2, "max_think_tokens": 8, "seed": 7}
METRICS_PORT = free_port()
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture(scope="module")
def serve_url():  # this module's Ray exports its metrics on a known port, every half second
    init = {"_metrics_export_port": METRICS_PORT, "_system_config": {"metrics_report_interval_ms": 500}}
    with serving(ray_init=init) as url:
        yield url


def scrape() -> list[tuple[str, dict, float]]:
    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(value for n, have, value in samples if n == name and labels.items() <= have.items())


def test_requests_show_up_on_ray_s_prometheus_endpoint_and_the_dashboard_reads_them(serve_url):
    ok = requests.post(f"{serve_url}/v1/images/generations", json={"prompt": "a red cube", **SMALL}, timeout=120)
    assert ok.status_code == 200
    with requests.post(f"{serve_url}/v1/images/generations/stream", json={"prompt": "a ball", **SMALL}, stream=True,
                       timeout=120) as stream:
        assert stream.status_code == 200 and stream.content  # read to its end
    assert requests.post(f"{serve_url}/v1/images/generations", json={"prompt": "a", "steps": 1},
                         timeout=60).status_code == 400

    expected = {  # what these three requests must have counted, at least
        ("ray_irg_requests_total", (("route", "/v1/images/generations"), ("status", "200"))): 1,
        ("ray_irg_requests_total", (("route", "/v1/images/generations"), ("status", "400"))): 1,
        ("ray_irg_requests_total", (("route", "/v1/images/generations/stream"), ("status", "200"))): 1,
        ("ray_irg_batch_size_count", ()): 2,
        ("ray_irg_think_tokens_total", ()): 2,  # a think and a reflection at least
        ("ray_irg_think_tokens_per_second_count", ()): 4,  # two think phases per request
        ("ray_irg_denoise_step_seconds_count", ()): 4,  # steps 2 and 3 of each of four rounds
        ("ray_irg_time_to_first_image_seconds_count", ()): 2,
    }
    deadline = time.monotonic() + 60
    while True:
        samples = scrape()
        missing = {key: total(samples, key[0], **dict(key[1])) for key, least in expected.items()
                   if total(samples, key[0], **dict(key[1])) < least}
        if not missing:
            break
        assert time.monotonic() < deadline, f"not (yet) on the endpoint: {missing}"
        time.sleep(1)

    generator = {"deployment": "Generator", "application": "irg"}
    assert total(samples, "ray_irg_batch_size_count", **generator) >= 2  # tagged with the replica's deployment
    assert [v for n, _, v in samples if n == "ray_irg_queue_depth"] == [0.0]  # nothing waits any more
    assert 0 < total(samples, "ray_irg_denoise_step_seconds_sum") < 60
    first_image = total(samples, "ray_irg_time_to_first_image_seconds_sum") / total(
        samples, "ray_irg_time_to_first_image_seconds_count")
    assert 0 < first_image < 60

    exported = {name for name, _, _ in samples}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    asked = {name for expr in exprs for name in re.findall(r"\b(ray_\w+)", expr)}
    assert {"ray_irg_requests_total", "ray_irg_queue_depth", "ray_irg_batch_size_bucket",
            "ray_irg_think_tokens_total", "ray_irg_denoise_step_seconds_bucket",
            "ray_irg_time_to_first_image_seconds_bucket"} <= asked
    assert asked <= exported, f"the dashboard reads series Ray does not export: {sorted(asked - exported)}"
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
