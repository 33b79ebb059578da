"""A small client for the typed API `rnnserve.v1`.

    with RnnServeClient("127.0.0.1:50051") as client:
        for result in client.classify("sentiment", ["what a wonderful flight"]):
            print(result.label, result.score)
        for result in client.classify_audio("keywords", [Path("yes.wav").read_bytes()]):
            print(result.label, result.score)
        for update in client.stream("sentiment", ["what a wond", "erful flight"]):
            print(update.running.label, update.final)
"""

from __future__ import annotations

import collections

import grpc
import numpy as np

from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def audio_request(model: str, clips: list, sample_rate_hz: int, version: str, top_k: int) -> pb.ClassifyRequest:
    audio = []
    for clip in clips:
        if isinstance(clip, bytes | bytearray):
            audio.append(pb.AudioClip(file=bytes(clip)))
        else:
            audio.append(pb.AudioClip(samples=pb.FloatSamples(values=np.asarray(clip, np.float32).tolist()),
                                      sample_rate_hz=sample_rate_hz))
    return pb.ClassifyRequest(model=model, version=version, audio=audio, top_k=top_k)


def stream_requests(model: str, chunks, version: str = "", **config):
    """The request messages of a Stream call: the config, then one message per chunk. A chunk is
    text (str), raw little-endian PCM16 (bytes) or float samples in [-1, 1] (array or list).
    config: StreamConfig fields (sample_rate_hz, threshold, smoothing_ms, refractory_ms,
    report_every_ms, top_k)."""
    yield pb.StreamRequest(config=pb.StreamConfig(model=model, version=version, **config))
    for chunk in chunks:
        if isinstance(chunk, str):
            yield pb.StreamRequest(chunk=pb.StreamChunk(text=chunk))
        elif isinstance(chunk, bytes | bytearray):
            yield pb.StreamRequest(chunk=pb.StreamChunk(pcm16=bytes(chunk)))
        else:
            values = np.asarray(chunk, np.float32)
            yield pb.StreamRequest(chunk=pb.StreamChunk(samples=pb.FloatSamples(values=values.tolist())))


def _credentials(tls_ca: bytes, tls_cert: bytes | None, tls_key: bytes | None) -> grpc.ChannelCredentials:
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key: give both for mutual TLS, or neither")
    return grpc.ssl_channel_credentials(tls_ca, private_key=tls_key, certificate_chain=tls_cert)


class AsyncRnnServeClient:
    """The same calls for asyncio code:

        async with AsyncRnnServeClient("127.0.0.1:50051") as client:
            results = await client.classify("sentiment", ["what a wonderful flight"])
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout_s: float = 30.0, token: str | None = None,
        tls_ca: bytes | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None,
    ):
        """As RnnServeClient: tls_ca (PEM) turns on TLS, tls_cert and tls_key add a client certificate."""
        self.channel = grpc.aio.secure_channel(target, _credentials(tls_ca, tls_cert, tls_key)) \
            if tls_ca is not None else grpc.aio.insecure_channel(target)
        self.stub = rnnserve_pb2_grpc.RnnServeStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def list_models(self) -> list[pb.ModelSummary]:
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self.metadata)
        return list(reply.models)

    async def get_model(self, name: str, version: str = "") -> pb.ModelInfo:
        return await self.stub.GetModel(pb.GetModelRequest(name=name, version=version), timeout=self.timeout_s,
                                        metadata=self.metadata)

    async def classify(self, model: str, texts: list[str], version: str = "", top_k: int = 0
                       ) -> list[pb.Classification]:
        request = pb.ClassifyRequest(model=model, version=version, texts=texts, top_k=top_k)
        return list((await self.stub.Classify(request, timeout=self.timeout_s, metadata=self.metadata)).results)

    async def classify_audio(self, model: str, clips: list, sample_rate_hz: int = 0, version: str = "",
                             top_k: int = 0) -> list[pb.Classification]:
        request = audio_request(model, clips, sample_rate_hz, version, top_k)
        return list((await self.stub.Classify(request, timeout=self.timeout_s, metadata=self.metadata)).results)

    def stream(self, model: str, chunks, version: str = "", timeout_s: float | None = None, **config):
        """An async iterator of StreamResponses; `chunks` may be a sync or an async iterable."""

        async def requests():
            if hasattr(chunks, "__aiter__"):
                yield next(stream_requests(model, [], version, **config))
                async for chunk in chunks:
                    for request in stream_requests(model, [chunk], version, **config):
                        if request.HasField("chunk"):
                            yield request
            else:
                for request in stream_requests(model, chunks, version, **config):
                    yield request

        return self.stub.Stream(requests(), timeout=timeout_s, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRnnServeClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self.header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class RnnServeClient:
    def __init__(
        self, target: str = DEFAULT_TARGET, timeout_s: float = 30.0, token: str | None = None,
        tls_ca: bytes | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None,
    ):
        """tls_ca (PEM) turns on TLS; tls_cert and tls_key add a client certificate (mutual TLS)."""
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, _credentials(tls_ca, tls_cert, tls_key))
        else:
            self.channel = grpc.insecure_channel(target)
        if token:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = rnnserve_pb2_grpc.RnnServeStub(self.channel)
        self.timeout_s = timeout_s

    def list_models(self) -> list[pb.ModelSummary]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s).models)

    def get_model(self, name: str, version: str = "") -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(name=name, version=version), timeout=self.timeout_s)

    def classify(self, model: str, texts: list[str], version: str = "", top_k: int = 0) -> list[pb.Classification]:
        request = pb.ClassifyRequest(model=model, version=version, texts=texts, top_k=top_k)
        return list(self.stub.Classify(request, timeout=self.timeout_s).results)

    def classify_audio(
        self, model: str, clips: list, sample_rate_hz: int = 0, version: str = "", top_k: int = 0
    ) -> list[pb.Classification]:
        """clips: encoded files (WAV/FLAC/OGG bytes), or float sample arrays in [-1, 1] at
        sample_rate_hz (numpy arrays or lists)."""
        request = audio_request(model, clips, sample_rate_hz, version, top_k)
        return list(self.stub.Classify(request, timeout=self.timeout_s).results)

    def stream(self, model: str, chunks, version: str = "", timeout_s: float | None = None, **config):
        """A live stream: yields a StreamResponse per text chunk (audio: on detections and every
        report_every_ms), then a final one after the last chunk. Streams have no deadline unless
        timeout_s is given. See stream_requests for chunks and config."""
        return self.stub.Stream(stream_requests(model, chunks, version, **config), timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RnnServeClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
