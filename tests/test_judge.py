"""The judge client and the WISE scorer against a scripted OpenAI-compatible server on 127.0.0.1.

The server records every request (path, headers, body, arrival time) and answers from a queue of
scripted replies, else from a function of the request, so each test controls what the judge says.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from irg.eval.benchmarks import EvalPrompt
from irg.eval.judge import JudgeClient, JudgeError, cache_key, retry_delay
from irg.eval.wise import WiseScorer

MODEL = "judge-vl"
GOOD = "Consistency: 2\nRealism: 1\nAesthetic Quality: 0"  # WiScore (1.4 + 0.2 + 0) / 2 = 0.8


@dataclass
class Reply:
    status: int = 200
    body: dict | str = ""
    headers: dict = field(default_factory=dict)


def ok(text: str) -> Reply:
    return Reply(200, {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


def error(status: int, message: str, headers: dict | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "error", "code": status}}, headers or {})


class FakeJudge:
    """A chat-completions server: ``script`` replies first, then ``answer(body)``, after ``delay(body)`` seconds."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: queue.Queue[Reply] = queue.Queue()
        self.answer: Callable[[dict], Reply] = lambda body: ok(GOOD)
        self.delay: Callable[[dict], float] = lambda body: 0.0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def say(self, *replies: Reply) -> None:
        for reply in replies:
            self.script.put(reply)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "time": time.monotonic()})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    time.sleep(fake.delay(body))
                    try:
                        reply = fake.script.get_nowait()
                    except queue.Empty:
                        reply = fake.answer(body)
                    data = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
                    self.send_response(reply.status)
                    for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def log_message(self, *args):
                pass

        return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out and hung up is expected in these tests


def item(i: int, color: tuple[int, int, int] = (0, 0, 0), category: str = "Biology") -> tuple[EvalPrompt, Image.Image]:
    prompt = EvalPrompt(f"{i:05d}", f"prompt {i}", category,
                        {"Prompt": f"prompt {i}", "Explanation": f"explanation {i}", "Category": category})
    return prompt, Image.new("RGB", (32, 32), color)


def client(fake: FakeJudge, **kwargs) -> JudgeClient:
    return JudgeClient(fake.base_url, MODEL, **{"backoff_s": 0.01, **kwargs})


def chat(text: str = "hello") -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_in(body: dict) -> str:
    return re.search(r'PROMPT: "([^"]*)"', body["messages"][1]["content"][0]["text"]).group(1)


# --- the request ----------------------------------------------------------------------------------


def test_request_format_and_the_image_it_carries(fake):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    prompt = item(7)[0]
    judge = client(fake, api_key="sk-test", temperature=0.0, max_tokens=64)

    [verdict] = WiseScorer(judge).score([(prompt, image)])

    assert verdict.score == 0.8
    assert verdict.details == {"consistency": 2, "realism": 1, "aesthetic_quality": 0, "judge": GOOD}
    [request] = fake.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == (MODEL, 0.0, 64)
    system, user = body["messages"]
    assert (system["role"], user["role"]) == ("system", "user")
    text, image_part = user["content"]
    assert 'PROMPT: "prompt 7"' in text["text"] and 'EXPLANATION: "explanation 7"' in text["text"]
    header, data = image_part["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    sent = Image.open(io.BytesIO(base64.b64decode(data)))
    assert sent.format == "PNG" and sent.size == (32, 32)
    assert np.array_equal(np.asarray(sent.convert("RGB")), pixels)


def test_no_key_sends_no_authorization_header(fake):
    assert client(fake).complete(chat()) == GOOD
    assert "Authorization" not in fake.requests[0]["headers"]


# --- retries and errors ---------------------------------------------------------------------------


def test_retry_delay_backs_off_exponentially_and_honours_retry_after():
    assert retry_delay(0, None, 1.0) == 1.0
    assert retry_delay(3, None, 1.0) == 8.0
    assert retry_delay(10, None, 1.0) == 60.0  # 1024 s, capped
    assert retry_delay(3, "0", 1.0) == 0.0
    assert retry_delay(0, "7", 1.0) == 7.0
    assert retry_delay(2, "Wed, 21 Oct 2015 07:28:00 GMT", 0.5) == 2.0  # a date: back off as usual


def test_429_with_retry_after_is_retried(fake):
    fake.say(error(429, "slow down", {"Retry-After": "0"}), ok("fine"))
    judge = client(fake, backoff_s=30.0)  # Retry-After: 0 overrides the 30 s backoff
    assert judge.complete(chat()) == "fine"
    assert judge.stats == {"requests": 2, "cache_hits": 0, "retries": 1}
    assert len(fake.requests) == 2


def test_500_is_retried(fake):
    fake.say(error(500, "boom"), ok("fine"))
    judge = client(fake)
    assert judge.complete(chat()) == "fine"
    assert (judge.stats["requests"], judge.stats["retries"]) == (2, 1)


def test_timeout_is_retried(fake):
    fake.delay = lambda body: 0.5 if len(fake.requests) == 1 else 0.0
    judge = client(fake, timeout_s=0.2)
    assert judge.complete(chat()) == GOOD
    assert (judge.stats["requests"], judge.stats["retries"]) == (2, 1)


def test_401_fails_at_once_and_names_the_key(fake):
    fake.say(error(401, "Incorrect API key provided"))
    judge = client(fake, api_key="sk-wrong")
    with pytest.raises(JudgeError) as raised:
        judge.complete(chat())
    message = str(raised.value)
    assert fake.base_url + "/chat/completions" in message
    assert "HTTP 401: Incorrect API key provided" in message and "check the API key" in message
    assert len(fake.requests) == 1 and judge.stats["retries"] == 0


def test_404_fails_at_once_and_names_the_model(fake):
    fake.say(Reply(404, {"object": "error", "message": "The model `judge-vl` does not exist."}))
    with pytest.raises(JudgeError, match="HTTP 404: The model `judge-vl` does not exist.*check base_url.*'judge-vl'"):
        client(fake).complete(chat())
    assert len(fake.requests) == 1


def test_exhausted_retries_name_the_attempts_and_the_last_error(fake):
    fake.answer = lambda body: error(503, "overloaded")
    judge = client(fake, max_retries=2)
    with pytest.raises(JudgeError, match="no answer after 3 attempts; last error: HTTP 503: overloaded"):
        judge.complete(chat())
    assert len(fake.requests) == 3 and judge.stats == {"requests": 3, "cache_hits": 0, "retries": 2}


def test_connection_refused_is_retried_then_reported():
    judge = JudgeClient(f"http://127.0.0.1:{free_port()}/v1", MODEL, max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match="no answer after 2 attempts; last error: ConnectionError"):
        judge.complete(chat())
    assert judge.stats["requests"] == 2


def test_a_url_without_scheme_is_refused_up_front():
    with pytest.raises(ValueError, match="base_url: must start with http:// or https://"):
        JudgeClient("127.0.0.1:8000/v1", MODEL)


def test_a_url_without_a_host_is_an_error():
    with pytest.raises(JudgeError, match="cannot send the request \\(InvalidURL: .*No host supplied"):
        JudgeClient("http:///v1", MODEL).complete(chat())


def test_a_key_with_a_newline_is_refused_without_quoting_it():
    with pytest.raises(ValueError, match="api_key: has surrounding whitespace") as raised:
        JudgeClient("http://127.0.0.1:8000/v1", MODEL, api_key="sk-secret\n")
    assert "sk-secret" not in str(raised.value)


@pytest.mark.parametrize("reply, problem", [
    (Reply(200, {"id": "x", "choices": []}), "no choices"),
    (Reply(200, {"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "length"}]}),
     "no message content \\(finish_reason 'length'\\)"),
    (Reply(200, "<html>proxy error</html>"), "not JSON"),
])
def test_a_reply_without_content_is_an_error(fake, reply, problem):
    fake.say(reply)
    with pytest.raises(JudgeError, match=problem):
        client(fake).complete(chat())
    assert len(fake.requests) == 1


def test_a_broken_endpoint_stops_scoring(fake):
    fake.answer = lambda body: error(401, "bad key")
    with pytest.raises(JudgeError, match="check the API key"):
        WiseScorer(client(fake, max_concurrency=1)).score([item(i) for i in range(20)])
    assert len(fake.requests) < 20  # the queued items were dropped, not all sent to the broken endpoint


# --- unreadable verdicts --------------------------------------------------------------------------


def test_an_unreadable_verdict_is_asked_again(fake):
    fake.say(ok("A lovely picture of a cat."), ok(GOOD))
    [verdict] = WiseScorer(client(fake)).score([item(0)])
    assert verdict.score == 0.8 and verdict.details["judge"] == GOOD
    assert len(fake.requests) == 2
    retry = fake.requests[1]["body"]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == "A lovely picture of a cat."
    assert "Consistency: N" in retry[3]["content"]


def test_an_always_unreadable_verdict_scores_zero_with_the_error(fake):
    fake.answer = lambda body: ok("I cannot judge this.")
    [verdict] = WiseScorer(client(fake), parse_retries=2).score([item(0)])
    assert verdict.score == 0.0
    assert "no Consistency, Realism, Aesthetic Quality mark" in verdict.details["parse_error"]
    assert verdict.details["judge"] == "I cannot judge this."
    assert len(fake.requests) == 3  # the first ask and two retries


# --- the cache ------------------------------------------------------------------------------------


def test_cached_verdicts_need_no_requests(fake, tmp_path):
    items = [item(0, (255, 0, 0)), item(1, (0, 255, 0)), item(2, (0, 0, 255))]
    first = WiseScorer(client(fake, cache_dir=str(tmp_path))).score(items)
    assert len(fake.requests) == 3

    files = sorted(tmp_path.glob("*/*.json"))
    assert len(files) == 3 and all(f.stem[:2] == f.parent.name for f in files)
    assert {f.stem for f in files} == {cache_key(r["body"]) for r in fake.requests}
    entry = json.loads(files[0].read_text())
    assert entry["response"] == GOOD and entry["request"]["model"] == MODEL
    assert "base64" not in files[0].read_text()  # the image is summarised by its hash

    # Another client on the same cache, even one pointing at no server, answers from the cache.
    offline = JudgeClient(f"http://127.0.0.1:{free_port()}/v1", MODEL, cache_dir=str(tmp_path), max_retries=0)
    again = WiseScorer(offline).score(items)
    assert again == first
    assert offline.stats == {"requests": 0, "cache_hits": 3, "retries": 0}
    assert len(fake.requests) == 3


def test_failed_requests_are_not_cached(fake, tmp_path):
    fake.say(error(400, "bad request"))
    judge = client(fake, cache_dir=str(tmp_path))
    with pytest.raises(JudgeError, match="HTTP 400: bad request"):
        judge.complete(chat())
    assert not list(tmp_path.rglob("*.json"))
    assert judge.complete(chat()) == GOOD
    assert len(list(tmp_path.rglob("*.json"))) == 1


@pytest.mark.integration
def test_cache_in_object_storage(fake, s3_env):
    cache = f"s3://{s3_env.bucket}/judge-cache"
    first = client(fake, cache_dir=cache).complete(chat("in s3"))
    again = client(fake, cache_dir=cache)
    assert again.complete(chat("in s3")) == first == GOOD
    assert again.stats["cache_hits"] == 1 and len(fake.requests) == 1


# --- concurrency and rate -------------------------------------------------------------------------


def test_scores_come_back_in_input_order(fake):
    marks = {"prompt 0": "Consistency: 2\nRealism: 2\nAesthetic Quality: 2",  # 1.0
             "prompt 1": "Consistency: 1\nRealism: 0\nAesthetic Quality: 0",  # 0.7 / 2 = 0.35
             "prompt 2": "Consistency: 0\nRealism: 0\nAesthetic Quality: 2"}  # 0.2 / 2 = 0.1
    fake.answer = lambda body: ok(marks[prompt_in(body)])
    # The first item answers last.
    fake.delay = lambda body: {"prompt 0": 0.3, "prompt 1": 0.2, "prompt 2": 0.1}[prompt_in(body)]
    verdicts = WiseScorer(client(fake, max_concurrency=3)).score([item(0), item(1), item(2)])
    assert [v.score for v in verdicts] == [1.0, 0.35, 0.1]
    assert fake.max_in_flight == 3


def test_no_more_than_max_concurrency_requests_in_flight(fake):
    fake.delay = lambda body: 0.05
    judge = client(fake, max_concurrency=2)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(judge.complete, [chat(f"q{i}") for i in range(6)]))
    assert len(fake.requests) == 6 and fake.max_in_flight == 2


def test_requests_per_minute_spaces_requests(fake):
    judge = client(fake, requests_per_minute=600, max_concurrency=5)  # one request per 0.1 s
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(judge.complete, [chat(f"q{i}") for i in range(5)]))
    arrivals = sorted(r["time"] for r in fake.requests)
    gaps = np.diff(arrivals)
    assert len(arrivals) == 5 and gaps.min() >= 0.09, gaps


# --- inside an evaluation -------------------------------------------------------------------------


def test_an_evaluation_scores_its_stored_rounds_with_the_judge(fake, tmp_path, monkeypatch):
    """The scoring actor of jobs/evaluate.py: the judge built from the job's settings (key from the
    named variable), each stored round sent as it was saved, verdicts cached under the output."""
    from irg.eval.run import ImageScorer
    from irg.eval.scorer_settings import ScorerSettings

    monkeypatch.setenv("LAB_JUDGE_KEY", "sk-lab")
    prompt, _ = item(3)
    colors = [(200, 20, 20), (20, 20, 200)]
    folder = tmp_path / "samples" / prompt.id / "0"
    folder.mkdir(parents=True)
    for r, color in enumerate(colors):
        Image.new("RGB", (32, 32), color).save(folder / f"round{r + 1}.png")
    fake.answer = lambda body: ok(GOOD if prompt_in(body) == "prompt 3" else "?")
    spec = ScorerSettings("wise", judge_url=fake.base_url, judge_model=MODEL, judge_api_key_env="LAB_JUDGE_KEY")
    spec.check()
    scorer = ImageScorer(spec, str(tmp_path), [prompt], cache=str(tmp_path / "judge-cache"))

    out = scorer({"prompt_id": np.array([prompt.id] * 2), "sample": np.array([0, 0]), "round": np.array([0, 1])})

    assert out["round"] == [1, 2] and out["score"] == [0.8, 0.8]
    assert [json.loads(d)["consistency"] for d in out["details"]] == [2, 2]
    assert [r["headers"]["Authorization"] for r in fake.requests] == ["Bearer sk-lab"] * 2
    sent = sorted(np.asarray(Image.open(io.BytesIO(base64.b64decode(
        r["body"]["messages"][1]["content"][1]["image_url"]["url"].split(",", 1)[1])))).reshape(-1, 3)[0].tolist()
        for r in fake.requests)
    assert sent == sorted(list(c) for c in colors)
    assert len(list((tmp_path / "judge-cache").rglob("*.json"))) == 2
