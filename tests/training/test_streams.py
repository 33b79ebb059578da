"""Continuous-speech recordings for keyword spotting: prose without keywords, composition that
knows where every keyword lies, frame-level targets, and the two synthesisers."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from training.data.speech import KEYWORDS, LABELS, SILENCE, UNKNOWN, Speaker, synthesize, synthesize_timed
from training.data.streams import (
    ACCENT_SPELLINGS,
    CARRIER_PHRASES,
    FESTIVAL_ACCENTED_VOICES,
    FESTIVAL_HELD_OUT_VOICE,
    FESTIVAL_TRAINING_VOICES,
    HELD_OUT,
    HOMOPHONES,
    NEAR_MISSES,
    TARGET_AFTER_END_S,
    Bank,
    BankPlan,
    Mix,
    Recording,
    StreamDataConfig,
    StreamDataError,
    Voice,
    _festival_job,
    _plan_description,
    bank_voices,
    compose,
    evaluation_recordings,
    festival_available,
    festival_synthesize,
    festival_synthesize_timed,
    festival_voice_installed,
    frame_targets,
    keyword_sentence,
    speakable,
)

QUIET = Mix(noise_probability=0.0, babble_probability=0.0, reverb_probability=0.0)


def _tone(frequency: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _tone_bank(voices=("a", "b")) -> Bank:
    """Each utterance is a tone of its own frequency, so that it can be found again in a recording;
    a "sentence" is three tones, its keyword the middle one."""
    parts, frequency = [], 200
    for voice in voices:
        for kind, label, seconds in ([("keyword", k, 0.4) for k in KEYWORDS]
                                     + [("near_miss", UNKNOWN, 0.3)] * 3 + [("prose", UNKNOWN, 3.0)] * 4):
            parts.append((kind, label, voice, _tone(frequency, seconds)))
            frequency += 37
        for keyword in KEYWORDS[:4]:
            before, said, after = _tone(frequency, 0.7), _tone(frequency + 13, 0.35), _tone(frequency + 26, 0.5)
            parts.append(("sentence", keyword, voice, np.concatenate([before, said, after]), (0.7, 1.05)))
            frequency += 41
    return Bank.join(parts)


def test_speakable_text_has_no_keyword_url_or_handle():
    text = "Go on, stop it NOW! Don't look up http://x.example/y @bob #tag or left-over goods; yes-ish"
    cleaned = speakable(text)
    assert not re.search(r"\b(" + "|".join(KEYWORDS) + r")\b", cleaned, re.IGNORECASE)
    assert "http" not in cleaned and "@" not in cleaned and "#" not in cleaned
    assert "NOW" in cleaned and "Don't look" in cleaned and "goods" in cleaned


def test_homophones_of_keywords_are_neither_prose_nor_near_misses():
    """ "know" is "no" and "write" is "right" to the ear: a recording that says them holds the
    keyword, so they are taken out of prose and never labelled _unknown_ as near misses."""
    assert set(HOMOPHONES) <= set(KEYWORDS)
    homophones = {word for words in HOMOPHONES.values() for word in words}
    assert not homophones & set(NEAR_MISSES) and len(set(NEAR_MISSES)) == len(NEAR_MISSES)
    cleaned = speakable("I Know you write well, the rite of spring; knowing Wright is a writer")
    assert cleaned.split() == ["I", "you", "well,", "the", "of", "spring;", "knowing", "is", "a", "writer"]


def test_composed_recording_holds_its_keywords_where_it_says():
    bank = _tone_bank()
    recording = compose(bank, 40.0, np.random.default_rng(3), QUIET)
    assert len(recording.samples) >= 40 * 16000 and recording.keywords
    said = [*bank.of_kind("keyword"), *bank.of_kind("sentence")]
    in_sentences = 0
    for label, start, end in recording.keywords:
        segment = recording.samples[round(start * 16000) : round(end * 16000)]
        # The segment is one of that keyword's takes, or the keyword of one of its sentences,
        # scaled by the segment's gain.
        spans = {i: [round(t * 16000) for t in bank.keyword_span(i)] for i in said if bank.labels[i] == label}
        candidates = {i: bank.utterance(i)[a:b] for i, (a, b) in spans.items()}
        matches = [i for i, c in candidates.items()
                   if len(c) == len(segment) and abs(np.corrcoef(c, segment)[0, 1]) > 0.999]
        assert matches, label
        in_sentences += bank.kinds[matches[0]] == "sentence"
    assert 0 < in_sentences < len(recording.keywords)
    for start, end in recording.speech:
        assert np.abs(recording.samples[round(start * 16000) : round(end * 16000)]).max() > 0.01
    # Between speech stretches there is silence (no noise in this mix).
    spoken = np.zeros(len(recording.samples), bool)
    for start, end in recording.speech:
        spoken[round(start * 16000) : round(end * 16000)] = True
    assert np.abs(recording.samples[~spoken]).max() < 1e-6


def _peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples)), n=1 << 16))
    return float(np.argmax(spectrum) * 16000 / (1 << 16))


def test_a_sped_up_recording_moves_its_keyword_times_and_pitch_with_the_speed():
    bank = _tone_bank()
    rng_plain, rng_sped = np.random.default_rng(3), np.random.default_rng(3)
    # Off (the default), nothing is drawn for it: the same recording as before it existed.
    plain = compose(bank, 40.0, rng_plain, replace(QUIET, speed=(1.25, 1.25)))
    np.testing.assert_array_equal(plain.samples, compose(bank, 40.0, np.random.default_rng(3), QUIET).samples)

    sped = compose(bank, 40.0, rng_sped, replace(QUIET, speed_probability=1.0, speed=(1.25, 1.25)))
    assert len(sped.samples) >= 40 * 16000 and sped.keywords
    said = [*bank.of_kind("keyword"), *bank.of_kind("sentence")]
    for label, start, end in sped.keywords:
        segment = sped.samples[round(start * 16000) : round(end * 16000)]
        # A take of that keyword, a quarter higher and a fifth shorter.
        takes = []
        for i in said:
            if bank.labels[i] == label:
                a, b = (round(t * 16000) for t in bank.keyword_span(i))
                takes.append(bank.utterance(i)[a:b])
        assert any(abs(len(segment) - len(take) / 1.25) <= 2 and abs(_peak_hz(segment) - 1.25 * _peak_hz(take)) < 2
                   for take in takes), label
    spoken = np.zeros(len(sped.samples), bool)
    for start, end in sped.speech:
        spoken[max(0, round(start * 16000) - 40) : round(end * 16000) + 40] = True
        assert np.abs(sped.samples[round(start * 16000) : round(end * 16000)]).max() > 0.01
    assert np.abs(sped.samples[~spoken]).max() < 0.05  # silence between (the resampler's edges aside)


def test_frame_targets_mark_keyword_ends_speech_and_silence():
    recording = Recording(np.zeros(5 * 16000, np.float32), [("stop", 1.0, 1.5)], [(1.0, 1.5), (3.0, 4.0)])
    frames = (len(recording.samples) - 480) // 320 + 1
    targets = frame_targets(recording, frames, 320, 480, LABELS)
    ends = (np.arange(frames) * 320 + 480) / 16000
    starts = np.arange(frames) * 320 / 16000
    is_keyword = targets == LABELS.index("stop")
    np.testing.assert_array_equal(is_keyword, (ends >= 1.5) & (ends <= 1.5 + TARGET_AFTER_END_S))
    speech = ((ends > 1.0) & (starts < 1.5)) | ((ends > 3.0) & (starts < 4.0))
    assert np.all(targets[speech & ~is_keyword] == LABELS.index(UNKNOWN))
    assert np.all(targets[~speech & ~is_keyword] == LABELS.index(SILENCE))
    # Delayed targets: the same window, 100 ms later; the frames in between are background again.
    delayed = frame_targets(recording, frames, 320, 480, LABELS, delay_s=0.1)
    np.testing.assert_array_equal(delayed == LABELS.index("stop"),
                                  (ends >= 1.6) & (ends <= 1.6 + TARGET_AFTER_END_S))
    early = is_keyword & (ends < 1.6)
    assert early.any() and np.all(delayed[early & speech] == LABELS.index(UNKNOWN))
    assert np.all(delayed[early & ~speech] == LABELS.index(SILENCE))


def test_evaluation_recordings_say_every_take_once_and_negatives_have_none():
    bank = _tone_bank()
    judged = evaluation_recordings(bank, seed=0)
    said = sorted(k[0] for r in judged["keywords"] for k in r.keywords)
    assert said == sorted(bank.labels[i] for i in (*bank.of_kind("keyword"), *bank.of_kind("sentence")))
    assert all(not r.keywords for r in judged["negative"])
    prose_seconds = bank.seconds("prose")
    assert sum(len(r.samples) for r in judged["negative"]) / 16000 >= prose_seconds


def test_voices_split_by_speaker_and_the_held_out_engine_is_never_training():
    assert Voice("festival", FESTIVAL_HELD_OUT_VOICE).split == HELD_OUT
    assert all(Voice("festival", v).split == "train" for v in FESTIVAL_TRAINING_VOICES)
    assert Voice("espeak-ng", "en-US+m3").split in ("train", "validation", "test")


@pytest.mark.skipif(not festival_available(), reason="Festival is a Debian package; .ci/run installs it")
def test_festival_voices_speak_at_16khz_with_prosody():
    for voice in FESTIVAL_TRAINING_VOICES:
        slow, fast = festival_synthesize(voice, [("stop the music", 1.3), ("stop the music", 0.8)])
        assert slow.dtype == np.float32 and 0.3 < len(fast) / 16000 < len(slow) / 16000 < 4.0
        assert np.abs(slow).max() > 0.05
    # The HTS voice (32 kHz, resampled) keeps its own speaking rate: its duration stretch is ignored.
    (held_out,) = festival_synthesize(FESTIVAL_HELD_OUT_VOICE, [("stop the music", 1.0)])
    assert 0.5 < len(held_out) / 16000 < 3.0 and np.abs(held_out).max() > 0.05


def test_keyword_sentences_say_their_keyword_once_where_they_say():
    keyword_words = re.compile(r"\b(" + "|".join([*KEYWORDS, *(w for ws in HOMOPHONES.values() for w in ws)]) + r")\b",
                               re.IGNORECASE)
    for keyword, phrases in CARRIER_PHRASES.items():
        for phrase in phrases:
            assert keyword_words.findall(phrase) == [keyword], phrase
    rng = np.random.default_rng(5)
    prose = [speakable("The minister said on Tuesday that the report was left unfinished by the committee")]
    carried = inserted = 0
    for keyword in KEYWORDS * 20:
        text, at = keyword_sentence(keyword, prose, rng)
        assert keyword_words.findall(text) == [keyword], text
        assert text[at : at + len(keyword)] == keyword and (at == 0 or text[at - 1] == " "), (text, at)
        assert 2 <= len(text.split()) <= 15
        carried += text in CARRIER_PHRASES[keyword]
        inserted += text not in CARRIER_PHRASES[keyword]
    assert carried > 30 and inserted > 100


def test_espeak_says_where_a_word_lies_in_a_sentence():
    """The span espeak-ng's word events give for a word lies inside the sentence and is loud, the
    spans of consecutive words follow one another, and "stop" lasts about as long as it does said
    on its own."""
    speaker = Speaker("en-us", "m3")
    text = "please turn the lights on and stop the music"
    spans = {}
    for word in ("please", "lights", "on", "stop", "music"):
        samples, start, end = synthesize_timed(text, text.index(word), speaker, 160, 50, 100)
        assert 0 <= start < end <= len(samples) / 16000
        assert np.abs(samples[round(start * 16000) : round(end * 16000)]).max() > 0.05
        spans[word] = (start, end)
    assert spans["please"][0] == 0 and spans["music"][1] == pytest.approx(len(samples) / 16000, abs=0.01)
    order = [spans[w] for w in ("please", "lights", "on", "stop", "music")]
    # (Each span is from its own call, and espeak-ng varies a little from one call to the next.)
    assert all(a[1] <= b[0] + 0.03 for a, b in zip(order, order[1:], strict=False))
    alone = len(synthesize("stop", speaker, 160, 50, 100)) / 16000
    assert 0.5 < (spans["stop"][1] - spans["stop"][0]) / alone < 1.5


@pytest.mark.skipif(not festival_available(), reason="Festival is a Debian package; .ci/run installs it")
def test_festival_says_where_a_word_lies_in_a_sentence():
    for voice in (FESTIVAL_TRAINING_VOICES[0], FESTIVAL_HELD_OUT_VOICE):
        (first, start_on, end_on), (_, start_stop, end_stop) = festival_synthesize_timed(
            voice, [("please turn the lights on and stop the music", 1.0, "on"),
                    ("stop the music", 1.0, "stop")])
        assert 0.5 < start_on < end_on < len(first) / 16000 - 0.5
        assert np.abs(first[round(start_on * 16000) : round(end_on * 16000)]).max() > 0.05
        assert start_stop == 0 and 0.1 < end_stop < 0.6


def _median_f0(samples: np.ndarray, rate: int = 16000) -> float:
    """The median pitch of the voiced 40 ms frames (autocorrelation peak between 60 and 400 Hz)."""
    size, found = int(0.04 * rate), []
    for start in range(0, len(samples) - size, size):
        frame = samples[start : start + size].astype(np.float64)
        if np.sqrt(np.mean(frame**2)) < 0.02:
            continue
        correlation = np.correlate(frame, frame, "full")[size - 1 :]
        low, high = rate // 400, rate // 60
        found.append(rate / (low + int(np.argmax(correlation[low:high]))))
    return float(np.median(found))


@pytest.mark.skipif(not festival_available(), reason="Festival is a Debian package; .ci/run installs it")
def test_festival_diphone_voices_speak_at_the_pitch_asked_for_and_keep_their_own_without_one():
    text = "please turn the lights on and stop the music"
    own, low, high = festival_synthesize(FESTIVAL_TRAINING_VOICES[0], [(text, 1.0)] * 3, [None, (85.0, 8.0),
                                                                                          (210.0, 20.0)])
    assert abs(_median_f0(low) - 85) < 15 and abs(_median_f0(high) - 210) < 25
    assert _median_f0(low) < _median_f0(own) < _median_f0(high)
    (plain,) = festival_synthesize(FESTIVAL_TRAINING_VOICES[0], [(text, 1.0)])
    np.testing.assert_array_equal(plain, own)


def test_a_plan_without_festival_pitches_keeps_the_digest_it_had_before_the_setting():
    plan = BankPlan(2, 0, 170.0, sentences=10)
    assert "festival_f0_hz" not in _plan_description(plan)
    pitched = _plan_description(BankPlan(2, 0, 170.0, sentences=10, festival_f0_hz=(75.0, 230.0)))
    assert pitched.pop("festival_f0_hz") == (75.0, 230.0) and pitched == _plan_description(plan)


def test_a_share_of_recordings_has_a_festival_voice_among_its_speakers():
    bank = _tone_bank(voices=("a", "b", "c", "festival:x"))
    rng = np.random.default_rng(3)
    spoken = [compose(bank, 4.0, rng, replace(QUIET, festival_voice=0.5)).voices for _ in range(80)]
    assert 0.3 < np.mean(["festival:x" in voices for voices in spoken]) < 0.7
    assert all(1 <= len(voices) <= 3 and len(set(voices)) == len(voices) for voices in spoken)
    assert all(sum(v.startswith("festival:") for v in voices) <= 1 for voices in spoken)
    always = [compose(bank, 4.0, rng, replace(QUIET, festival_voice=1.0)).voices for _ in range(20)]
    assert all("festival:x" in voices for voices in always)
    # Voices drawn alike (the setting at 0): the Festival voice is one voice among four.
    alike = [compose(bank, 4.0, rng, QUIET).voices for _ in range(80)]
    assert 0.25 < np.mean(["festival:x" in voices for voices in alike]) < 0.75
    # What a recording holds is said by its voices only: every keyword take it placed is theirs.
    recording = compose(bank, 20.0, np.random.default_rng(5), replace(QUIET, festival_voice=1.0))
    assert recording.keywords and "festival:x" in recording.voices


def test_the_train_plan_adds_the_accented_voices_and_the_held_out_engine_stays_out():
    plan = replace(StreamDataConfig().plans["train"], accented_voices=True)
    _, festival = bank_voices("train", plan)
    assert set(festival) == {*FESTIVAL_TRAINING_VOICES, *FESTIVAL_ACCENTED_VOICES}
    assert FESTIVAL_HELD_OUT_VOICE not in festival
    _, without = bank_voices("train", replace(plan, accented_voices=False))
    assert without == list(FESTIVAL_TRAINING_VOICES)
    assert bank_voices(HELD_OUT, StreamDataConfig().plans[HELD_OUT])[1] == [FESTIVAL_HELD_OUT_VOICE]
    assert all(Voice("festival", voice).split == "train" for voice in FESTIVAL_ACCENTED_VOICES)
    # A plan without them keeps the digest it had before the setting.
    assert "accented_voices" not in _plan_description(replace(plan, accented_voices=False))
    # Every language respells every keyword, each as one word that is no other keyword's.
    for spellings in ACCENT_SPELLINGS.values():
        assert sorted(spellings) == sorted(KEYWORDS)
        assert len(set(spellings.values())) == len(KEYWORDS)
        assert all(re.fullmatch(r"[a-z]+", said) for said in spellings.values())


_ONE_PER_LANGUAGE = ["lp_diphone", "suo_fi_lj_diphone", "czech_dita"]


@pytest.mark.skipif(not all(map(festival_voice_installed, _ONE_PER_LANGUAGE)),
                    reason="Debian festvox packages; .ci/run installs them")
def test_accented_voices_say_respelled_keywords_labelled_as_the_keyword_and_time_them_in_sentences():
    plan = BankPlan(0, 0, 10.0, festival_keyword_takes=1, festival_near_miss_words=2, festival_prose_seconds=10.0,
                    festival_sentences=10, festival_f0_hz=(75.0, 230.0), accented_voices=True)
    sentences = [speakable("The minister said on Tuesday that the report was left unfinished by the committee"),
                 speakable("Shares in the company rose by a third after the results were published")]
    for voice in _ONE_PER_LANGUAGE:
        parts = _festival_job((voice, plan, sentences, StreamDataConfig(), [3, 1]))
        assert all(part[2] == f"festival:{voice}" for part in parts)
        said = [part for part in parts if part[0] == "keyword"]
        assert sorted(part[1] for part in said) == sorted(KEYWORDS)
        assert all(0.08 < len(part[3]) / 16000 < 1.2 and np.abs(part[3]).max() > 0.05 for part in said)
        timed = [part for part in parts if part[0] == "sentence"]
        assert len(timed) >= 8 and {part[1] for part in timed} <= set(KEYWORDS)
        for _, _, _, samples, (start, end) in timed:
            assert 0 <= start < end <= len(samples) / 16000 and 0.08 < end - start < 1.0
            assert np.abs(samples[round(start * 16000) : round(end * 16000)]).max() > 0.05


@pytest.mark.skipif(not festival_voice_installed("lp_diphone"), reason="Debian festvox packages; .ci/run installs them")
def test_an_utterance_festival_fails_on_is_skipped_only_when_asked_and_the_rest_are_spoken():
    # The Italian voice fails on this text (an error inside Festival, no wave).
    failing = "The service will be supported by banner ads. Do u have to also add me?"
    items = [("stop now", 1.0), (failing, 1.0), ("go now", 1.0)]
    first, failed, last = festival_synthesize("lp_diphone", items, skip_failures=True)
    assert failed is None and len(first) > 1600 and len(last) > 1600
    with pytest.raises(StreamDataError, match="lp_diphone"):
        festival_synthesize("lp_diphone", items)
