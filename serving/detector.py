"""The keyword detector: per-frame posteriors of many streams -> one event per spoken keyword.

s_t is the mean of the last `smoothing` frame posteriors (of as many as there are at a stream's
start). When a keyword's s_t reaches its threshold (`threshold`, or that keyword's own in
`keyword_thresholds`) an event opens; it gathers every keyword's peak for decision_ms (dips below
the threshold included) and is then reported as the keyword with the highest peak, that peak
being its confidence (the first frames of a word often look like another keyword). With keyword
thresholds, the scores are scaled by threshold / the keyword's own threshold, so that a keyword
reaches `threshold` where it reaches its own and peaks are compared relative to each keyword's
threshold; the confidence reported is the unscaled peak. No event opens until refractory_ms after
the end of the previous event's last frame over the threshold. Labels starting with `_` never
fire.

A stream's settings and carried state (the frames its moving average still needs, the frames
seen, the open event, the refractory time) are one row of a `DetectorState`, so one step of many
streams, each with a chunk of its own length, is array work over all of them. Events follow each
other (where one closes, and its refractory time, decide where the next may open), so every frame
over the threshold is first worked out as if an event opened there (where it would close, which
frame would open the next one), all at once; then the events that do open are followed from each
stream's first, every stream a step at a time. That loop runs once per event of the busiest
stream, never per frame or per stream.

The moving average sums float32 frames from the start of what a chunk carries, as the server sums
a stream, so scores (and which frames reach the threshold) are those of streaming the same chunks
bit for bit; `smooth_recordings` does that for whole recordings at once, for evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from serving.errors import InvalidInput


@dataclass(frozen=True)
class DetectorConfig:
    threshold: float = 0.5
    smoothing_ms: float = 100.0
    refractory_ms: float = 500.0
    # An open detection collects evidence this long (dips below the threshold included) and is
    # then reported as the keyword with the highest peak.
    decision_ms: float = 500.0
    # Thresholds of single keywords, (keyword, threshold) pairs sorted by keyword (a mapping is
    # taken too); the other keywords use `threshold`.
    keyword_thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        pairs = self.keyword_thresholds
        pairs = pairs.items() if isinstance(pairs, Mapping) else pairs
        object.__setattr__(self, "keyword_thresholds", tuple(sorted((str(k), float(v)) for k, v in pairs)))

    @classmethod
    def from_settings(cls, settings: Mapping) -> DetectorConfig:
        """A config from stored or requested settings (a card's operating point: numbers, and
        keyword thresholds as an object); ValueError naming any setting it does not know."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown detector settings {unknown}")
        return cls(**{k: v if k == "keyword_thresholds" else float(v) for k, v in settings.items()})

    def checked(self, labels: Sequence[str] | None = None) -> DetectorConfig:
        """The config, if its values are in range (and its keyword thresholds name keywords of
        `labels`, when given); else InvalidInput naming the field and the limit."""
        if not 0.0 < self.threshold < 1.0:
            raise InvalidInput(f"config.threshold: {self.threshold}, must be between 0 and 1 (exclusive)")
        for name in ("smoothing_ms", "refractory_ms", "decision_ms"):
            value = getattr(self, name)
            if not 0.0 <= value <= 10_000:
                raise InvalidInput(f"config.{name}: {value}, must be 0 to 10000 ms")
        keywords = None if labels is None else [label for label in labels if not label.startswith("_")]
        for keyword, value in self.keyword_thresholds:
            if not 0.0 < value < 1.0:
                raise InvalidInput(f"config.keyword_thresholds[{keyword!r}]: {value}, must be between 0 and 1 "
                                   "(exclusive)")
            if keywords is not None and keyword not in keywords:
                raise InvalidInput(f"config.keyword_thresholds: {keyword!r} is not a keyword of this model "
                                   f"({', '.join(keywords)})")
        if len({k for k, _ in self.keyword_thresholds}) != len(self.keyword_thresholds):
            raise InvalidInput("config.keyword_thresholds: a keyword is named twice")
        return self

    def thresholds(self, keywords: Sequence[str]) -> np.ndarray:
        """The threshold of each of these keywords [K]."""
        own = dict(self.keyword_thresholds)
        return np.array([own.get(keyword, self.threshold) for keyword in keywords], np.float64)

    def as_dict(self) -> dict:
        """The settings as JSON takes them (keyword thresholds as an object; left out when none)."""
        settings = asdict(self)
        settings["keyword_thresholds"] = dict(self.keyword_thresholds)
        if not self.keyword_thresholds:
            del settings["keyword_thresholds"]
        return settings


@dataclass(frozen=True)
class Detection:
    keyword: str
    start_ms: float
    end_ms: float
    confidence: float
    # Stream time at which the detector reported it (the end of the frame that closed it).
    reported_ms: float = 0.0


@dataclass
class DetectorState:
    """Settings and carried state of detector streams, one row a stream. Rows of streams of one
    label set stack into a batch (`stack`) and part again (`rows`)."""

    threshold: np.ndarray  # [N] float64
    smoothing: np.ndarray  # [N] int64: frames averaged
    decision: np.ndarray  # [N] int64: frames an open event gathers peaks
    refractory_ms: np.ndarray  # [N] float64
    # [N, H, C] float32: the last frames seen, right-aligned, zeros before them; H >= smoothing - 1
    history: np.ndarray
    history_frames: np.ndarray  # [N] int64: how many frames of history are real
    frames: np.ndarray  # [N] int64: frames seen
    open: np.ndarray  # [N] bool: an event is gathering peaks
    first: np.ndarray  # [N] int64: the open event's first frame
    last: np.ndarray  # [N] int64: its last frame over the threshold
    peaks: np.ndarray  # [N, K] float64: its peak per keyword
    refractory_until_ms: np.ndarray  # [N] float64: no event opens at a frame that starts earlier
    # [N, K] float64: each keyword's scores are multiplied by threshold / its own threshold
    scale: np.ndarray

    def __len__(self) -> int:
        return len(self.threshold)

    @classmethod
    def stack(cls, states: Sequence[DetectorState]) -> DetectorState:
        """One state holding the rows of all of these, in order (histories padded to the widest)."""
        if len(states) == 1:
            return states[0]
        width = max(state.history.shape[1] for state in states)
        history = np.zeros((sum(map(len, states)), width, states[0].history.shape[2]), np.float32)
        row = 0
        for state in states:
            history[row : row + len(state), width - state.history.shape[1] :] = state.history
            row += len(state)
        others = [f.name for f in fields(cls) if f.name != "history"]
        return cls(history=history, **{name: np.concatenate([getattr(s, name) for s in states]) for name in others})

    def rows(self) -> list[DetectorState]:
        """One state per row (views), each history trimmed to what its smoothing needs."""
        width = self.history.shape[1]
        keep = (self.smoothing - 1).tolist()
        if keep == [width]:
            return [self]
        others = [f.name for f in fields(self) if f.name != "history"]
        return [
            DetectorState(history=self.history[i : i + 1, width - keep[i] :],
                          **{name: getattr(self, name)[i : i + 1] for name in others})
            for i in range(len(self))
        ]


class BatchDetector:
    """The detector of one label set and frame rate, for any number of streams: the streams'
    settings and state live in a `DetectorState` that `start` makes and `update` advances."""

    def __init__(self, labels: Sequence[str], hop_ms: float, window_ms: float):
        self.labels = list(labels)
        self.keywords = np.array([i for i, label in enumerate(self.labels) if not label.startswith("_")], np.int64)
        self.hop_ms, self.window_ms = hop_ms, window_ms

    def frames(self, ms: float) -> int:
        """A duration in whole frames (at least one)."""
        return max(1, round(ms / self.hop_ms))

    def start(self, configs: Sequence[DetectorConfig]) -> DetectorState:
        """The state of new streams, one per config."""
        count = len(configs)
        smoothing = np.array([self.frames(c.smoothing_ms) for c in configs], np.int64)
        return DetectorState(
            threshold=np.array([c.threshold for c in configs], np.float64),
            smoothing=smoothing,
            decision=np.array([self.frames(c.decision_ms) for c in configs], np.int64),
            refractory_ms=np.array([c.refractory_ms for c in configs], np.float64),
            history=np.zeros((count, int(smoothing.max(initial=1)) - 1, len(self.labels)), np.float32),
            history_frames=np.zeros(count, np.int64), frames=np.zeros(count, np.int64),
            open=np.zeros(count, bool), first=np.zeros(count, np.int64), last=np.zeros(count, np.int64),
            peaks=np.zeros((count, len(self.keywords))), refractory_until_ms=np.full(count, -1.0),
            scale=np.stack([self.scale(c) for c in configs]) if count else np.ones((0, len(self.keywords))),
        )

    def scale(self, config: DetectorConfig) -> np.ndarray:
        """[K]: what each keyword's scores are multiplied by so that its own threshold maps onto
        config.threshold."""
        return config.threshold / config.thresholds([self.labels[i] for i in self.keywords])

    def update(self, state: DetectorState, posteriors: np.ndarray,
               lengths: np.ndarray) -> tuple[DetectorState, list[list[Detection]], np.ndarray]:
        """Each stream's next chunk: row i of posteriors [N, T, C] holds lengths[i] frames (the rest
        is padding). Returns the new state (the given one is left as it was), each stream's events
        closed in its chunk, and the smoothed posteriors [N, T, C] (float64; padding: meaningless)."""
        lengths = np.asarray(lengths, np.int64)
        width = state.history.shape[1]
        joined = np.concatenate([state.history, posteriors.astype(np.float32)], axis=1)
        smoothed = _moving_average(joined, width, state.history_frames, state.smoothing)
        # The frames the next chunk's moving average needs, right-aligned.
        kept = np.minimum(state.smoothing - 1, state.history_frames + lengths)
        new_width = int(state.smoothing.max(initial=1)) - 1
        columns = width + lengths[:, None] - new_width + np.arange(new_width)
        real = np.arange(new_width) >= new_width - kept[:, None]
        history = np.where(real[..., None], joined[np.arange(len(state))[:, None], np.maximum(columns, 0)], 0)
        after = replace(state, history=history, history_frames=kept, frames=state.frames + lengths,
                        open=state.open.copy(), first=state.first.copy(), last=state.last.copy(),
                        peaks=state.peaks.copy(), refractory_until_ms=state.refractory_until_ms.copy())
        valid = np.arange(posteriors.shape[1]) < lengths[:, None]
        closed = _Closed()
        scores = smoothed[:, :, self.keywords][valid]
        if (state.scale != 1.0).any():
            scores = scores * np.repeat(state.scale, lengths, axis=0)
        self._advance(after, scores, lengths, state.frames, closed)
        return after, closed.events(self, after).detections(self.labels), smoothed

    def finish(self, state: DetectorState) -> list[list[Detection]]:
        """The end of the streams: each open event, closed at its stream's last frame."""
        closed = _Closed()
        self._finish(state, closed)
        return closed.events(self, state).detections(self.labels)

    def _finish(self, state: DetectorState, closed: _Closed) -> None:
        closing = np.flatnonzero(state.open)
        closed.add(closing, state.first[closing], state.last[closing], np.maximum(state.frames[closing] - 1, 0),
                   state.peaks[closing])

    def smooth_recordings(self, posteriors: Sequence[np.ndarray], smoothing_ms: float,
                          chunk_frames: int = 50, block_chunks: int = 8192) -> SmoothedRecordings:
        """The keyword scores of whole recordings (posteriors [frames, C] each) exactly as streaming
        each in chunks of chunk_frames would smooth them; worked `block_chunks` chunks at a time."""
        smoothing = self.frames(smoothing_ms)
        width = smoothing - 1
        lengths = np.array([len(p) for p in posteriors], np.int64)
        frames = np.concatenate([np.zeros((0, len(self.keywords)), np.float32),
                                 *(np.asarray(p, np.float32)[:, self.keywords] for p in posteriors)])
        chunks = -(-lengths // chunk_frames)
        recording = np.repeat(np.arange(len(lengths)), chunks)
        begin = (np.arange(len(recording)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * chunk_frames
        starts = np.cumsum(lengths) - lengths
        scores = []
        for block in range(0, len(recording), block_chunks):
            part, first = recording[block : block + block_chunks], begin[block : block + block_chunks]
            # Each chunk with the frames before it that its moving average reaches, zeros before a
            # recording's first frame.
            columns = first[:, None] + np.arange(-width, chunk_frames)
            real = (columns >= 0) & (columns < lengths[part][:, None])
            joined = np.where(real[..., None], frames[np.where(real, starts[part][:, None] + columns, 0)], 0)
            smoothed = _moving_average(joined, width, np.minimum(width, first), np.full(len(part), smoothing))
            scores.append(smoothed[np.arange(chunk_frames) < (lengths[part] - first)[:, None]])
        flat = np.concatenate(scores) if scores else np.zeros((0, len(self.keywords)))
        return SmoothedRecordings(flat, flat.max(axis=1, initial=-np.inf), lengths, smoothing)

    def detect_recordings(self, smoothed: SmoothedRecordings, config: DetectorConfig) -> Events:
        """The events of recordings (streams: recordings), each from its start to its end, at a
        setting of the smoothing the scores had."""
        if self.frames(config.smoothing_ms) != smoothed.smoothing:
            raise ValueError(f"scores smoothed over {smoothed.smoothing} frames, config asks {config.smoothing_ms} ms")
        state = self.start([config] * len(smoothed.lengths))
        state.frames = smoothed.lengths
        closed = _Closed()
        scale = self.scale(config)
        scores, best = smoothed.scores, smoothed.best
        if (scale != 1.0).any():
            scores, best = scores * scale, None
        self._advance(state, scores, smoothed.lengths, np.zeros_like(smoothed.lengths), closed, best)
        self._finish(state, closed)
        return closed.events(self, state)

    def _advance(self, state: DetectorState, scores: np.ndarray, lengths: np.ndarray, frame0: np.ndarray,
                 closed: _Closed, best: np.ndarray | None = None) -> None:
        """The event logic over each stream's new frames: scores [F, K] holds the smoothed keyword
        scores of stream after stream (lengths[i] frames each, starting at stream frame frame0[i]),
        best [F] their max when known. Updates state's event fields in place; the events closed go
        to `closed`."""
        if not len(self.keywords):
            return
        # The frames at or over their stream's threshold (indices in `scores`).
        best = scores.max(axis=1, initial=-np.inf) if best is None else best
        over = np.flatnonzero(best >= np.repeat(state.threshold, lengths))
        if not len(over) and not state.open.any():
            return  # the usual chunk: nothing open, nothing reaches the threshold
        starts = np.cumsum(lengths) - lengths  # where each stream's frames start in `scores`
        stops = starts + lengths
        offset = starts - frame0  # index in `scores` = stream frame + offset
        end = frame0 + lengths  # the first frame after each chunk
        marks = np.concatenate([[-1], over, [len(scores)]])  # between sentinels, for searching

        def next_over(index: np.ndarray, streams: np.ndarray) -> np.ndarray:
            """Which of `over` is the first at or after `index` in each stream's chunk (-1: none)."""
            found = np.searchsorted(marks, np.minimum(index, len(scores)))
            return np.where(marks[found] < stops[streams], found - 1, -1)

        def last_over(through: np.ndarray, streams: np.ndarray) -> np.ndarray:
            """The stream frame of the last frame over the threshold up to index `through` in each
            stream's chunk (-1: none)."""
            found = marks[np.searchsorted(marks, through, side="right") - 1]
            return np.where(found >= starts[streams], found - offset[streams], -1)

        # An event carried in open gathers peaks up to its decision time, and closes there if the
        # chunk gets that far.
        search = np.where(~state.open & (lengths > 0), frame0, -1)  # where a stream looks for its next event
        carried = np.flatnonzero(state.open & (lengths > 0))
        close = state.first[carried] + state.decision[carried]
        until = np.minimum(close, end[carried])
        gathering = carried[until > frame0[carried]]
        if len(gathering):
            through = until[until > frame0[carried]] + offset[gathering]
            state.peaks[gathering] = np.maximum(state.peaks[gathering],
                                                _range_max(scores, starts[gathering], through))
            state.last[gathering] = np.maximum(state.last[gathering], last_over(through - 1, gathering))
        closing = close < end[carried]
        if closing.any():
            self._close(state, closed, carried[closing], close[closing])
            search[carried[closing]] = close[closing]
        searching = np.flatnonzero(search >= 0)
        if not len(searching) or not len(over):
            return

        # Every frame over the threshold, as if an event opened there: where it would close, its
        # last frame over the threshold, and which frame over the threshold would open the next
        # one (-1: none in this chunk, or the event is still open at its end).
        owner = np.searchsorted(starts, over, side="right") - 1
        first = over - offset[owner]
        close = first + state.decision[owner]
        through = np.minimum(close, end[owner]) + offset[owner]  # just past its evidence
        last = last_over(through - 1, owner)
        closes = close < end[owner]
        refractory_until_ms = last * self.hop_ms + self.window_ms + state.refractory_ms[owner]
        resume = np.maximum(close, self._first_frame_from(refractory_until_ms))
        after = np.where(closes, next_over(resume + offset[owner], owner), -1)

        # The events that do open: from each stream's first, follow `after` (all streams a step at once).
        resume = np.maximum(search[searching], self._first_frame_from(state.refractory_until_ms[searching]))
        event = next_over(resume + offset[searching], searching)
        event = event[event >= 0]
        events, final = [], np.full(len(lengths), -1)
        while len(event):
            events.append(event)
            final[owner[event]] = event
            event = after[event]
            event = event[event >= 0]
        if not events:
            return
        done = np.concatenate(events)
        done = done[closes[done]]
        closed.add(owner[done], first[done], last[done], close[done], _range_max(scores, over[done], through[done]))
        ended = np.flatnonzero(final >= 0)
        state.refractory_until_ms[ended] = np.where(closes[final[ended]], refractory_until_ms[final[ended]],
                                                    state.refractory_until_ms[ended])
        still = final[ended][~closes[final[ended]]]  # each stream's event still open at the chunk's end
        state.open[owner[still]], state.first[owner[still]], state.last[owner[still]] = True, first[still], last[still]
        state.peaks[owner[still]] = _range_max(scores, over[still], through[still])

    def _close(self, state: DetectorState, closed: _Closed, streams: np.ndarray, at: np.ndarray) -> None:
        closed.add(streams, state.first[streams], state.last[streams], at, state.peaks[streams])
        state.open[streams] = False
        state.refractory_until_ms[streams] = (state.last[streams] * self.hop_ms + self.window_ms
                                              + state.refractory_ms[streams])

    def _first_frame_from(self, ms: np.ndarray) -> np.ndarray:
        """The first frame whose start (frame * hop_ms, as floats) is at or after `ms`."""
        frame = np.ceil(ms / self.hop_ms).astype(np.int64)
        while (early := (frame - 1) * self.hop_ms >= ms).any():
            frame -= early
        while (late := frame * self.hop_ms < ms).any():
            frame += late
        return frame


@dataclass
class SmoothedRecordings:
    """Smoothed keyword scores of recordings, one after another."""

    scores: np.ndarray  # [frames, K] float64
    best: np.ndarray  # [frames]: the highest keyword score
    lengths: np.ndarray  # [recordings] frames each
    smoothing: int  # frames averaged


@dataclass
class Events:
    """Closed events as arrays, stream after stream, each stream's in the order they closed."""

    streams: int
    stream: np.ndarray  # [E] int64
    label: np.ndarray  # [E] int64: index of the keyword in the labels
    start_ms: np.ndarray  # [E] float64, and so on: the fields of a Detection
    end_ms: np.ndarray
    confidence: np.ndarray
    reported_ms: np.ndarray

    def detections(self, labels: Sequence[str]) -> list[list[Detection]]:
        found: list[list[Detection]] = [[] for _ in range(self.streams)]
        columns = (self.label, self.start_ms, self.end_ms, self.confidence, self.reported_ms)
        for stream, label, *values in zip(self.stream.tolist(), *(c.tolist() for c in columns), strict=True):
            found[stream].append(Detection(labels[label], *values))
        return found


class _Closed:
    """The events closed in one call, as arrays, in the order they closed."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, streams, first, last, at, peaks) -> None:
        if len(streams):
            self.parts.append((streams, first, last, at, peaks))

    def events(self, detector: BatchDetector, state: DetectorState) -> Events:
        if not self.parts:
            empty = np.zeros(0)
            return Events(len(state), np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty, empty, empty)
        streams, first, last, at, peaks = (np.concatenate(column) for column in zip(*self.parts, strict=True))
        order = np.argsort(streams, kind="stable")  # each stream's events stay in the order they closed
        streams, first, last, at, peaks = streams[order], first[order], last[order], at[order], peaks[order]
        hop_ms, window_ms = detector.hop_ms, detector.window_ms
        # The keyword with the highest peak while the event was open (relative to its threshold)
        # names it; its confidence is its peak.
        named = peaks.argmax(axis=1)
        picked = np.arange(len(named))
        return Events(
            len(state), streams, label=detector.keywords[named],
            start_ms=np.maximum(0, first - state.smoothing[streams] + 1) * hop_ms,
            end_ms=last * hop_ms + window_ms, confidence=peaks[picked, named] / state.scale[streams, named],
            reported_ms=at * hop_ms + window_ms,
        )


def _range_max(scores: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per column, the max of scores[starts[i]:ends[i]] (non-empty ranges)."""
    width = int((ends - starts).max(initial=1))
    # Short ranges repeat their last frame, which leaves the max as it is.
    return scores[np.minimum(starts[:, None] + np.arange(width), ends[:, None] - 1)].max(axis=1)


def _moving_average(joined: np.ndarray, width: int, history_frames: np.ndarray, smoothing: np.ndarray) -> np.ndarray:
    """joined [N, width + T, C] float32: each row's carried frames right-aligned in its first
    `width` columns (history_frames[i] real ones, zeros before), then its chunk. Returns [N, T, C]
    float64: at each chunk frame the mean of the last smoothing[i] frames, or of all there are."""
    count, total, channels = joined.shape
    sums = np.zeros((count, total + 1, channels), np.float32)
    np.cumsum(joined, axis=1, out=sums[:, 1:])
    ends = width + np.arange(1, total - width + 1)
    averaged = np.minimum(smoothing[:, None], history_frames[:, None] + np.arange(1, total - width + 1))
    return (sums[:, width + 1 :] - sums[np.arange(count)[:, None], ends - averaged]) / averaged[..., None]
