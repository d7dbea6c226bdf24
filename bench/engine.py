"""Serving under load: continuous batching (`Engine`) vs static batches vs one request at a time.

The embedded tiny model (``create_model("tiny-random")``: SmolLM2-135M + small random ImageBind) serves
``--requests`` requests arriving as a Poisson process (``--rate`` per second, ``--seed``), a mix of
text-only and image questions (``--image-fraction``), each with its own answer length (``max_new_tokens``
drawn from ``--min-new..--max-new``). Decoding is greedy with no stop token (``stop_token_ids=()``), so
every request generates exactly its drawn number of tokens and all three policies do the same work:

* ``continuous``: ``Engine(model, max_batch=--max-batch)``; a request joins the running batch at the
  next scheduler step and leaves it as soon as it is done;
* ``static``: a dispatcher thread waits until ``--max-batch`` requests have arrived (or the last ones),
  runs them as one ``model.generate`` batch (all rows start together, the batch ends when its longest
  row ends; every result is ready then), and starts the next batch when that one finishes;
* ``one at a time``: ``Engine(model, max_batch=1)``.

Per policy: throughput (generated tokens/s and requests/s from the first arrival to the last
completion), and request latency (arrival to completion) p50 / p95; with ``--stream`` the engines'
handles are consumed as streams and the p50 time to the first text is added (the static batch streams
nothing: its first text is its result). Without it each request's thread just waits for the result,
which keeps the harness's own wake-ups off the engine's cores. The model (and each engine) is warmed up
before the clock starts. ``--contend N`` runs N busy-loop neighbour processes alongside, to measure on a
loaded machine.

All policies compute off the main thread (the engine's scheduler thread, the static dispatcher), as a
server does. The model is loaded and warmed up in a short-lived thread, so that the serving thread is
the only one holding an OpenMP thread pool. ``--load-in-main`` loads it in the main thread instead, as a
server typically would. On CPUs that slows every serving thread down (decoding ~1.5x on 2 cores): the
main thread keeps an idle OpenMP pool, libgomp then counts more managed threads than CPUs and throttles
the spin-wait of the other threads' OpenMP workers to ~100 spins, so they sleep and must be woken for
each parallel op (a decode step is hundreds of small ones).

    python bench/engine.py [--requests 32] [--rate 2.5] [--seed 0] [--max-batch 8] [--contend N] [--threads T]
                           [--min-new 16 --max-new 96] [--image-fraction 0.5] [--stream] [--load-in-main]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import imagebind_llm as ibl
from common import contend
from imagebind_llm.engine import Engine, Request
from imagebind_llm.llm.generate import GREEDY

MEDIA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "media"
IMAGES = ["girl.jpg", "bird_image.jpg", "car_image.jpg", "dog_image.jpg"]
QUESTIONS = [
    "Describe the picture in detail.",
    "What is the capital of France? Answer in one sentence, then name three famous landmarks there.",
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List five tips for staying productive when working from home.",
    "What might the person in this scene be feeling, and why?",
]


@dataclass
class Job:
    """One request of the workload: when it arrives, what it asks, and what happened to it."""

    arrival: float  # seconds after the start
    request: Request
    max_new: int
    has_image: bool
    done: float = float("nan")
    first: float = float("nan")  # first streamed text
    tokens: list[int] = field(default_factory=list)


def workload(n: int, rate: float, seed: int, min_new: int, max_new: int, image_fraction: float) -> list[Job]:
    """The same ``n`` requests for every policy: Poisson arrivals (the first at 0), lengths, media."""
    rng = random.Random(seed)
    jobs, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        new = rng.randint(min_new, max_new)
        image = rng.random() < image_fraction
        media = {"image": str(MEDIA / rng.choice(IMAGES))} if image else None
        sampling = GREEDY.replace(max_new_tokens=new, stop_token_ids=())
        jobs.append(Job(t, Request.ask(rng.choice(QUESTIONS), media, sampling=sampling), new, image))
    return jobs


def fresh(jobs: list[Job]) -> list[Job]:
    return [Job(j.arrival, j.request, j.max_new, j.has_image) for j in jobs]


def arrive(jobs: list[Job], t0: float, submit) -> None:
    """Call ``submit(i)`` at each job's arrival time (latencies count from the scheduled time)."""
    for i, job in enumerate(jobs):
        delay = t0 + job.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(i)


def run_engine(model, jobs: list[Job], max_batch: int, stream: bool) -> float:
    """Serve ``jobs`` with an `Engine` (one waiting thread per request); returns the start time."""
    engine = Engine(model, max_batch=max_batch, background=True)
    warm = Request.ask("Hi", {"image": str(MEDIA / IMAGES[0])}, sampling=GREEDY.replace(max_new_tokens=2))
    engine.submit(warm).result()  # allocate the KV cache, start the thread
    waiters: list[threading.Thread] = []

    def wait(job: Job, handle) -> None:
        if stream:
            for _ in handle.stream():
                if job.first != job.first:  # NaN: the first piece
                    job.first = time.perf_counter()
        job.tokens = list(handle.result().tokens)
        job.done = time.perf_counter()

    def submit(i: int) -> None:
        handle = engine.submit(jobs[i].request)
        waiters.append(threading.Thread(target=wait, args=(jobs[i], handle), daemon=True))
        waiters[-1].start()

    t0 = time.perf_counter()
    arrive(jobs, t0, submit)
    for w in waiters:
        w.join()
    engine.stop()
    return t0


def run_static(model, jobs: list[Job], batch: int, template) -> float:
    """Serve ``jobs`` in static batches of ``batch`` with ``model.generate``; returns the start time."""
    arrived: list[int] = []
    cond = threading.Condition()
    ready = threading.Event()

    def dispatch() -> None:
        model.generate([template.render(jobs[0].request.text_messages())], [jobs[0].request.media()],
                       sampling=GREEDY.replace(max_new_tokens=2, stop_token_ids=()))  # warm this thread up
        ready.set()
        served = 0
        while served < len(jobs):
            with cond:
                cond.wait_for(lambda: len(arrived) - served >= min(batch, len(jobs) - served))
                take = arrived[served:served + batch]
            served += len(take)
            group = [jobs[i] for i in take]
            prompts = [template.render(j.request.text_messages()) for j in group]
            media = [j.request.media() for j in group]
            longest = max(j.max_new for j in group)
            out = model.generate(prompts, media, sampling=GREEDY.replace(max_new_tokens=longest, stop_token_ids=()))
            now = time.perf_counter()
            for job, completion in zip(group, out):
                job.tokens, job.done, job.first = list(completion.tokens[:job.max_new]), now, now

    def submit(i: int) -> None:
        with cond:
            arrived.append(i)
            cond.notify()

    dispatcher = threading.Thread(target=dispatch, daemon=True)
    dispatcher.start()
    if not ready.wait(600):
        raise RuntimeError("the static dispatcher did not start")
    t0 = time.perf_counter()
    arrive(jobs, t0, submit)
    dispatcher.join()
    return t0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, interpolated between the closest ranks."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(name: str, jobs: list[Job], t0: float) -> dict:
    latency = [j.done - t0 - j.arrival for j in jobs]
    first = [j.first - t0 - j.arrival for j in jobs]
    span = max(j.done for j in jobs) - t0  # the first arrival is at t0
    tokens = sum(len(j.tokens) for j in jobs)
    return dict(name=name, tokens=tokens, span=span, tok_s=tokens / span, req_s=len(jobs) / span,
                p50=statistics.median(latency), p95=percentile(latency, 95),
                first50=statistics.median(first), jobs=jobs)


def in_thread(fn):
    """``fn()`` run in a short-lived thread: the OpenMP thread pools its torch calls create end with it."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError(f"{fn.__name__} failed (see the traceback above)")
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=2.5, help="mean arrivals per second (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=8, help="engine rows and static batch size")
    parser.add_argument("--min-new", type=int, default=16, help="answer lengths are drawn from min-new..max-new")
    parser.add_argument("--max-new", type=int, default=96)
    parser.add_argument("--image-fraction", type=float, default=0.5, help="share of requests with an image")
    parser.add_argument("--policies", default="continuous,static,single",
                        help="subset of continuous,static,single, run in this order")
    parser.add_argument("--stream", action="store_true",
                        help="consume the engines' streams and report the p50 time to the first text")
    parser.add_argument("--load-in-main", action="store_true",
                        help="load and warm up the model in the main thread, which then keeps an OpenMP thread pool "
                             "that slows the serving threads down (see above)")
    parser.add_argument("--contend", type=int, default=0, help="busy-loop neighbour processes during the run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(policies) - {"continuous", "static", "single"}
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}")

    jobs = workload(args.requests, args.rate, args.seed, args.min_new, args.max_new, args.image_fraction)

    def load():
        model = ibl.create_model("tiny-random")
        template = Engine(model, background=False).template
        warm = jobs[:2]
        model.generate([template.render(j.request.text_messages()) for j in warm],
                       [j.request.media() for j in warm], sampling=GREEDY.replace(max_new_tokens=4, stop_token_ids=()))
        return model, template

    model, template = load() if args.load_in_main else in_thread(load)

    if args.contend and torch.get_num_threads() + args.contend > (os.cpu_count() or 1):
        print(f"note: {torch.get_num_threads()} torch threads + {args.contend} busy neighbours exceed the "
              f"{os.cpu_count()} cores: OpenMP threads then wait on descheduled team-mates at every op, which "
              "can slow decoding several-fold (try --threads)", file=sys.stderr)
    neighbours = contend(args.contend)
    try:
        results = []
        for policy in policies:
            run = fresh(jobs)
            if policy == "static":
                t0 = run_static(model, run, args.max_batch, template)
                name = f"static batches of {args.max_batch}"
            else:
                batch = args.max_batch if policy == "continuous" else 1
                t0 = run_engine(model, run, batch, args.stream)
                name = f"continuous (max_batch={batch})" if policy == "continuous" else "one at a time"
            results.append(summarise(name, run, t0))
            print(f"{name}: done in {results[-1]['span']:.1f} s", file=sys.stderr, flush=True)
    finally:
        for p in neighbours:
            p.kill()
            p.wait()

    lengths = [j.max_new for j in jobs]
    print(f"embedded demo model on CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"{args.contend} busy neighbours, model loaded in {'the main' if args.load_in_main else 'a short-lived'} "
          f"thread; {args.requests} requests, Poisson {args.rate}/s over "
          f"{jobs[-1].arrival:.1f} s (seed {args.seed}), {sum(j.has_image for j in jobs)} with an image; "
          f"greedy, {args.min_new}..{args.max_new} new tokens (mean {statistics.mean(lengths):.0f}, "
          f"total {sum(lengths)}), no stop token\n")
    header = ("policy", "tokens", "wall s", "tok/s", "req/s", "p50 latency s", "p95 latency s",
              *(["p50 first text s"] if args.stream else []))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in results:
        row = (r["name"], r["tokens"], f"{r['span']:.1f}", f"{r['tok_s']:.1f}", f"{r['req_s']:.2f}",
               f"{r['p50']:.2f}", f"{r['p95']:.2f}", *([f"{r['first50']:.2f}"] if args.stream else []))
        print("| " + " | ".join(map(str, row)) + " |")
    by = {p: r for p, r in zip(policies, results)}
    if "continuous" in by and "static" in by:
        c, s = by["continuous"], by["static"]
        print(f"\ncontinuous / static: throughput {c['tok_s'] / s['tok_s']:.2f}x (target >= 1.3x), "
              f"p95 latency {c['p95'] / s['p95']:.2f}x (target < 1)")
    if "single" in by:
        ref = by["single"]["jobs"]
        for p in policies:
            if p != "single":
                same = sum(a.tokens == b.tokens for a, b in zip(by[p]["jobs"], ref))
                print(f"greedy tokens of {p} identical to one at a time: {same}/{len(ref)}")


if __name__ == "__main__":
    main()
