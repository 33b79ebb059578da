"""Long synthetic recordings for a streaming keyword spotter: the speech it will hear in use.

A *bank* holds clean utterances synthesised once per split and cached: the ten keywords said on
their own, near-miss words ("of", "dog", "gopher", ...), and running prose read from the corpora
we have offline (BBC News articles and tweets) with every keyword word taken out, so that prose
is speech with no keyword in it. Two engines speak: espeak-ng (voices x variants, split by
speaker as the clip data set is) and Festival (the diphone voices kal and ked for training; the
HTS voice cmu_us_slt_arctic_hts is never trained on: it is the held-out engine family).

Keywords are said on their own (commands) and inside sentences (`keyword_sentence`: a carrier
phrase such as "turn the lights on", or a prose sentence with the keyword put into it), spoken
in one breath with no pause around the keyword. The synthesisers say where the keyword lies:
espeak-ng's word events (through libespeak-ng) and Festival's segment times.

`compose` joins bank utterances into one long recording: keywords said as commands between short
pauses, keyword sentences, prose, near misses, silence and noise gaps; then gain
changes, coloured noise, babble (several other voices at once) and reverberation. Because we put
every keyword there, we know where it lies: `frame_targets` labels the frames from a keyword's
end to 300 ms after it with the keyword, speech frames `_unknown_`, the rest `_silence_`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile
import soxr

from training.data.speech import (
    KEYWORDS,
    NOISE_COLOURS,
    SAMPLE_RATE_HZ,
    SILENCE,
    UNKNOWN,
    Speaker,
    SynthesisError,
    coloured_noise,
    espeak_version,
    mix_at_snr,
    speakers,
    split_of,
    synthesize,
    synthesize_timed,
    timed_trim,
    trim_silence,
)

FESTIVAL_TRAINING_VOICES = ("kal_diphone", "ked_diphone")
# Festival's voices of other languages (Debian's festvox packages), saying English with an accent:
# the keywords respelled for each language's letter-to-sound rules, as a speaker of it would say
# them ("ies" is Italian for /jes/), the rest of a text read by those rules as it stands. They are
# the only other voices made from recordings of people: female, male and a child's, beside the two
# English diphone voices (both male). Training voices, in the train bank when its plan says so.
_ACCENT_SPELLING = {"yes": "jes", "no": "nou", "up": "ap", "down": "daun", "left": "left", "right": "rait",
                    "on": "on", "off": "off", "stop": "stop", "go": "gou"}
ACCENT_SPELLINGS = {
    "italian": {**_ACCENT_SPELLING, "yes": "ies"},
    "finnish": _ACCENT_SPELLING,
    "czech": {**_ACCENT_SPELLING, "right": "rajt"},
}
FESTIVAL_ACCENTED_VOICES = {
    "lp_diphone": "italian", "pc_diphone": "italian", "suo_fi_lj_diphone": "finnish", "hy_fi_mv_diphone": "finnish",
    "czech_dita": "czech", "czech_krb": "czech", "czech_machac": "czech", "czech_ph": "czech",
}
FESTIVAL_ACCENT_PACKAGES = ("festvox-italp16k festvox-itapc16k festvox-suopuhe-lj festvox-suopuhe-mv "
                            "festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-czech-ph")
# Never in training or tuning: the cross-engine test.
FESTIVAL_HELD_OUT_VOICE = "cmu_us_slt_arctic_hts"
HELD_OUT = "held_out_engine"
# Words that sound like part of a keyword, or start like one; they are negatives. (Homophones
# such as "know" and "write" are among them: said inside a sentence they are not commands.)
# Words that sound like a keyword: to the ear they are the keyword, so they are taken out of the
# prose with the keywords and are never near misses. Labelled _unknown_ (as they were until bank
# version 2) they taught the model to tell apart what cannot be told apart, and in the evaluation
# prose every "I know" was a "no" detection counted as a false alarm.
HOMOPHONES = {"no": ["know"], "right": ["write", "rite", "wright"]}
# Words that sound like a keyword without being one.
NEAR_MISSES = [
    "of", "dog", "cup", "leftover", "gopher", "yet", "yeah", "yellow", "yesterday", "nope", "note",
    "nobody", "upper", "upon", "download", "downtown", "town", "lift", "left-handed", "lefty",
    "bright", "right-hand", "light", "only", "online", "often", "cough", "office", "stock", "stopper", "top",
    "shop", "goat", "going", "ago", "gold", "yes-man", "done", "gone", "lost", "offer", "onion", "upside",
]
_KEYWORD_WORDS = re.compile(
    r"\b(" + "|".join([*KEYWORDS, *(word for words in HOMOPHONES.values() for word in words)]) + r")\b", re.IGNORECASE
)
# Keywords as people say them to a device, inside a phrase: each holds exactly one keyword and no
# other keyword or homophone (a test checks). Keywords are also put into prose sentences.
CARRIER_PHRASES = {
    "yes": ["yes please", "I said yes", "yes that is the one", "oh yes I think so", "yes we can do that"],
    "no": ["no not that one", "I said no", "no thanks", "oh no", "no I do not want it"],
    "up": ["turn it up", "scroll up a bit", "please pick it up", "look up there", "move the list up please"],
    "down": ["turn it down", "sit down please", "slow down a little", "scroll down", "put it down now"],
    "left": ["turn left here", "look to the left", "move it left a bit", "the left one please", "keep left"],
    "right": ["turn right here", "that is right", "the right one please", "move it right a bit", "keep right"],
    "on": ["turn the lights on", "switch it on please", "put the kettle on", "turn the radio on now", "keep it on"],
    "off": ["turn the lights off", "switch it off please", "take the day off", "turn the radio off now",
            "put that off"],
    "stop": ["please stop the music", "stop it now", "can you stop here", "stop playing", "I want it to stop"],
    "go": ["let us go now", "ready steady go", "go ahead please", "here we go", "we can go later"],
}
_URLS_AND_TAGS = re.compile(r"https?://\S+|www\.\S+|[@#]\w+|\bRT\b")
_NOT_SPEAKABLE = re.compile(r"[^A-Za-z0-9',.;:?! -]+")
_SPACES = re.compile(r"\s+")
# espeak-ng at the rates used here reads about this many words of the corpora a second.
WORDS_PER_SECOND = 2.4
# Frames from a keyword's end to this long after it carry the keyword's label.
TARGET_AFTER_END_S = 0.3
# The max-pooling loss's window around a keyword's end (training/stream_training.py): it may fire on
# any of its frames. A detection opens there and is reported decision_ms later, which must still
# be within 0.5 s of the keyword's end to count as a hit.
MAX_POOL_BEFORE_END_S = 0.25
MAX_POOL_AFTER_END_S = 0.2


class StreamDataError(RuntimeError):
    """A synthesiser is missing or failed."""


@dataclass(frozen=True, order=True)
class Voice:
    engine: str  # "espeak-ng" or "festival"
    name: str  # an espeak-ng speaker (voice+variant) or a Festival voice

    @property
    def split(self) -> str:
        if self.engine == "festival":
            return HELD_OUT if self.name == FESTIVAL_HELD_OUT_VOICE else "train"
        voice, variant = self.name.split("+", 1)
        return split_of(Speaker(voice, variant))


def _text_split(text: str) -> str:
    """Prose texts are split too (by hash): test recordings read sentences training never read."""
    position = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if position < 0.7:
        return "train"
    if position < 0.8:
        return "mining"
    return "validation" if position < 0.9 else "test"


def speakable(text: str) -> str:
    """Text with URLs, handles, odd characters and every keyword word (and homophone) removed."""
    text = _URLS_AND_TAGS.sub(" ", text)
    text = _NOT_SPEAKABLE.sub(" ", text)
    text = _KEYWORD_WORDS.sub(" ", text)
    return _SPACES.sub(" ", text).strip(" ,;:-")


def prose_sentences() -> dict[str, list[str]]:
    """Sentences of 5-40 words from the BBC News articles and the tweets, keyword words removed,
    by text split (train, mining, validation, test)."""
    from training.data.sentiment import load_sentiment
    from training.data.topic import load_topic

    sentences: dict[str, list[str]] = {"train": [], "mining": [], "validation": [], "test": []}
    seen = set()
    for text in [*load_topic().texts, *load_sentiment().texts]:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            cleaned = speakable(sentence)
            if 5 <= len(cleaned.split()) <= 40 and cleaned not in seen:
                seen.add(cleaned)
                sentences[_text_split(cleaned)].append(cleaned)
    return sentences


def festival_available() -> bool:
    return shutil.which("festival") is not None


def festival_voice_installed(voice: str) -> bool:
    """Whether Debian's festvox package of `voice` is installed (where Debian puts voices)."""
    return festival_available() and any(Path("/usr/share/festival/voices").glob(f"*/{voice}"))


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def festival_synthesize(voice: str, items: list[tuple[str, float]],
                        pitches: list[tuple[float, float] | None] | None = None,
                        skip_failures: bool = False) -> list[np.ndarray | None]:
    """(text, duration stretch) pairs spoken by a Festival voice in one Festival process, as
    float32 at 16 kHz, leading and trailing silence trimmed. pitches: per item, the target f0
    mean and standard deviation in Hz, or None for the voice's own. (The diphone voices honour
    stretch and pitch; the HTS voice keeps its own rate and intonation.) skip_failures: an item
    Festival fails on is None, not an error (the accented voices fail on a few English texts)."""
    return [None if spoken is None else spoken[0]
            for spoken in _festival_run(voice, items, [None] * len(items), pitches, skip_failures)]


def festival_synthesize_timed(voice: str, items: list[tuple[str, float, str]],
                              pitches: list[tuple[float, float] | None] | None = None,
                              skip_failures: bool = False) -> list[tuple[np.ndarray, float, float] | None]:
    """(text, duration stretch, word) triples, as festival_synthesize, each with where its `word`
    (said once in the text) lies: (samples, start_s, end_s), from Festival's own segment times."""
    spoken = _festival_run(voice, [(text, stretch) for text, stretch, _ in items], [word for *_, word in items],
                           pitches, skip_failures)
    return [None if said is None else (said[0], *said[1]) for said in spoken]


# The linear-regression intonation model's own f0 statistics in Festival's diphone voices
# (kal_diphone and ked_diphone set these): targets are mapped from them.
_FESTIVAL_MODEL_F0 = (170.0, 34.0)


def _festival_run(voice: str, items: list[tuple[str, float]], words: list[str | None],
                  pitches: list[tuple[float, float] | None] | None = None, skip_failures: bool = False):
    if not festival_available():
        raise StreamDataError("Festival is not installed (Debian: apt-get install festival festvox-kallpc16k "
                              "festvox-kdlpc16k festvox-us-slt-hts)")
    with tempfile.TemporaryDirectory(prefix="rnnserve-festival-") as folder:
        lines = [f"(voice_{voice})"]
        for index, (text, stretch) in enumerate(items):
            # Each item in unwind-protect: an error in one (its wave then missing) leaves the rest.
            lines.append("(unwind-protect (begin")
            lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.3f})")
            if pitches is not None and pitches[index] is not None:
                mean, deviation = pitches[index]
                lines.append(f"(set! int_lr_params '((target_f0_mean {mean:.1f}) (target_f0_std {deviation:.1f}) "
                             f"(model_f0_mean {_FESTIVAL_MODEL_F0[0]}) (model_f0_std {_FESTIVAL_MODEL_F0[1]})))")
            lines.append(f"(set! utt (utt.synth (Utterance Text {_scheme_string(text)})))")
            lines.append(f'(utt.save.wave utt "{folder}/{index}.wav" \'riff)')
            if words[index] is not None:
                # Each word's first segment start and last segment end, in seconds.
                lines.append(f'(set! fd (fopen "{folder}/{index}.words" "w"))')
                lines.append('(mapcar (lambda (w) (format fd "%s %f %f\\n" (item.name w) '
                             '(item.feat w "R:SylStructure.daughter1.daughter1.segment_start") '
                             '(item.feat w "R:SylStructure.daughtern.daughtern.segment_end"))) '
                             "(utt.relation.items utt 'Word))")
                lines.append("(fclose fd)")
            lines.append(") nil)")
        script = Path(folder) / "speak.scm"
        script.write_text("\n".join(lines) + "\n")
        result = subprocess.run(["festival", "-b", str(script)], capture_output=True, timeout=3600, check=False)
        outputs = []
        for index in range(len(items)):
            try:
                outputs.append(_festival_output(Path(folder), index, voice, items[index][0], words[index], result))
            except StreamDataError:
                if not skip_failures:
                    raise
                outputs.append(None)
        return outputs


def _festival_output(folder: Path, index: int, voice: str, text: str, word: str | None, result
                     ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Item `index` of a Festival run: its samples at 16 kHz, trimmed, and where `word` lies."""
    path = folder / f"{index}.wav"
    if not path.is_file():
        raise StreamDataError(f"Festival ({voice}) failed on {text!r}: {result.stderr.decode(errors='replace')[:300]}")
    samples, rate = soundfile.read(path, dtype="float32")
    if rate != SAMPLE_RATE_HZ:
        samples = soxr.resample(samples, rate, SAMPLE_RATE_HZ).astype(np.float32)
    if word is None:
        return trim_silence(samples), None
    timing = folder / f"{index}.words"
    # (latin-1: the word names of voices of other languages are not UTF-8)
    times = [line.split() for line in timing.read_text(encoding="latin-1").splitlines()] if timing.is_file() else []
    found = [(float(t[1]), float(t[2])) for t in times if len(t) == 3 and t[0].lower() == word]
    if len(found) != 1:
        raise StreamDataError(f"Festival ({voice}) said {word!r} {len(found)} times in {text!r}")
    try:
        trimmed, start, end = timed_trim(samples, round(found[0][0] * SAMPLE_RATE_HZ),
                                          round(found[0][1] * SAMPLE_RATE_HZ))
    except SynthesisError as error:
        raise StreamDataError(f"Festival ({voice}) on {text!r}: {error}") from None
    return trimmed, (start, end)


def keyword_sentence(keyword: str, sentences: list[str], rng: np.random.Generator) -> tuple[str, int]:
    """A text that says `keyword` once inside running speech, and the character where it begins:
    one time in three a carrier phrase ("turn the lights on"), otherwise 4-14 words of a prose
    sentence (which holds no keyword) with the keyword put between two of them, or first or last."""
    if not sentences or rng.random() < 1 / 3:
        phrase = str(rng.choice(CARRIER_PHRASES[keyword]))
        words = phrase.split()
        at = words.index(keyword)
    else:
        words = str(rng.choice(sentences)).split()
        length = int(rng.integers(4, 15))
        first = int(rng.integers(0, max(1, len(words) - length + 1)))
        words = words[first : first + length]
        at = int(rng.integers(0, len(words) + 1))
        words = [*words[:at], keyword, *words[at:]]
    return " ".join(words), sum(len(word) + 1 for word in words[:at])


@dataclass(frozen=True)
class BankPlan:
    """How much to synthesise for each split (per espeak-ng speaker; Festival voices get their own)."""

    keyword_takes: int  # renditions of each keyword per speaker
    near_miss_words: int  # near-miss words per speaker
    prose_seconds: float  # prose per speaker (about 2.6 words a second)
    festival_keyword_takes: int = 0  # per Festival voice of this split
    festival_near_miss_words: int = 0
    festival_prose_seconds: float = 0.0
    speaker_limit: int = 0  # 0: every speaker of the split
    sentences: int = 0  # per speaker: keywords said inside a sentence (keyword_sentence), keywords in turn
    festival_sentences: int = 0  # per Festival voice of this split
    # Festival diphone voices: each utterance at a target f0 mean drawn from this range (Hz), its
    # spread 6-20% of it; None: the voice's own intonation
    festival_f0_hz: tuple[float, float] | None = None
    # The train split: Festival's voices of other languages (FESTIVAL_ACCENTED_VOICES) too, each
    # with the Festival amounts above, at its own pitch
    accented_voices: bool = False


# BankPlan fields added after bank version 3: they enter a bank's digest only when set, so that
# the banks made before them keep their folders.
_LATER_PLAN_FIELDS = {"festival_f0_hz": None, "accented_voices": False}


def _plan_description(plan: BankPlan) -> dict:
    return {key: value for key, value in asdict(plan).items()
            if key not in _LATER_PLAN_FIELDS or value != _LATER_PLAN_FIELDS[key]}


@dataclass(frozen=True)
class StreamDataConfig:
    plans: dict = field(default_factory=lambda: {
        # Festival's two diphone voices at many pitches (keywords/5's bank had 12 takes, 40 near
        # misses, 600 s of prose and 80 sentences per voice, at the voices' own pitch), and 12
        # keyword sentences per espeak-ng speaker (7,128; keywords/5's bank had 4). Since keywords/7
        # the accented Festival voices speak too, as much as each diphone voice.
        "train": BankPlan(1, 5, 22.0, festival_keyword_takes=40, festival_near_miss_words=120,
                          festival_prose_seconds=1800.0, sentences=12, festival_sentences=300,
                          festival_f0_hz=(75.0, 230.0), accented_voices=True),
        # Held-out prose of the training speakers: where hard negatives are mined.
        "mining": BankPlan(0, 0, 8.0),
        # Prose enough (about 5 h) that the <= 2 false alarms/h operating point, keyword thresholds
        # and all, rests on ten alarms rather than two.
        # Each keyword said twice as a command and once inside a sentence by each speaker.
        "validation": BankPlan(2, 0, 250.0, sentences=10),
        # At least 5 hours of continuous speech by test speakers and 1 hour by the held-out voice.
        "test": BankPlan(2, 0, 170.0, sentences=10),
        HELD_OUT: BankPlan(0, 0, 0.0, festival_keyword_takes=27, festival_prose_seconds=4300.0,
                           festival_sentences=130),
    })
    rate_wpm: tuple[int, int] = (130, 210)
    pitch: tuple[int, int] = (25, 75)
    festival_stretch: tuple[float, float] = (0.8, 1.3)
    seed: int = 29


QUICK_STREAM_DATA = StreamDataConfig(plans={
    "train": BankPlan(1, 2, 8.0, festival_keyword_takes=1, festival_near_miss_words=2,
                      festival_prose_seconds=8.0, speaker_limit=8, sentences=2, festival_sentences=2),
    "mining": BankPlan(0, 0, 6.0, speaker_limit=4),
    "validation": BankPlan(1, 0, 12.0, speaker_limit=3, sentences=3),
    "test": BankPlan(1, 0, 12.0, speaker_limit=3, sentences=3),
    HELD_OUT: BankPlan(0, 0, 0.0, festival_keyword_takes=1, festival_prose_seconds=10.0, festival_sentences=3),
})


@dataclass
class Bank:
    """Clean utterances of one split, each with its kind ("keyword", "sentence", "near_miss",
    "prose"), its label (the keyword, or _unknown_) and its voice. A "sentence" says its keyword
    inside running speech; its span says where (seconds from the utterance's start)."""

    samples: np.ndarray  # float32, every utterance end to end
    offsets: np.ndarray  # int64 [n + 1]
    kinds: list[str]
    labels: list[str]
    voices: list[str]
    spans: np.ndarray  # float64 [n, 2]: the keyword's start and end in a sentence, NaN elsewhere

    def __len__(self) -> int:
        return len(self.kinds)

    def utterance(self, index: int) -> np.ndarray:
        return self.samples[self.offsets[index] : self.offsets[index + 1]]

    @cached_property
    def _by_kind(self) -> dict[str, np.ndarray]:
        kinds = np.asarray(self.kinds)
        found = {kind: np.flatnonzero(kinds == kind) for kind in set(self.kinds)}
        for indices in found.values():
            indices.flags.writeable = False
        return found

    @cached_property
    def _voice_ids(self) -> tuple[np.ndarray, np.ndarray]:
        names, ids = np.unique(np.asarray(self.voices, dtype=str), return_inverse=True)
        return names, ids

    def of_kind(self, kind: str) -> np.ndarray:
        """The indices of the utterances of `kind`, in order (read-only)."""
        return self._by_kind.get(kind, np.zeros(0, np.int64))

    def indices(self, kind: str, voices, exclude: bool = False) -> np.ndarray:
        """The indices of the utterances of `kind` by one of `voices` (exclude: by none of them), in order."""
        names, ids = self._voice_ids
        of_kind = self.of_kind(kind)
        spoken = np.isin(names, np.asarray(list(voices), dtype=str))[ids[of_kind]]
        return of_kind[~spoken if exclude else spoken]

    def seconds(self, kind: str) -> float:
        lengths = np.diff(self.offsets)
        return float(sum(lengths[i] for i in self.of_kind(kind)) / SAMPLE_RATE_HZ)

    def keyword_span(self, index: int) -> tuple[float, float]:
        """Where utterance `index` says its keyword: the whole of a "keyword", the span of a "sentence"."""
        if self.kinds[index] == "sentence":
            return float(self.spans[index, 0]), float(self.spans[index, 1])
        return 0.0, float(self.offsets[index + 1] - self.offsets[index]) / SAMPLE_RATE_HZ

    def save(self, folder: Path) -> None:
        np.save(folder / "samples.npy", (np.clip(self.samples, -1, 1) * 32767).astype(np.int16))
        np.save(folder / "offsets.npy", self.offsets)
        np.save(folder / "spans.npy", self.spans)
        (folder / "utterances.json").write_text(json.dumps(
            {"kinds": self.kinds, "labels": self.labels, "voices": self.voices}))

    @classmethod
    def load(cls, folder: Path) -> Bank:
        meta = json.loads((folder / "utterances.json").read_text())
        samples = np.load(folder / "samples.npy").astype(np.float32) / 32767.0
        return cls(samples, np.load(folder / "offsets.npy"), meta["kinds"], meta["labels"], meta["voices"],
                   np.load(folder / "spans.npy"))

    @classmethod
    def join(cls, parts: list[tuple]) -> Bank:
        """A bank of (kind, label, voice, samples) parts; a "sentence" adds its keyword's (start_s, end_s)."""
        lengths = np.array([len(p[3]) for p in parts], np.int64)
        samples = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.float32)
        spans = np.array([p[4] if len(p) > 4 and p[4] is not None else (np.nan, np.nan) for p in parts],
                         np.float64).reshape(-1, 2)
        return cls(samples.astype(np.float32), np.concatenate([[0], np.cumsum(lengths)]),
                   [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], spans)


def _prose_texts(sentences: list[str], seconds: float, rng: np.random.Generator) -> list[str]:
    """Texts of 12-45 words (a sentence, or two short ones), about `seconds` of speech in all."""
    texts, words = [], 0
    while words < seconds * WORDS_PER_SECOND and sentences:
        text = sentences[int(rng.integers(len(sentences)))]
        if len(text.split()) < 12:
            text += " " + sentences[int(rng.integers(len(sentences)))]
        text = " ".join(text.split()[:45])
        texts.append(text)
        words += len(text.split())
    return texts


def _keyword_turns(count: int, rng: np.random.Generator) -> list[str]:
    """`count` keywords, every keyword in turn (in shuffled rounds), so that each is said as often."""
    turns: list[str] = []
    while len(turns) < count:
        turns.extend(str(k) for k in rng.permutation(KEYWORDS))
    return turns[:count]


def _espeak_job(job) -> list[tuple]:
    speaker, plan, sentences, config, seed = job
    rng = np.random.default_rng(seed)
    out = []

    def prosody() -> tuple[int, int, int]:
        return (int(rng.integers(*config.rate_wpm, endpoint=True)), int(rng.integers(*config.pitch, endpoint=True)),
                int(rng.integers(70, 130)))

    def say(text: str) -> np.ndarray:
        return synthesize(text, speaker, *prosody())

    for keyword in KEYWORDS:
        for _ in range(plan.keyword_takes):
            out.append(("keyword", keyword, speaker.name, say(keyword)))
    for word in rng.choice(NEAR_MISSES, size=plan.near_miss_words, replace=False) if plan.near_miss_words else []:
        out.append(("near_miss", UNKNOWN, speaker.name, say(str(word))))
    for text in _prose_texts(sentences, plan.prose_seconds, rng):
        out.append(("prose", UNKNOWN, speaker.name, say(text)))
    for keyword in _keyword_turns(plan.sentences, rng):
        text, at = keyword_sentence(keyword, sentences, rng)
        samples, start, end = synthesize_timed(text, at, speaker, *prosody())
        out.append(("sentence", keyword, speaker.name, samples, (start, end)))
    return out


def _festival_job(job) -> list[tuple]:
    voice, plan, sentences, config, seed = job
    rng = np.random.default_rng(seed)
    # With plan.festival_f0_hz every utterance gets its own pitch; without, no draw is made, so
    # the plans that set none are spoken exactly as before the setting existed.
    pitch_rng = np.random.default_rng([*np.atleast_1d(seed), 7])

    spellings = ACCENT_SPELLINGS.get(FESTIVAL_ACCENTED_VOICES.get(voice, ""), {})

    def pitch() -> tuple[float, float] | None:
        # (The accented voices' intonation models are their languages' own, not the f0 model
        # whose statistics the targets are mapped from.)
        if plan.festival_f0_hz is None or spellings:
            return None
        mean = float(pitch_rng.uniform(*plan.festival_f0_hz))
        return mean, mean * float(pitch_rng.uniform(0.06, 0.2))

    items, meta, pitches = [], [], []
    for keyword in KEYWORDS:
        for _ in range(plan.festival_keyword_takes):
            items.append((spellings.get(keyword, keyword), float(rng.uniform(*config.festival_stretch))))
            meta.append(("keyword", keyword))
            pitches.append(pitch())
    words = rng.choice(NEAR_MISSES, size=plan.festival_near_miss_words) if plan.festival_near_miss_words else []
    for word in words:
        items.append((str(word), float(rng.uniform(*config.festival_stretch))))
        meta.append(("near_miss", UNKNOWN))
        pitches.append(pitch())
    for text in _prose_texts(sentences, plan.festival_prose_seconds, rng):
        items.append((text, float(rng.uniform(0.9, 1.15))))
        meta.append(("prose", UNKNOWN))
        pitches.append(pitch())
    name = f"festival:{voice}"
    skip = bool(spellings)
    out = [(kind, label, name, samples)
           for (kind, label), samples in zip(meta, festival_synthesize(voice, items, pitches, skip), strict=True)
           if samples is not None]
    timed, timed_pitches, labels = [], [], []
    for keyword in _keyword_turns(plan.festival_sentences, rng):
        text, at = keyword_sentence(keyword, sentences, rng)
        said = spellings.get(keyword, keyword)
        text = text[:at] + said + text[at + len(keyword):]
        timed.append((text, float(rng.uniform(*config.festival_stretch)), said))
        labels.append(keyword)
        timed_pitches.append(pitch())
    if timed:
        out.extend(("sentence", label, name, said[0], said[1:])
                   for label, said in zip(labels, festival_synthesize_timed(voice, timed, timed_pitches, skip),
                                          strict=True)
                   if said is not None)
    return out


def _run_job(job):
    return _festival_job(job[1:]) if job[0] == "festival" else _espeak_job(job[1:])


def bank_voices(split: str, plan: BankPlan) -> tuple[list[Speaker], list[str]]:
    """The espeak-ng speakers and Festival voices that speak a split."""
    speaker_split = "train" if split == "mining" else split
    chosen = [s for s in speakers() if split_of(s) == speaker_split] if split != HELD_OUT else []
    if plan.speaker_limit:
        chosen = sorted(chosen, key=lambda s: hashlib.sha256(f"bank:{s.name}".encode()).hexdigest())
        chosen = sorted(chosen[: plan.speaker_limit])
    festival = []
    if plan.festival_keyword_takes or plan.festival_prose_seconds or plan.festival_sentences:
        festival = list(FESTIVAL_TRAINING_VOICES) if split == "train" else [FESTIVAL_HELD_OUT_VOICE]
        if split == "train" and plan.accented_voices:
            festival += list(FESTIVAL_ACCENTED_VOICES)
    return chosen, festival


TRAINING_SPLITS = ("train", "mining", "validation")
EVALUATION_SPLITS = ("validation", "test", HELD_OUT)


def build_banks(cache_dir: Path, config: StreamDataConfig = StreamDataConfig(), workers: int = 2,
                progress: bool = False, splits: tuple[str, ...] | None = None) -> dict[str, Bank]:
    """The banks of `splits` (default: every split), each synthesised once into
    cache_dir/<digest>/<split>/ and reused after."""
    from multiprocessing import get_context

    from tqdm.auto import tqdm

    banks = {}
    sentences = None
    for split, plan in config.plans.items():
        if splits is not None and split not in splits:
            continue
        # Each split is cached under a digest of what makes it, so changing one plan keeps the others.
        description = {"split": split, "plan": _plan_description(plan), "seed": config.seed, "espeak": espeak_version(),
                       "prosody": [config.rate_wpm, config.pitch, config.festival_stretch],
                       "near_misses": NEAR_MISSES, "homophones": HOMOPHONES, "words_per_second": WORDS_PER_SECOND,
                       "carrier_phrases": CARRIER_PHRASES, "version": 3}
        digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
        root = cache_dir / digest
        folder = root / split
        if (folder / "utterances.json").is_file():
            banks[split] = Bank.load(folder)
            continue
        if sentences is None:
            sentences = prose_sentences()
        text_split = "test" if split == HELD_OUT else split
        chosen, festival = bank_voices(split, plan)
        missing = [voice for voice in festival
                   if voice in FESTIVAL_ACCENTED_VOICES and not festival_voice_installed(voice)]
        if missing:
            raise StreamDataError(f"Festival voices {', '.join(missing)} are not installed (Debian: apt-get install "
                                  f"{FESTIVAL_ACCENT_PACKAGES})")
        jobs = [("espeak", speaker, plan, sentences[text_split], config,
                 [config.seed, int(hashlib.sha256(f"{split}:{speaker.name}".encode()).hexdigest()[:8], 16)])
                for speaker in chosen]
        # Festival voices speak in pieces so that both workers share them.
        pieces = 6 if plan.festival_prose_seconds > 120 else 1
        for voice in festival:
            for piece in range(pieces):
                share = BankPlan(0, 0, plan.festival_prose_seconds / pieces,
                                 festival_keyword_takes=plan.festival_keyword_takes if piece == 0 else 0,
                                 festival_near_miss_words=plan.festival_near_miss_words if piece == 0 else 0,
                                 festival_prose_seconds=plan.festival_prose_seconds / pieces,
                                 festival_sentences=plan.festival_sentences if piece == min(1, pieces - 1) else 0,
                                 festival_f0_hz=plan.festival_f0_hz, accented_voices=plan.accented_voices)
                salt = int(hashlib.sha256(f"{split}:{voice}".encode()).hexdigest()[:8], 16)
                jobs.append(("festival", voice, share, sentences[text_split], config, [config.seed, piece, salt]))
        # Festival jobs are the longest: start them first.
        jobs.sort(key=lambda job: job[0] != "festival")
        parts = []
        with get_context("spawn").Pool(max(1, workers)) as pool:
            for result in tqdm(pool.imap_unordered(_run_job, jobs), total=len(jobs), disable=not progress,
                               desc=f"synthesising {split}", unit="voice"):
                parts.extend(result)
        parts.sort(key=lambda p: (p[2], p[0], p[1]))  # a stable order whatever the workers' timing
        bank = Bank.join(parts)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".bank-", dir=root))
        bank.save(staging)
        (staging / "generation.json").write_text(json.dumps(description, indent=2))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, folder)
        except OSError:  # rendered meanwhile by another process
            shutil.rmtree(staging, ignore_errors=True)
        banks[split] = Bank.load(folder)
    return banks


# ---- composing recordings ------------------------------------------------------------------


@dataclass
class Recording:
    samples: np.ndarray  # float32 at 16 kHz
    # (keyword, start_s, end_s) of every keyword said in it
    keywords: list[tuple[str, float, float]]
    # (start_s, end_s) of every stretch of foreground speech (keywords included)
    speech: list[tuple[float, float]]
    # for each keyword: whether it was said inside a sentence (else as a command); may be left empty
    in_sentence: list[bool] = field(default_factory=list)
    voices: list[str] = field(default_factory=list)  # the bank voices that speak in it (compose)


@dataclass(frozen=True)
class Mix:
    """What a composed recording holds: segment kinds and their odds, and the conditions."""

    command: float = 0.3  # a keyword said on its own, short pauses around it
    # A keyword inside a sentence, said in one breath with it: keywords/5 was trained at 0.3. From
    # one clip stage the trainer's validation recall at <= 2 false alarms/h was, at 0.15: 0.295
    # after round 1 (then stopped); at 0.3: 0.230 after round 1, 0.464 after round 4; at 0.45:
    # 0.395 after round 4, 0.414 after round 5 (README).
    in_speech: float = 0.3
    prose: float = 0.4
    near_miss: float = 0.1
    gap: float = 0.05  # silence or noise, 1-3 s
    hard_negative: float = 0.0  # a stretch the model fired on before (hard-negative mining)
    # The share of recordings with a Festival voice among their speakers. Voices drawn alike made
    # it 2 in 596 (the train bank's two Festival voices among 594 espeak-ng speakers): Festival
    # speech was all but never heard, and the clip accuracy on those very voices was 0.55.
    festival_voice: float = 0.0
    pause_s: tuple[float, float] = (0.25, 1.0)
    # Speed perturbation: the share of recordings whose foreground speech is resampled to play
    # faster or slower by a factor drawn from `speed`, which moves pitch and formants together
    # (a longer or shorter vocal tract, a new speaker) and the tempo; the keyword times move with it.
    speed_probability: float = 0.0
    speed: tuple[float, float] = (0.9, 1.1)
    gain_db: tuple[float, float] = (-15.0, 4.0)  # per segment
    noise_probability: float = 0.7
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_probability: float = 0.2
    babble_snr_db: tuple[float, float] = (8.0, 20.0)
    reverb_probability: float = 0.3
    rt60_s: tuple[float, float] = (0.15, 0.6)


# Test and validation recordings: mild noise, no babble or reverberation.
EVALUATION_MIX = Mix(noise_probability=1.0, snr_db=(15.0, 35.0), babble_probability=0.0, reverb_probability=0.0,
                     gain_db=(-6.0, 3.0))


def _pause(rng: np.random.Generator, seconds: tuple[float, float]) -> np.ndarray:
    return np.zeros(int(rng.uniform(*seconds) * SAMPLE_RATE_HZ), np.float32)


def compose(bank: Bank, seconds: float, rng: np.random.Generator, mix: Mix = Mix(),
            voices: list[str] | None = None, hard_negatives: list[np.ndarray] | None = None) -> Recording:
    """One recording of about `seconds`, spoken by 1-3 of the bank's voices (or `voices`)."""
    all_voices = sorted(set(bank.voices))
    festival = [voice for voice in all_voices if voice.startswith("festival:")]
    if voices is None and festival and len(festival) < len(all_voices) and mix.festival_voice > 0:
        others = [voice for voice in all_voices if voice not in festival]
        count = int(rng.integers(1, 4))
        if rng.random() < mix.festival_voice:
            voices = [str(rng.choice(festival)), *rng.choice(others, size=min(len(others), count - 1), replace=False)]
        else:
            voices = list(rng.choice(others, size=min(len(others), count), replace=False))
    elif voices is None:
        voices = list(rng.choice(all_voices, size=min(len(all_voices), int(rng.integers(1, 4))), replace=False))
    by_kind = {kind: bank.indices(kind, voices) for kind in ("keyword", "sentence", "near_miss", "prose")}
    kinds = ["command", "in_speech", "prose", "near_miss", "gap", "hard_negative"]
    odds = np.array([mix.command, mix.in_speech, mix.prose, mix.near_miss, mix.gap,
                     mix.hard_negative if hard_negatives else 0.0])
    if not len(by_kind["keyword"]):
        odds[0] = 0
    if not len(by_kind["sentence"]):
        odds[1] = 0
    if not len(by_kind["prose"]):
        odds[2] = 0
    if not len(by_kind["near_miss"]):
        odds[3] = 0
    odds = odds / odds.sum()
    # Drawn only when asked for, so that recordings without it keep their draws.
    speed = float(rng.uniform(*mix.speed)) if mix.speed_probability and rng.random() < mix.speed_probability else 1.0
    built = _Builder(rng, mix)
    built.pause(mix.pause_s)

    while built.position < seconds * speed * SAMPLE_RATE_HZ:  # still `seconds` long once sped up
        kind = kinds[int(rng.choice(len(kinds), p=odds))]
        if kind in ("command", "in_speech"):
            built.say_keyword(bank, int(rng.choice(by_kind["keyword" if kind == "command" else "sentence"])))
            built.pause(mix.pause_s)
        elif kind == "prose":
            built.put(bank.utterance(int(rng.choice(by_kind["prose"]))))
            built.pause((0.1, 0.8))
        elif kind == "near_miss":
            for _ in range(int(rng.integers(1, 4))):
                built.put(bank.utterance(int(rng.choice(by_kind["near_miss"]))))
                built.pause(mix.pause_s)
        elif kind == "hard_negative":
            built.put(hard_negatives[int(rng.integers(len(hard_negatives)))])
            built.pause((0.1, 0.5))
        else:
            built.pause((1.0, 3.0))
    foreground, keywords, speech = built.samples(), built.keywords, built.speech
    if speed != 1.0:
        foreground, keywords, speech = _sped_up(foreground, keywords, speech, speed)
    samples = _conditions(foreground, bank, voices, rng, mix, fast=True)
    return Recording(samples, keywords, speech, built.in_sentence, [str(voice) for voice in voices])


def _sped_up(samples: np.ndarray, keywords: list[tuple[str, float, float]], speech: list[tuple[float, float]],
             factor: float):
    """The samples played `factor` times as fast (resampled), with the keyword and speech times
    where they then lie."""
    faster = soxr.resample(samples, SAMPLE_RATE_HZ * factor, SAMPLE_RATE_HZ).astype(np.float32)
    return (faster, [(keyword, start / factor, end / factor) for keyword, start, end in keywords],
            [(start / factor, end / factor) for start, end in speech])


def _noise(samples: int, colour: str, rng: np.random.Generator, fast: bool = False) -> np.ndarray:
    """Coloured noise of any length from a power-of-two FFT (an FFT of an arbitrary length can be
    many times slower)."""
    size = 1 << max(0, int(samples - 1).bit_length())
    return coloured_noise(size, colour, rng, fast)[:samples]


def _conditions(samples: np.ndarray, bank: Bank, voices: list[str], rng: np.random.Generator, mix: Mix,
                fast: bool = False) -> np.ndarray:
    """Reverberation, babble and noise as `mix` says. fast: the noise drawn in float32 (training;
    the judged recordings keep the draws their figures were measured on)."""
    from training.augment import reverberate

    if rng.random() < mix.reverb_probability:
        samples = reverberate(samples, float(rng.uniform(*mix.rt60_s)), SAMPLE_RATE_HZ, rng)
    background = np.zeros_like(samples)
    others = bank.indices("prose", voices, exclude=True)
    if len(others) and rng.random() < mix.babble_probability:
        # Several other voices at once, each looped to the recording's length.
        for _ in range(int(rng.integers(3, 6))):
            voice = bank.utterance(int(rng.choice(others)))
            background += np.resize(voice, len(samples)) * np.float32(rng.uniform(0.5, 1.0))
        samples = mix_at_snr(samples, background, float(rng.uniform(*mix.babble_snr_db)))
    if rng.random() < mix.noise_probability:
        noise = _noise(len(samples), str(rng.choice(NOISE_COLOURS)), rng, fast)
        samples = mix_at_snr(samples, noise, float(rng.uniform(*mix.snr_db)))
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def frame_targets(recording: Recording, frames: int, hop_samples: int, window_samples: int,
                  labels: list[str], delay_s: float = 0.0) -> np.ndarray:
    """Per-frame class ids [frames]: a keyword from delay_s after its end for TARGET_AFTER_END_S,
    _unknown_ on frames that overlap speech, _silence_ elsewhere."""
    starts = np.arange(frames) * hop_samples / SAMPLE_RATE_HZ
    ends = starts + window_samples / SAMPLE_RATE_HZ
    targets = np.full(frames, labels.index(SILENCE), np.int64)
    for start, end in recording.speech:
        targets[(ends > start) & (starts < end)] = labels.index(UNKNOWN)
    for keyword, _, end in recording.keywords:
        targets[(ends >= end + delay_s) & (ends <= end + delay_s + TARGET_AFTER_END_S)] = labels.index(keyword)
    return targets


def sentence_keyword_frames(recording: Recording, frames: int, hop_samples: int, window_samples: int,
                            delay_s: float = 0.0) -> np.ndarray:
    """The frames [frames] that frame_targets gives the label of a keyword said inside a sentence."""
    ends = (np.arange(frames) * hop_samples + window_samples) / SAMPLE_RATE_HZ
    marked = np.zeros(frames, bool)
    in_sentence = recording.in_sentence or [False] * len(recording.keywords)
    for (_, _, end), said_in_sentence in zip(recording.keywords, in_sentence, strict=True):
        # In order, as frame_targets labels them: a later keyword's frames take over.
        marked[(ends >= end + delay_s) & (ends <= end + delay_s + TARGET_AFTER_END_S)] = said_in_sentence
    return marked


def keyword_windows(recording: Recording, frames: int, hop_samples: int, window_samples: int,
                    labels: list[str], before_end_s: float = MAX_POOL_BEFORE_END_S,
                    after_end_s: float = MAX_POOL_AFTER_END_S) -> list[tuple[int, int, int]]:
    """(label id, first, last frame) of each keyword's max-pooling window: the frames that end
    between before_end_s before the keyword's end (not before its start) and after_end_s after
    it, those a detection reported in time can fire on."""
    ends = (np.arange(frames) * hop_samples + window_samples) / SAMPLE_RATE_HZ
    windows = []
    for keyword, start, end in recording.keywords:
        first = max(start, end - before_end_s)
        inside = np.flatnonzero((ends >= first) & (ends <= end + after_end_s))
        if inside.size:
            windows.append((labels.index(keyword), int(inside[0]), int(inside[-1])))
    return windows


def negative_recording(bank: Bank, utterances: list[int], rng: np.random.Generator, mix: Mix) -> Recording:
    """Continuous speech with no keyword: the given prose utterances read one after another."""
    built = _Builder(rng, mix)
    for index in utterances:
        built.put(bank.utterance(index))
        built.pause((0.1, 0.6))
    samples = _conditions(built.samples(), bank, [], rng, Mix(**{**asdict(mix), "babble_probability": 0.0}))
    return Recording(samples, [], built.speech)


def evaluation_recordings(bank: Bank, seed: int, keyword_seconds: float = 60.0) -> dict[str, list[Recording]]:
    """A split's judged recordings: "negative", every prose utterance once (continuous speech
    by each voice, no keyword); "keywords", every keyword take once (a command, or a sentence
    that says it inside running speech), per voice."""
    rng = np.random.default_rng(seed)
    negative, with_keywords = [], []
    for voice in sorted(set(bank.voices)):
        prose = [int(i) for i in bank.indices("prose", [voice])]
        for part in np.array_split(np.array(prose, np.int64), max(1, len(prose) // 8)):
            if len(part):
                negative.append(negative_recording(bank, list(part), rng, EVALUATION_MIX))
        takes = [int(i) for kind in ("keyword", "sentence") for i in bank.indices(kind, [voice])]
        if takes:
            with_keywords.extend(_keyword_recordings(bank, voice, takes, prose, rng, keyword_seconds))
    return {"negative": negative, "keywords": with_keywords}


class _Builder:
    """Pieces of one recording and where its keywords and speech lie."""

    def __init__(self, rng: np.random.Generator, mix: Mix):
        self.rng, self.mix = rng, mix
        self.pieces: list[np.ndarray] = []
        self.keywords: list[tuple[str, float, float]] = []
        self.in_sentence: list[bool] = []
        self.speech: list[tuple[float, float]] = []
        self.position = 0

    def put(self, samples: np.ndarray, spoken: bool = True) -> None:
        if spoken:
            samples = samples * np.float32(10 ** (self.rng.uniform(*self.mix.gain_db) / 20))
        start, end = self.position / SAMPLE_RATE_HZ, (self.position + len(samples)) / SAMPLE_RATE_HZ
        if spoken and len(samples):
            self.speech.append((start, end))
        self.pieces.append(samples.astype(np.float32))
        self.position += len(samples)

    def say_keyword(self, bank: Bank, index: int) -> None:
        """A "keyword" or "sentence" utterance of the bank, its keyword where the bank says it lies."""
        at = self.position / SAMPLE_RATE_HZ
        start, end = bank.keyword_span(index)
        self.put(bank.utterance(index))
        self.keywords.append((bank.labels[index], at + start, at + end))
        self.in_sentence.append(bank.kinds[index] == "sentence")

    def pause(self, seconds: tuple[float, float]) -> None:
        self.put(_pause(self.rng, seconds), spoken=False)

    def samples(self) -> np.ndarray:
        return np.concatenate(self.pieces).astype(np.float32) if self.pieces else np.zeros(0, np.float32)


def _keyword_recordings(bank: Bank, voice: str, takes: list[int], prose: list[int], rng: np.random.Generator,
                        seconds: float) -> list[Recording]:
    """Each keyword take exactly once, a command between pauses or a sentence that says it
    inside running speech; now and then a prose utterance of the same voice between them."""
    recordings = []
    order = list(rng.permutation(takes))
    mix = EVALUATION_MIX
    while order:
        built = _Builder(rng, mix)
        built.pause(mix.pause_s)
        while order and built.position < seconds * SAMPLE_RATE_HZ:
            built.say_keyword(bank, int(order.pop()))
            built.pause(mix.pause_s)
            if prose and rng.random() < 0.3:
                built.put(bank.utterance(int(rng.choice(prose))))
                built.pause(mix.pause_s)
        samples = _conditions(built.samples(), bank, [voice], rng, mix)
        recordings.append(Recording(samples, built.keywords, built.speech, built.in_sentence))
    return recordings


__all__ = ["Bank", "Mix", "Recording", "StreamDataConfig", "build_banks", "compose", "evaluation_recordings",
           "frame_targets", "keyword_windows", "sentence_keyword_frames", "SynthesisError"]
