"""The audio frontend of a step call, all streams at once: on the bundled keywords model (real
ONNX Runtime) each stream's log-mel frames, leftover samples, state and detections equal those
of the stream on its own through serving/audio.py, for random chunkings (empty chunks, chunks
shorter than a window, PCM16 and float samples, another input rate) and streams that start and
end at different steps of one batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soxr

from serving.audio import StreamingLogMel, pcm16_to_float, push_streams
from serving.detector import DetectorConfig
from serving.errors import InvalidInput
from serving.repository import load_version
from serving.streaming import AudioStep, AudioStream, frontend_features, run_audio_steps

ROOT = Path(__file__).resolve().parents[2]
# (input rate, chunks as PCM16 bytes or float samples, step it joins at)
KINDS = ((16000, "pcm16", 0), (16000, "samples", 0), (44100, "pcm16", 3), (16000, "pcm16", 7),
         (8000, "samples", 1), (16000, "samples", 12))


@pytest.fixture(scope="module")
def version():
    versions = sorted((ROOT / "models" / "keywords").iterdir(), key=lambda p: int(p.name))
    return load_version("keywords", versions[-1])


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """16 kHz recordings of keywords and other words between stretches of quiet noise."""
    from training.data.speech import Speaker, coloured_noise, synthesize

    rng = np.random.default_rng(0)
    recordings = []
    for voice, words in (("m2", ("yes", "stop", "left")), ("f3", ("no", "house", "up")),
                         ("klatt", ("right", "off", "go"))):
        pieces = []
        for word in words:
            pieces += [(coloured_noise(int(rng.integers(4000, 12000)), "pink", rng) * 0.003).astype(np.float32),
                       synthesize(word, Speaker("en-US", voice))]
        recordings.append(np.concatenate(pieces))
    return recordings


def _chunks(samples: np.ndarray, kind: str, rng: np.random.Generator) -> list[bytes | np.ndarray]:
    """Random chunk sizes: empty, shorter than a window, about a hop, longer than a window."""
    sizes = []
    while sum(sizes) < len(samples):
        sizes.append(int(rng.choice([0, rng.integers(1, 400), 160, rng.integers(400, 5000)])))
    cuts = np.minimum(np.cumsum([0, *sizes]), len(samples))
    parts = [samples[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    if kind == "pcm16":
        return [(np.clip(part, -1, 1) * 32767).astype("<i2").tobytes() for part in parts]
    return [part.astype(np.float32) * 1.5 for part in parts]  # loud: some samples are clipped


def _alone(stream_rate: int, model_rate: int, chunks: list) -> list[np.ndarray]:
    """Each chunk's samples at the model's rate, decoded and resampled as one stream on its own."""
    resampler = soxr.ResampleStream(stream_rate, model_rate, 1, dtype="float32", quality="HQ") \
        if stream_rate != model_rate else None
    out = []
    for index, chunk in enumerate(chunks):
        samples = pcm16_to_float(np.frombuffer(chunk, "<i2")) if isinstance(chunk, bytes) else chunk
        if resampler is not None:
            samples = resampler.resample_chunk(samples, last=index == len(chunks) - 1)
        out.append(np.clip(samples, -1.0, 1.0))
    return out


def _streams(version, speech, seed: int):
    """The streams of KINDS, each with its chunks (the last one ends the stream)."""
    rng = np.random.default_rng(seed)
    streams, chunks = [], []
    for index, (rate, kind, _) in enumerate(KINDS):
        recording = speech[index % len(speech)]
        if rate != 16000:
            recording = soxr.resample(recording, 16000, rate).astype(np.float32)
        streams.append(AudioStream(version, rate, 30.0, DetectorConfig(threshold=0.3, smoothing_ms=80)))
        chunks.append(_chunks(recording, kind, rng))
    return streams, chunks


def _schedule(chunks: list[list]) -> list[list[int]]:
    """Per step, the streams that send a chunk in it: each joins at its step of KINDS and sends
    one chunk a step until it has sent them all, so streams start and end at different steps."""
    steps, taken = [], [0] * len(chunks)
    while any(taken[i] < len(chunks[i]) for i in range(len(chunks))):
        step = len(steps)
        live = [i for i, (_, _, join) in enumerate(KINDS) if join <= step and taken[i] < len(chunks[i])]
        for i in live:
            taken[i] += 1
        steps.append(live)
    return steps


def _step(streams, chunks, taken, live, run):
    """One step batch: each live stream's next chunk made a job, run together by `run`, applied."""
    jobs, updates = {}, {}
    for i in live:
        last = taken[i] == len(chunks[i]) - 1
        job = streams[i].job(chunks[i][taken[i]], last)
        if job is None:
            updates[i] = streams[i].apply(None, None, last)
        else:
            jobs[i] = job[0]
        taken[i] += 1
    for i, step in zip(jobs, run([jobs[i] for i in jobs]) if jobs else [], strict=True):
        updates[i] = streams[i].apply(jobs[i], step, jobs[i].last)
    return jobs, updates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_frames_of_a_step_batch_equal_each_stream_on_its_own(version, speech, seed):
    streams, chunks = _streams(version, speech, seed)
    frames: list[list[np.ndarray]] = [[] for _ in streams]
    taken, captured = [0] * len(streams), []

    def frontend_only(jobs):
        features, pending = frontend_features(version, jobs)
        captured[:] = features
        return [AudioStep(leftover) for leftover in pending]

    for live in _schedule(chunks):
        captured.clear()
        jobs, _ = _step(streams, chunks, taken, live, frontend_only)
        for i, found in zip(jobs, captured, strict=True):
            frames[i].append(found)
    config = version.frontend.config
    for i, (rate, _, _) in enumerate(KINDS):
        signal = np.concatenate(_alone(rate, config.sample_rate_hz, chunks[i]))
        whole = version.frontend(signal)
        streamed = np.concatenate(frames[i]) if frames[i] else np.zeros((0, config.mel_bands), np.float32)
        assert streamed.shape == whole.shape
        np.testing.assert_allclose(streamed, whole, atol=1e-5)
        np.testing.assert_array_equal(streams[i].pending, signal[len(whole) * config.hop_samples :])
        assert streams[i].samples == sum(len(c) // 2 if isinstance(c, bytes) else len(c) for c in chunks[i])


def test_push_streams_equals_each_stream_pushed_alone(version):
    rng = np.random.default_rng(3)
    signals = [rng.uniform(-1, 1, n).astype(np.float32) for n in (0, 399, 400, 561, 16000, 3333)]
    alone = [StreamingLogMel(version.frontend) for _ in signals]
    pending = [np.zeros(0, np.float32) for _ in signals]
    for _ in range(4):
        cuts = [np.sort(rng.integers(0, len(s) + 1, 3)) for s in signals]
        for part in range(4):
            chunks = [np.split(s, c)[part] for s, c in zip(signals, cuts, strict=True)]
            features, pending = push_streams(version.frontend, pending, chunks)
            for stream, chunk, found, left in zip(alone, chunks, features, pending, strict=True):
                np.testing.assert_allclose(found, stream.push(chunk), atol=1e-5)
                np.testing.assert_array_equal(left, stream.pending)


def test_states_and_detections_of_a_step_batch_equal_each_stream_on_its_own(version, speech):
    batched, chunks = _streams(version, speech, 4)
    alone, _ = _streams(version, speech, 4)
    taken_batched, taken_alone = [0] * len(batched), [0] * len(alone)
    detections: list[list] = [[] for _ in batched]

    def run(jobs):
        return run_audio_steps(version, jobs)

    for live in _schedule(chunks):
        _, updates = _step(batched, chunks, taken_batched, live, run)
        for i in live:
            expected = _step(alone, chunks, taken_alone, [i], run)[1][i]
            update = updates[i]
            # The same events; confidences from a batched ONNX Runtime call differ in the last bits.
            assert [_event(d) for d in update.detections] == [_event(d) for d in expected.detections]
            np.testing.assert_allclose([d.confidence for d in update.detections],
                                       [d.confidence for d in expected.detections], atol=1e-5)
            assert update.final == expected.final
            detections[i] += update.detections
            for mine, theirs in ((update.logits, expected.logits),
                                 (update.chunk_posteriors, expected.chunk_posteriors)):
                assert (mine is None) == (theirs is None)
                if mine is not None:
                    np.testing.assert_allclose(mine, theirs, atol=1e-5)
            # state_max holds running maxima of raw logits (up to ~30): float32 bits of a batched
            # ONNX Runtime call differ relative to the value, so a relative term beside the 1e-5.
            for name, value in alone[i].state.items():
                np.testing.assert_allclose(batched[i].state[name], value, atol=1e-5, rtol=1e-6)
            np.testing.assert_array_equal(batched[i].pending, alone[i].pending)
            mine, theirs = batched[i].detector_state, alone[i].detector_state
            for name in ("frames", "history_frames", "open", "first", "last", "refractory_until_ms"):
                np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name))
            np.testing.assert_allclose(mine.peaks, theirs.peaks, atol=1e-5)
    assert all(detections[:3]), "each recording should make the detector fire"


def _event(detection) -> tuple:
    return detection.keyword, detection.start_ms, detection.end_ms, detection.reported_ms


def test_bad_chunks_are_refused_before_queueing_and_leave_the_stream_as_it_was(version):
    stream = AudioStream(version, 16000, 1.0, DetectorConfig())
    for chunk, message in ((b"\x00\x01\x02", "chunk.pcm16: 3 bytes, not a whole number of 16-bit samples"),
                           (b"\x00" * 32002 * 2, "chunk: 2.00 s of audio, limit 1 s per chunk"),
                           (np.zeros(16001, np.float32), "chunk: 1.00 s of audio, limit 1 s per chunk"),
                           (np.array([0.0, np.nan], np.float32), "chunk.samples: NaN or infinite values")):
        with pytest.raises(InvalidInput, match=message.replace(".", r"\.")):
            stream.job(chunk, False)
    assert stream.samples == 0 and len(stream.pending) == 0
    assert stream.job(b"", False) is None and stream.job(np.zeros(0, np.float32), False) is None
