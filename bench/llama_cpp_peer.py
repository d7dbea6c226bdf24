"""llama.cpp (through llama-cpp-python's low-level API) as the decode-speed peer of the benches.

`LlamaCpp(path, threads, batch)` loads a GGUF file with ``batch`` sequences of KV cache and `greedy`
decodes ``batch`` copies of a prompt in lockstep (one ``llama_decode`` of ``batch`` tokens per step,
argmax in numpy), the same work our `generate` does. Its extra weight buffers (AMX, repacking) are off:
with them llama-cpp-python 0.3.36 crashed on this machine's AMX CPU for any prompt of over one token.

    from llama_cpp_peer import LlamaCpp
    peer = LlamaCpp("model.gguf", threads=2, batch=4)
    tokens = peer.greedy(prompt_ids, new_tokens=32)      # [batch][new_tokens]
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np


class LlamaCpp:
    """One llama.cpp model + context for ``batch`` parallel sequences of up to ``ctx_per_seq`` tokens."""

    def __init__(self, path: str, *, threads: int, batch: int = 1, ctx_per_seq: int = 512) -> None:
        import llama_cpp as C

        self.C = C
        C.llama_backend_init()
        mparams = C.llama_model_default_params()
        mparams.use_extra_bufts = False
        self.model = C.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = C.llama_context_default_params()
        cparams.n_ctx = ctx_per_seq * batch
        cparams.n_batch = cparams.n_ubatch = ctx_per_seq * batch
        cparams.n_seq_max = batch
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.batch = batch
        self._batch = C.llama_batch_init(ctx_per_seq * batch, 0, batch)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (self.C.llama_token * (len(data) + 8))()
        n = self.C.llama_tokenize(self.vocab, data, len(data), out, len(out), True, True)
        return list(out[:n])

    def _decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, position, sequence, wants_logits)`` items."""
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.C.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        ptr = self.C.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax())

    def greedy(self, prompt: Sequence[int], new_tokens: int) -> list[list[int]]:
        """Greedy continuations (EOS ignored) of ``batch`` copies of ``prompt``: ``[batch][new_tokens]``."""
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)
        n = len(prompt)
        self._decode([(t, p, s, p == n - 1) for s in range(self.batch) for p, t in enumerate(prompt)])
        outs = [[self._argmax(s * n + n - 1)] for s in range(self.batch)]
        for step in range(1, new_tokens):
            self._decode([(outs[s][-1], n + step - 1, s, True) for s in range(self.batch)])
            for s in range(self.batch):
                outs[s].append(self._argmax(s))
        return outs

    def close(self) -> None:
        self.C.llama_batch_free(self._batch)
        self.C.llama_free(self.ctx)
        self.C.llama_model_free(self.model)
