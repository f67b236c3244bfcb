"""The FastAPI app: OpenAI-compatible generation, classification, model list, health and the chat page.

``create_app`` takes models already loaded (``serving.models``), so tests and the benchmark build
the same app the command line serves. The generator's engine thread starts and stops with the
app's lifespan. With an API key, every ``/v1`` route and ``/invocations`` need
``Authorization: Bearer <key>``; ``/health`` and the page stay open (the page asks for the key).
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi.responses import HTMLResponse

from llmcore.classifier import predict_proba, probability_columns
from serving.engine import Engine
from serving.errors import APIError, install_error_handlers
from serving.limits import BodyLimit, ServeConfig
from serving.models import CLASSIFIER, GENERATOR, Served
from serving.openai_api import openai_router
from serving.schemas import ClassifyRequest

PAGE = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")
FLAGS = {GENERATOR: "--model", CLASSIFIER: "--classifier"}


class ServeState:
    """The served models, the generator's engine and the settings every route reads."""

    def __init__(self, generator: Served | None, classifier: Served | None, config: ServeConfig):
        self.models = {GENERATOR: generator, CLASSIFIER: classifier}
        self.config = config
        self.engine = generator and Engine(
            generator.model,
            generator.tokenizer,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            stream_interval=config.stream_interval_s,
            threads=config.torch_threads,
        )
        self.classifying = 0  # classification requests in flight (bounded like the engine's queue)
        # Without an engine, model calls still run on one thread of their own (see serving.engine).
        self.executor = None
        if not self.engine:
            threads = config.torch_threads or torch.get_num_threads()
            self.executor = ThreadPoolExecutor(1, "llm-torch", initializer=torch.set_num_threads, initargs=(threads,))

    async def run_model(self, fn, *args):
        """``fn(*args)`` on the server's one torch thread: the engine's, else the executor's."""
        if self.engine:
            return await self.engine.call(fn, *args)
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def start(self) -> None:
        if self.engine:
            self.engine.start()

    def close(self) -> None:
        if self.engine:
            self.engine.close()
        else:
            self.executor.shutdown(cancel_futures=True)

    def lookup(self, kind: str, requested: str | None) -> Served:
        """The served model of ``kind``, checked against the name a request gave; else a 404."""
        served = self.models[kind]
        if served is None:
            raise APIError(
                404,
                f"this server has no {kind} model: start it with {FLAGS[kind]} DIR_OR_MODELS_URI",
                param="model",
                code="model_not_found",
            )
        if requested is not None and requested != served.name:
            other = self.models[CLASSIFIER if kind == GENERATOR else GENERATOR]
            hint = f" ({requested!r} is the {other.kind})" if other is not None and other.name == requested else ""
            raise APIError(
                404,
                f"the model {requested!r} does not exist here{hint}; the {kind} is {served.name!r}",
                param="model",
                code="model_not_found",
            )
        return served


def bearer_auth(api_key: str | None):
    async def check(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def create_app(generator: Served | None, classifier: Served | None, config: ServeConfig = ServeConfig()) -> FastAPI:
    state = ServeState(generator, classifier, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="llmpipe serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.state.serve = state
    install_error_handlers(app)
    auth = [Depends(bearer_auth(config.api_key))]
    app.include_router(openai_router(state), dependencies=auth)
    app.include_router(info_router(state), dependencies=auth)
    app.include_router(classify_router(state), dependencies=auth)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict:
        names = {kind: served and served.name for kind, served in state.models.items()}
        return {"status": "ok", **names, "engine": state.engine.stats() if state.engine else None}

    return app


def info_router(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [s.card() for s in state.models.values() if s is not None]}

    @router.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        for served in state.models.values():
            if served is not None and served.name == name:
                return served.card()
        raise APIError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")

    return router


async def classify(state: ServeState, body: ClassifyRequest) -> tuple[Served, torch.Tensor]:
    """Class probabilities (texts, classes), computed on the torch thread; 4xx for bad or too many."""
    served = state.lookup(CLASSIFIER, body.model)
    try:
        texts = body.texts()
    except ValueError as exc:
        raise APIError(400, str(exc), param="input") from exc
    if not 0 < len(texts) <= state.config.max_texts:
        raise APIError(400, f"give 1 to {state.config.max_texts} texts, got {len(texts)}", param="input")
    if state.classifying >= state.config.max_classify:
        raise APIError(
            429,
            "server busy: too many classification requests at once",
            code="too_many_requests",
            headers={"Retry-After": "1"},
        )
    state.classifying += 1
    try:
        return served, await state.run_model(predict_proba, served.model, served.tokenizer, texts)
    finally:
        state.classifying -= 1


def classify_router(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify_texts(body: ClassifyRequest) -> dict:
        served, probs = await classify(state, body)
        labels = served.model.labels
        data = [
            {
                "object": "classification",
                "index": i,
                "label": labels[int(p.argmax())],
                "probabilities": dict(zip(labels, p.tolist())),
            }
            for i, p in enumerate(probs)
        ]
        return {"object": "list", "model": served.name, "data": data}

    @router.post("/invocations")
    async def invocations(body: ClassifyRequest) -> dict:
        """MLflow's scoring-server answer, as the registered pyfunc gives it: the label and
        ``<label>_probability`` (the positive class's for two classes, ``spam_probability`` for the
        spam model; every class's for more)."""
        served, probs = await classify(state, body)
        labels = served.model.labels
        columns = probability_columns(labels)
        return {
            "predictions": [
                {"label": labels[int(p.argmax())], **{name: float(p[i]) for name, i in columns}} for p in probs
            ]
        }

    return router
