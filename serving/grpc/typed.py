"""The typed API `rnnserve.v1.RnnServe`: protobuf <-> data plane, nothing more."""

from __future__ import annotations

from concurrent.futures import Executor

import grpc
import numpy as np

from serving.dataplane import DataPlane
from serving.errors import InvalidInput
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc
from serving.grpc.handlers import add_servicer
from serving.grpc.status import deadline_of, run_call
from serving.repository import ModelEntry


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

        def classify():
            if texts and clips:
                raise InvalidInput("texts and audio: send one kind of input per request")
            if clips:
                return self.dataplane.classify_audio(request.model, request.version, clips, request.top_k, deadline)
            return self.dataplane.classify_texts(request.model, request.version, texts, request.top_k, deadline)

        model, predictions = await run_call(context, classify, self.executor, self.dataplane.metrics, "Classify",
                                            request.model)
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


def add_to_server(servicer: RnnServeServicer, server: grpc.aio.Server) -> None:
    add_servicer(server, SERVICE, servicer)
