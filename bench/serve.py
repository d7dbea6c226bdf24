"""Serving over HTTP: `imagebind-llm serve` under concurrent streaming clients vs one at a time, and vs
llama-cpp-python's OpenAI server on the same GGUF.

Both servers run as subprocesses on this machine with the same number of threads (``--threads``):

* ours: ``imagebind-llm serve --no-ui --max-batch B``, the embedded demo model (SmolLM2-135M from the bundled
  Q4_1 GGUF + a small random ImageBind, so image and audio parts go through the whole pipeline);
* ``llama.cpp``: ``python -m llama_cpp.server`` on the same GGUF file, its chat template taken from the file.
  It serves one request at a time (a lock around its model; ``--interrupt_requests False`` so that a new
  request waits instead of cutting the running stream short). It runs with ``OMP_WAIT_POLICY=PASSIVE``
  (unless set otherwise): without it its OpenMP build, called from the server's worker threads, decoded at
  4-6 tok/s instead of ~30-40 with one client on the 2-core machine (likely libgomp's throttled spin-waits,
  as in bench/engine.py), and without its extra weight buffers (AMX, repacking; ``--llama-extra-bufts`` keeps
  them), which crash llama-cpp-python 0.3.36 on this machine's AMX CPU for any prompt of over one token.
  It needs the ``llama-cpp-python[server]`` dependencies (sse-starlette, starlette-context, pydantic-settings).

Each scenario sends ``--requests`` chat completions from a fixed list, ``C`` clients each sending the next
request as soon as its previous answer is complete (closed loop), streamed (``stream_options.include_usage``),
greedy, ``--max-tokens`` each. The mix cycles text only / image (``girl.jpg`` as an ``image_url`` data URL) /
image + audio (``girl_bgm.wav`` as ``input_audio``); text-only requests are what both servers can answer.
Scenarios: ours on the mix with 1 client (the requests served one at a time: the baseline) and with each of
``--clients``; then, for each client count, ours and llama.cpp on the text-only requests, back to back.

Per scenario: generated tokens (the server's ``usage``; llama-cpp-python reports none when streaming, so
there it is ``max_tokens`` for answers cut by length, else the number of content chunks), tokens/s (all
generated tokens / wall time from the first request sent to the last answer done), time to first token
(first non-empty content chunk) and latency (whole answer) p50/p95 from the client's side, and for ours the
mean number of rows decoded together and the deepest queue, sampled from ``GET /metrics`` every 0.25 s.
Servers are warmed up before the clock starts. ``--contend N`` runs N busy-loop neighbour processes alongside.
The client runs on the same cores as the servers. The defaults take ~9-11 minutes on 2 cores, most of it in
the one-client scenarios; those are also the most sensitive to other load on the machine.

    python bench/serve.py [--requests 32] [--max-tokens 64] [--clients 1,8,32] [--max-batch 8] [--threads T]
                          [--contend N] [--skip-llama-cpp] [--llama-extra-bufts]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import LLAMA_SERVER, contend
from imagebind_llm.llm.weights.gguf import find_default_gguf

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
QUESTIONS = [
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List five tips for staying productive when working from home.",
    "Describe a busy city street at night in vivid detail.",
    "What is the capital of France? Answer in one sentence, then name three famous landmarks there.",
]
KINDS = ("text", "image", "image+audio")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a server subprocess, its output going to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a subprocess (kill it if it does not exit within 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bodies(n: int, kinds: tuple[str, ...], max_tokens: int) -> list[dict]:
    """``n`` chat-completion bodies cycling through ``kinds`` and the questions."""
    image = "data:image/jpeg;base64," + base64.b64encode((MEDIA / "girl.jpg").read_bytes()).decode()
    audio = base64.b64encode((MEDIA / "girl_bgm.wav").read_bytes()).decode()
    out = []
    for i in range(n):
        kind, question = kinds[i % len(kinds)], QUESTIONS[i % len(QUESTIONS)]
        content: list[dict] = [{"type": "text", "text": question}]
        if "image" in kind:
            content.insert(0, {"type": "image_url", "image_url": {"url": image}})
        if "audio" in kind:
            content.insert(1, {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}})
        message = {"role": "user", "content": question if kind == "text" else content}
        out.append({"model": "bench", "messages": [message],
                    "temperature": 0, "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


async def complete(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Send one streamed request; its time to first token, latency and generated tokens."""
    t0 = time.perf_counter()
    first, chunks, usage, finish = float("nan"), 0, None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first != first:
                        first = time.perf_counter() - t0
                finish = choice.get("finish_reason") or finish
    tokens = usage["completion_tokens"] if usage else (body["max_tokens"] if finish == "length" else chunks)
    return dict(ttft=first, latency=time.perf_counter() - t0, tokens=tokens)


async def sample_metrics(client: httpx.AsyncClient, url: str, done: asyncio.Event, samples: list) -> None:
    """Every 0.25 s until ``done``: (rows being decoded, queue depth) from our server's ``/metrics``."""
    while not done.is_set():
        values = {}
        for line in (await client.get(url + "/metrics")).text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("imagebind_llm_batch_size", "imagebind_llm_queue_depth"):
                values[name] = float(value)
        samples.append((values.get("imagebind_llm_batch_size", 0), values.get("imagebind_llm_queue_depth", 0)))
        try:
            await asyncio.wait_for(done.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def scenario(url: str, requests: list[dict], clients: int, metrics: bool) -> dict:
    """``clients`` closed-loop clients sharing ``requests``; per-request results, wall time, /metrics samples."""
    pending, results, samples, done = iter(range(len(requests))), [None] * len(requests), [], asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30), limits=limits) as client:
        async def worker() -> None:
            for i in pending:
                results[i] = await complete(client, url, requests[i])

        sampler = asyncio.create_task(sample_metrics(client, url, done, samples)) if metrics else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        if sampler:
            await sampler
    return dict(results=results, wall=wall, samples=samples)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, interpolated between the closest ranks."""
    return values[0] if len(values) < 2 else statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(name: str, clients: int, run: dict) -> dict:
    """One table row of a scenario's results."""
    res, busy = run["results"], [rows for rows, _ in run["samples"] if rows > 0]
    ttft, latency = [r["ttft"] for r in res if r["ttft"] == r["ttft"]], [r["latency"] for r in res]
    tokens = sum(r["tokens"] for r in res)
    return dict(name=name, clients=clients, requests=len(res), tokens=tokens, wall=run["wall"],
                tok_s=tokens / run["wall"], ttft50=statistics.median(ttft), ttft95=percentile(ttft, 95),
                lat50=statistics.median(latency), lat95=percentile(latency, 95),
                rows=f"{statistics.mean(busy):.1f}" if busy else "",
                queue=f"{max(q for _, q in run['samples']):.0f}" if run["samples"] else "")


def report(rows: list[dict], setup: str) -> None:
    """Print the table and the ratios the targets are about."""
    print(f"\n{setup}\n")
    header = ("scenario", "clients", "requests", "tokens", "wall s", "tok/s", "TTFT p50 s", "TTFT p95 s",
              "latency p50 s", "latency p95 s", "mean rows", "max queue")
    print("| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        cells = (r["name"], r["clients"], r["requests"], r["tokens"], f"{r['wall']:.1f}", f"{r['tok_s']:.1f}",
                 f"{r['ttft50']:.2f}", f"{r['ttft95']:.2f}", f"{r['lat50']:.2f}", f"{r['lat95']:.2f}",
                 r["rows"], r["queue"])
        print("| " + " | ".join(map(str, cells)) + " |")
    tok_s = {(r["name"], r["clients"]): r["tok_s"] for r in rows}
    print()
    for (name, c), speed in tok_s.items():
        if name == "ours, mix" and c > 1:
            print(f"ours mix, {c} clients / one at a time: {speed / tok_s['ours, mix, one at a time', 1]:.2f}x"
                  + (" (target >= 4x)" if c == 8 else ""))
        if name == "llama.cpp, text":
            print(f"ours text / llama.cpp text, {c} client{'s' * (c > 1)}: {tok_s['ours, text', c] / speed:.2f}x"
                  + (" (target > 1x)" if c == 8 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per scenario")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts (1 always runs)")
    parser.add_argument("--max-batch", type=int, default=8, help="our server's --max-batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each server")
    parser.add_argument("--contend", type=int, default=0, help="busy-loop neighbour processes during the runs")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="do not run llama-cpp-python's server")
    parser.add_argument("--llama-extra-bufts", action="store_true",
                        help="let llama.cpp use its extra weight buffers (AMX, repacking); off by default: on an "
                             "AMX CPU here they crashed llama-cpp-python 0.3.36 on any prompt of over one token")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too (Ctrl-C raises)
    counts = sorted({1, *(int(c) for c in args.clients.split(",") if c.strip())})
    llama = not args.skip_llama_cpp
    gguf, logs = find_default_gguf(), Path(tempfile.mkdtemp(prefix="bench-serve-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    ours_port, llama_port = free_port(), free_port()
    ours_url, llama_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{llama_port}"
    exe = Path(sys.executable).with_name("imagebind-llm")
    servers = [start([str(exe) if exe.exists() else "imagebind-llm", "serve", "--no-ui", "--port", str(ours_port),
                      "--max-batch", str(args.max_batch), "--max-queue", str(max(64, 2 * max(counts)))],
                     logs / "ours.log", env)]
    llama_flags = ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
                   "--n_batch", "512", "--interrupt_requests", "False", "--logits_all", "False",
                   "--use_mlock", "False", "--verbose", "False"]
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    if llama:
        mode = "extra-bufts" if args.llama_extra_bufts else "no-extra-bufts"
        servers.append(start([sys.executable, "-c", LLAMA_SERVER, mode, "--model", str(gguf), "--model_alias",
                              "bench", "--port", str(llama_port), *llama_flags], logs / "llama.log",
                             dict(env, OMP_WAIT_POLICY=wait_policy)))
    neighbours: list[subprocess.Popen] = []
    rows = []
    try:
        wait_ready(ours_url + "/health", servers[0], logs / "ours.log")
        if llama:
            wait_ready(llama_url + "/v1/models", servers[1], logs / "llama.log")
        mix, text = bodies(args.requests, KINDS, args.max_tokens), bodies(args.requests, ("text",), args.max_tokens)
        asyncio.run(scenario(ours_url, bodies(args.max_batch, KINDS, 4), args.max_batch, False))  # warm-up
        if llama:
            asyncio.run(scenario(llama_url, bodies(2, ("text",), 4), 1, False))
        neighbours = contend(args.contend)
        plan = [("ours, mix, one at a time" if c == 1 else "ours, mix", ours_url, mix, c) for c in counts]
        for c in counts:  # the text-only comparison back to back, so that both see the same machine
            plan += [("ours, text", ours_url, text, c)] + ([("llama.cpp, text", llama_url, text, c)] if llama else [])
        for name, url, requests, c in plan:
            rows.append(summarise(name, c, asyncio.run(scenario(url, requests, c, url == ours_url))))
            print(f"{name}, {c} client{'s' * (c > 1)}: {rows[-1]['tok_s']:.1f} tok/s in {rows[-1]['wall']:.1f} s",
                  file=sys.stderr, flush=True)
    finally:
        for p in neighbours + servers:
            stop(p)
    setup = (f"{gguf.name}, servers on 127.0.0.1, {args.threads} threads each, {os.cpu_count()} cores, "
             f"{args.contend} busy neighbours; {args.requests} requests per scenario (mix: {' / '.join(KINDS)}), "
             f"greedy, max_tokens {args.max_tokens}, streamed; ours: --max-batch {args.max_batch}")
    if llama:
        setup += (f"; llama-cpp-python: {' '.join(llama_flags)}, OMP_WAIT_POLICY={wait_policy}"
                  + ("" if args.llama_extra_bufts else ", use_extra_bufts=False"))
    report(rows, setup)


if __name__ == "__main__":
    main()
