"""The data plane shared by every transport: validate inputs, preprocess, run, postprocess."""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from serving.audio import decode_clip
from serving.batching import Batcher
from serving.card import Limits
from serving.detector import DetectorConfig
from serving.errors import InvalidInput, ModelNotFound, ModelNotReady
from serving.metrics import Metrics
from serving.repository import ModelEntry, ModelVersion
from serving.runtime import OnnxSession
from serving.streaming import Stream, StreamLimits, StreamManager, softmax


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: np.ndarray
    # (label, probability), most probable first; empty unless top_k was asked for
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_rows: int = 64
    max_delay_s: float = 0.002
    max_queue_rows: int = 4096
    # An idle instance holds fewer rows than this (up to max_delay_s) when no other instance is
    # busy; 0: max_batch_rows.
    preferred_rows: int = 0


def _padded_runs(rows: list[np.ndarray], max_rows: int, run) -> list[np.ndarray]:
    """Run variable-length rows in padded chunks of similar lengths; results in row order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    results: list[np.ndarray | None] = [None] * len(rows)
    for start in range(0, len(order), max_rows):
        chunk = order[start : start + max_rows]
        lengths = np.array([len(rows[i]) for i in chunk], np.int64)
        batch = np.zeros((len(chunk), int(lengths.max()), *rows[chunk[0]].shape[1:]), rows[chunk[0]].dtype)
        for slot, i in enumerate(chunk):
            batch[slot, : len(rows[i])] = rows[i]
        for slot, logits in zip(chunk, run(batch, lengths), strict=True):
            results[slot] = logits
    return results


class DataPlane:
    def __init__(
        self, models: dict[str, ModelEntry], batching: BatchingConfig | None = BatchingConfig(),
        stream_limits: StreamLimits = StreamLimits(),
    ):
        self.models = models
        # False once the server drains for shutdown: readiness probes then say no.
        self.accepting = True
        # None runs every request on its own (no batcher threads).
        self.batching = batching
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._lock = threading.Lock()
        self.metrics = Metrics()
        self.metrics.set_models({name: entry.ready for name, entry in models.items()})
        for entry in models.values():
            if entry.ready:
                self.metrics.instances.labels(entry.name).set(len(entry.versions[entry.version_names()[0]].sessions))
        self.streams = StreamManager(self.metrics, stream_limits)

    def close(self) -> None:
        self.streams.close_all()
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    def batcher(self, model: ModelVersion) -> Batcher | None:
        if self.batching is None:
            return None
        key = (model.name, model.version)
        with self._lock:
            if key not in self._batchers:
                busy = self.metrics.instances_busy.labels(model.name)
                self._batchers[key] = Batcher(
                    f"{model.name}/{model.version}",
                    [functools.partial(self._run_jobs, model, session=session) for session in model.sessions],
                    self.batching.max_batch_rows, self.batching.max_delay_s, self.batching.max_queue_rows,
                    observe=lambda waits, seconds, rows: self._observe(model.name, waits, seconds, rows),
                    preferred_rows=self.batching.preferred_rows or None, track_busy=busy.inc,
                )
            return self._batchers[key]

    def _observe(self, name: str, waits: list[float], seconds: float, rows: int) -> None:
        for wait in waits:
            self.metrics.queue_seconds.labels(name).observe(wait)
        self.metrics.compute_seconds.labels(name).observe(seconds)
        self.metrics.batch_rows.labels(name).observe(rows)

    def _run_jobs(self, model: ModelVersion, payloads: list, session: OnnxSession | None = None) -> list:
        """One batcher call on one instance's session (default the first): every job's rows
        together; each job gets its own results back."""
        session = session or model.session
        kind = payloads[0][0]
        if kind == "tensors":
            return self._run_tensor_jobs(session, payloads)
        rows = [row for _, job_rows in payloads for row in job_rows]
        max_rows = self.batching.max_batch_rows if self.batching else len(rows)
        logits = _padded_runs(rows, max_rows, lambda batch, lengths: self._logits(session, kind, batch, lengths))
        results, position = [], 0
        for _, job_rows in payloads:
            results.append(np.stack(logits[position : position + len(job_rows)]))
            position += len(job_rows)
        return results

    @staticmethod
    def _logits(session: OnnxSession, kind: str, batch: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        name = "input_ids" if kind == "text" else "features"
        return session.run({name: batch, "lengths": lengths}, ["logits"])[0]

    def _scores(
        self, model: ModelVersion, kind: str, rows: list[np.ndarray], deadline: float | None = None
    ) -> np.ndarray:
        """Logits [len(rows), C] for one request, batched with concurrent ones when enabled."""
        return self._submit(model, (kind, rows), len(rows), kind, deadline).result()

    def _submit(self, model: ModelVersion, payload: tuple, rows: int, key, deadline: float | None,
                then=None, on_loop: bool = False) -> Future | asyncio.Future:
        """then(result) of one job: queued on the model's batcher (a Future, or with on_loop an
        asyncio future of the running loop), or computed here without a batcher."""
        batcher = self.batcher(model)
        if batcher is not None:
            submit = batcher.submit_async if on_loop else batcher.submit
            return submit(payload, rows, key=key, deadline=deadline, then=then)
        done = asyncio.get_running_loop().create_future() if on_loop else Future()
        try:
            result = self._run_jobs(model, [payload])[0]
            done.set_result(then(result) if then else result)
        except InvalidInput as error:
            done.set_exception(error)
        return done

    def list_models(self) -> list[ModelEntry]:
        return [self.models[name] for name in sorted(self.models)]

    def entry(self, name: str) -> ModelEntry:
        if not name:
            raise InvalidInput("model: empty; name one of the served models")
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(
                f"model {name!r} not found; served models: {', '.join(sorted(self.models)) or 'none'}"
            ) from None

    def model(self, name: str, version: str = "") -> ModelVersion:
        entry = self.entry(name)
        if version:
            if version in entry.versions:
                return entry.versions[version]
            if version in entry.failures:
                raise ModelNotReady(f"model {name!r} version {version} is not ready: {entry.failures[version]}")
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; versions: {', '.join(entry.version_names()) or 'none'}"
            )
        if not entry.ready:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.reason}")
        return entry.versions[entry.version_names()[0]]

    @staticmethod
    def limits(model: ModelVersion) -> Limits:
        return model.card.limits if model.card else Limits()

    @staticmethod
    def _check_batch(field: str, count: int, limits: Limits, top_k: int, labels: list[str]) -> None:
        if count == 0:
            raise InvalidInput(f"{field}: empty; send 1 to {limits.max_batch_size} {field}")
        if count > limits.max_batch_size:
            raise InvalidInput(f"{field}: {count} inputs, limit {limits.max_batch_size} per request")
        if top_k > len(labels):
            raise InvalidInput(f"top_k: {top_k} exceeds the model's {len(labels)} labels")

    @staticmethod
    def _predictions(logits: np.ndarray, labels: list[str], top_k: int) -> list[Prediction]:
        probabilities = softmax(logits.astype(np.float64)).astype(np.float32)
        predictions = []
        for row in probabilities:
            best = int(row.argmax())
            order = np.argsort(-row, kind="stable")[:top_k]
            predictions.append(Prediction(
                label=labels[best], score=float(row[best]), probabilities=row,
                top=[(labels[i], float(row[i])) for i in order],
            ))
        return predictions

    def classify_texts(
        self, name: str, version: str, texts: list[str], top_k: int = 0, deadline: float | None = None
    ) -> tuple[ModelVersion, list[Prediction]]:
        model, rows, then = self._text_job(name, version, texts, top_k)
        return model, self._submit(model, ("text", rows), len(rows), "text", deadline, then).result()

    def submit_texts(
        self, name: str, version: str, texts: list[str], top_k: int = 0, deadline: float | None = None
    ) -> tuple[ModelVersion, asyncio.Future]:
        """classify_texts for a caller on the event loop: checks and tokenises here, returns an
        asyncio future of the predictions (resolved with the rest of its batch in one wake-up)."""
        model, rows, then = self._text_job(name, version, texts, top_k)
        return model, self._submit(model, ("text", rows), len(rows), "text", deadline, then, on_loop=True)

    def _text_job(self, name: str, version: str, texts: list[str], top_k: int):
        """Checked and tokenised texts: (model, token rows, logits -> predictions)."""
        model = self.model(name, version)
        if model.encoder is None:
            raise InvalidInput(f"model {name!r} is a {model.task} model and does not take texts")
        limits, labels = self.limits(model), model.card.labels
        self._check_batch("texts", len(texts), limits, top_k, labels)
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidInput(f"texts[{index}]: empty text")
            if len(text) > limits.max_text_chars:
                raise InvalidInput(
                    f"texts[{index}]: {len(text)} characters, limit {limits.max_text_chars}"
                )
        token_ids = model.encoder.token_ids(texts)
        for index, ids in enumerate(token_ids):
            if not ids:
                raise InvalidInput(f"texts[{index}]: no token left after normalisation")
        rows = [np.asarray(ids, np.int64) for ids in token_ids]
        return model, rows, functools.partial(self._predictions, labels=labels, top_k=top_k)

    def classify_audio(
        self, name: str, version: str, clips: list[dict], top_k: int = 0, deadline: float | None = None
    ) -> tuple[ModelVersion, list[Prediction]]:
        """clips: keyword arguments of serving.audio.decode_clip per clip (file=, pcm16=,
        samples=, sample_rate_hz=). Each clip is resampled to the model's rate and scored whole."""
        model = self.model(name, version)
        if model.frontend is None:
            raise InvalidInput(f"model {name!r} is a {model.task} model and does not take audio")
        limits, labels = self.limits(model), model.card.labels
        self._check_batch("audio", len(clips), limits, top_k, labels)
        config = model.frontend.config
        features = []
        for index, clip in enumerate(clips):
            samples = decode_clip(f"audio[{index}]", config.sample_rate_hz, limits.max_audio_seconds, **clip)
            if config.frames_for(len(samples)) == 0:
                raise InvalidInput(
                    f"audio[{index}]: {len(samples) / config.sample_rate_hz * 1000:.1f} ms, shorter than one "
                    f"{config.window_samples / config.sample_rate_hz * 1000:.0f} ms frame"
                )
            features.append(model.frontend(samples))
        return model, self._predictions(self._scores(model, "audio", features, deadline), labels, top_k)

    def open_stream(self, name: str, version: str, sample_rate_hz: int = 0, **detector: float) -> Stream:
        """A new stream on a model with a step graph (text or audio by the model's task).
        Detector settings left out (or 0) come from the card's evaluated default, else DetectorConfig's;
        a request that sets a threshold sets it for every keyword (the card's keyword thresholds,
        if any, are then not used)."""
        model = self.model(name, version)
        if not model.streaming:
            architecture = model.card.architecture if model.card else {}
            why = ("it is bidirectional" if architecture.get("bidirectional") else
                   "it reads its input in independent chunks" if architecture.get("chunk_tokens") else
                   "it has no step graph")
            raise InvalidInput(f"model {name!r} does not stream ({why}); send whole inputs with Classify/ModelInfer")
        limits = self.limits(model)
        if model.frontend is not None:
            defaults = model.card.detector_defaults()
            if detector.get("threshold"):
                defaults.pop("keyword_thresholds", None)
            config = DetectorConfig.from_settings({**defaults, **{k: v for k, v in detector.items() if v}})
            return self.streams.open_audio(
                model, sample_rate_hz or model.frontend.config.sample_rate_hz, limits.max_audio_seconds, config
            )
        return self.streams.open_text(model, limits.max_text_chars)

    def infer_tensors(
        self, name: str, version: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
        deadline: float | None = None,
    ) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """A plain tensor model (no card): the graph's inputs in, its outputs out. Names,
        dtypes, ranks and fixed dimensions are checked against the graph."""
        model, pending = self._submit_tensors(name, version, inputs, outputs, deadline, on_loop=False)
        return model, pending.result()

    def submit_tensors(
        self, name: str, version: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
        deadline: float | None = None,
    ) -> tuple[ModelVersion, asyncio.Future]:
        """infer_tensors for a caller on the event loop: checks the inputs here and returns an
        asyncio future of the outputs (resolved with the rest of its batch in one wake-up)."""
        return self._submit_tensors(name, version, inputs, outputs, deadline, on_loop=True)

    def _submit_tensors(
        self, name: str, version: str, inputs: dict[str, np.ndarray], outputs: list[str] | None,
        deadline: float | None, on_loop: bool,
    ) -> tuple[ModelVersion, Future | asyncio.Future]:
        model = self.model(name, version)
        if model.card is not None:
            raise InvalidInput(f"model {name!r} is a {model.task} model: send its task inputs, not raw tensors")
        limits = self.limits(model)
        expected = {info.name: info for info in model.session.inputs}
        missing = sorted(set(expected) - set(inputs))
        unknown = sorted(set(inputs) - set(expected))
        if missing or unknown:
            raise InvalidInput(f"inputs: model {name!r} takes {sorted(expected)}; missing {missing}, unknown {unknown}")
        feeds = {}
        for input_name, array in inputs.items():
            info = expected[input_name]
            if array.dtype == object or str(array.dtype) != info.dtype:
                raise InvalidInput(f"inputs[{input_name}]: dtype {array.dtype}, the model takes {info.dtype}")
            if array.ndim != len(info.shape):
                raise InvalidInput(f"inputs[{input_name}]: {array.ndim} axes, the model takes {len(info.shape)}")
            for axis, (got, want) in enumerate(zip(array.shape, info.shape, strict=True)):
                if want != -1 and got != want:
                    raise InvalidInput(f"inputs[{input_name}]: axis {axis} is {got}, the model takes {want}")
            if array.ndim and array.shape[0] > limits.max_batch_size:
                raise InvalidInput(
                    f"inputs[{input_name}]: batch of {array.shape[0]}, limit {limits.max_batch_size} per request"
                )
            feeds[input_name] = array
        names = [info.name for info in model.session.outputs]
        wanted = outputs or names
        for output in wanted:
            if output not in names:
                raise InvalidInput(f"outputs: model {name!r} has no output {output!r} (it has {names})")
        payload = ("tensors", feeds, tuple(wanted))
        batcher = self.batcher(model)
        rows = {array.shape[0] for array in feeds.values() if array.ndim}
        if batcher is None or len(rows) != 1:  # no common batch axis: run alone, here
            done = asyncio.get_running_loop().create_future() if on_loop else Future()
            try:
                done.set_result(self._run_tensor_jobs(model.session, [payload])[0])
            except InvalidInput as error:
                done.set_exception(error)
            return model, done
        key = ("tensors", tuple(wanted), tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feeds.items())))
        return model, self._submit(model, payload, rows.pop(), key, deadline, on_loop=on_loop)

    @staticmethod
    def _run_tensor(session: OnnxSession, feeds: dict[str, np.ndarray], wanted: tuple) -> dict[str, np.ndarray]:
        try:
            return dict(zip(wanted, session.run(feeds, list(wanted)), strict=True))
        except Exception as error:  # ONNX Runtime rejects shapes it cannot run, e.g. mismatched batch axes
            raise InvalidInput(f"inputs: the model cannot run them: {str(error).splitlines()[0][:300]}") from None

    def _run_tensor_jobs(self, session: OnnxSession, payloads: list) -> list[dict[str, np.ndarray]]:
        """Jobs of one key share a call, concatenated on axis 0, when every output has that
        batch axis; otherwise each job runs alone."""
        wanted = payloads[0][2]
        if len(payloads) == 1:
            return [self._run_tensor(session, payloads[0][1], wanted)]
        sizes = [next(iter(feeds.values())).shape[0] for _, feeds, _ in payloads]
        joined = {name: np.concatenate([feeds[name] for _, feeds, _ in payloads]) for name in payloads[0][1]}
        outputs = self._run_tensor(session, joined, wanted)
        if any(value.ndim == 0 or value.shape[0] != sum(sizes) for value in outputs.values()):
            return [self._run_tensor(session, feeds, wanted) for _, feeds, _ in payloads]
        splits = np.cumsum(sizes)[:-1]
        parts = {name: np.split(value, splits) for name, value in outputs.items()}
        return [{name: parts[name][index] for name in wanted} for index in range(len(payloads))]
