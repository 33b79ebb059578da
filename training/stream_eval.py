"""Keyword spotting judged where it is used: long recordings of continuous speech.

The judged recordings come from training/data/streams.py banks of voices never heard in
training: "negative" recordings are continuous prose with no keyword in it (false alarms per
hour), "keywords" recordings hold every keyword take once, said as a command between pauses or
inside running speech (recall). Each split is streamed through the server's own code
(serving.audio's streaming log-mel, step.onnx with carried state) in 100 ms chunks, many
recordings side by side as the server's cellular batching runs them, and its posteriors through
serving.detector's keyword detector as 1 s chunks would be: every recording at once, smoothed once
per smoothing for all the thresholds and decision windows of the grid.

Matching follows MLPerf Tiny's streaming wake-word benchmark: a detection is a hit when it is
reported between the keyword's start and 0.5 s after its end and names that keyword (each
keyword is hit at most once); every other detection is a false alarm, and false alarms are
debounced to at most one per second.

The operating point (threshold, smoothing, decision window, and thresholds of single keywords
tuned from the best shared setting, one keyword at a time) is chosen on validation speakers: the
most recall at <= 2 false alarms per hour. Test speakers and the held-out engine are then
measured once at that point, and a DET curve (recall against false alarms per hour as one
shared threshold moves) is drawn for both.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from serving.detector import BatchDetector, Detection, DetectorConfig, Events
from serving.streaming import StepRow, run_steps, softmax

CHUNK_S = 0.1
HIT_AFTER_END_S = 0.5
DEBOUNCE_S = 1.0
TARGET_FALSE_ALARMS_PER_HOUR = 2.0
TARGETS = {"test": {"recall": 0.90, "false_alarms_per_hour": 2.0},
           "held_out_engine": {"recall": 0.80, "false_alarms_per_hour": 5.0}}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995)
SMOOTHING_MS = (40, 80, 160)
DECISION_MS = (100, 300)


def frame_posteriors(version, recordings, chunk_s: float = CHUNK_S, group: int = 256) -> list[np.ndarray]:
    """Per-frame posteriors [frames, C] of each recording, streamed in `chunk_s` chunks through
    the streaming frontend and step.onnx, `group` recordings stepping together."""
    from serving.audio import StreamingLogMel
    from serving.streaming import initial_state

    outputs: list[np.ndarray] = []
    chunk = int(chunk_s * 16000)
    for first in range(0, len(recordings), group):
        part = recordings[first : first + group]
        frontends = [StreamingLogMel(version.frontend) for _ in part]
        states = [initial_state(version) for _ in part]
        pieces: list[list[np.ndarray]] = [[] for _ in part]
        longest = max(len(r.samples) for r in part)
        for start in range(0, longest, chunk):
            live, payloads = [], []
            for index, recording in enumerate(part):
                if start >= len(recording.samples):
                    continue
                features = frontends[index].push(recording.samples[start : start + chunk])
                if len(features):
                    live.append(index)
                    payloads.append([StepRow(features, states[index])])
            if payloads:
                for index, (result,) in zip(live, run_steps(version, payloads), strict=True):
                    states[index] = result.state
                    pieces[index].append(result.frame_logits)
        outputs.extend(softmax(np.concatenate(p).astype(np.float64)).astype(np.float32) for p in pieces)
    return outputs


def detect_all(posteriors: list[np.ndarray], labels: list[str], hop_ms: float, window_ms: float,
               config: DetectorConfig, chunk_frames: int = 50) -> list[list[Detection]]:
    """Each recording's detections, as streaming it through the detector in chunks of chunk_frames
    finds them; all recordings at once."""
    detector = BatchDetector(labels, hop_ms, window_ms)
    smoothed = detector.smooth_recordings(posteriors, config.smoothing_ms, chunk_frames)
    return detector.detect_recordings(smoothed, config).detections(labels)


def debounced(times: list[float], seconds: float = DEBOUNCE_S) -> int:
    """How many of these false-alarm times count when at most one a second counts."""
    count, last = 0, -np.inf
    for moment in sorted(times):
        if moment - last >= seconds:
            count, last = count + 1, moment
    return count


def score(recordings, posteriors: list[np.ndarray], labels: list[str], hop_ms: float, window_ms: float,
          config: DetectorConfig) -> dict:
    """Hits, recall (overall and per keyword), debounced false alarms and false alarms per hour."""
    detector = BatchDetector(labels, hop_ms, window_ms)
    events = detector.detect_recordings(detector.smooth_recordings(posteriors, config.smoothing_ms), config)
    return score_events(recordings, events, labels)


def score_events(recordings, events: Events, labels: list[str]) -> dict:
    """score() of the events detected in the recordings (stream i: recordings[i])."""
    keywords = [label for label in labels if not label.startswith("_")]
    said = dict.fromkeys(keywords, 0)
    for recording in recordings:
        for label, _, _ in recording.keywords:
            said[label] += 1
    found = dict.fromkeys(keywords, 0)
    # Recall by how the keyword was said, where the recordings say.
    delivery = {"command": [0, 0], "in_sentence": [0, 0]}  # [said, found]
    for recording in recordings:
        for in_sentence in recording.in_sentence:
            delivery["in_sentence" if in_sentence else "command"][0] += 1
    moments = events.reported_ms / 1000
    # What each event was: a hit, or a false alarm inside the hit window of a keyword it does not
    # name (that keyword's label index), or elsewhere (-1). Events inside some hit window are
    # matched one by one, in order, since each keyword is hit at most once.
    hit = len(labels)
    outcome = np.full(len(moments), -1)
    index_of = {label: i for i, label in enumerate(labels)}
    near = np.flatnonzero(_in_hit_windows(recordings, events.stream, moments))
    matched: set[tuple[int, int]] = set()
    for event, stream, moment, name in zip(near.tolist(), events.stream[near].tolist(), moments[near].tolist(),
                                           [labels[i] for i in events.label[near]], strict=True):
        for index, (label, start, end) in enumerate(recordings[stream].keywords):
            if start <= moment <= end + HIT_AFTER_END_S and (stream, index) not in matched:
                outcome[event] = index_of[label]
                if label == name:
                    outcome[event] = hit
                    matched.add((stream, index))
                    found[name] += 1
                    if recordings[stream].in_sentence:
                        delivery["in_sentence" if recordings[stream].in_sentence[index] else "command"][1] += 1
                    break
    alarms = np.flatnonzero(outcome != hit)
    # Kinds of false alarm, in the order each first happened (the order ties are listed in).
    kinds, first_seen, counts = np.unique(np.where(outcome[alarms] >= 0, outcome[alarms], hit) * len(labels)
                                          + events.label[alarms], return_index=True, return_counts=True)
    names = [*labels, "none"]
    confusions = {f"{names[kind // len(labels)]}->{labels[kind % len(labels)]}": count
                  for kind, count in zip(kinds[np.argsort(first_seen)].tolist(),
                                         counts[np.argsort(first_seen)].tolist(), strict=True)}
    splits = np.flatnonzero(np.diff(events.stream[alarms])) + 1
    false_alarms = sum(debounced(times.tolist()) for times in np.split(moments[alarms], splits) if len(times))
    hours = sum(len(r.samples) for r in recordings) / 16000 / 3600
    total = sum(said.values())
    return {
        "keywords": total, "hits": sum(found.values()), "recall": sum(found.values()) / max(total, 1),
        "recall_per_keyword": {k: round(found[k] / said[k], 4) for k in keywords if said[k]},
        "recall_by_delivery": {k: round(hits / total, 4) for k, (total, hits) in delivery.items() if total},
        "false_alarms": false_alarms, "hours": round(hours, 3),
        "false_alarms_per_hour": false_alarms / hours if hours else 0.0,
        "top_false_alarms": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:8]),
    }


def _in_hit_windows(recordings, streams: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """[E] bool: whether each moment (in recording streams[i]) lies in the hit window of one of
    its recording's keywords."""
    per_recording = np.array([len(r.keywords) for r in recordings], np.int64)
    starts = np.array([start for r in recordings for _, start, _ in r.keywords], np.float64)
    ends = np.array([end for r in recordings for _, _, end in r.keywords], np.float64)
    # Every pair of an event and a keyword of its recording.
    pairs = per_recording[streams]
    event = np.repeat(np.arange(len(moments)), pairs)
    keyword = (np.repeat((np.cumsum(per_recording) - per_recording)[streams] - (np.cumsum(pairs) - pairs), pairs)
               + np.arange(len(event)))
    inside = (starts[keyword] <= moments[event]) & (moments[event] <= ends[keyword] + HIT_AFTER_END_S)
    near = np.zeros(len(moments), bool)
    near[event[inside]] = True
    return near


def judged(negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels, hop_ms, window_ms,
           config: DetectorConfig) -> dict:
    """Recall on the keyword recordings, false alarms per hour on the continuous speech."""
    ((_, result),) = judged_grid(negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels,
                                 hop_ms, window_ms, [config])
    return result


def judged_grid(negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels, hop_ms, window_ms,
                configs: list[DetectorConfig]) -> list[tuple[DetectorConfig, dict]]:
    """judged() at each setting, in order; the recordings are smoothed once per smoothing and every
    recording is detected on at once."""
    judge = Judge(negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels, hop_ms, window_ms)
    return [(config, judge(config)) for config in configs]


class Judge:
    """judged() of one split's recordings at any setting, each smoothing worked out once."""

    def __init__(self, negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels, hop_ms,
                 window_ms):
        self.negative, self.keyword_recordings = negative, keyword_recordings
        self.posteriors = (negative_posteriors, keyword_posteriors)
        self.labels = labels
        self.detector = BatchDetector(labels, hop_ms, window_ms)
        self.smoothed: dict[float, tuple] = {}

    def __call__(self, config: DetectorConfig) -> dict:
        if config.smoothing_ms not in self.smoothed:
            self.smoothed[config.smoothing_ms] = tuple(self.detector.smooth_recordings(p, config.smoothing_ms)
                                                       for p in self.posteriors)
        on_speech, on_keywords = self.smoothed[config.smoothing_ms]
        return _judgement(
            score_events(self.keyword_recordings, self.detector.detect_recordings(on_keywords, config), self.labels),
            score_events(self.negative, self.detector.detect_recordings(on_speech, config), self.labels),
        )


def tune_keyword_thresholds(judge: Judge, start: DetectorConfig, budget: float = TARGET_FALSE_ALARMS_PER_HOUR,
                            sweeps: int = 2) -> tuple[DetectorConfig, dict]:
    """From `start`, each keyword's own threshold in turn (coordinate ascent over THRESHOLDS,
    `sweeps` times over the keywords): the one that gives the most recall within the false-alarm
    budget, kept when it gives more than before. Returns the config and its judgement."""
    keywords = [label for label in judge.labels if not label.startswith("_")]
    best = (start, judge(start))

    def key(result):
        fits = result["false_alarms_per_hour"] <= budget
        return (fits, result["recall"] if fits else 0.0, -result["false_alarms_per_hour"])

    for _ in range(sweeps):
        improved = False
        for keyword in keywords:
            own = dict(best[0].keyword_thresholds)
            for value in THRESHOLDS:
                if value == own.get(keyword, best[0].threshold):
                    continue
                config = replace(best[0], keyword_thresholds={**own, keyword: value})
                result = judge(config)
                if key(result) > key(best[1]):
                    best, improved = (config, result), True
        if not improved:
            break
    # Keyword thresholds equal to the shared one say nothing: drop them.
    config = best[0]
    config = replace(config, keyword_thresholds={k: v for k, v in config.keyword_thresholds if v != config.threshold})
    return config, best[1]


def _judgement(on_keywords: dict, on_speech: dict) -> dict:
    return {
        "recall": round(on_keywords["recall"], 4), "keywords": on_keywords["keywords"],
        "recall_per_keyword": on_keywords["recall_per_keyword"],
        "recall_by_delivery": on_keywords["recall_by_delivery"],
        "false_alarms_per_hour": round(on_speech["false_alarms_per_hour"], 3),
        "false_alarms": on_speech["false_alarms"], "speech_hours": on_speech["hours"],
        "top_false_alarms": on_speech["top_false_alarms"],
        # False alarms in the keyword recordings too (prose between and around keywords).
        "keyword_recordings": {"hours": on_keywords["hours"], "false_alarms": on_keywords["false_alarms"],
                               "top_false_alarms": on_keywords["top_false_alarms"]},
    }


def grid() -> list[DetectorConfig]:
    return [DetectorConfig(threshold=t, smoothing_ms=s, decision_ms=d)
            for s in SMOOTHING_MS for d in DECISION_MS for t in THRESHOLDS]


def choose(results: list[tuple[DetectorConfig, dict]], budget: float = TARGET_FALSE_ALARMS_PER_HOUR):
    """The setting with the most recall within the false-alarm budget (fewest alarms on ties);
    the quietest one when none fits."""
    allowed = [r for r in results if r[1]["false_alarms_per_hour"] <= budget]
    if not allowed:
        return min(results, key=lambda r: (r[1]["false_alarms_per_hour"], -r[1]["recall"]))
    return max(allowed, key=lambda r: (r[1]["recall"], -r[1]["false_alarms_per_hour"], r[0].threshold))


def det_curve(negative, keyword_recordings, negative_posteriors, keyword_posteriors, labels, hop_ms, window_ms,
              config: DetectorConfig) -> list[dict]:
    """Recall (overall, and for commands and keywords in sentences apart) against false alarms
    per hour as one threshold shared by every keyword moves (the config's smoothing and decision
    window; keyword thresholds of its own dropped)."""
    settings = [replace(config, threshold=threshold, keyword_thresholds=())
                for threshold in sorted({*THRESHOLDS, 0.2, 0.9999})]
    return [{"threshold": setting.threshold, "recall": point["recall"],
             "recall_by_delivery": point["recall_by_delivery"],
             "false_alarms_per_hour": point["false_alarms_per_hour"]}
            for setting, point in judged_grid(negative, keyword_recordings, negative_posteriors, keyword_posteriors,
                                              labels, hop_ms, window_ms, settings)]


def plot_det(curves: dict[str, list[dict]], chosen: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for name, points in curves.items():
        xs = [max(p["false_alarms_per_hour"], 0.1) for p in points]
        line, = axes.plot(xs, [p["recall"] for p in points], marker=".", label=name)
        if name in chosen:
            axes.plot(max(chosen[name]["false_alarms_per_hour"], 0.1), chosen[name]["recall"], "o", ms=9,
                      mfc="none", color=line.get_color())
    for target in TARGETS.values():
        axes.axvline(target["false_alarms_per_hour"], color="grey", lw=0.6, ls=":")
        axes.axhline(target["recall"], color="grey", lw=0.6, ls=":")
    axes.set_xscale("log")
    axes.set_xlabel("false alarms per hour of continuous speech (0 drawn at 0.1)")
    axes.set_ylabel("recall over keyword events")
    axes.set_title("keywords: DET, one shared threshold (circles: the default point)", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def choose_operating_point(judge: Judge, keyword_thresholds: bool = True,
                           budget: float = TARGET_FALSE_ALARMS_PER_HOUR) -> tuple[DetectorConfig, dict]:
    """The detector setting with the most recall within the budget on these (validation)
    recordings: the grid of shared thresholds, and with keyword_thresholds, from the best shared
    setting of each smoothing, each keyword's own threshold tuned."""
    results = [(config, judge(config)) for config in grid()]
    if keyword_thresholds:
        for smoothing_ms in SMOOTHING_MS:
            start, _ = choose([r for r in results if r[0].smoothing_ms == smoothing_ms], budget)
            results.append(tune_keyword_thresholds(judge, start, budget))
    return choose(results, budget)


def evaluate(version_dir: Path, banks: dict, plot_path: Path | None = None, seed: int = 0,
             progress=print, keyword_thresholds: bool = True) -> dict:
    from serving.repository import load_version
    from training.data.streams import HELD_OUT, evaluation_recordings

    version = load_version(version_dir.parent.name, version_dir)
    labels = version.card.labels
    config = version.frontend.config
    hop_ms = config.hop_samples / config.sample_rate_hz * 1000
    window_ms = config.window_samples / config.sample_rate_hz * 1000
    started = time.perf_counter()
    prepared = {}
    for split in ("validation", "test", HELD_OUT):
        if split not in banks:
            continue
        recordings = evaluation_recordings(banks[split], seed)
        prepared[split] = (recordings["negative"], recordings["keywords"],
                           frame_posteriors(version, recordings["negative"]),
                           frame_posteriors(version, recordings["keywords"]))
        progress(f"streamed {split}: {sum(len(r.samples) for r in recordings['negative']) / 57600000:.2f} h of "
                 f"speech, {sum(len(r.keywords) for r in recordings['keywords'])} keywords")
    chosen, on_validation = choose_operating_point(
        Judge(*prepared["validation"], labels, hop_ms, window_ms), keyword_thresholds)
    points = {"validation": on_validation}
    curves = {}
    for split in ("test", HELD_OUT):
        if split in prepared:
            points[split] = judged(*prepared[split], labels, hop_ms, window_ms, chosen)
            curves[split] = det_curve(*prepared[split], labels, hop_ms, window_ms, chosen)
    if plot_path is not None and curves:
        names = {"test": "unseen espeak-ng speakers", HELD_OUT: "held-out engine (Festival HTS)"}
        plot_det({names[k]: v for k, v in curves.items()}, {names[k]: points[k] for k in curves}, plot_path)
    hours = {split: round(sum(len(r.samples) for r in p[0]) / 16000 / 3600, 3) for split, p in prepared.items()}
    return {
        "method": "continuous prose with no keyword (false alarms per hour) and keyword recordings (each take "
                  "once, as a command or inside a sentence said in one breath) by voices never trained on, "
                  "streamed in 100 ms chunks through serving.streaming; MLPerf Tiny matching: a hit is reported "
                  "between the keyword's start and 0.5 s after its end and names it, false alarms debounced to one "
                  "per second",
        "chosen_on": "validation speakers: the most recall at <= 2 false alarms per hour, over a grid of one "
                     "threshold shared by every keyword x smoothing x decision window and, from the best shared "
                     "setting of each smoothing, thresholds of single keywords tuned one keyword at a time; "
                     "test speakers and the held-out engine measured once at that point" if keyword_thresholds else
                     "validation speakers: the most recall at <= 2 false alarms per hour; test speakers and the "
                     "held-out engine measured once at that point",
        "targets": TARGETS,
        "default_budget_per_hour": TARGET_FALSE_ALARMS_PER_HOUR,
        "operating_points": [{"false_alarm_budget_per_hour": TARGET_FALSE_ALARMS_PER_HOUR,
                              "detector": chosen.as_dict(), **points}],
        "det_curves": curves,
        "speech_hours": hours,
        "seconds_to_evaluate": round(time.perf_counter() - started, 1),
    }


def run(version_dir: Path, quick: bool = False, write_card: bool = False, plot_path: Path | None = None) -> dict:
    """Evaluate a version on the bundled stream banks; with write_card, store it in model.json."""
    from training.data.streams import EVALUATION_SPLITS, QUICK_STREAM_DATA, StreamDataConfig, build_banks
    from training.tasks import cache_dir

    banks = build_banks(cache_dir() / "streams", QUICK_STREAM_DATA if quick else StreamDataConfig(), progress=True,
                        splits=EVALUATION_SPLITS)
    plot_path = plot_path or version_dir / "det.png"
    result = evaluate(version_dir, banks, plot_path)
    if write_card:
        card_path = version_dir / "model.json"
        card = json.loads(card_path.read_text())
        command = f"rnnserve evaluate-stream {version_dir}{' --quick' if quick else ''} --write-card"
        card["detection"] = {**result, "command": command, "plot": plot_path.name}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return result
