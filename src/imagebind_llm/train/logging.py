"""Training progress: a console bar, ``log.jsonl`` and (optionally) TensorBoard, on the main process only.

Each logged record holds ``step``, ``epoch`` (fractional), ``loss`` (mean over the steps since the last
record and over processes), ``lr``, ``samples_per_s``, ``tokens_per_s`` (non-padding tokens, all
processes), ``eta_s`` and ``elapsed_s``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imagebind_llm.hub.files import make_dir

log = logging.getLogger(__name__)


class ProgressLogger:
    """Accumulates per-step numbers and writes a record every ``log_every`` steps.

    Args:
        output_dir: where ``log.jsonl`` (appended when resuming, so resumed runs continue it; started anew
            otherwise) and ``tensorboard/`` go.
        total_steps: optimiser steps of the run (for the bar and the ETA).
        start_step: the step a resumed run starts from.
        enabled: False on non-main processes (nothing is written or shown).
        progress: show the tqdm bar.
        tensorboard: also write TensorBoard scalars (``train/loss``, ``train/lr``); needs ``tensorboard``.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0, *, log_every: int = 10,
                 enabled: bool = True, progress: bool = True, tensorboard: bool = False) -> None:
        self.enabled, self.log_every, self.total = enabled, log_every, total_steps
        self.start_step = start_step
        self.records: list[dict[str, Any]] = []
        self._reset_window()
        self._t0 = time.perf_counter()
        self.bar = self.file = self.writer = None
        if not enabled:
            return
        output_dir = make_dir(output_dir, "train.output_dir")
        self.file = (output_dir / "log.jsonl").open("a" if start_step else "w")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not progress, dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard is on but the tensorboard package is not installed; "
                            "logging to log.jsonl only (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def _reset_window(self) -> None:
        self._losses: list[float] = []
        self._samples = self._tokens = 0
        self._window_t0 = time.perf_counter()

    def step(self, step: int, epoch: float, loss: float, lr: float, samples: int, tokens: int) -> None:
        """Record optimiser step ``step`` (1-based count of steps done) and log when due."""
        self._losses.append(loss)
        self._samples += samples
        self._tokens += tokens
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.log_every and step != self.total:
            return
        now = time.perf_counter()
        window = max(now - self._window_t0, 1e-9)
        done = step - self.start_step
        elapsed = now - self._t0
        record = {"step": step, "epoch": round(epoch, 6), "loss": sum(self._losses) / len(self._losses), "lr": lr,
                  "samples_per_s": self._samples / window, "tokens_per_s": self._tokens / window,
                  "eta_s": elapsed / max(done, 1) * (self.total - step), "elapsed_s": elapsed}
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        rate, unit = (record["tokens_per_s"], "tok/s") if self._tokens else (record["samples_per_s"], "samples/s")
        log.info("step %d/%d epoch %.3f loss %.4f lr %.3e %.0f %s eta %.0f s", step, self.total, epoch,
                 record["loss"], lr, rate, unit, record["eta_s"])
        self._reset_window()

    def add(self, record: dict[str, Any]) -> None:
        """Write another record with a ``step`` (e.g. evaluation metrics) to ``log.jsonl``; TensorBoard gets
        its numbers as ``eval/<key>``."""
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"eval/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
