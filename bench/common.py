"""Helpers the benchmarks share: busy neighbour processes, and llama.cpp (llama-cpp-python) as a peer.

* `contend` starts busy-loop processes, to measure on a loaded machine.
* `llama_without_extra_bufts` makes llama-cpp-python load models without its extra weight buffer types
  (AMX, repacked weights): with them, llama-cpp-python 0.3.36 crashes on this machine's AMX CPU for any
  prompt of over one token. `LLAMA_SERVER` runs its OpenAI server that way (``python -c LLAMA_SERVER
  no-extra-bufts|extra-bufts --model ...``).
* `LlamaCpp` runs greedy generation on a GGUF file in this process; `LlamaPeer` runs it in a worker
  process that the benchmark times request by request (its own process, so that its OpenMP runtime and
  settings stay apart from torch's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BUSY = """
import os
parent = os.getppid()
while os.getppid() == parent:  # a busy loop that ends with the benchmark, however that ends
    for _ in range(1_000_000):
        pass
"""


def contend(n: int) -> list[subprocess.Popen]:
    """Start ``n`` busy-loop neighbour processes (stop them with ``p.kill()``; they also end with this one)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]


def llama_without_extra_bufts() -> None:
    """Make every llama-cpp-python model load after this call skip the extra weight buffer types."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params


LLAMA_SERVER = f"""
import runpy, sys
sys.path.insert(0, {str(BENCH)!r})
if sys.argv.pop(1) == "no-extra-bufts":
    from common import llama_without_extra_bufts
    llama_without_extra_bufts()
runpy.run_module("llama_cpp.server", run_name="__main__")
"""

LLAMA_WORKER = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
from common import llama_worker
llama_worker(*json.loads(sys.argv[1]))
"""


class LlamaCpp:
    """llama.cpp (llama-cpp-python's low-level API) on a GGUF file, with KV cache for ``batch`` sequences of up
    to ``ctx_per_seq`` tokens. `greedy` decodes copies of a prompt in lockstep, one ``llama_decode`` of one
    token per sequence per step and argmax in numpy: the same work our `generate` does."""

    def __init__(self, path: str, *, threads: int, batch: int = 1, ctx_per_seq: int = 512,
                 extra_bufts: bool = False) -> None:
        if not extra_bufts:
            llama_without_extra_bufts()
        import llama_cpp.llama_cpp as C

        self.C = C
        C.llama_backend_init()
        self.model = C.llama_model_load_from_file(path.encode(), C.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = C.llama_context_default_params()
        params.n_ctx = batch * ctx_per_seq
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        self.ctx = C.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.batch = batch
        self._batch = C.llama_batch_init(512, 0, 1)

    def _submit(self, items: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) in batches of up to 512; the logits stay in the context."""
        b = self._batch
        for start in range(0, len(items), 512):
            part = items[start:start + 512]
            b.n_tokens = len(part)
            for i, (token, pos, seq, logits) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
                b.seq_id[i][0], b.logits[i] = seq, logits
            if self.C.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int, banned: Sequence[int]) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.C.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
        logits[list(banned)] = -np.inf
        return int(logits.argmax())

    def greedy(self, prompt: Sequence[int], new_tokens: int, rows: int | None = None,
               banned: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuations ``[rows][new_tokens]`` of ``rows`` (default ``batch``) copies of ``prompt``;
        ``banned`` ids (e.g. EOS) are never chosen, as ``min_new_tokens`` does."""
        rows = self.batch if rows is None else rows
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)
        # Every row's last prompt token goes last, so that all rows' logits come out of the final batch.
        last = len(prompt) - 1
        self._submit([(t, p, s, False) for s in range(rows) for p, t in enumerate(prompt[:last])]
                     + [(prompt[last], last, s, True) for s in range(rows)])
        out: list[list[int]] = [[] for _ in range(rows)]
        for step in range(new_tokens):
            tokens = [self._argmax(s - rows, banned) for s in range(rows)]  # the last `rows` outputs, in order
            for s, t in enumerate(tokens):
                out[s].append(t)
            if step + 1 < new_tokens:
                self._submit([(t, len(prompt) + step, s, True) for s, t in enumerate(tokens)])
        return out

    def close(self) -> None:
        self.C.llama_batch_free(self._batch)
        self.C.llama_free(self.ctx)
        self.C.llama_model_free(self.model)


def llama_worker(path: str, threads: int, max_batch: int, max_tokens: int, extra_bufts: bool) -> None:
    """The `LlamaPeer` process: answers one JSON request per stdin line with one JSON line on stdout."""
    import time

    peer = LlamaCpp(path, threads=threads, batch=max_batch, ctx_per_seq=max_tokens, extra_bufts=extra_bufts)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        out = peer.greedy(request["prompt"], request["new"], request["batch"], request["banned"])
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": out}), flush=True)


class LlamaPeer:
    """Greedy generation by llama.cpp on a GGUF file, in a worker process, timed inside the worker.

    ``generate(prompt, batch, new)`` returns ``(seconds, tokens)``: the time from the first prompt token
    to the last new token for ``batch`` copies of ``prompt`` decoded together (one sequence each), and
    each row's ``new`` tokens (``banned`` ids, e.g. EOS, never chosen, as ``min_new_tokens`` does).
    ``env`` adds environment variables for the worker only (e.g. ``OMP_WAIT_POLICY``).
    """

    def __init__(self, path: Path, threads: int, max_batch: int, max_tokens: int, *, extra_bufts: bool = False,
                 env: dict[str, str] | None = None) -> None:
        import os

        args = json.dumps([str(path), threads, max_batch, max_tokens, extra_bufts])
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama-peer-", suffix=".log")  # its loader is verbose
        self.proc = subprocess.Popen([sys.executable, "-c", LLAMA_WORKER, args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})

    def generate(self, prompt: list[int], batch: int, new: int, banned: list[int]) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "batch": batch, "new": new, "banned": banned}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the llama.cpp worker exited (code {self.proc.wait()}): {self.log.read()[-2000:]}")
        reply = json.loads(line)
        return reply["seconds"], reply["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()
