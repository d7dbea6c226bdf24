"""Fuzz the media loaders and the checkpoint reader with mutated files: our own errors only, and no hangs.

Targets: `imagebind_llm.preprocess` (``load_images``, ``load_audio``, ``load_video``, ``load_points``, ``load_depth``,
``load_thermal``, ``load_imu``), fed mutated bytes of the fixtures in ``tests/fixtures/media`` and of small files
made here (PNG, FLAC, OGG, a short MP4, .npy, .ply, .xyz, .csv ...), as a path or as bytes; and
`imagebind_llm.hub.read_state_dict`, fed mutated ``.pth`` (zip and legacy pickle) and ``.safetensors`` files written
to a temporary folder. Mutations are seeded and dependency-free: bit flips, interesting bytes and integers, cuts,
deleted, repeated or inserted chunks; for zips and safetensors also inside the archive members and the JSON header.

A case passes when the call returns or raises the target's own error type (`MediaError` for the loaders,
`StateDictError` for the reader). Anything else is a crash, a call that outlasts ``--case-timeout`` a hang, a
worker that dies (a signal, e.g. a segfault in a decoder) a death; the first input of each distinct finding
(target, kind, exception type, the line of ours it passed through) is saved under ``--out`` for reproduction.
Cases run in a separate process (restarted after a hang or a death) with its address space capped by ``--max-gb``.

Run: ``python bench/fuzz.py`` (120 s), ``python bench/fuzz.py --seconds 600 --seed 1 --out /tmp/fuzz``.
Exit code 1 when anything was found.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
STARTUP_S = 120.0  # a fresh worker imports torch and the loaders before its first case
TARGETS = ("images", "audio", "video", "points", "depth", "thermal", "imu", "state_dict")
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x0A, 0x2D)
INTERESTING_INTS = (0, 1, -1, 2, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40,
                    (1 << 63) - 1)


# ------------------------------------------------------------------------------------------------ seeds
def _npy(array) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _png(array, mode: str | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _sound(fmt: str, seconds: float = 0.5, rate: int = 16000) -> bytes:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, np.sin(2 * np.pi * 440 * t).astype(np.float32), rate, format=fmt)
    return buffer.getvalue()


def _short_video() -> bytes:
    """One second of 64x48 moving colour at 8 fps, MPEG-4 part 2 in MP4."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = np.full((48, 64, 3), (i * 30) % 256, np.uint8)
            frame[:, i * 8:(i + 1) * 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _points_text(rng, n: int = 64) -> tuple[str, str]:
    rows = [(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(n)]
    xyz = "".join(f"{x:.4f} {y:.4f} {z:.4f}\n" for x, y, z in rows)
    ply = (f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
           f"end_header\n{xyz}")
    return xyz, ply


def _state_dicts() -> list[tuple[str, bytes]]:
    import torch
    from safetensors.torch import save

    small = {"image_bind_proj.weight": torch.randn(4, 3), "image_bind_proj.bias": torch.zeros(4),
             "prefix_query.weight": torch.randn(2, 4).half(), "step": torch.tensor(3)}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"model": small}, zipped)
    torch.save(small, legacy, _use_new_zipfile_serialization=False)
    return [(".pth", zipped.getvalue()), (".pth", legacy.getvalue()), (".safetensors", save(small)),
            (".pth", (ROOT / "tests" / "fixtures" / "adapter" / "adapter_pretrain.pth").read_bytes())]


def make_seeds() -> dict[str, list[tuple[str, bytes]]]:
    """Target -> [(file suffix, bytes)]: valid inputs that the mutations start from."""
    import numpy as np

    rng = random.Random(0)
    gen = np.random.default_rng(0)
    xyz, ply = _points_text(rng)
    image = gen.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return {
        "images": [(".jpg", (MEDIA / "girl.jpg").read_bytes()), (".jpg", (MEDIA / "car_image.jpg").read_bytes()),
                   (".png", _png(image))],
        "audio": [(".wav", (MEDIA / "car_audio.wav").read_bytes()), (".wav", _sound("WAV")),
                  (".flac", _sound("FLAC")), (".ogg", _sound("OGG"))],
        "video": [(".mp4", _short_video()), (".mp4", (MEDIA / "synthetic_landscape.mp4").read_bytes())],
        "points": [(".pt", (MEDIA / "car.pt").read_bytes()), (".npy", _npy(gen.standard_normal((256, 3), np.float32))),
                   (".ply", ply.encode()), (".xyz", xyz.encode())],
        "depth": [(".png", _png(gen.integers(0, 65535, (48, 64), dtype=np.uint16))),
                  (".npy", _npy(gen.uniform(0.5, 5, (48, 64)).astype(np.float32)))],
        "thermal": [(".png", _png(gen.integers(0, 256, (48, 64), dtype=np.uint8))),
                    (".jpg", (MEDIA / "dog_image.jpg").read_bytes())],
        "imu": [(".npy", _npy(gen.standard_normal((2000, 6)).astype(np.float32))),
                (".csv", "".join(",".join(f"{v:.3f}" for v in row) + "\n"
                                 for row in gen.standard_normal((50, 6))).encode())],
        "state_dict": _state_dicts(),
    }


# ------------------------------------------------------------------------------------------------ mutations
def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1 to 16 random byte-level mutations."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8, 16))):
        if not buf:
            buf += bytes([rng.randrange(256)])
        op = rng.randrange(8)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            width, order = rng.choice((2, 4, 8)), rng.choice("<>")
            value = rng.choice(INTERESTING_INTS) & ((1 << 8 * width) - 1)
            buf[i:i + width] = value.to_bytes(width, "little" if order == "<" else "big")
        elif op == 3:
            del buf[rng.randrange(len(buf) + 1) if rng.random() < 0.5 else rng.randrange(min(len(buf), 512) + 1):]
        elif op == 4:
            del buf[i:i + rng.randrange(1, 256)]
        elif op == 5:
            chunk = buf[i:i + rng.randrange(1, 256)]
            j = rng.randrange(len(buf) + 1)
            buf[j:j] = chunk * rng.choice((1, 2, 16))
        elif op == 6:
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        else:
            buf[i] = rng.randrange(256)
    return bytes(buf)


def mutate_zip(data: bytes, rng: random.Random) -> bytes:
    """A zip (``torch.save``'s format) with one member mutated, re-packed: gets past the CRC checks."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    name = rng.choice([n for n in members if n.endswith("data.pkl")] * 3 + list(members))
    members[name] = mutate(members[name], rng)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for member, content in members.items():
            z.writestr(member, content)
    return out.getvalue()


def mutate_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    """A safetensors file whose JSON header has one field of one tensor changed to a hostile value."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    hostile = rng.choice([0, -1, 1 << 62, 3, "F32", "X9", None, [], [1 << 40], [-2], [0, 0]])
    entry[rng.choice(("dtype", "shape", "data_offsets"))] = rng.choice(
        [hostile, [hostile], [hostile, hostile], [rng.randrange(len(body) + 8)] * 2])
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def mutated(target: str, suffix: str, data: bytes, rng: random.Random) -> bytes:
    """One mutant of a seed: structure-aware half of the time where the format allows."""
    if rng.random() < 0.5:
        if data.startswith(b"PK\x03\x04"):
            return mutate_zip(data, rng)
        if suffix == ".safetensors":
            return mutate_safetensors_header(data, rng)
    return mutate(data, rng)


# ------------------------------------------------------------------------------------------------ worker
def _calls() -> dict[str, tuple[Callable[[object], object], tuple[type[BaseException], ...]]]:
    """Target -> (the call, the errors it may raise)."""
    from imagebind_llm import preprocess as p
    from imagebind_llm.hub.state_dict import StateDictError, read_state_dict

    media = (p.MediaError,)
    return {
        "images": (p.load_images, media), "audio": (p.load_audio, media), "video": (p.load_video, media),
        "points": (p.load_points, media), "depth": (p.load_depth, media), "thermal": (p.load_thermal, media),
        "imu": (p.load_imu, media), "state_dict": (lambda path: _touch(read_state_dict(path)), (StateDictError,)),
    }


def _touch(state: dict) -> None:
    """Read every tensor's bytes, as loading them into a model does (memory-mapped data past the end of a file
    would fault here)."""
    for tensor in state.values():
        tensor.clone()


def _where(error: BaseException) -> str:
    """The innermost frame of our package the error passed through (else the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "imagebind_llm" in f.filename] or frames
    frame = ours[-1] if ours else None
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else "?"


def worker(conn: Connection, folder: str, max_gb: float) -> None:
    """Answer (target, suffix, data, as_bytes) jobs with (outcome, error type, where, message)."""
    import resource

    import torch

    torch.set_num_threads(1)
    calls = _calls()
    if max_gb > 0:  # a decompression bomb becomes a MemoryError, not a machine out of memory
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        limit = used + int(max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path_stem = Path(folder) / "input"
    while (job := conn.recv()) is not None:
        target, suffix, data, as_bytes = job
        path = path_stem.with_suffix(suffix)
        path.write_bytes(data)
        call, allowed = calls[target]
        with warnings.catch_warnings(record=True) as caught:  # on a user's stderr, each is more lines
            warnings.simplefilter("always")
            try:
                call(data if as_bytes else path)
                result = ("ok", "", "", "")
            except allowed as e:
                result = ("expected", type(e).__name__, "", str(e)[:300])
            except Exception as e:  # noqa: BLE001 (a finding: reported, not raised)
                result = ("crash", type(e).__name__, _where(e), " ".join(str(e).split())[:300])
        conn.send((*result, {f"{w.category.__name__} at {Path(w.filename).name}:{w.lineno}": str(w.message)[:120]
                             for w in caught}))


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Finding:
    target: str
    kind: str  # crash, hang, death
    error: str
    where: str
    message: str
    saved: Path
    count: int = 1


@dataclass
class Stats:
    cases: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    findings: dict[tuple[str, str, str, str], Finding] = field(default_factory=dict)
    warnings: Counter = field(default_factory=Counter)  # "target: Category at file:line" (not findings: apart)
    warning_text: dict[str, str] = field(default_factory=dict)  # an example message of each


class Worker:
    """The process that runs the cases; restarted after a hang or a death."""

    def __init__(self, folder: str, max_gb: float) -> None:
        self.folder, self.max_gb = folder, max_gb
        self.ctx = mp.get_context("spawn")
        self.start()

    def start(self) -> None:
        self.fresh = True  # its first job waits for the imports too
        self.conn, child = self.ctx.Pipe()
        self.process = self.ctx.Process(target=worker, args=(child, self.folder, self.max_gb), daemon=True)
        self.process.start()
        child.close()

    def run(self, job: tuple, timeout: float) -> tuple[str, str, str, str, dict[str, str]]:
        self.conn.send(job)
        try:
            if not self.conn.poll(timeout + (STARTUP_S if self.fresh else 0.0)):
                self.restart()
                return "hang", "Timeout", "", f"no result within {timeout:g} s", {}
            self.fresh = False
            return self.conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            self.process.join(5)
            code = self.process.exitcode
            self.start()
            return "death", f"exit {code}", "", "the worker process died (a signal is a negative exit code)", {}

    def restart(self) -> None:
        self.process.kill()
        self.process.join()
        self.start()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def fuzz(seconds: float, seed: int, case_timeout: float, out: Path, max_gb: float, targets: list[str]) -> Stats:
    rng = random.Random(seed)
    seeds = make_seeds()
    stats = Stats()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ibllm-fuzz-") as folder:
        runner = Worker(folder, max_gb)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                target = rng.choice(targets)
                suffix, data = rng.choice(seeds[target])
                mutant = mutated(target, suffix, data, rng)
                as_bytes = target != "state_dict" and rng.random() < 0.3
                outcome, error, where, message, warned = runner.run((target, suffix, mutant, as_bytes), case_timeout)
                stats.cases[target] += 1
                stats.outcomes[outcome] += 1
                for where_warned, text in warned.items():
                    stats.warnings[f"{target}: {where_warned}"] += 1
                    stats.warning_text.setdefault(f"{target}: {where_warned}", text)
                if outcome in ("ok", "expected"):
                    continue
                key = (target, outcome, error, where)
                if key in stats.findings:
                    stats.findings[key].count += 1
                    continue
                saved = out / f"{target}-{outcome}-{len(stats.findings):03d}{suffix}"
                saved.write_bytes(mutant)
                stats.findings[key] = Finding(target, outcome, error, where, message, saved)
                print(f"[{sum(stats.cases.values())}] {target}: {outcome} {error} at {where}: {message[:160]} "
                      f"({saved}{', as bytes' if as_bytes else ''})", file=sys.stderr, flush=True)
        finally:
            runner.close()
    return stats


def report(stats: Stats, seconds: float) -> str:
    lines = [f"{sum(stats.cases.values())} inputs in {seconds:g} s: "
             + ", ".join(f"{k} {v}" for k, v in sorted(stats.outcomes.items())),
             "per target: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.cases.items()))]
    if not stats.findings:
        lines.append("no crash, hang or death")
    for f in stats.findings.values():
        lines.append(f"- {f.target} {f.kind} x{f.count}: {f.error} at {f.where}: {f.message[:200]} [{f.saved}]")
    if stats.warnings:
        lines.append("warnings (printed on stderr by a CLI user's run):")
        lines += [f"- x{n} {w}: {stats.warning_text[w]}" for w, n in stats.warnings.most_common()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations (a run is reproducible)")
    parser.add_argument("--case-timeout", type=float, default=20.0, help="seconds one input may take before it is "
                                                                          "a hang")
    parser.add_argument("--max-gb", type=float, default=4.0, help="memory one input may take (0: no cap)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {TARGETS}")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "imagebind-llm-fuzz",
                        help="folder for the inputs that found something")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {TARGETS}")
    stats = fuzz(args.seconds, args.seed, args.case_timeout, args.out, args.max_gb, targets)
    print(report(stats, args.seconds))
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
