"""`inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over gRPC,
wire-compatible with tritonclient[grpc].

Task models speak in their own terms: text models take `text` BYTES [N] (UTF-8), the
keyword model takes `audio` FP32 [N, S] (mono, at the model's rate unless the request
parameter `sample_rate_hz` says otherwise); both answer `label` BYTES [N] and
`probabilities` FP32 [N, C]. A plain ONNX model (no card) is served tensor-in, tensor-out
with the graph's own names. Outputs come back as raw_output_contents, as Triton does.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import Executor

import grpc
import numpy as np

from serving import __version__
from serving.audio import MAX_SOURCE_RATE_HZ
from serving.dataplane import DataPlane, Prediction
from serving.errors import InvalidInput, ServingError
from serving.grpc.generated.inference import inference_pb2 as pb
from serving.grpc.handlers import Drain, add_servicer
from serving.grpc.status import deadline_of, run_async_call, run_call
from serving.repository import ModelVersion
from serving.tensors import FROM_NUMPY_NAME, decode_tensor, raw_bytes

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
# Text requests up to this size are tokenised on the event loop (a few hundred microseconds at
# most); larger ones go to the worker pool so the loop never stalls.
SMALL_REQUEST_BYTES = 16 * 1024
TASK_OUTPUTS = ("label", "probabilities")


def _parameter(parameter: pb.InferParameter):
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _task_inputs(model: ModelVersion) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    if model.frontend is not None:
        return [pb.ModelMetadataResponse.TensorMetadata(name="audio", datatype="FP32", shape=[-1, -1])]
    return [pb.ModelMetadataResponse.TensorMetadata(name="text", datatype="BYTES", shape=[-1])]


def _task_outputs(model: ModelVersion) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
        pb.ModelMetadataResponse.TensorMetadata(
            name="probabilities", datatype="FP32", shape=[-1, len(model.card.labels)]
        ),
    ]


def _graph_tensors(infos) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=info.name, datatype=FROM_NUMPY_NAME.get(info.dtype, info.dtype.upper()), shape=list(info.shape)
        )
        for info in infos
    ]


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input tensor of a request by name, from raw_input_contents or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs (one per input, in order)"
        )
    arrays = {}
    for index, tensor in enumerate(request.inputs):
        field = f"inputs[{tensor.name or index}]"
        if tensor.name in arrays:
            raise InvalidInput(f"{field}: the input appears twice")
        arrays[tensor.name] = decode_tensor(
            field, tensor.datatype, list(tensor.shape), tensor.contents, raw[index] if raw else None
        )
    return arrays


class InferenceServicer:
    def __init__(self, dataplane: DataPlane, executor: Executor):
        self.dataplane = dataplane
        self.executor = executor

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        ready = self.dataplane.accepting and any(entry.ready for entry in self.dataplane.list_models())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context):
        def ready():
            try:
                self.dataplane.model(request.name, request.version)
            except ServingError as error:
                if error.code == "UNAVAILABLE":
                    return False
                raise
            return self.dataplane.accepting

        return pb.ModelReadyResponse(ready=await run_call(context, ready, self.executor))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="rnnserve", version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        def describe():
            model = self.dataplane.model(request.name, request.version)
            entry = self.dataplane.entry(request.name)
            if model.card is None:
                inputs, outputs = _graph_tensors(model.session.inputs), _graph_tensors(model.session.outputs)
            else:
                inputs, outputs = _task_inputs(model), _task_outputs(model)
            return pb.ModelMetadataResponse(
                name=model.name, versions=entry.version_names(), platform=PLATFORM, inputs=inputs, outputs=outputs
            )

        return await run_call(context, describe, self.executor)

    def infer(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        """One request, synchronously (runs on the worker pool)."""
        model = self.dataplane.model(request.model_name, request.model_version)
        arrays = decode_inputs(request)
        requested = [output.name for output in request.outputs]
        _check_task_outputs(model, requested)
        if model.card is None:
            model, results = self.dataplane.infer_tensors(
                model.name, model.version, arrays, requested or None, deadline
            )
            named = [(name, FROM_NUMPY_NAME.get(str(value.dtype), "BYTES"), value) for name, value in results.items()]
        else:
            predictions = self._classify(model, arrays, request, deadline)
            named = _task_tensors(model, predictions, requested)
        return _response(model, request, named)

    async def infer_sequence(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One chunk of a Triton-style sequence: state held per sequence_id between requests.

        Text models take `text` BYTES [1] (a fragment), keywords `audio` FP32 [1, S]; the
        answer is the running prediction of everything sent so far, final at sequence_end."""
        sequence_id, start, end = sequence_parameters(request)
        model = self.dataplane.model(request.model_name, request.model_version)
        arrays = decode_inputs(request)
        requested = [output.name for output in request.outputs]
        _check_task_outputs(model, requested)
        if model.card is None:
            raise InvalidInput(f"parameters[sequence_id]: model {model.name!r} is a plain tensor model without state")
        rate = _sample_rate(request, model) if model.frontend is not None else 0
        chunk = self._sequence_chunk(model, arrays)
        streams = self.dataplane.streams
        stream = streams.sequence(
            model, sequence_id, start, lambda: self.dataplane.open_stream(model.name, model.version, rate)
        )
        if not start and model.frontend is not None and "sample_rate_hz" in request.parameters \
                and rate != stream.input_rate:
            raise InvalidInput(f"parameters[sample_rate_hz]: {rate}, the sequence started at {stream.input_rate} Hz")
        try:
            async with stream.lock:
                update = await streams.feed(stream, chunk, last=end)
        except ServingError:
            if start:  # a sequence whose first request failed never started
                streams.close(stream, "error")
            raise
        if end:
            streams.close(stream, "end")
        labels = model.card.labels
        if update.logits is None:
            predictions = []
        else:
            predictions = self.dataplane._predictions(update.logits[None], labels, 0)
        return _response(model, request, _task_tensors(model, predictions, requested))

    def _sequence_chunk(self, model: ModelVersion, arrays: dict[str, np.ndarray]):
        expected = "audio" if model.frontend is not None else "text"
        if set(arrays) != {expected}:
            raise InvalidInput(f"inputs: model {model.name!r} takes one input named {expected!r}, got {sorted(arrays)}")
        array = arrays[expected]
        if expected == "text":
            texts = _texts(array)
            if len(texts) != 1:
                raise InvalidInput(f"inputs[text]: {len(texts)} texts; a sequence takes one fragment per request")
            return texts[0]
        _check_audio(array)
        if array.shape[0] != 1:
            raise InvalidInput(f"inputs[audio]: shape {list(array.shape)}; a sequence takes [1, samples] per request")
        return array[0]

    def _classify(
        self, model: ModelVersion, arrays: dict[str, np.ndarray], request, deadline: float | None
    ) -> list[Prediction]:
        expected = "audio" if model.frontend is not None else "text"
        if set(arrays) != {expected}:
            raise InvalidInput(f"inputs: model {model.name!r} takes one input named {expected!r}, got {sorted(arrays)}")
        array = arrays[expected]
        if expected == "text":
            texts = _texts(array)
            _, predictions = self.dataplane.classify_texts(model.name, model.version, texts, deadline=deadline)
            return predictions
        _check_audio(array)
        rate = _sample_rate(request, model)
        clips = [{"samples": row, "sample_rate_hz": rate} for row in array]
        _, predictions = self.dataplane.classify_audio(model.name, model.version, clips, deadline=deadline)
        return predictions

    async def infer_on_loop(self, request: pb.ModelInferRequest, deadline: float | None):
        """Plain tensor models, and text models with small requests, on the event loop:
        decoding, checks and tokenising are cheap there, and the batch is awaited rather than
        waited for by a worker thread. None for the rest (audio, large texts)."""
        model = self.dataplane.model(request.model_name, request.model_version)
        requested = [output.name for output in request.outputs]
        if model.encoder is not None and request.ByteSize() <= SMALL_REQUEST_BYTES:
            _check_task_outputs(model, requested)
            arrays = decode_inputs(request)
            if set(arrays) != {"text"}:
                raise InvalidInput(f"inputs: model {model.name!r} takes one input named 'text', got {sorted(arrays)}")
            model, pending = self.dataplane.submit_texts(model.name, model.version, _texts(arrays["text"]),
                                                         deadline=deadline)
            predictions = await pending
            return _response(model, request, _task_tensors(model, predictions, requested))
        if model.card is not None:
            return None
        model, pending = self.dataplane.submit_tensors(
            model.name, model.version, decode_inputs(request), requested or None, deadline
        )
        results = await pending
        named = [(name, FROM_NUMPY_NAME.get(str(value.dtype), "BYTES"), value) for name, value in results.items()]
        return _response(model, request, named)

    async def ModelInfer(self, request, context):
        if is_sequence(request):
            return await run_async_call(context, self.infer_sequence(request), self.dataplane.metrics,
                                        "ModelInfer", request.model_name)
        deadline = deadline_of(context)
        if request.model_name in self.dataplane.models and self.dataplane.batching is not None:
            async def tensors_or_task():
                response = await self.infer_on_loop(request, deadline)
                if response is None:
                    loop = asyncio.get_running_loop()
                    response = await loop.run_in_executor(self.executor, self.infer, request, deadline)
                return response

            return await run_async_call(context, tensors_or_task(), self.dataplane.metrics, "ModelInfer",
                                        request.model_name)
        return await run_call(context, lambda: self.infer(request, deadline), self.executor, self.dataplane.metrics,
                              "ModelInfer", request.model_name)

    async def ModelStreamInfer(self, requests, context):
        """Each request gets one response on the stream; a failed request gets an error_message
        and the stream goes on."""
        loop = asyncio.get_running_loop()
        metrics = self.dataplane.metrics
        async for request in requests:
            try:
                if is_sequence(request):
                    response = await self.infer_sequence(request)
                else:
                    response = await loop.run_in_executor(self.executor, self.infer, request)
            except ServingError as error:
                metrics.count_request("ModelStreamInfer", request.model_name, error.code)
                yield pb.ModelStreamInferResponse(
                    error_message=f"{error.code}: {error}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
                continue
            except Exception:  # a bug, not the client's mistake: say so, keep the stream, log the details
                log.exception("unexpected error in ModelStreamInfer")
                metrics.count_request("ModelStreamInfer", request.model_name, "INTERNAL")
                yield pb.ModelStreamInferResponse(
                    error_message="INTERNAL: internal server error; see the server log",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
                continue
            metrics.count_request("ModelStreamInfer", request.model_name, "OK")
            yield pb.ModelStreamInferResponse(infer_response=response)


def _check_task_outputs(model: ModelVersion, requested: list[str]) -> None:
    if model.card is None:
        return
    for name in requested:
        if name not in TASK_OUTPUTS:
            raise InvalidInput(f"outputs: {name!r} is not an output of {model.name!r} (label, probabilities)")


def _task_tensors(model: ModelVersion, predictions: list[Prediction], requested: list[str]) -> list[tuple]:
    labels = np.array([p.label.encode() for p in predictions], dtype=object)
    probabilities = np.array([p.probabilities for p in predictions], np.float32).reshape(
        len(predictions), len(model.card.labels)
    )
    available = {"label": ("BYTES", labels), "probabilities": ("FP32", probabilities)}
    return [(name, *available[name]) for name in (requested or TASK_OUTPUTS)]


def _response(model: ModelVersion, request: pb.ModelInferRequest, named: list[tuple]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for name, datatype, value in named:
        response.outputs.add(name=name, datatype=datatype, shape=list(value.shape))
        response.raw_output_contents.append(raw_bytes(value, datatype))
    return response


def _texts(array: np.ndarray) -> list[str]:
    if array.dtype != object:
        raise InvalidInput("inputs[text]: datatype must be BYTES (UTF-8 strings)")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise InvalidInput(f"inputs[text]: shape {list(array.shape)}, expected [N] (or [N, 1])")
    texts = []
    for index, item in enumerate(array):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"inputs[text][{index}]: not valid UTF-8 ({error.reason})") from None
    return texts


def _check_audio(array: np.ndarray) -> None:
    if array.dtype != np.float32:
        raise InvalidInput(f"inputs[audio]: datatype {FROM_NUMPY_NAME.get(str(array.dtype), array.dtype)}, "
                           "expected FP32 samples in [-1, 1]")
    if array.ndim != 2:
        raise InvalidInput(f"inputs[audio]: shape {list(array.shape)}, expected [N, samples]")


def _sample_rate(request: pb.ModelInferRequest, model: ModelVersion) -> int:
    if "sample_rate_hz" not in request.parameters:
        return model.frontend.config.sample_rate_hz
    rate = _parameter(request.parameters["sample_rate_hz"])
    if not isinstance(rate, int | float) or isinstance(rate, bool) or not math.isfinite(rate) or rate != int(rate):
        raise InvalidInput("parameters[sample_rate_hz]: must be an integer number of Hz")
    if not 0 < rate <= MAX_SOURCE_RATE_HZ:
        raise InvalidInput(f"parameters[sample_rate_hz]: {int(rate)}, must be 1 to {MAX_SOURCE_RATE_HZ} Hz")
    return int(rate)


def is_sequence(request: pb.ModelInferRequest) -> bool:
    """Triton's rule: a request belongs to a sequence when it carries a non-zero sequence_id
    (or any sequence flag, which then needs one)."""
    parameters = request.parameters
    if any(name in parameters for name in ("sequence_start", "sequence_end")):
        return True
    return "sequence_id" in parameters and _parameter(parameters["sequence_id"]) not in (0, "", None)


def sequence_parameters(request: pb.ModelInferRequest) -> tuple[object, bool, bool]:
    parameters = request.parameters
    sequence_id = _parameter(parameters["sequence_id"]) if "sequence_id" in parameters else None
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str) or sequence_id in (0, ""):
        raise InvalidInput(
            "parameters[sequence_id]: sequence_start/sequence_end need a non-zero integer or non-empty string "
            "sequence_id"
        )
    if isinstance(sequence_id, str) and len(sequence_id) > 256:
        raise InvalidInput(f"parameters[sequence_id]: {len(sequence_id)} characters, limit 256")
    flags = []
    for name in ("sequence_start", "sequence_end"):
        value = _parameter(parameters[name]) if name in parameters else False
        if not isinstance(value, bool):
            raise InvalidInput(f"parameters[{name}]: must be a bool")
        flags.append(value)
    return sequence_id, flags[0], flags[1]


SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server, drain: Drain) -> None:
    add_servicer(server, SERVICE, servicer, drain)
