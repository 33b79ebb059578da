"""Audio through the typed API: the bundled keyword model on a real server on port 0, fed
speech synthesised here as WAV files at several rates, raw PCM16 and float samples."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import soxr

from serving.dataplane import softmax
from serving.grpc.client import RnnServeClient
from serving.grpc.generated.rnnserve.v1 import rnnserve_pb2 as pb
from serving.grpc.server import BackgroundServer
from serving.repository import load_repository
from serving.settings import ServerSettings
from training.data.speech import Speaker, coloured_noise, mix_at_snr, split_of, synthesize

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def client(front_settings):
    with BackgroundServer(ServerSettings(models=ROOT / "models", port=0, **front_settings)) as running:
        with RnnServeClient(running.target) as connected:
            yield connected


@pytest.fixture(scope="module")
def spoken() -> dict[str, np.ndarray]:
    """Keywords said by a speaker the bundled model never heard, in 1 s clips at 16 kHz."""
    speaker = next(s for s in (Speaker("en-US", v) for v in ("m2", "f3", "klatt", "Alex", "m5"))
                   if split_of(s) == "test")
    clips = {}
    for word in ("yes", "stop", "left"):
        speech = synthesize(word, speaker)[:16000]
        clip = np.zeros(16000, np.float32)
        clip[3000 : 3000 + len(speech[:13000])] = speech[:13000]
        clips[word] = mix_at_snr(clip, coloured_noise(16000, "pink", np.random.default_rng(0)), 30.0)
    return clips


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _probabilities(results) -> np.ndarray:
    return np.array([list(r.probabilities) for r in results])


def test_get_model_describes_the_audio_contract(client):
    info = client.get_model("keywords")
    assert info.task == "keyword_spotting" and info.streaming
    assert info.limits.sample_rate_hz == 16000 and info.limits.max_audio_seconds == 30.0
    assert [(t.name, t.dtype) for t in info.inputs] == [("features", "float32"), ("lengths", "int64")]


def test_unseen_voice_keywords_are_recognised(client, spoken):
    results = client.classify_audio("keywords", [_wav(clip, 16000) for clip in spoken.values()], top_k=3)
    assert [r.label for r in results] == list(spoken)
    assert all(abs(sum(r.probabilities) - 1.0) < 1e-4 and len(r.top) == 3 for r in results)


def test_any_sample_rate_is_resampled_to_the_models(client, spoken):
    clip = spoken["yes"]
    native = _probabilities(client.classify_audio("keywords", [_wav(clip, 16000)]))
    for rate in (8000, 44100):
        resampled = soxr.resample(clip, 16000, rate).astype(np.float32)
        (result,) = client.classify_audio("keywords", [_wav(resampled, rate)])
        assert abs(sum(result.probabilities) - 1.0) < 1e-4
        if rate == 44100:  # up and back down again loses nothing the model hears
            assert result.label == "yes"
            np.testing.assert_allclose(_probabilities([result]), native, atol=0.02)


def test_pcm16_float_samples_and_wav_give_the_same_result(client, spoken):
    clip = np.round(spoken["stop"] * 32767).astype(np.int16)
    as_wav = _probabilities(client.classify_audio("keywords", [_wav(clip, 16000)]))
    floats = _probabilities(client.classify_audio("keywords", [clip / 32768.0], sample_rate_hz=16000))
    request = pb.ClassifyRequest(model="keywords", audio=[pb.AudioClip(pcm16=clip.astype("<i2").tobytes(),
                                                                        sample_rate_hz=16000)])
    pcm = _probabilities(client.stub.Classify(request).results)
    np.testing.assert_allclose(floats, as_wav, atol=1e-5)
    np.testing.assert_allclose(pcm, as_wav, atol=1e-6)


def test_served_probabilities_equal_the_model_run_offline(client, spoken):
    """Clips of different lengths in one request: padding changes nothing."""
    clips = [spoken["yes"], spoken["left"][:9000], spoken["stop"][:12345]]
    served = _probabilities(client.classify_audio("keywords", clips, sample_rate_hz=16000))
    entry = load_repository(ROOT / "models")["keywords"]
    version = entry.versions[entry.version_names()[0]]  # the one a request without a version gets
    for row, clip in enumerate(clips):
        features = version.frontend(clip)[None]
        (logits,) = version.session.run({"features": features, "lengths": np.array([features.shape[1]])})
        np.testing.assert_allclose(served[row], softmax(logits)[0], atol=1e-5)


@pytest.mark.parametrize("audio, message", [
    (pb.AudioClip(file=b"RIFF....WAVEfmt garbage"), "audio[0].file: not a readable WAV/FLAC/OGG file"),
    (pb.AudioClip(pcm16=b"\x01\x02\x03", sample_rate_hz=16000), "audio[0].pcm16: 3 bytes"),
    (pb.AudioClip(samples=pb.FloatSamples(values=[0.1] * 100)), "audio[0].sample_rate_hz: 0"),
    (pb.AudioClip(samples=pb.FloatSamples(values=[0.1] * 100), sample_rate_hz=16000), "shorter than one 30 ms frame"),
    (pb.AudioClip(samples=pb.FloatSamples(values=[0.0] * (8000 * 31)), sample_rate_hz=8000), "limit 30 s"),
    (pb.AudioClip(samples=pb.FloatSamples(values=[float("nan")] * 800), sample_rate_hz=16000), "NaN"),
    (pb.AudioClip(), "audio[0]: no samples"),
])
def test_bad_audio_is_invalid_argument_naming_the_field_and_the_server_keeps_serving(client, spoken, audio, message):
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Classify(pb.ClassifyRequest(model="keywords", audio=[audio]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert client.classify_audio("keywords", [_wav(spoken["yes"], 16000)])[0].label == "yes"


def test_inputs_of_the_wrong_kind_are_refused(client, spoken):
    wav = _wav(spoken["yes"], 16000)
    cases = [
        (pb.ClassifyRequest(model="keywords", texts=["yes"]), "does not take texts"),
        (pb.ClassifyRequest(model="sentiment", audio=[pb.AudioClip(file=wav)]), "does not take audio"),
        (pb.ClassifyRequest(model="keywords", texts=["yes"], audio=[pb.AudioClip(file=wav)]), "one kind of input"),
        (pb.ClassifyRequest(model="keywords", audio=[pb.AudioClip(file=wav)] * 257), "limit 256"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            client.stub.Classify(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
