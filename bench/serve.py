"""Serving throughput: answers per second with 8 concurrent clients, dynamic batching against
answering one request at a time (the reference's loop: `gama-ds serve --max-batch 1`).

Both are real `gama-ds serve` processes on the same tiny export, started side by side and
measured in alternating rounds on the same requests (8 clips, 10 s each, a question each,
greedy, --max-tokens answer tokens, so both generate the same tokens). Each client sends its
next request when its answer arrives. Prints answers/s, the ratio, latency p50/p95 and the
servers' CPU seconds per answer. Goal: at least 3x.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_clips  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What do you hear?", "How many beeps?", "Is this a tone or noise?", "Describe the clip."]


def build_export(folder: str, llm_size: str) -> str:
    """The tiny recipe's model (`tiny`: its 64-wide, 2-layer LLM, whose decoding step costs the
    same at any batch size, as a 7B LLM's does on a GPU; `small`: a 256-wide, 4-layer Llama, 3.5M
    parameters, whose step on a CPU grows with the batch), a random LoRA standing in for a
    trained one, and a word tokenizer whose every id is a word."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gama_ds.config import load_recipe
    from gama_ds.data.tokenizer import word_tokenizer
    from gama_ds.model.build import build_model
    from gama_ds.train.export import write_export

    words = " ".join(QUESTIONS).replace("?", " ?").replace(".", " .").split()
    words += [f"w{i}" for i in range(508 - len(set(words)))]
    word_tokenizer([" ".join(words)]).save_pretrained(os.path.join(folder, "tokenizer"))
    torch.manual_seed(0)
    llm = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    if llm_size == "small":
        LlamaForCausalLM(llm).save_pretrained(os.path.join(folder, "llm"))
    overrides = [f"data.tokenizer={os.path.join(folder, 'tokenizer')}"]
    if llm_size == "small":
        overrides.append(f"model.llm={os.path.join(folder, 'llm')}")
    recipe = load_recipe("tiny", overrides)
    model = build_model(recipe.model)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = os.path.join(folder, "export")
    write_export(model, recipe, out, {"bench": "serve"})
    return out


def start_server(export: str, max_batch: int, wait_ms: float, log_path: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "gama_ds", "serve", "--model", export, "--port", str(port),
        "--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    return proc, port


def wait_ready(proc: subprocess.Popen, port: int, log_path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {open(log_path).read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server on {port} not ready after {timeout} s")


def run_clients(
    port: int, bodies: list[bytes], clients: int, per_client: int
) -> tuple[float, list[float], int]:
    """(seconds, latencies, completion tokens) of `clients` closed-loop clients."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        for i in range(per_client):
            body = bodies[(k + i * clients) % len(bodies)]
            start = time.perf_counter()
            conn.request(
                "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
            )
            reply = conn.getresponse()
            data = json.loads(reply.read())
            took = time.perf_counter() - start
            if reply.status != 200:
                raise SystemExit(f"request failed: {reply.status} {data}")
            with lock:
                latencies.append(took)
                tokens[0] += data["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, tokens[0]


def cpu_seconds(proc: subprocess.Popen) -> float:
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per round and server (default 48)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--llm", choices=("tiny", "small"), default="tiny", help="the export's LLM (build_export)")
    args = p.parse_args()
    if min(args.clients, args.requests, args.rounds, args.max_tokens) < 1 or args.requests % args.clients:
        raise SystemExit(
            "--clients, --requests, --rounds, --max-tokens at least 1; --requests a multiple of --clients"
        )
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        export = build_export(tmp, args.llm)
        clips = write_clips(os.path.join(tmp, "clips"), 8, seconds=10.0)
        bodies = [
            json.dumps(
                {
                    "model": "export",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                                {
                                    "type": "input_audio",
                                    "input_audio": {
                                        "data": base64.b64encode(open(c, "rb").read()).decode(),
                                        "format": "wav",
                                    },
                                },
                            ],
                        }
                    ],
                    "temperature": 0,
                    "max_tokens": args.max_tokens,
                }
            ).encode()
            for i, c in enumerate(clips)
        ]
        servers = {
            "one at a time (--max-batch 1)": (1, 0.0),
            f"batched (--max-batch {args.clients})": (args.clients, args.batch_wait_ms),
        }
        procs = {}
        try:
            for name, (max_batch, wait) in servers.items():
                log = os.path.join(tmp, f"server_{max_batch}.log")
                procs[name] = (*start_server(export, max_batch, wait, log), log)
            for proc, port, log in procs.values():
                wait_ready(proc, port, log)
            results = {
                name: {"rates": [], "latencies": [], "tokens": 0, "cpu": 0.0, "answers": 0}
                for name in servers
            }
            per_client = args.requests // args.clients
            run_clients(procs[next(iter(procs))][1], bodies[:1], 1, 1)  # first-request costs out of the way
            run_clients(procs[list(procs)[1]][1], bodies[:1], 1, 1)
            for _ in range(args.rounds):
                for name, (proc, port, _) in procs.items():
                    cpu = cpu_seconds(proc)
                    seconds, latencies, tokens = run_clients(port, bodies, args.clients, per_client)
                    r = results[name]
                    r["cpu"] += cpu_seconds(proc) - cpu
                    r["rates"].append(len(latencies) / seconds)
                    r["latencies"] += latencies
                    r["tokens"] += tokens
                    r["answers"] += len(latencies)
        finally:
            for proc, _, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(
        f"serve: {machine()}, torch threads {torch.get_num_threads()}, {args.clients} clients, "
        f"{args.requests} requests x {args.rounds} rounds per server, 10 s clips, greedy, "
        f"max_tokens {args.max_tokens}, {args.llm} LLM"
    )
    summary = {}
    for name, r in results.items():
        lat = sorted(r["latencies"])
        rate = statistics.median(r["rates"])
        p50, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        summary[name] = rate
        print(
            f"  {name:32s} {rate:6.2f} answers/s (rounds: {', '.join(f'{x:.2f}' for x in r['rates'])}), "
            f"latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
            f"{r['tokens'] / r['answers']:.1f} tokens/answer, "
            f"server CPU {r['cpu'] / r['answers'] * 1000:.0f} ms/answer"
        )
    base, ours = summary.values()
    print(f"  ratio: {ours / base:.2f}x (goal: at least 3x)")


if __name__ == "__main__":
    main()
