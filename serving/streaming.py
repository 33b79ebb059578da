"""Streams: server-held state per stream, steps of many streams in one ONNX Runtime call.

A stream (a typed `Stream` RPC or a KServe v2 sequence) owns the state tensors its
model's step graph declares. Each chunk becomes a step row (the chunk's tokens or
log-mel frames plus the stream's state); rows of all streams of one model version
that wait at the same moment run as one call of step.onnx (cellular batching) on
gathered state, and each stream gets its own outputs and new state back. A stream
has at most one step in flight, so its chunks run in order.

Text arrives in fragments that may split words: only text up to the last whitespace
is committed to the state (its tokens cannot change when more text arrives); the
unfinished word is scored provisionally, from the same state, in the same call.
Audio chunks reach the step queue as they arrived (PCM16 bytes or float samples, checked
against the limits on the event loop); the step thread decodes the chunks of all streams of a
step call together, resamples those at other input rates (a streaming resampler per stream) and
frames them and computes their log-mel features together (serving/audio.py push_streams: exact
framing across chunk boundaries, each stream's leftover samples carried as its state). For keyword models
the per-frame posteriors feed a detector (serving/detector.py: moving-average
smoothing, a threshold and a refractory period) that reports each spoken keyword
once, with its times; like the state tensors, each stream's detector state rides in
its step row, and the detector runs for all audio rows of a step call at once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from serving.audio import decode_pcm16_chunks, push_streams
from serving.batching import Batcher
from serving.detector import BatchDetector, Detection, DetectorConfig, DetectorState
from serving.errors import InvalidInput, ResourceExhausted, ServingError
from serving.repository import ModelVersion


class StreamStateError(ServingError):
    """A sequence used out of order: chunk before start, id reused while active, chunk after end.
    INVALID_ARGUMENT like a typed stream's chunk before its config (DESIGN.md) and like Triton."""

    code = "INVALID_ARGUMENT"


class ShuttingDown(ServingError):
    """The server is shutting down and has ended the stream."""

    code = "UNAVAILABLE"


@dataclass
class StepRow:
    """One chunk of one stream: tokens [T] or frames [T, F], and the state it starts from."""

    inputs: np.ndarray
    state: dict[str, np.ndarray]
    # False for a provisional row (text's unfinished word): its state is not kept.
    commit: bool = True
    # Audio of a keyword model: the stream's keyword detector state, advanced over the frames.
    detector: DetectorState | None = None


@dataclass
class StepResult:
    logits: np.ndarray  # [C]: the result of everything streamed so far
    frame_logits: np.ndarray  # [T, C]: per token / frame
    state: dict[str, np.ndarray]
    # Rows with a detector: its new state, the events it closed, and per label the highest
    # smoothed posterior over the row's frames.
    detector: DetectorState | None = None
    detections: list[Detection] = field(default_factory=list)
    posteriors_peak: np.ndarray | None = None


def run_steps(model: ModelVersion, payloads: list[list[StepRow]], session=None) -> list[list[StepResult]]:
    """One step.onnx call, on one instance's session (default the first), for the rows of many
    streams; each payload gets its own results."""
    session = session or model.step_session
    spec = model.card.streaming
    rows = [row for payload in payloads for row in payload]
    input_name = spec.inputs[0].name
    lengths = np.array([len(row.inputs) for row in rows], np.int64)
    first = rows[0].inputs
    pad = model.encoder.pad_id if model.encoder is not None else 0
    batch = np.full((len(rows), int(lengths.max()), *first.shape[1:]), pad, first.dtype)
    for index, row in enumerate(rows):
        batch[index, : len(row.inputs)] = row.inputs
    feeds = {input_name: batch, "lengths": lengths}
    for state in spec.state:
        feeds[state.name] = np.stack([row.state[state.name] for row in rows])
    names = ["logits", "frame_logits", *(state.output for state in spec.state)]
    outputs = dict(zip(names, session.run(feeds, names), strict=True))
    detecting = [index for index, row in enumerate(rows) if row.detector is not None]
    detected = dict(zip(detecting, _detect(model, [rows[i].detector for i in detecting],
                                           outputs["frame_logits"][detecting], lengths[detecting]), strict=True))
    results, index = [], 0
    for payload in payloads:
        mine = []
        for row in payload:
            mine.append(StepResult(
                logits=outputs["logits"][index].copy(),
                frame_logits=outputs["frame_logits"][index, : len(row.inputs)].copy(),
                state={state.name: outputs[state.output][index].copy() for state in spec.state},
                **detected.get(index, {}),
            ))
            index += 1
        results.append(mine)
    return results


@dataclass
class AudioChunk:
    """One chunk of one audio stream as it arrived, PCM16 bytes or float samples at the stream's
    input rate, with what the step thread turns it into a step row from: the stream's leftover
    samples, its resampler (None at the model's rate), state and detector state."""

    data: bytes | np.ndarray
    pending: np.ndarray
    state: dict[str, np.ndarray]
    detector: DetectorState
    resampler: object | None = None
    last: bool = False


@dataclass
class AudioStep:
    """What a step call made of an AudioChunk: the stream's new leftover samples and, when the
    chunk completed a frame, the result of its step row."""

    pending: np.ndarray
    result: StepResult | None = None


def run_audio_steps(model: ModelVersion, chunks: list[AudioChunk], session=None) -> list[AudioStep]:
    """The chunks of many audio streams: decoded, resampled, framed and turned into log-mel
    features together, then the rows of those that completed a frame in one run_steps call."""
    features, pending = frontend_features(model, chunks)
    stepping = [index for index, frames in enumerate(features) if len(frames)]
    results = run_steps(model, [[StepRow(features[i], chunks[i].state, detector=chunks[i].detector)]
                                for i in stepping], session) if stepping else []
    found = {index: result for index, (result,) in zip(stepping, results, strict=True)}
    return [AudioStep(leftover, found.get(index)) for index, leftover in enumerate(pending)]


def frontend_features(model: ModelVersion, chunks: list[AudioChunk]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each chunk's completed log-mel frames and its stream's new leftover samples."""
    pcm = [index for index, chunk in enumerate(chunks) if isinstance(chunk.data, bytes)]
    samples: list[np.ndarray] = [chunk.data for chunk in chunks]
    for index, decoded in zip(pcm, decode_pcm16_chunks([chunks[i].data for i in pcm]), strict=True):
        samples[index] = decoded
    for index, chunk in enumerate(chunks):
        if chunk.resampler is not None:  # stateful C code, one stream at a time
            samples[index] = chunk.resampler.resample_chunk(samples[index], last=chunk.last)
        if chunk.resampler is not None or not isinstance(chunk.data, bytes):  # PCM16 is in range
            samples[index] = np.clip(samples[index], -1.0, 1.0)
    return push_streams(model.frontend, [chunk.pending for chunk in chunks], samples)


def keyword_detector(model: ModelVersion) -> BatchDetector:
    config = model.frontend.config
    return BatchDetector(model.card.labels, config.hop_samples / config.sample_rate_hz * 1000,
                         config.window_samples / config.sample_rate_hz * 1000)


def _detect(model: ModelVersion, states: list[DetectorState], frame_logits: np.ndarray,
            lengths: np.ndarray) -> list[dict]:
    """The keyword detector of every audio row of a step, at once: frame_logits [N, T, C]."""
    if not states:
        return []
    state, detections, smoothed = keyword_detector(model).update(
        DetectorState.stack(states), softmax(frame_logits.astype(np.float64)), lengths
    )
    peaks = np.where((np.arange(smoothed.shape[1]) < lengths[:, None])[..., None], smoothed, -np.inf).max(axis=1)
    return [{"detector": row, "detections": found, "posteriors_peak": peak}
            for row, found, peak in zip(state.rows(), detections, peaks, strict=True)]


def initial_state(model: ModelVersion) -> dict[str, np.ndarray]:
    return {
        state.name: np.full(state.shape, state.initial, dtype=state.dtype) for state in model.card.streaming.state
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis (labels), for logits of any rank: one row, a batch, frames of a batch."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class Update:
    """What a chunk (or the end) did to a stream."""

    logits: np.ndarray | None  # running result of everything so far (None before any token/frame)
    detections: list[Detection] = field(default_factory=list)
    # Per label, the highest smoothed posterior over this update's frames (audio only).
    chunk_posteriors: np.ndarray | None = None
    final: bool = False


class Stream:
    """State of one stream. Subclasses check a chunk on the event loop and make it a step job,
    `job(chunk, last) -> (payload, rows) | None` (None: no step needed), and commit what the
    step call returned, `apply(payload, outcome, last) -> Update` (both None without a job)."""

    _serial = itertools.count(1)

    def __init__(self, model: ModelVersion):
        self.id = next(self._serial)
        self.model = model
        self.state = initial_state(model)
        self.logits: np.ndarray | None = None
        self.chunks = 0
        self.last_active = time.monotonic()
        self.ended = False
        # Serialises steps of one stream (KServe sequences may send concurrent requests).
        self.lock = asyncio.Lock()

    def _apply_commit(self, result: StepResult) -> None:
        self.state = result.state
        self.logits = result.logits


class TextStream(Stream):
    def __init__(self, model: ModelVersion, max_chunk_chars: int):
        super().__init__(model)
        self.encoder = model.encoder
        self.max_chunk_chars = max_chunk_chars
        self.tail = ""
        self.tokens = 0

    def _ids(self, text: str, room: int) -> np.ndarray:
        return np.asarray(self.encoder.tokenizer.encode(text).ids[: max(room, 0)], np.int64)

    def job(self, fragment: str, last: bool) -> tuple[list[StepRow], int] | None:
        rows = self._rows(fragment, last)
        return (rows, len(rows)) if rows else None

    def _rows(self, fragment: str, last: bool) -> list[StepRow]:
        if len(fragment) > self.max_chunk_chars:
            raise InvalidInput(f"chunk.text: {len(fragment)} characters, limit {self.max_chunk_chars} per chunk")
        text = self.tail + fragment
        if last:
            stable, tail = text, ""
        else:
            cut = len(text)
            while cut and not text[cut - 1].isspace():
                cut -= 1
            stable, tail = text[:cut], text[cut:]
            if len(tail) > self.max_chunk_chars:
                raise InvalidInput(
                    f"chunk.text: an unfinished word of {len(tail)} characters, limit {self.max_chunk_chars}"
                )
        self.tail = tail
        room = self.encoder.max_tokens - self.tokens
        ids = self._ids(stable, room) if stable.strip() else np.zeros(0, np.int64)
        rows = [StepRow(ids, self.state)] if len(ids) else []
        if self.tail.strip() and room > len(ids):
            provisional = np.concatenate([ids, self._ids(self.tail, room - len(ids))])
            if len(provisional) > len(ids):
                rows.append(StepRow(provisional, self.state, commit=False))
        return rows

    def apply(self, rows: list[StepRow] | None, results: list[StepResult] | None, last: bool) -> Update:
        running = self.logits
        for row, result in zip(rows or [], results or [], strict=True):
            if row.commit:
                self._apply_commit(result)
                self.tokens += len(row.inputs)
            running = result.logits
        return Update(logits=running if running is not None else self.logits, final=last)


class AudioStream(Stream):
    def __init__(self, model: ModelVersion, input_rate_hz: int, max_chunk_seconds: float, detector: DetectorConfig):
        super().__init__(model)
        config = model.frontend.config
        self.rate = config.sample_rate_hz
        if not 0 < input_rate_hz <= 384_000:
            raise InvalidInput(f"config.sample_rate_hz: {input_rate_hz}, must be 1 to 384000 Hz")
        self.input_rate = input_rate_hz
        self.max_chunk_seconds = max_chunk_seconds
        # Samples at the model's rate not yet in a frame (the next frame's start on).
        self.pending = np.zeros(0, np.float32)
        self.resampler = None
        if input_rate_hz != self.rate:
            import soxr

            self.resampler = soxr.ResampleStream(input_rate_hz, self.rate, 1, dtype="float32", quality="HQ")
        self.samples = 0  # at the input rate
        self.detector = keyword_detector(model)
        self.detector_state = self.detector.start([detector.checked(model.card.labels)])

    @property
    def seconds(self) -> float:
        return self.samples / self.input_rate

    def job(self, data: bytes | np.ndarray, last: bool) -> tuple[AudioChunk, int] | None:
        """data: little-endian PCM16 bytes or float samples, at the input rate. Only checked
        here; decoding and the frontend run on the step thread (run_audio_steps)."""
        if isinstance(data, bytes):
            if len(data) % 2:
                raise InvalidInput(f"chunk.pcm16: {len(data)} bytes, not a whole number of 16-bit samples")
            count = len(data) // 2
        else:
            data = np.asarray(data, np.float32).reshape(-1)
            count = len(data)
        if count / self.input_rate > self.max_chunk_seconds:
            raise InvalidInput(
                f"chunk: {count / self.input_rate:.2f} s of audio, limit {self.max_chunk_seconds:g} s per chunk"
            )
        if not isinstance(data, bytes) and not np.isfinite(data).all():
            raise InvalidInput("chunk.samples: NaN or infinite values")
        self.samples += count
        if not count and not (last and self.resampler is not None):  # nothing new (the resampler flushes)
            return None
        return AudioChunk(data, self.pending, self.state, self.detector_state, self.resampler, last), 1

    def apply(self, chunk: AudioChunk | None, step: AudioStep | None, last: bool) -> Update:
        detections: list[Detection] = []
        chunk_posteriors = None
        if step is not None:
            self.pending = step.pending
        if step is not None and step.result is not None:  # the detector ran with the step (run_steps)
            result = step.result
            self._apply_commit(result)
            self.detector_state = result.detector
            detections += result.detections
            chunk_posteriors = result.posteriors_peak
        if last:
            (found,) = self.detector.finish(self.detector_state)
            detections += found
        return Update(logits=self.logits, detections=detections, chunk_posteriors=chunk_posteriors, final=last)


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int = 1024
    idle_timeout_s: float = 30.0
    step_max_rows: int = 256


class StreamManager:
    """Every live stream and sequence of a server: opening under a bound, stepping through a
    per-model cellular batcher, closing (end, cancel, disconnect, deadline, idle) with a count."""

    def __init__(self, metrics, limits: StreamLimits = StreamLimits()):
        self.metrics = metrics
        self.limits = limits
        self.live: dict[int, Stream] = {}
        self.sequences: dict[tuple[str, object], Stream] = {}
        # Recently ended sequence ids, to tell "ended" from "never started" in errors.
        self._ended: collections.OrderedDict[tuple[str, object], None] = collections.OrderedDict()
        self._runners: dict[tuple[str, str], Batcher] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="rnnserve-stream-sweeper", daemon=True)
        self._sweeper.start()

    # -- opening and closing --------------------------------------------------------------
    def open_text(self, model: ModelVersion, max_chunk_chars: int) -> TextStream:
        return self._register(lambda: TextStream(model, max_chunk_chars))

    def open_audio(self, model: ModelVersion, input_rate_hz: int, max_chunk_seconds: float,
                   detector: DetectorConfig = DetectorConfig()) -> AudioStream:
        return self._register(lambda: AudioStream(model, input_rate_hz, max_chunk_seconds, detector))

    def _register(self, build) -> Stream:
        with self._lock:
            if len(self.live) >= self.limits.max_streams:
                raise ResourceExhausted(
                    f"streams: {len(self.live)} open, limit {self.limits.max_streams}; close one or retry later"
                )
            stream = build()
            self.live[stream.id] = stream
        self.metrics.active_streams.labels(stream.model.name).inc()
        return stream

    def close(self, stream: Stream, reason: str) -> None:
        with self._lock:
            if self.live.pop(stream.id, None) is None:
                return
            for key, held in list(self.sequences.items()):
                if held is stream:
                    del self.sequences[key]
                    self._remember_ended(key)
        stream.ended = True
        self.metrics.active_streams.labels(stream.model.name).dec()
        self.metrics.streams_closed.labels(stream.model.name, reason).inc()

    def _remember_ended(self, key) -> None:
        self._ended[key] = None
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)

    # -- KServe sequences -----------------------------------------------------------------
    def sequence(self, model: ModelVersion, sequence_id, start: bool, open_stream) -> Stream:
        """The stream of a sequence id: opened by `open_stream()` on start, else looked up."""
        key = (model.name, sequence_id)
        with self._lock:
            held = self.sequences.get(key)
        if start:
            if held is not None:
                raise StreamStateError(
                    f"sequence_id {sequence_id!r}: already active for model {model.name!r}; "
                    "end it (sequence_end) before starting it again"
                )
            stream = open_stream()
            with self._lock:
                if key in self.sequences:  # raced with another start of the same id
                    raced = True
                else:
                    raced = False
                    self.sequences[key] = stream
                    self._ended.pop(key, None)
            if raced:
                self.close(stream, "error")
                raise StreamStateError(f"sequence_id {sequence_id!r}: already active for model {model.name!r}")
            return stream
        if held is None:
            if key in self._ended:
                raise StreamStateError(
                    f"sequence_id {sequence_id!r}: the sequence has ended (sequence_end or idle timeout); "
                    "start a new one with sequence_start"
                )
            raise StreamStateError(
                f"sequence_id {sequence_id!r}: no active sequence for model {model.name!r}; "
                "the first request needs sequence_start=true"
            )
        if held.model.version != model.version:
            raise InvalidInput(
                f"sequence_id {sequence_id!r}: started on version {held.model.version}, not {model.version}"
            )
        return held

    # -- stepping ---------------------------------------------------------------------------
    def _runner(self, model: ModelVersion) -> Batcher:
        key = (model.name, model.version)
        with self._lock:
            if key not in self._runners:
                label = f"{model.name}/step"
                run = run_audio_steps if model.frontend is not None else run_steps
                self.metrics.instances.labels(label).set(len(model.step_sessions))
                self._runners[key] = Batcher(
                    f"{model.name}/{model.version}/step",
                    [functools.partial(run, model, session=session) for session in model.step_sessions],
                    max_batch_rows=self.limits.step_max_rows, max_delay_s=0.0,
                    max_queue_rows=max(self.limits.max_streams * 2, self.limits.step_max_rows),
                    observe=lambda waits, seconds, rows: self._observe(label, waits, seconds, rows),
                    track_busy=self.metrics.instances_busy.labels(label).inc,
                )
            return self._runners[key]

    def _observe(self, label: str, waits: list[float], seconds: float, rows: int) -> None:
        for wait in waits:
            self.metrics.queue_seconds.labels(label).observe(wait)
        self.metrics.compute_seconds.labels(label).observe(seconds)
        self.metrics.batch_rows.labels(label).observe(rows)

    async def feed(self, stream: Stream, chunk, last: bool = False) -> Update:
        """Run one chunk (a text fragment, PCM16 bytes or float samples; None at the end) through the stream."""
        if stream.ended:
            if self._stop.is_set():
                raise ShuttingDown("the server is shutting down; the stream was ended")
            raise StreamStateError("the stream has ended")
        stream.last_active = time.monotonic()
        empty = "" if isinstance(stream, TextStream) else b""
        job = stream.job(empty if chunk is None else chunk, last)
        stream.chunks += 1
        payload = outcome = None
        if job is not None:
            payload, rows = job
            # Steps of every stream awaiting this batch wake the loop once, together.
            outcome = await self._runner(stream.model).submit_async(payload, rows)
        stream.last_active = time.monotonic()
        return stream.apply(payload, outcome, last)

    # -- idle sequences -------------------------------------------------------------------
    def _sweep(self) -> None:
        while not self._stop.wait(0.2):
            cutoff = time.monotonic() - self.limits.idle_timeout_s
            with self._lock:
                idle = [s for s in self.sequences.values() if s.last_active < cutoff and not s.lock.locked()]
            for stream in idle:
                self.close(stream, "idle")

    def close_all(self) -> None:
        self._stop.set()
        for stream in list(self.live.values()):
            self.close(stream, "shutdown")
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()
