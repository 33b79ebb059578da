"""The keyword detector as it was before it worked on arrays of streams: one stream, a Python loop
over frames. Kept only as the reference the array detector must equal exactly."""

from __future__ import annotations

import numpy as np

from serving.detector import Detection, DetectorConfig


class ReferenceDetector:
    def __init__(self, labels: list[str], hop_ms: float, window_ms: float, config: DetectorConfig):
        self.labels = labels
        self.keywords = np.array([i for i, label in enumerate(labels) if not label.startswith("_")])
        self.hop_ms, self.window_ms, self.config = hop_ms, window_ms, config
        self.smoothing = max(1, round(config.smoothing_ms / hop_ms))
        self.history = np.zeros((0, len(labels)), np.float32)
        self.frame = 0
        self.refractory_until_ms = -1.0
        self.open: tuple[int, int, np.ndarray] | None = None  # first frame, last frame, per-keyword peaks
        # Keyword thresholds: each keyword's scores times threshold / its own threshold.
        own = dict(config.keyword_thresholds)
        self.scale = np.array([config.threshold / own.get(labels[i], config.threshold) for i in self.keywords])

    def _close(self, at_frame: int) -> Detection:
        first, last, peaks = self.open
        self.open = None
        # Peaks are of the scaled scores; the confidence is the named keyword's own peak.
        named = int(peaks.argmax())
        label, peak = int(self.keywords[named]), float(peaks[named] / self.scale[named])
        end_ms = last * self.hop_ms + self.window_ms
        self.refractory_until_ms = end_ms + self.config.refractory_ms
        start_ms = max(0, first - self.smoothing + 1) * self.hop_ms
        return Detection(self.labels[label], start_ms, end_ms, peak, at_frame * self.hop_ms + self.window_ms)

    def update(self, posteriors: np.ndarray) -> tuple[list[Detection], np.ndarray]:
        joined = np.concatenate([self.history, posteriors.astype(np.float32)])
        sums = np.cumsum(np.concatenate([np.zeros((1, joined.shape[1]), np.float32), joined]), axis=0)
        ends = np.arange(len(self.history), len(joined)) + 1
        starts = np.maximum(ends - self.smoothing, 0)
        smoothed = (sums[ends] - sums[starts]) / (ends - starts)[:, None]
        self.history = joined[-(self.smoothing - 1):] if self.smoothing > 1 else joined[:0]
        events = []
        threshold = self.config.threshold
        decision_frames = max(1, round(self.config.decision_ms / self.hop_ms))
        if not len(self.keywords):
            self.frame += len(smoothed)
            return events, smoothed
        keyword_scores = smoothed[:, self.keywords]
        if (self.scale != 1.0).any():
            keyword_scores = keyword_scores * self.scale
        for offset in range(len(smoothed)):
            frame = self.frame + offset
            best = int(keyword_scores[offset].argmax())
            score = float(keyword_scores[offset, best])
            if self.open is not None:
                first, last, peaks = self.open
                if frame - first < decision_frames:
                    np.maximum(peaks, keyword_scores[offset], out=peaks)
                    self.open = (first, frame if score >= threshold else last, peaks)
                    continue
                events.append(self._close(frame))
            if score >= threshold and frame * self.hop_ms >= self.refractory_until_ms:
                self.open = (frame, frame, keyword_scores[offset].copy())
        self.frame += len(smoothed)
        return events, smoothed

    def finish(self) -> list[Detection]:
        return [self._close(max(self.frame - 1, 0))] if self.open is not None else []


def reference_detect(posteriors: np.ndarray, labels: list[str], hop_ms: float, window_ms: float,
                     config: DetectorConfig, chunk_frames: int = 50) -> list[Detection]:
    """training.stream_eval.detect as it was: one recording in chunks of chunk_frames."""
    detector = ReferenceDetector(labels, hop_ms, window_ms, config)
    events = []
    for start in range(0, len(posteriors), chunk_frames):
        events += detector.update(posteriors[start : start + chunk_frames])[0]
    return events + detector.finish()
