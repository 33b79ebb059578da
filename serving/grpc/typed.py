"""The typed API `rnnserve.v1.RnnServe`: protobuf <-> data plane, nothing more."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

import grpc
import numpy as np

from serving.dataplane import DataPlane
from serving.errors import InvalidInput, ServingError
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.handlers import Drain, add_servicer
from serving.grpc.kserve import SMALL_REQUEST_BYTES
from serving.grpc.status import deadline_of, run_async_call, run_call, status_code
from serving.repository import ModelEntry
from serving.streaming import AudioStream, Update

log = logging.getLogger(__name__)


def _tensor_specs(infos) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=i.name, dtype=i.dtype, shape=list(i.shape)) for i in infos]


class RnnServeServicer(rnnserve_pb2_grpc.RnnServeServicer):
    def __init__(self, dataplane: DataPlane, executor: Executor):
        self.dataplane = dataplane
        self.executor = executor

    @staticmethod
    def _summary(entry: ModelEntry) -> pb.ModelSummary:
        versions = entry.version_names()
        task = entry.versions[versions[0]].task if versions else ""
        return pb.ModelSummary(
            name=entry.name, versions=versions, latest_version=versions[0] if versions else "",
            task=task, ready=entry.ready, reason=entry.reason,
        )

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[self._summary(e) for e in self.dataplane.list_models()])

    async def GetModel(self, request, context):
        model = await run_call(context, lambda: self.dataplane.model(request.name, request.version))
        entry = self.dataplane.entry(request.name)
        card = model.card
        limits = self.dataplane.limits(model)
        properties = {}
        if card is not None:
            properties = {f"architecture.{k}": str(v) for k, v in card.architecture.items()}
            properties.update({
                "description": card.description,
                "test_accuracy": f"{card.metrics.accuracy:.4f}",
                "test_macro_f1": f"{card.metrics.macro_f1:.4f}",
                "data_source": card.data.source,
            })
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            versions=entry.version_names(),
            task=model.task,
            labels=card.labels if card else [],
            streaming=model.streaming,
            execution_provider=model.session.provider,
            limits=pb.Limits(
                max_batch_size=limits.max_batch_size,
                max_text_chars=limits.max_text_chars,
                max_tokens=getattr(card.preprocessing, "max_tokens", 0) if card else 0,
                max_audio_seconds=limits.max_audio_seconds if model.frontend else 0.0,
                sample_rate_hz=model.frontend.config.sample_rate_hz if model.frontend else 0,
            ),
            inputs=_tensor_specs(model.session.inputs),
            outputs=_tensor_specs(model.session.outputs),
            ready=True,
            properties=properties,
        )

    async def Classify(self, request, context):
        texts = list(request.texts)
        clips = [_clip_arguments(clip) for clip in request.audio]
        deadline = deadline_of(context)
        if texts and not clips and request.ByteSize() <= SMALL_REQUEST_BYTES and self.dataplane.batching is not None:
            # Small text requests: tokenised on the event loop, the batch awaited (no worker thread).
            async def on_loop():
                _, pending = self.dataplane.submit_texts(request.model, request.version, texts, request.top_k,
                                                         deadline)
                return await pending

            predictions = await run_async_call(context, on_loop(), self.dataplane.metrics, "Classify", request.model)
            return self._classify_response(request.model, request.version, predictions)

        def classify():
            if texts and clips:
                raise InvalidInput("texts and audio: send one kind of input per request")
            if clips:
                return self.dataplane.classify_audio(request.model, request.version, clips, request.top_k, deadline)
            return self.dataplane.classify_texts(request.model, request.version, texts, request.top_k, deadline)

        model, predictions = await run_call(context, classify, self.executor, self.dataplane.metrics, "Classify",
                                            request.model)
        return self._classify_response(model.name, model.version, predictions)

    def _classify_response(self, name: str, version: str, predictions) -> pb.ClassifyResponse:
        model = self.dataplane.model(name, version)
        return pb.ClassifyResponse(
            model=model.name,
            version=model.version,
            results=[
                pb.Classification(
                    label=p.label, score=p.score, probabilities=p.probabilities.tolist(),
                    top=[pb.LabelScore(label=label, score=score) for label, score in p.top],
                )
                for p in predictions
            ],
        )


    async def Stream(self, requests, context):
        """Config first, then chunks; see StreamRequest in the proto for the contract."""
        streams = self.dataplane.streams
        idle_s = streams.limits.idle_timeout_s
        iterator = requests.__aiter__()

        async def pull():
            try:
                return await anext(iterator)
            except StopAsyncIteration:
                return None

        async def next_request():
            return await asyncio.wait_for(pull(), idle_s)

        try:
            first = await next_request()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no config within {idle_s:g} s (stream_idle_timeout_s)")
        if first is None:
            return
        if first.WhichOneof("kind") != "config":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "chunk before config: the first message of a stream must be a config")
        config = first.config
        metrics = self.dataplane.metrics
        try:
            stream = self.dataplane.open_stream(
                config.model, config.version, config.sample_rate_hz, threshold=config.threshold,
                smoothing_ms=config.smoothing_ms, refractory_ms=config.refractory_ms,
            )
            labels = stream.model.card.labels
            if config.top_k > len(labels):
                streams.close(stream, "error")
                raise InvalidInput(f"config.top_k: {config.top_k} exceeds the model's {len(labels)} labels")
        except ServingError as error:
            metrics.count_request("Stream", config.model, error.code)
            await context.abort(status_code(error), str(error))
        metrics.count_request("Stream", config.model, "OK")
        reason = "error"
        report = _Reporter(stream, config)
        try:
            while True:
                try:
                    request = await next_request()
                except TimeoutError:
                    reason = "idle"
                    # Freed before the status goes out, so that a client that sees it finds the state gone.
                    streams.close(stream, reason)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"stream idle for {idle_s:g} s (limit stream_idle_timeout_s); state freed")
                if request is None:
                    break
                if request.WhichOneof("kind") != "chunk":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "config: only the first message of a stream may be a config")
                try:
                    update = await streams.feed(stream, _chunk(request.chunk, stream))
                except ServingError as error:
                    await context.abort(status_code(error), str(error))
                except Exception:  # a bug, not the client's mistake: say so without leaking details
                    log.exception("stream step failed")
                    await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")
                response = report.add(update)
                if response is not None:
                    yield response
            try:
                update = await streams.feed(stream, None, last=True)
            except ServingError as error:  # e.g. ended by a shutdown after the grace period
                await context.abort(status_code(error), str(error))
            reason = "end"
            yield report.add(update)
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            if not self.dataplane.accepting:  # the drain ended it at the end of the grace period
                reason = "shutdown"
            else:
                reason = "deadline" if remaining is not None and remaining <= 0 else "cancelled"
            raise
        finally:
            streams.close(stream, reason)


class _Reporter:
    """Builds StreamResponses: text every chunk; audio on detections, every report_every_ms and at
    the end, with the posterior peaks gathered since the previous response."""

    def __init__(self, stream, config: pb.StreamConfig):
        self.stream, self.config = stream, config
        self.labels = stream.model.card.labels
        self.peaks = None
        self.reported_ms = 0.0

    def add(self, update: Update) -> pb.StreamResponse | None:
        stream = self.stream
        audio = isinstance(stream, AudioStream)
        if update.chunk_posteriors is not None:
            peaks = update.chunk_posteriors
            self.peaks = peaks if self.peaks is None else np.maximum(self.peaks, peaks)
        stream_ms = stream.seconds * 1000 if audio else 0.0
        due = stream_ms - self.reported_ms >= self.config.report_every_ms
        if audio and not (update.final or update.detections or due):
            return None
        response = pb.StreamResponse(
            model=stream.model.name, version=stream.model.version, chunks=stream.chunks, stream_ms=stream_ms,
            tokens=getattr(stream, "tokens", 0), final=update.final,
            detections=[
                pb.KeywordDetection(keyword=d.keyword, start_ms=d.start_ms, end_ms=d.end_ms, confidence=d.confidence)
                for d in update.detections
            ],
        )
        if update.logits is not None:
            p = DataPlane._predictions(update.logits[None], self.labels, self.config.top_k)[0]
            response.running.CopyFrom(pb.Classification(
                label=p.label, score=p.score, probabilities=p.probabilities.tolist(),
                top=[pb.LabelScore(label=label, score=score) for label, score in p.top],
            ))
        if self.peaks is not None:
            response.posteriors.extend(self.peaks.tolist())
            self.peaks = None
        self.reported_ms = stream_ms
        return response


def _chunk(chunk: pb.StreamChunk, stream):
    """A chunk as the stream takes it: text, or PCM16 bytes or float samples at the stream's
    input rate (decoded on the step thread)."""
    kind = chunk.WhichOneof("data")
    if isinstance(stream, AudioStream):
        if kind == "pcm16":
            return chunk.pcm16
        if kind == "samples":
            return np.asarray(chunk.samples.values, dtype=np.float32)
        raise InvalidInput(f"chunk: model {stream.model.name!r} streams audio; send pcm16 or samples, not {kind}")
    if kind != "text":
        raise InvalidInput(f"chunk: model {stream.model.name!r} streams text; send text, not {kind}")
    return chunk.text


def _clip_arguments(clip: pb.AudioClip) -> dict:
    """The AudioClip message as serving.audio.decode_clip keyword arguments."""
    kind = clip.WhichOneof("data")
    if kind == "file":
        return {"file": clip.file}
    if kind == "pcm16":
        return {"pcm16": clip.pcm16, "sample_rate_hz": clip.sample_rate_hz}
    if kind == "samples":
        return {"samples": np.asarray(clip.samples.values, dtype=np.float32), "sample_rate_hz": clip.sample_rate_hz}
    return {"samples": np.zeros(0, np.float32), "sample_rate_hz": clip.sample_rate_hz or 1}


SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
SERVICE_NAME = SERVICE.full_name


def add_to_server(servicer: RnnServeServicer, server: grpc.aio.Server, drain: Drain) -> None:
    add_servicer(server, SERVICE, servicer, drain)
