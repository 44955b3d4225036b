"""Load test of ``adaptune serve``: mixed-task dynamic batching against batching off and against one
process per task, on the shipped all-MiniLM-L6-v2 with 4 task adapters. Bounded (a fixed number of
requests per phase), loopback only, one go.

The 4 runs are trained once into ``runs/serve-bench/`` (1 epoch on 300 of the embedded fine-food
reviews each, seeds 0-3, two Houlsby and two Pfeiffer adapters: four adapters of two shapes, as four
tasks would be). Every request holds one review (the texts of the reviews' test split, in turn) and
a task drawn at random. Each server process runs torch on ``--server-threads`` threads; the load
generator is this process, ``--clients`` threads with one kept-alive connection each.

Phases (each server started fresh, warmed up with 64 requests, then ``--requests`` requests):

- ``batched-mixed``: one server, 4 tasks, dynamic batching (``--max-wait-ms``), requests of all tasks.
- ``batched-one-task``: the same server, every request for one task (what N tasks cost over one).
- ``unbatched-mixed``: ``--no-batching``, at 1, 2 and 4 clients; its peak is the best of those.
- ``per-task-processes``: 4 servers of one task each (batching on), each request sent to its task's.
- ``sigterm``: the batched server under load gets SIGTERM half-way; every request it accepted (its
  access log has it) must still be answered with 200. Requests sent after it stopped listening,
  or on a kept-alive connection it closed at shutdown before reading them, were never accepted and
  are counted apart (HTTP clients retry those).

Memory: the resident set of the server process(es) after each phase (one base + 4 adapters against
4 bases). Results: ``--json`` (default ``bench/results/serve_load.json``) and a table on stdout.

``--words N`` cuts every review to its first N words: short inputs, where a forward pass costs less
arithmetic per row and more of it is per-call overhead that batching shares.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/serve_load.py [--requests 600] [--clients 16]
      [--words 8 --json bench/results/serve_load_short.json]
On a machine without the shipped packages (a lent GPU): ``--make-kit DIR`` here, carry DIR, then
``--kit DIR --runs DIR/runs --device cuda`` there (docs/serve.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["reviews_a", "reviews_b", "reviews_c", "reviews_d"]


def prepare_runs(folder: Path, kit: Path | None = None, device: str = "cpu") -> dict[str, Path]:
    """The 4 adapter runs (trained once, then reused); with a kit, on its base and reviews."""
    from adaptune.training.train import TrainConfig, train

    source = {} if kit is None else dict(model=str(kit_base(kit)), data=str(kit / "reviews.csv"))
    runs = {}
    for seed, name in enumerate(TASKS):
        out = folder / name
        if not (out / "metrics.json").is_file():
            adapter = "houlsby" if seed % 2 == 0 else "pfeiffer"
            cfg = TrainConfig(
                adapter=adapter, seed=seed, limit_train=300, epochs=1, max_length=64, device=device, **source
            )
            print(f"training {name} ({adapter}, seed {seed}) ...", flush=True)
            train(cfg, out, quiet=True)
        runs[name] = out
    return runs


def review_texts(kit: Path | None = None) -> list[str]:
    from adaptune.data.loading import load_task_data

    task = load_task_data("reviews" if kit is None else str(kit / "reviews.csv"))
    split = task.test if task.test is not None else task.dev
    return [t for t in split.texts if t.strip()][:500]


def make_kit(kit: Path) -> None:
    """What a machine without the shipped packages needs (a GPU machine lent for minutes, which
    cannot carry MiniLM's 90 MB of weights): MiniLM's config and tokenizer (``base/``; weights
    drawn at random there, seeded: throughput does not depend on them) and the embedded reviews as
    ``reviews.csv`` (text, label)."""
    import csv
    import shutil

    from adaptune.data.loading import load_task_data
    from adaptune.models.loading import existing_model_path

    minilm = Path(existing_model_path("minilm", "the shipped MiniLM"))
    (kit / "base").mkdir(parents=True, exist_ok=True)
    for f in minilm.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".onnx")):
            shutil.copy(f, kit / "base" / f.name)
    task = load_task_data("reviews")
    with open(kit / "reviews.csv", "w", newline="", encoding="utf-8") as out:
        rows = csv.writer(out)
        rows.writerow(["text", "label"])
        for split in (task.train, task.dev, task.test):
            rows.writerows((t, task.label_names[y]) for t, y in zip(split.texts, split.labels))
    print(f"wrote {kit}: base/ (config and tokenizer, no weights) and reviews.csv")


def kit_base(kit: Path) -> Path:
    """The kit's base model folder, its random weights drawn once (seed 0)."""
    base = kit / "base"
    if not (base / "model.safetensors").is_file():
        import torch
        import transformers as T

        torch.manual_seed(0)
        T.AutoModel.from_config(T.AutoConfig.from_pretrained(base)).save_pretrained(base)
    return base


class Server:
    """``adaptune serve`` in a subprocess on a free port."""

    def __init__(self, runs: dict[str, Path], threads: int, extra: list[str], quiet: bool = True) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        specs = [f"{n}={p}" for n, p in runs.items()]
        cmd = [
            sys.executable,
            "-m",
            "adaptune",
            "serve",
            *specs,
            "--port",
            str(self.port),
            *(["--quiet"] if quiet else []),
        ]
        self.log = tempfile.TemporaryFile("w+")  # the access log (a pipe could fill up and stall the server)
        self.proc = subprocess.Popen([*cmd, *extra], env=env, stderr=self.log, text=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.logged()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start within 180 s")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def logged(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def answered(self) -> list[int]:
        """The statuses of the predictions the server's access log records (requests it accepted)."""
        lines = [json.loads(x) for x in self.logged().splitlines() if x.startswith("{")]
        return [r["status"] for r in lines if r["path"] == "/v1/predict"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


def load(ports: dict[str, int], jobs: list[tuple[str, str]], clients: int, on_half=None) -> dict:
    """Send ``jobs`` (task, text) from ``clients`` threads; latency of each, wall time, failures."""
    lock, cursor = threading.Lock(), [0]
    latencies, failures, refused = [], [], [0]

    def worker() -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(jobs):
                break
            if on_half is not None and i == len(jobs) // 2:
                on_half()
            task, text = jobs[i]
            port = ports[task]
            body = json.dumps({"task": task, "inputs": [text]})
            t0 = time.perf_counter()
            try:
                conn = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conns[port] = conn
                conn.request("POST", "/v1/predict", body, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
            except ConnectionRefusedError:
                refused[0] += 1  # never accepted: the server had stopped listening
                conns.pop(port, None)
                continue
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{type(e).__name__}: {e}")
                conns.pop(port, None)
                continue
            if resp.status != 200:
                failures.append(str(resp.status))
            else:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(jobs),
        "answered": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "refused": refused[0],
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--words", type=int, default=None, help="cut each review to its first N words (short inputs)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "serve-bench"))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    ap.add_argument("--device", default="cpu", help="the servers' device: cpu (default), cuda (the GPU goal)")
    ap.add_argument("--kit", default=None, help="a folder from --make-kit: its base (random weights) and reviews")
    ap.add_argument("--make-kit", default=None, metavar="DIR", help="write a kit for another machine, then stop")
    args = ap.parse_args()
    if args.make_kit:
        return make_kit(Path(args.make_kit))
    kit = Path(args.kit) if args.kit else None
    runs = prepare_runs(Path(args.runs), kit, "cpu" if args.device == "cpu" else args.device)
    texts = review_texts(kit)
    if args.words:
        texts = [" ".join(t.split()[: args.words]) for t in texts]
    rng = random.Random(0)
    mixed = [(rng.choice(TASKS), texts[i % len(texts)]) for i in range(args.requests)]
    one = [(TASKS[0], text) for _, text in mixed]
    warm = mixed[:64]
    batching = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    batching += ["--device", args.device]
    report = {"settings": vars(args), "cpu_count": os.cpu_count(), "phases": {}}
    phases = report["phases"]

    def phase(name: str, server: Server | list[Server], jobs, clients: int, ports=None, on_half=None) -> dict:
        ports = ports or dict.fromkeys(TASKS, server.port)
        load(ports, warm, clients)
        result = load(ports, jobs, clients, on_half)
        servers = server if isinstance(server, list) else [server]
        result["rss_mib"] = round(sum(s.rss_mib() for s in servers), 1) if on_half is None else None
        result["clients"] = clients
        phases[name] = result
        print(f"{name:<28} {json.dumps(result)}", flush=True)
        return result

    server = Server(runs, args.server_threads, batching)
    phase("batched-mixed", server, mixed, args.clients)
    phase("batched-one-task", server, one, args.clients)
    server.stop()
    server = Server(runs, args.server_threads, ["--no-batching", "--device", args.device])
    for c in (1, 2, 4):
        phase(f"unbatched-mixed-c{c}", server, mixed, c)
    server.stop()
    servers = [Server({t: runs[t]}, args.server_threads, batching) for t in TASKS]
    phase("per-task-processes", servers, mixed, args.clients, ports={t: s.port for t, s in zip(TASKS, servers)})
    for s in servers:
        s.stop()
    server = Server(runs, args.server_threads, batching, quiet=False)
    result = phase("sigterm", server, mixed, args.clients, on_half=lambda: server.proc.send_signal(signal.SIGTERM))
    result["exit_code"] = server.proc.wait(60)
    statuses = server.answered()[len(warm) :]  # after the warm-up requests
    # accepted: the server read the request (its access log has it); the others met a closed socket
    result["accepted"] = len(statuses)
    result["accepted_failed"] = sum(s != 200 for s in statuses) + max(0, len(statuses) - result["answered"])
    server.log.close()
    report["summary"] = summary(phases)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


def summary(phases: dict) -> dict:
    unbatched = max((v for k, v in phases.items() if k.startswith("unbatched")), key=lambda v: v["throughput_rps"])
    batched, one, per_task = phases["batched-mixed"], phases["batched-one-task"], phases["per-task-processes"]
    return {
        "batched_over_unbatched_peak_throughput": round(batched["throughput_rps"] / unbatched["throughput_rps"], 2),
        "batched_p95_ms": batched["p95_ms"],
        "unbatched_peak_p95_ms": unbatched["p95_ms"],
        "unbatched_peak_clients": unbatched["clients"],
        "batched_over_per_task_processes_throughput": round(batched["throughput_rps"] / per_task["throughput_rps"], 2),
        "mixed_cost_over_one_task": round(one["throughput_rps"] / batched["throughput_rps"], 3),
        "rss_mib_one_server_vs_per_task_processes": [batched["rss_mib"], per_task["rss_mib"]],
        "failed_requests_before_sigterm": sum(v["failed"] for k, v in phases.items() if k != "sigterm"),
        "sigterm_accepted": phases["sigterm"]["accepted"],
        "sigterm_accepted_failed": phases["sigterm"]["accepted_failed"],
        "sigterm_not_accepted": phases["sigterm"]["failed"] + phases["sigterm"]["refused"],
        "sigterm_exit_code": phases["sigterm"]["exit_code"],
    }


if __name__ == "__main__":
    main()
