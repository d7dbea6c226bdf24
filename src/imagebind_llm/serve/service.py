"""What the API and the web UI share: one engine (loaded in the background), the limits, the metrics, and
the worker pool that decodes media outside the engine's thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence

import torch

from imagebind_llm.engine import Engine
from imagebind_llm.serve.config import ServeConfig
from imagebind_llm.serve.media import decode_error, decode_part
from imagebind_llm.serve.metrics import Metrics
from imagebind_llm.serve.protocol import APIError, MediaPart

log = logging.getLogger(__name__)


class Service:
    """The server's state: give an `Engine`, or a ``load`` function that builds one (then the model is loaded
    and served from one background thread, and requests get 503 until it is ready)."""

    def __init__(self, config: ServeConfig, engine: Engine | None = None,
                 load: Callable[[], Engine] | None = None) -> None:
        if (engine is None) == (load is None):
            raise ValueError("give an engine or a load function, not both")
        self.config, self.metrics = config, Metrics()
        self._engine, self._load = engine, load
        self.load_error: BaseException | None = None
        self.unclip = None  # an `imagebind_llm.apps.UnCLIP` when the server also makes images (`serve --unclip`)
        self._pool = concurrent.futures.ThreadPoolExecutor(config.media_workers, thread_name_prefix="media")
        if engine is not None:
            self._watch(engine)

    def start(self) -> None:
        """Start loading the model (when built with ``load``)."""
        if self._load is not None and self._engine is None:
            threading.Thread(target=self._load_and_serve, name="imagebind-llm-engine", daemon=True).start()

    def _load_and_serve(self) -> None:
        try:
            engine = self._load()
        except BaseException as e:  # reported by /health and every request
            log.exception("loading the model failed")
            self.load_error = e
            return
        self._watch(engine)
        self._engine = engine
        engine.run_forever()  # the thread that loaded the model serves it

    def _watch(self, engine: Engine) -> None:
        self.metrics.watch(lambda: engine.waiting, lambda: engine.running)

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        """The engine; while the model loads, a 503 (``Retry-After``) for the client."""
        if self._engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise APIError(503, "the model is loading; retry shortly", type="unavailable_error", code="model_loading",
                           headers={"Retry-After": "5"})
        return self._engine

    def decode_sync(self, parts: Sequence[MediaPart]) -> list[torch.Tensor]:
        """Decode media parts under the limits, in the calling thread."""
        tensors = []
        for part in parts:
            try:
                tensors.append(decode_part(part, self.config.media))
            except APIError:
                raise
            except Exception as e:  # a decoder failing on hostile input: the client's error, never a 500
                log.warning("decoding %s failed", part.param, exc_info=True)
                raise decode_error(part, e) from None
        return tensors

    async def decode(self, parts: Sequence[MediaPart]) -> list[torch.Tensor]:
        """Decode media parts in the worker pool (the engine keeps decoding tokens meanwhile)."""
        if not parts:
            return []
        futures = [asyncio.get_running_loop().run_in_executor(self._pool, self.decode_sync, [p]) for p in parts]
        return [t for tensors in await asyncio.gather(*futures) for t in tensors]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
