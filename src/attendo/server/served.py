"""The models one server serves: loaded in the background, each generating model with its own
scheduler, looked up by the name it was given on the command line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from attendo.errors import InvalidSettingError
from attendo.generation.lookup import check_draft_tokens
from attendo.model import Model
from attendo.server.errors import bad_request, model_not_found, unavailable
from attendo.server.metrics import Metrics
from attendo.server.prompts import PromptEncoder
from attendo.server.scheduler import Scheduler

log = logging.getLogger("attendo.server")


@dataclass
class ServerSettings:
    models: list[str]  # names, directories or files, as given to --model; requests use these names
    api_key: str | None = None
    max_batch: int = 16  # sequences decoded together (KV-cache slots per model)
    max_queue: int = 64  # sequences that may wait for a slot before requests get 429
    max_len: int = 2048  # tokens (prompt + completion) per sequence, capped by the model's context
    prefill_chunk: int = 256  # prompt tokens prefilled per sequence per step
    prompt_lookup: int = 0  # draft tokens checked per step while one sequence decodes (0: off)
    prefix_cache: bool = True  # a new prompt reuses the keys and values a finished one left in its slot
    max_body_bytes: int = 4 * 2**20
    dtype: str | None = None
    kv_cache_dtype: str | None = None  # see attendo.load
    shutdown_grace: float = 30.0  # seconds open generations may run on after SIGTERM
    # LoRA adapters served as models of their own on the first of `models`: name -> adapter directory.
    adapters: dict[str, str] = field(default_factory=dict)
    indexes: dict[str, str] = field(default_factory=dict)  # retrieval indexes: name -> index file

    def __post_init__(self) -> None:
        limits = {"max_batch": (self.max_batch, 1), "max_queue": (self.max_queue, 0), "max_len": (self.max_len, 2),
                  "prefill_chunk": (self.prefill_chunk, 1), "max_body_bytes": (self.max_body_bytes, 1024)}  # fmt: skip
        for name, (value, least) in limits.items():
            if value < least:
                raise InvalidSettingError(f"{name} must be at least {least}, got {value}")
        check_draft_tokens(self.prompt_lookup)
        if self.shutdown_grace < 0:
            raise InvalidSettingError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")


@dataclass
class Served:
    name: str
    model: Model
    prompts: PromptEncoder
    scheduler: Scheduler | None  # None: the model does not generate text (encoder-only)
    window: int  # the most tokens (prompt + completion) one sequence may hold


@dataclass
class ServedModels:
    settings: ServerSettings
    preloaded: dict[str, Model] = field(default_factory=dict)
    loader: Callable[[str, str | None], Model] | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.names = list(dict.fromkeys([*self.settings.models, *self.settings.adapters, *self.preloaded]))
        self.served: dict[str, Served] = {}
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.shutting_down = False
        self.created = int(time.time())
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load every model in a background thread; /health answers 503 until it is done."""
        self._thread = threading.Thread(target=self._load_all, name="attendo-loader", daemon=True)
        self._thread.start()

    def _load_all(self) -> None:
        try:
            for name in self.names:
                model = self.preloaded.get(name) or self._load(name)
                self.served[name] = self._serve(name, model)
                log.info("serving %s as %r", model, name)
        except Exception as e:  # reported by /health; the process stays up to say so
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading models failed: %s", self.load_error)
            return
        self.ready.set()

    def _load(self, name: str) -> Model:
        if self.loader is not None:
            return self.loader(name, self.settings.dtype)
        from attendo.loader import load

        s = self.settings
        adapter = s.adapters.get(name)
        return load(s.models[0] if adapter else name, dtype=s.dtype, adapter=adapter, kv_cache_dtype=s.kv_cache_dtype)

    def _serve(self, name: str, model: Model) -> Served:
        s = self.settings
        window = min(model.config.context_length, s.max_len)
        scheduler = None
        if model.config.family == "decoder":
            scheduler = Scheduler(
                name, model, max_batch=s.max_batch, max_queue=s.max_queue, max_len=window,
                prefill_chunk=s.prefill_chunk, prompt_lookup=s.prompt_lookup, prefix_cache=s.prefix_cache,
                metrics=self.metrics,
            )  # fmt: skip
            scheduler.warm_up()  # /health stays 503 until this is done
            scheduler.start()
        return Served(name, model, PromptEncoder(model.tokenizer), scheduler, window)

    def get(self, name: str) -> Served:
        if name not in self.names:
            raise model_not_found(name)
        if self.shutting_down:
            raise unavailable("the server is shutting down")
        if name not in self.served:
            raise unavailable(f"model {name!r} is still loading" if self.load_error is None else self.load_error)
        return self.served[name]

    def generator(self, name: str) -> Served:
        served = self.get(name)
        if served.scheduler is None:
            raise bad_request(f"model {name!r} ({served.model.config.family}) does not generate text", param="model")
        return served

    def queues(self) -> dict[str, tuple[int, int]]:
        return {n: (s.scheduler.waiting, s.scheduler.running) for n, s in self.served.items() if s.scheduler}

    def begin_shutdown(self) -> None:
        """Stop taking requests; open generations get `shutdown_grace` seconds to finish."""
        self.shutting_down = True
        for served in list(self.served.values()):
            if served.scheduler is not None:
                served.scheduler.drain(self.settings.shutdown_grace)

    def close(self) -> None:
        self.shutting_down = True
        for served in list(self.served.values()):
            if served.scheduler is not None:
                served.scheduler.stop()

