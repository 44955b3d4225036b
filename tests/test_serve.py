"""``adaptune serve``: concurrent clients of several tasks, hot load and unload, every bad request,
a full queue, timeouts, SIGTERM. Loopback only; every loop is bounded."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import uvicorn
from conftest import write_reviews_csv
from test_predict import _train

from adaptune.predict import Predictor
from adaptune.serve import Engine, Limits, create_app
from adaptune.serve.engine import _Job

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """An adapter root with three runs on one tiny base: 2 labels, 3 labels (Pfeiffer), regression."""
    tmp = tmp_path_factory.mktemp("serve-runs")
    _train(tiny_model_dir, write_reviews_csv(tmp / "two.csv", n=40), tmp / "two", "--max-length", "16")
    _train(
        tiny_model_dir, write_reviews_csv(tmp / "three.csv", n=60, classes=3), tmp / "three", "--adapter", "pfeiffer"
    )
    reg = tmp / "reg.csv"
    reg.write_text("review,score\n" + "".join(f"coffee number {i},{i / 10}\n" for i in range(30)))
    _train(tiny_model_dir, reg, tmp / "reg", "--task-type", "regression")
    (tmp / "not-a-run").mkdir()
    return tmp


class Live:
    """A server on a free loopback port, in a thread of this process."""

    def __init__(self, engine: Engine, **app_kw) -> None:
        self.engine = engine
        self.port = _free_port()
        config = uvicorn.Config(create_app(engine, **app_kw), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def call(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        kind = resp.getheader("content-type", "")
        return resp.status, (json.loads(payload) if "json" in kind else payload.decode()), dict(resp.getheaders())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(root):
    engine = Engine(
        {"two": root / "two", "three": root / "three", "reg": root / "reg"},
        device="cpu",
        max_batch_size=16,
        max_wait_ms=20,
    )
    server = Live(engine, token=TOKEN, adapter_root=root, limits=Limits(max_body_bytes=4096, max_inputs=8))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(root):
    return {name: Predictor(root / name, device="cpu") for name in ("two", "three", "reg")}


def _same(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert got["text"] == want["text"]
        if "score" in want:
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        else:
            assert got["label"] == want["label"]
            for label, p in want["probabilities"].items():
                assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)


TEXTS = ["this coffee is great and tasty", "stale bland and soggy, a long review past eight tokens", "okay", "lovely"]


def test_concurrent_clients_of_several_tasks_get_offline_predictions(live, offline):
    """24 requests of 3 tasks from 8 threads: each answer equals that run's own Predictor (labels,
    and scores within 1e-5), and the batcher did put several requests in one forward pass."""
    jobs = [(("two", "three", "reg")[i % 3], TEXTS[: 1 + i % 4]) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda job: live.call("POST", "/v1/predict", {"task": job[0], "inputs": job[1]}), jobs)
        )
    for (task, texts), (status, body, _) in zip(jobs, answers):
        assert status == 200, body
        assert body["task"] == task and all(row["task"] == task for row in body["outputs"])
        _same(body["outputs"], offline[task].predict(texts))
    status, text, headers = live.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    batches = float(_metric(text, "adaptune_batch_rows_count"))
    rows = float(_metric(text, "adaptune_batch_rows_sum"))
    assert rows / batches > 1.5  # requests were batched together
    assert float(_metric(text, 'adaptune_requests_total{endpoint="/v1/predict",status="200",task="reg"}')) >= 8


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name))


def test_tasks_health_page(live):
    status, body, _ = live.call("GET", "/v1/tasks")
    assert status == 200 and body["kind"] == "predict" and len(body["base"]["fingerprint"]) == 16
    assert body["tasks"]["three"]["labels"] == ["bad", "good", "meh"]
    assert body["tasks"]["reg"]["task_type"] == "regression" and body["tasks"]["two"]["adapter"]["size"] == 64
    assert live.call("GET", "/healthz")[:2] == (200, {"status": "ok", "tasks": 3, "queue": 0})
    status, page, headers = live.call("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "/v1/predict" in page


def test_hot_load_and_unload_while_requests_are_in_flight(live, root, offline):
    """A client keeps asking task 'two' while another loads a copy of 'three' under a new name, uses
    it and unloads it: no request of 'two' fails or changes its answer."""
    stop, answers = threading.Event(), []

    def keep_asking():
        for _ in range(200):
            if stop.is_set():
                return
            answers.append(live.call("POST", "/v1/predict", {"task": "two", "inputs": TEXTS[:2]}))

    auth = {"Authorization": f"Bearer {TOKEN}"}
    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        for _ in range(3):
            status, body, _ = live.call("POST", "/v1/adapters", {"path": "three", "name": "extra"}, auth)
            assert status == 201, body
            status, body, _ = live.call("POST", "/v1/predict", {"task": "extra", "inputs": TEXTS})
            assert status == 200
            _same(body["outputs"], offline["three"].predict(TEXTS))
            assert live.call("DELETE", "/v1/adapters/extra", headers=auth)[:2] == (200, {"unloaded": "extra"})
            assert live.call("POST", "/v1/predict", {"task": "extra", "inputs": ["x"]})[0] == 404
    finally:
        stop.set()
        worker.join(60)
    assert answers and all(status == 200 for status, _, _ in answers)
    expected = offline["two"].predict(TEXTS[:2])
    for _, body, _ in answers:
        _same(body["outputs"], expected)


AUTH = "auth"  # the right token
GEN = {"task": "two", "prompt": "hi"}
BAD = {
    "malformed JSON": ("POST", "/v1/predict", None, b'{"task": "two", "inputs": [', {}, 400, "not valid JSON"),
    "not an object": ("POST", "/v1/predict", [1, 2], None, {}, 400, "JSON object"),
    "unknown task": ("POST", "/v1/predict", {"task": "nine", "inputs": ["x"]}, None, {}, 404, "unknown task 'nine'"),
    "task not a text": ("POST", "/v1/predict", {"task": 3, "inputs": ["x"]}, None, {}, 422, '"task"'),
    "inputs not a list": ("POST", "/v1/predict", {"task": "two", "inputs": "x"}, None, {}, 422, '"inputs"'),
    "input not a text": ("POST", "/v1/predict", {"task": "two", "inputs": ["ok", 5]}, None, {}, 422, "inputs[1]"),
    "input of 3 texts": (
        "POST",
        "/v1/predict",
        {"task": "two", "inputs": [["a", "b", "c"]]},
        None,
        {},
        422,
        "inputs[0]",
    ),
    "empty inputs": ("POST", "/v1/predict", {"task": "two", "inputs": []}, None, {}, 422, "non-empty"),
    "too many inputs": ("POST", "/v1/predict", {"task": "two", "inputs": ["x"] * 9}, None, {}, 413, "limit of 8"),
    "oversize body": ("POST", "/v1/predict", {"task": "two", "inputs": ["x" * 5000]}, None, {}, 413, "4096"),
    "generate on a classifier": (
        "POST",
        "/v1/generate",
        {"task": "two", "prompt": "hi"},
        None,
        {},
        400,
        "/v1/predict",
    ),
    "no such endpoint": ("GET", "/v2/nothing", None, None, {}, 404, "no such endpoint"),
    "wrong method": ("GET", "/v1/predict", None, None, {}, 405, "not allowed"),
    "missing token": ("POST", "/v1/adapters", {"path": "three"}, None, {}, 401, "Bearer"),
    "wrong token": ("POST", "/v1/adapters", {"path": "three"}, None, {"Authorization": "Bearer no"}, 401, "Bearer"),
    "unload without token": ("DELETE", "/v1/adapters/two", None, None, {}, 401, "Bearer"),
    "path outside the root": (
        "POST",
        "/v1/adapters",
        {"path": "../.."},
        None,
        "auth",
        403,
        "outside the adapter root",
    ),
    "absolute path outside": ("POST", "/v1/adapters", {"path": "/etc"}, None, "auth", 403, "outside the adapter root"),
    "no such folder": ("POST", "/v1/adapters", {"path": "nine"}, None, "auth", 404, "no folder nine"),
    "name clash": ("POST", "/v1/adapters", {"path": "three", "name": "two"}, None, "auth", 409, "already served"),
    "not a run": ("POST", "/v1/adapters", {"path": "not-a-run"}, None, "auth", 422, "not a finished run"),
    "bad name": ("POST", "/v1/adapters", {"path": "three", "name": "9 x"}, None, "auth", 422, "not usable"),
    "unload unknown": ("DELETE", "/v1/adapters/nine", None, None, "auth", 404, "no task named 'nine'"),
    "lone surrogate": ("POST", "/v1/predict", None, b'{"task": "two", "inputs": ["\\ud800 x"]}', {}, 422, "surrogate"),
    "a pair for a one-text task": (
        "POST",
        "/v1/predict",
        {"task": "two", "inputs": [["a", "b"]]},
        None,
        {},
        422,
        "one text per input",
    ),  # fmt: skip
    "null byte in a path": ("POST", "/v1/adapters", {"path": "a\u0000b"}, None, "auth", 422, "no folder name has"),
    "surrogate in a path": ("POST", "/v1/adapters", None, b'{"path": "\\ud800"}', "auth", 422, "no folder name"),
    "empty name": ("POST", "/v1/adapters", {"path": "three", "name": ""}, None, "auth", 422, "is empty"),
    "trailing slash": ("GET", "/v1/tasks/", None, None, {}, 404, "no such endpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_request_gets_its_4xx_and_the_server_keeps_serving(live, case):
    method, path, body, raw, headers, status, needle = BAD[case]
    headers = {"Authorization": f"Bearer {TOKEN}"} if headers == "auth" else headers
    got, answer, _ = live.call(method, path, body, headers, raw)
    assert got == status, answer
    assert set(answer) == {"error"} and needle in answer["error"] and "\n" not in answer["error"]
    ok, body, _ = live.call("POST", "/v1/predict", {"task": "two", "inputs": ["fine"]})
    assert ok == 200 and body["outputs"][0]["text"] == "fine"


def _blocked(engine: Engine) -> threading.Event:
    """Hold the batcher on a queued job until the returned event is set."""
    gate = threading.Event()
    engine._submit(_Job(call=lambda: gate.wait(30)))
    return gate


def test_a_full_queue_answers_503_and_a_slow_answer_504(root):
    engine = Engine({"two": root / "two"}, device="cpu", max_queue=2)
    server = Live(engine, limits=Limits(timeout_s=0.5))
    try:
        gate = _blocked(engine)
        time.sleep(0.2)  # the batcher took the blocking job: the queue is empty again
        with ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(server.call, "POST", "/v1/predict", {"task": "two", "inputs": ["a"]}) for _ in range(2)
            ]
            time.sleep(0.2)
            status, body, headers = server.call("POST", "/v1/predict", {"task": "two", "inputs": ["b"]})
            assert status == 503 and headers.get("retry-after") == "1" and "--max-queue 2" in body["error"]
            assert [f.result()[0] for f in waiting] == [504, 504]  # 0.5 s, and the batcher is still held
        gate.set()
        for _ in range(200):  # the batcher skips the two timed-out requests
            if server.call("GET", "/healthz")[1]["queue"] == 0:
                break
            time.sleep(0.05)
        status, body, _ = server.call("POST", "/v1/predict", {"task": "two", "inputs": ["c"]})
        assert status == 200 and body["outputs"][0]["text"] == "c"  # the timed-out ones were skipped
    finally:
        server.stop()


def test_sigterm_finishes_every_accepted_request_and_exits_0(root, tmp_path):
    """The CLI server: requests in flight when SIGTERM arrives are answered, then it exits 0."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adaptune", "serve", str(root / "two"), str(root / "three"), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--max-wait-ms", "300", "--device", "cpu"], env=env, stderr=subprocess.PIPE)
    try:
        client = Live.__new__(Live)
        client.port = port
        for _ in range(300):
            try:
                if client.call("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        with ThreadPoolExecutor(6) as pool:
            asks = [
                pool.submit(client.call, "POST", "/v1/predict", {"task": ("two", "three")[i % 2], "inputs": TEXTS})
                for i in range(6)
            ]
            time.sleep(0.15)  # accepted and waiting for the batch (--max-wait-ms 300)
            proc.send_signal(signal.SIGTERM)
            assert [f.result()[0] for f in asks] == [200] * 6
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_refuses_bad_settings(root):
    from adaptune import ConfigError

    with pytest.raises(ConfigError, match="at least 1"):
        Engine({"two": root / "two"}, device="cpu", max_batch_size=0)
    shutil.rmtree(root / "gone", ignore_errors=True)
    with pytest.raises(ConfigError, match="not a finished run folder"):
        Engine({"gone": Path(root / "gone")}, device="cpu")


# ---- generation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    from conftest import save_tiny_causal_lm, write_chat_jsonl

    from adaptune.training.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("serve-chat")
    lm = save_tiny_causal_lm(tmp / "lm", "llama")
    data = write_chat_jsonl(tmp / "chat.jsonl", n=64)
    cfg = TrainConfig(model=str(lm), data=str(data), epochs=1, batch_size=16, max_length=64, device="cpu")
    train(cfg, tmp / "colours", quiet=True)
    server = Live(Engine({"colours": tmp / "colours"}, device="cpu"))
    yield server, tmp / "colours"
    server.stop()


def test_generate_answers_and_streams_as_offline_generation(chat_server):
    from adaptune.lm.generate import Generator

    server, run = chat_server
    offline = Generator(run, device="cpu").generate("what colour is the sky?", max_new_tokens=6)
    status, body, _ = server.call(
        "POST", "/v1/generate", {"task": "colours", "prompt": "what colour is the sky?", "max_new_tokens": 6}
    )
    assert status == 200 and body["text"] == offline
    status, events, headers = server.call(
        "POST",
        "/v1/generate",
        {"task": "colours", "prompt": "what colour is the sky?", "max_new_tokens": 6, "stream": True},
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in events.split("\n\n") if b]
    pieces = [json.loads(b[len("data: ") :])["text"] for b in blocks if b.startswith("data: ")]
    assert blocks[-1].startswith("event: done") and json.loads(blocks[-1].split("data: ", 1)[1])["text"] == offline
    assert "".join(pieces).strip() == offline
    assert server.call("POST", "/v1/predict", {"task": "colours", "inputs": ["x"]})[0] == 400
    status, body, _ = server.call("POST", "/v1/generate", {"task": "colours", "prompt": "hi", "top_p": "x"})
    assert status == 422 and "top_p" in body["error"]
    assert server.call("POST", "/v1/generate", {"task": "nine", "prompt": "hi"})[0] == 404


def test_a_tagging_run_is_hot_loaded_and_served_beside_the_others(live, root, tiny_model_dir):
    """A token-classification run on the same base, loaded at run time: its answers are its own
    Predictor's (words, tags, entities), and the classification tasks keep theirs."""
    from test_tagging import tagged_sentences, write_conll

    from adaptune.cli.parser import main

    train = write_conll(root / "ner-train.conll", tagged_sentences(40))
    args = ["--quiet", "--model", str(tiny_model_dir), "--data", str(train), "--epochs", "1", "--batch-size", "8",
            "--max-length", "8", "--device", "cpu"]  # fmt: skip
    assert main(["train", "-o", str(root / "ner"), *args]) == 0
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = live.call("POST", "/v1/adapters", {"path": "ner", "name": "ner"}, auth)
    assert status == 201, body
    texts = ["Anna Chen flew to Oslo .", "Bob met Maria"]
    status, body, _ = live.call("POST", "/v1/predict", {"task": "ner", "inputs": texts})
    assert status == 200, body
    expected = Predictor(root / "ner", device="cpu").predict(texts)
    assert [{k: v for k, v in row.items() if k != "task"} for row in body["outputs"]] == expected
    status, body, _ = live.call("POST", "/v1/predict", {"task": "two", "inputs": TEXTS[:2]})
    assert status == 200
    _same(body["outputs"], Predictor(root / "two", device="cpu").predict(TEXTS[:2]))
    assert live.call("DELETE", "/v1/adapters/ner", headers=auth)[0] == 200
