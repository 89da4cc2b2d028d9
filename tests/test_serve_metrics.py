"""The service's metrics on Ray's Prometheus endpoint, scraped after real requests to a local Serve app
that requires keys and lets a key run one request at a time, and the Grafana dashboard that reads them
(every series it asks for is one Ray exports)."""

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
KEYS_ENV = "IRG_TEST_METRICS_KEYS"
KEY = "sk-test-metrics"
AUTH = {"authorization": f"Bearer {KEY}"}
METRICS_PORT = free_port()
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@pytest.fixture(scope="module")
def serve_url():  # this module's Ray exports its metrics on a known port, every half second
    init = {"_metrics_export_port": METRICS_PORT, "_system_config": {"metrics_report_interval_ms": 500}}
    with serving({KEYS_ENV: f"tester:{KEY}"}, ray_init=init, require_api_key=True, api_keys_env=KEYS_ENV,
                 max_concurrent_per_key=1) as url:
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


def client(url, key):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_a_key_over_its_concurrency_gets_a_429_until_its_request_ends(serve_url):
    import openai

    long = {"prompt": "many shapes", "size": "256x256", "steps": 200, "rounds": 4, "max_think_tokens": 8}
    with requests.post(f"{serve_url}/v1/images/generations/stream", json=long, headers=AUTH, stream=True,
                       timeout=120) as running:
        assert running.status_code == 200
        lines = running.iter_lines(decode_unicode=True)  # kept: a dropped iterator closes the connection
        assert "event: step" in lines  # reads up to the first step: the generation is under way
        with pytest.raises(openai.RateLimitError) as info:  # the same key while its stream runs
            client(serve_url, KEY).images.generate(prompt="a red cube", size="64x64", extra_body=SMALL)
        assert (info.value.status_code, info.value.code) == (429, "rate_limit_exceeded")
        assert "max_concurrent_per_key is 1" in info.value.message
        assert info.value.response.headers["retry-after"]
    # The stream is closed: its slot is free again (its generation stops at the next step).
    deadline = time.monotonic() + 30
    while True:
        try:
            assert client(serve_url, KEY).images.generate(prompt="a red cube", size="64x64", extra_body=SMALL).data
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed stream kept its key's slot"
            time.sleep(0.5)


def test_requests_show_up_on_ray_s_prometheus_endpoint_and_the_dashboard_reads_them(serve_url):
    ok = requests.post(f"{serve_url}/v1/images/generations", json={"prompt": "a red cube", **SMALL}, headers=AUTH,
                       timeout=120)
    assert ok.status_code == 200
    with requests.post(f"{serve_url}/v1/images/generations/stream", json={"prompt": "a ball", **SMALL}, headers=AUTH,
                       stream=True, timeout=120) as stream:
        assert stream.status_code == 200 and stream.content  # read to its end
    assert requests.post(f"{serve_url}/v1/images/generations", json={"prompt": "a", "steps": 1}, headers=AUTH,
                         timeout=60).status_code == 400
    assert requests.get(f"{serve_url}/v1/models", timeout=30).status_code == 401

    expected = {  # what these three requests must have counted, at least
        ("ray_irg_requests_total", (("route", "/v1/images/generations"), ("status", "200"))): 1,
        ("ray_irg_requests_total", (("route", "/v1/images/generations"), ("status", "400"))): 1,
        ("ray_irg_requests_total", (("route", "/v1/images/generations/stream"), ("status", "200"))): 1,
        ("ray_irg_requests_total", (("route", "/v1/models"), ("status", "401"))): 1,
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
