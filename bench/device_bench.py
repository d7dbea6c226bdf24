"""The GPU check: the `device`-marked tests, then the GPU benches, one summary table (run by bench/device_check.sh).

    bash bench/device_check.sh                  # on a CUDA machine: <= 8 minutes on one GPU
    bash bench/device_check.sh --dry-run        # anywhere: CPU, tiny shapes, device tests skipped (< 1 minute)
    python bench/device_bench.py --part decode --dry-run    # one part in this process (PYTHONPATH=src)

Parts, each in its own process under its own time limit (a hang, a crash or an out-of-memory error fails that
part alone), within ``--budget`` seconds in all:

* ``tests``: ``tests/test_device.py`` (marker ``device``), one row per test;
* ``decode``: achievable memory bandwidth (a device-to-device copy: bytes read + written per second) and the
  bf16 matrix rate, then greedy decode tok/s at batch 1 of a LLaMA-7B-shaped `Transformer` (random bf16 weights
  made on the GPU), eager and with ``torch.compile``, against the bound ``bandwidth / weight bytes read per
  token`` (every matrix once; of the embedding table only one row);
* ``encoder``: ImageBind-huge's vision tower in bf16 (random weights), images/s at batch 1 and 32;
* ``engine``: multimodal requests (an image each) through `Engine` on the tiny fixture LLaMA + ImageBind-huge,
  all arriving at once: requests/s and tok/s (bench/engine.py's workload);
* ``train``: stage-1 and stage-2 optimiser steps under bf16 autocast (bench/train.py: the tiny fixture LLaMA +
  ImageBind-huge, the frozen encoder in the step or features from the cache), samples/s.

``--dry-run`` runs the same code on the CPU with tiny shapes (tiny decoder, the demo's small ImageBind, 3 decode
steps, one timed training step): the device tests skip with their reason. Every row has a status (ok, skip,
FAIL); the exit status is 1 when any row failed. With ``$OUT`` set (or ``--out``), the table is also written
there as device_check.md and device_check.json.

The bare GPU machine has PyTorch but not every package this repository pins (no faiss, av, soundfile, plyfile,
ftfy or gguf). Those the GPU paths never call are replaced by stand-ins that fail when used, and the table's
first row says which; a missing package that the checks do need fails that row, naming it. ``--hide a,b``
hides installed packages, to rehearse that machine (tests/test_device_check.py does).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HIDE_ENV = "IMAGEBIND_LLM_HIDE_MODULES"
OK, SKIP, FAIL = "ok", "skip", "FAIL"
MATMUL_ROW = "bf16 matmul"

# Imported on the way by modules the checks use (`import imagebind_llm` imports the FAISS cache and every media
# loader) but never called by them; the bare GPU machine lacks them (/work/.library/device/KINDS.md).
STUBBABLE = {"av": "audio/video decoding", "soundfile": "audio files", "plyfile": ".ply point clouds",
             "ftfy": "ImageBind text cleaning", "gguf": "GGUF weights", "faiss": "the retrieval cache"}
# Needed by the checks themselves (import names).
REQUIRED = ("torch", "numpy", "safetensors", "tokenizers", "sentencepiece", "PIL", "yaml", "jinja2", "tqdm",
            "regex", "pytest")


@dataclass
class Row:
    """One line of the summary table."""

    name: str
    value: float | str | None = None
    unit: str = ""
    status: str = OK
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The sizes of every bench: the GPU's, or the dry run's tiny ones."""

    llm: str  # an LLMConfig name
    prompt_tokens: int
    new_tokens: int
    copy_bytes: int
    matmul_n: int
    encoder: str  # "huge" or "demo" (the embedded demo's small ImageBind)
    encoder_batches: tuple[int, ...]
    encoder_iters: int
    engine_requests: int
    engine_new_tokens: int
    train_encoder: str  # bench/train.py's --encoder: "huge" or "config" (the fixture's small ImageBind)
    train_batch: int
    train_steps: int
    limits: dict[str, float] = field(default_factory=dict)  # seconds per part


GPU = Plan(llm="llama-7b", prompt_tokens=32, new_tokens=128, copy_bytes=4 << 30, matmul_n=8192, encoder="huge",
           encoder_batches=(1, 32), encoder_iters=10, engine_requests=16, engine_new_tokens=32,
           train_encoder="huge", train_batch=8, train_steps=5,
           limits={"tests": 150, "decode": 210, "encoder": 60, "engine": 75, "train": 100})
DRY = Plan(llm="tiny", prompt_tokens=8, new_tokens=3, copy_bytes=64 << 20, matmul_n=256, encoder="demo",
           encoder_batches=(1, 2), encoder_iters=1, engine_requests=3, engine_new_tokens=3,
           train_encoder="config", train_batch=2, train_steps=1,
           limits={"tests": 90, "decode": 120, "encoder": 60, "engine": 60, "train": 60})
PARTS = ("tests", "decode", "encoder", "engine", "train")


# ---------------------------------------------------------------------------------------------- imports
class _Absent:
    """A name from a stubbed package: importable and indexable at import time, fails when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Absent:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __getitem__(self, key: Any) -> _Absent:
        return _Absent(f"{self._name}[{key!r}]")

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        package = self._name.split(".")[0]
        raise ModuleNotFoundError(f"{self._name}: {package} is not installed here (stubbed by bench/device_bench.py)")


class _Stub(types.ModuleType):
    """Stands in for a package this machine lacks (``__stubbed__`` tells the tests)."""

    __stubbed__ = True

    def __getattr__(self, attr: str) -> _Absent:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


class _Hide(importlib.abc.MetaPathFinder):
    """Makes installed packages unimportable (``--hide``), to rehearse the bare GPU machine."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by --hide)", name=fullname)
        return None


def _hidden() -> set[str]:
    return {name for name in os.environ.get(HIDE_ENV, "").split(",") if name}


def _installed(name: str) -> bool:
    if name in _hidden() or isinstance(sys.modules.get(name), _Stub):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def prepare_imports() -> list[str]:
    """Hide the packages ``$IMAGEBIND_LLM_HIDE_MODULES`` names, then stand in for the missing `STUBBABLE` ones;
    returns the names stood in for. Call it before importing ``imagebind_llm``."""
    if _hidden() and not any(isinstance(finder, _Hide) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hide(_hidden()))
    stubbed = [name for name in STUBBABLE if not _installed(name)]
    for name in stubbed:
        if not isinstance(sys.modules.get(name), _Stub):
            sys.modules[name] = _Stub(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    return stubbed


def imports_row() -> Row:
    """Which packages are stubbed and which needed ones are missing (with `prepare_imports` applied)."""
    stubbed = prepare_imports()
    missing = [name for name in REQUIRED if not _installed(name)]
    note = "; ".join(filter(None, [
        f"missing: {', '.join(missing)} (install or carry their wheels)" if missing else "",
        f"stubbed, unused by these checks: {', '.join(f'{n} ({STUBBABLE[n]})' for n in stubbed)}" if stubbed else ""]))
    return Row("python packages", f"{len(REQUIRED) - len(missing)}/{len(REQUIRED)}", "needed",
               FAIL if missing else OK, note or "all installed")


def bench_module(name: str) -> types.ModuleType:
    """``bench/<name>.py`` imported as ``bench_<name>`` (the benches are scripts, not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# ---------------------------------------------------------------------------------------------- part: tests
class _Outcomes:
    """A pytest plugin that keeps one row per test."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = report.nodeid.split("::", 1)[-1]
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.rows[name] = Row(name, status=SKIP, note=reason.removeprefix("Skipped: "))
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            self.rows[name] = Row(name, status=FAIL, note=f"{report.when}: {message.splitlines()[0][:160]}")
        elif report.when == "call":
            self.rows[name] = Row(name, report.duration, "s", OK)


def part_tests(plan: Plan, device: torch.device, peak_tflops: float | None) -> list[Row]:
    import pytest

    outcomes = _Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "device", str(ROOT / "tests" / "test_device.py")],
                       plugins=[outcomes])
    rows = list(outcomes.rows.values())
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not rows:
        rows.append(Row("device tests", int(code), "pytest exit", FAIL, "pytest did not run the tests (see above)"))
    return rows


# ---------------------------------------------------------------------------------------------- part: decode
def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Achievable device-memory bandwidth in bytes/s: a copy of ``nbytes`` random bytes, read + written."""
    time_call = bench_module("encoders").time_call
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_call(lambda: dst.copy_(src), device, 2, 10)


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 ``[n, n] @ [n, n]`` FLOP/s on random data."""
    time_call = bench_module("encoders").time_call
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / time_call(lambda: a @ b, device, 2, 10)


def random_llm(name: str, max_seq_len: int, device: torch.device) -> torch.nn.Module:
    """The `Transformer` of config ``name`` with random bf16 weights made on ``device`` (no disk, no host copy)."""
    from imagebind_llm.llm.config import LLMConfig
    from imagebind_llm.llm.model import Transformer

    with torch.device("meta"):
        model = Transformer(LLMConfig.from_name(name, max_seq_len=max_seq_len))
    model = model.to(torch.bfloat16).to_empty(device=device)
    bench_module("encoders").fast_init(model, "vision")  # N(0, 0.02) matrices, unit norms (a decoder has no logit scale)
    return model.eval()


def greedy_run(model: torch.nn.Module, prompt: list[int], new_tokens: int, compile: bool) -> tuple[float, list[int]]:
    """Decode tok/s over steps 2..``new_tokens`` of one greedy run (``new_tokens >= 2``), and its tokens."""
    from imagebind_llm.llm.generate import generate_tokens

    tokens, stamps = [], []
    for token in generate_tokens(model, [prompt], max_new_tokens=new_tokens, compile=compile):
        tokens.append(int(token[0]))  # one host sync per step, as `generate` does
        stamps.append(time.perf_counter())
    return (new_tokens - 1) / (stamps[-1] - stamps[0]), tokens


def part_decode(plan: Plan, device: torch.device, peak_tflops: float | None) -> list[Row]:
    weight_bytes = bench_module("decode").weight_bytes
    bandwidth, rate = copy_bandwidth(device, plan.copy_bytes), matmul_rate(device, plan.matmul_n)
    rows = [Row("copy bandwidth", bandwidth / 1e9, "GB/s", note=f"{plan.copy_bytes >> 20} MiB copied, read + write"),
            Row(MATMUL_ROW, rate / 1e12, "TFLOP/s", note=f"{plan.matmul_n}^3, random data")]
    print(f"copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)
    model = random_llm(plan.llm, plan.prompt_tokens + plan.new_tokens, device)
    read = weight_bytes(model) - model.tok_embeddings.weight.nbytes  # a step reads one embedding row
    bound = bandwidth / read
    rows.append(Row(f"{plan.llm} bf16 decode bound", bound, "tok/s",
                    note=f"bandwidth / {read / 1e9:.3g} GB of weights read per token"))
    prompt = torch.randint(3, model.config.vocab_size, (plan.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    outputs = {}
    for compile in (False, True):
        start = time.perf_counter()
        greedy_run(model, prompt, plan.new_tokens, compile)  # warm-up; compiles the decode step
        first = time.perf_counter() - start
        runs = [greedy_run(model, prompt, plan.new_tokens, compile) for _ in range(2)]
        speed, outputs[compile] = max(runs)
        label = "compiled" if compile else "eager"
        status = FAIL if speed > 1.05 * bound else OK  # faster than the weights can be read: a timing error
        note = f"{speed / bound:.0%} of the bound" + (f"; first run (compiling) {first:.0f} s" if compile else "")
        rows.append(Row(f"{plan.llm} bf16 decode b1 {label}", speed, "tok/s", status, note))
        print(f"decode {label}: {speed:.1f} tok/s ({note})", flush=True)
    same = outputs[False] == outputs[True]
    rows[-1].note += "; greedy tokens " + ("= eager" if same else "differ from eager (bf16 near-ties of random weights)")
    return rows


# ---------------------------------------------------------------------------------------------- part: encoder
def encoder_config(size: str) -> Any:
    """ImageBind-huge (``"huge"``) or the embedded demo's small ImageBind (``"demo"``), without the point branch."""
    from imagebind_llm.encoders import ImageBindConfig
    from imagebind_llm.model.factory import DEMO_ENCODER

    return ImageBindConfig.huge(with_point=False, **({} if size == "huge" else DEMO_ENCODER))


def part_encoder(plan: Plan, device: torch.device, peak_tflops: float | None) -> list[Row]:
    from imagebind_llm.encoders import ImageBind

    encoders = bench_module("encoders")
    config = encoder_config(plan.encoder)
    with torch.device("meta"):
        model = ImageBind(config)
    tower = model.towers["vision"].to_empty(device=device).to(torch.bfloat16)  # the other towers stay on meta
    encoders.fast_init(tower, "vision")
    flops_per_image = 2 * sum(p.numel() for p in tower.parameters()) * (config.num_patches("vision") + 1)
    rows, g = [], torch.Generator().manual_seed(0)
    for batch in plan.encoder_batches:
        x = encoders.make_input("vision", batch, config, g).to(device)
        with torch.inference_mode(), encoders.PeakMemory(device) as memory:
            seconds = encoders.time_call(lambda: model({"vision": x}), device, 2, plan.encoder_iters)
            finite = bool(torch.isfinite(model({"vision": x})["vision"]).all())
        rate = flops_per_image * batch / seconds
        note = f"{seconds * 1e3:.1f} ms/batch, {rate / 1e12:.1f} TFLOP/s"
        note += f" ({rate / (peak_tflops * 1e12):.0%} of the matmul rate)" if peak_tflops else ""
        rows.append(Row(f"ImageBind-{plan.encoder} vision bf16 b{batch}", batch / seconds, "img/s",
                        OK if finite else FAIL, note + f", peak {memory.mib:.0f} MiB" + ("" if finite else ", NOT FINITE")))
        print(f"{rows[-1].name}: {batch / seconds:.1f} img/s ({note})", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- part: engine
def part_engine(plan: Plan, device: torch.device, peak_tflops: float | None) -> list[Row]:
    engine_bench, train_bench = bench_module("engine"), bench_module("train")
    model = train_bench.build("tiny", plan.train_encoder, "finetune").to(device=device, dtype=torch.bfloat16)
    new = plan.engine_new_tokens
    # every request brings an image, all arrive at once; no stop token, so each generates exactly `new` tokens
    jobs = engine_bench.workload(plan.engine_requests, 1e6, 0, new, new, 1.0)
    result = engine_bench.summarise("engine", jobs, engine_bench.run_engine(model, jobs, 8, False))
    complete = sum(len(j.tokens) == new for j in jobs)
    status = OK if complete == len(jobs) else FAIL
    note = f"{len(jobs)} image requests x {new} tokens, max_batch 8, p50 latency {result['p50']:.2f} s"
    print(f"engine: {result['req_s']:.2f} req/s, {result['tok_s']:.0f} tok/s ({note})", flush=True)
    return [Row("engine multimodal requests", result["req_s"], "req/s", status,
                note + ("" if status == OK else f"; only {complete} complete")),
            Row("engine generated tokens", result["tok_s"], "tok/s", status, "tiny fixture LLaMA, bf16")]


# ---------------------------------------------------------------------------------------------- part: train
def part_train(plan: Plan, device: torch.device, peak_tflops: float | None) -> list[Row]:
    train_bench = bench_module("train")
    rows = []
    for stage in (1, 2):
        model = train_bench.build("tiny", plan.train_encoder, train_bench.STAGES[stage][0]).to(device)
        for r in train_bench.bench(model, stage, plan.train_batch, device, plan.train_steps, peak_tflops):
            note = f"{r['tokens']} tokens/sample, {r['step_ms']:.1f} ms/step"
            note += f", MFU {r['mfu']:.1%} of the measured matmul rate" if "mfu" in r else ""
            rows.append(Row(f"train stage {stage} b{r['batch']}, {r['features']} features", r["samples_s"],
                            "samples/s", OK if math.isfinite(r["samples_s"]) else FAIL, note))
            print(f"{rows[-1].name}: {r['samples_s']:.1f} samples/s ({note})", flush=True)
        del model
    return rows


PART_FUNCTIONS: dict[str, Callable[[Plan, torch.device, float | None], list[Row]]] = {
    "tests": part_tests, "decode": part_decode, "encoder": part_encoder, "engine": part_engine, "train": part_train}


def run_part_here(name: str, dry_run: bool, peak_tflops: float | None) -> list[Row]:
    """One part in this process; an exception becomes a failed row."""
    plan, device = (DRY, torch.device("cpu")) if dry_run else (GPU, torch.device("cuda"))
    prepare_imports()
    try:
        return PART_FUNCTIONS[name](plan, device, peak_tflops)
    except Exception as e:  # the table says which part broke; the traceback goes to the log
        traceback.print_exc()
        return [Row(name, None, "", FAIL, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")]


# ---------------------------------------------------------------------------------------------- the whole check
def run_part_process(name: str, args: argparse.Namespace, timeout: float, peak_tflops: float | None) -> list[Row]:
    """``--part name`` in a child process (killed with its own children after ``timeout`` s)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, "--part", name, "--rows", str(rows_file)]
        command += ["--dry-run"] * args.dry_run + (["--peak-tflops", str(peak_tflops)] if peak_tflops else [])
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except BaseException as e:  # the time limit, or Ctrl-C (the part's own session does not get it)
            os.killpg(process.pid, signal.SIGKILL)  # its process group: compile workers go too
            process.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return [Row(name, round(time.monotonic() - start), "s", FAIL, f"timed out after {timeout:.0f} s")]
        if not rows_file.is_file():
            return [Row(name, None, "", FAIL, f"the part's process ended with exit status {code} and no results")]
        return [Row(**r) for r in json.loads(rows_file.read_text())]


def row_dict(row: Row) -> dict[str, Any]:
    """``row`` for JSON: a value that is not a finite number becomes null."""
    bad = isinstance(row.value, float) and not math.isfinite(row.value)
    return {**asdict(row), "value": None if bad else row.value}


def environment() -> str:
    """The machine in words: device, torch and Python versions."""
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU ({os.cpu_count()} cores)"
    return f"{where}, torch {torch.__version__}, Python {platform.python_version()}"


def format_value(value: float | str | None) -> str:
    if not isinstance(value, float):
        return "" if value is None else str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def table(rows: Sequence[Row]) -> str:
    """The summary as a markdown table: name | value | unit | status | note."""
    lines = ["| name | value | unit | status | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {format_value(r.value)} | {r.unit} | {r.status} | {r.note} |" for r in rows]
    return "\n".join(lines)


def write_outputs(out: Path, header: str, rows: Sequence[Row], seconds: float, dry_run: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.md").write_text(f"{header}\n\n{table(rows)}\n")
    summary = {"environment": header, "dry_run": dry_run, "seconds": round(seconds, 1),
               "failed": sum(r.status == FAIL for r in rows), "rows": [row_dict(r) for r in rows]}
    (out / "device_check.json").write_text(json.dumps(summary, indent=2))


def check(args: argparse.Namespace) -> int:
    """Every part in turn, within ``args.budget`` seconds; prints the table; 1 if any row failed, 2 without a GPU."""
    start = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): run with --dry-run", file=sys.stderr)
        return 2
    if args.hide:
        os.environ[HIDE_ENV] = ",".join(args.hide)  # for the parts' processes too
    plan = DRY if args.dry_run else GPU
    header = f"device check{' (dry run)' if args.dry_run else ''} on {environment()}"
    print(header, flush=True)
    rows, peak = [imports_row()], None
    for name in args.parts:
        left = args.budget - (time.monotonic() - start)
        if left < 10:
            rows.append(Row(name, None, "", FAIL, f"not run: the {args.budget:.0f} s budget is spent"))
            continue
        print(f"\n=== {name} ===", flush=True)
        part_rows = run_part_process(name, args, min(plan.limits[name], left), peak)
        peak = next((r.value for r in part_rows if r.name == MATMUL_ROW and r.status == OK), peak)
        rows += part_rows
    seconds = time.monotonic() - start
    print(f"\n{header}, {seconds:.0f} s\n\n{table(rows)}")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None:
        write_outputs(out, header, rows, seconds, args.dry_run)
    failed = [r.name for r in rows if r.status == FAIL]
    print(f"\n{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, device tests skipped")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=list(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts (default 480)")
    parser.add_argument("--out", type=Path, default=None, help="folder for device_check.md/.json (default $OUT)")
    parser.add_argument("--hide", type=lambda s: [n for n in s.split(",") if n], default=[],
                        help="packages to make unimportable, e.g. av,faiss (rehearses the bare GPU machine)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the child process of one part
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if args.part is None:
        return check(args)
    rows = run_part_here(args.part, args.dry_run, args.peak_tflops)
    if args.rows is not None:
        args.rows.write_text(json.dumps([row_dict(r) for r in rows]))
    else:
        print(table(rows))
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
