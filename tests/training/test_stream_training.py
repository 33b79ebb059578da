"""Stream training of the keyword spotter: the max-pooling loss's targets, truncated
backpropagation that carries state the way a whole pass does, hard-negative mining, and the
clip stage kept for later runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.speech import KEYWORDS, LABELS, SILENCE, UNKNOWN
from training.data.streams import (
    MAX_POOL_AFTER_END_S,
    MAX_POOL_BEFORE_END_S,
    TARGET_AFTER_END_S,
    Bank,
    Recording,
    frame_targets,
    keyword_windows,
    sentence_keyword_frames,
)
from training.keywords import _clip_stage
from training.models.classifier import ClassifierConfig, RNNClassifier
from training.stream_training import (
    IGNORED,
    STREAM_LOSSES,
    ContinuousSpeechTraining,
    WeightAverage,
    frame_logits,
    free_keyword_frames,
    max_pool_targets,
    pick_maxima,
    weighted_cross_entropy,
)

HOP, WINDOW = 320, 480


def _frame_ends(frames: int) -> np.ndarray:
    return (np.arange(frames) * HOP + WINDOW) / 16000


def test_max_pool_windows_and_targets_lie_where_the_recording_put_its_keywords():
    # "stop" said from 1.0 to 1.5 s, "go" from 3.0 to 3.1 s (shorter than the window before its end).
    recording = Recording(np.zeros(6 * 16000, np.float32), [("stop", 1.0, 1.5), ("go", 3.0, 3.1)],
                          [(1.0, 1.5), (2.0, 3.6)])
    frames = (len(recording.samples) - WINDOW) // HOP + 1
    ends = _frame_ends(frames)
    windows = keyword_windows(recording, frames, HOP, WINDOW, LABELS)
    assert [label for label, _, _ in windows] == [LABELS.index("stop"), LABELS.index("go")]
    # Frames ending from 0.25 s before the end to 0.2 s after it, and never before the start.
    assert (MAX_POOL_BEFORE_END_S, MAX_POOL_AFTER_END_S) == (0.25, 0.2)
    for (_, first, last), (low, high) in zip(windows, [(1.25, 1.7), (3.0, 3.3)], strict=True):
        inside = np.flatnonzero((ends >= low - 1e-9) & (ends <= high + 1e-9))
        assert (first, last) == (inside[0], inside[-1])

    targets, same_windows = max_pool_targets(recording, frames, HOP, WINDOW, LABELS)
    assert same_windows == windows
    free = np.zeros(frames, bool)
    for (_, first, last), (_, _, end) in zip(windows, recording.keywords, strict=True):
        free[first : last + 1] = True
        free[(ends >= end) & (ends <= end + TARGET_AFTER_END_S)] = True
    assert np.all(targets[free] == IGNORED)
    # No frame is a keyword before pick_maxima chooses one; the rest is speech or silence.
    starts = np.arange(frames) * HOP / 16000
    speech = ((ends > 1.0) & (starts < 1.5)) | ((ends > 2.0) & (starts < 3.6))
    assert np.all(targets[~free & speech] == LABELS.index(UNKNOWN))
    assert np.all(targets[~free & ~speech] == LABELS.index(SILENCE))


def test_pick_maxima_gives_each_window_its_most_likely_frame_in_the_chunk():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2, 50, len(LABELS))).astype(np.float32))
    targets = torch.full((2, 50), IGNORED, dtype=torch.int64)
    stop, go = LABELS.index("stop"), LABELS.index("go")
    # Lane 0: a window inside the chunk (frames 110..120 of the stream; the chunk starts at 100)
    # and one that ended before it. Lane 1: a window cut by the chunk's end (frames 140..160).
    windows = [[(stop, 110, 120), (go, 10, 20)], [(go, 140, 160)]]
    picked = pick_maxima(logits, targets, windows, offset=100)
    log_probabilities = torch.log_softmax(logits, -1)
    assert torch.equal(torch.nonzero(picked[0] != IGNORED).flatten(),
                       torch.tensor([10 + int(log_probabilities[0, 10:21, stop].argmax())]))
    assert torch.equal(torch.nonzero(picked[1] != IGNORED).flatten(),
                       torch.tensor([40 + int(log_probabilities[1, 40:50, go].argmax())]))
    assert int(picked[0][picked[0] != IGNORED]) == stop and int(picked[1][picked[1] != IGNORED]) == go
    assert torch.all(targets == IGNORED)  # the chunk's targets are left as they were


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_chunks_with_carried_state_equal_one_pass_over_the_whole_sequence(cell):
    torch.manual_seed(0)
    model = RNNClassifier(ClassifierConfig(num_classes=len(LABELS), feature_dim=40, cell=cell, hidden_size=16,
                                           num_layers=2, pooling="frame_max")).eval()
    features = torch.randn(3, 230, 40)
    with torch.no_grad():
        whole, whole_state = frame_logits(model, features, None)
        state, pieces = None, []
        for start in range(0, 230, 60):  # the training loop's chunks; the last one shorter
            logits, state = frame_logits(model, features[:, start : start + 60], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=0)
    for carried, once in zip(state if cell == "lstm" else (state,), whole_state if cell == "lstm" else (whole_state,),
                             strict=True):
        torch.testing.assert_close(carried, once, atol=1e-5, rtol=0)


def _tone_bank() -> Bank:
    parts, frequency = [], 300
    for split_voice in ("a", "b"):
        for kind, label, seconds in [("keyword", k, 0.4) for k in KEYWORDS] + [("prose", UNKNOWN, 3.0)] * 6:
            t = np.arange(int(seconds * 16000)) / 16000
            parts.append((kind, label, split_voice, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)))
            frequency += 41
    return Bank.join(parts)


def _trainer(fires_on: str):
    """A StreamTrainer whose model answers `fires_on` on every frame (its head's bias)."""
    from serving.audio import LogMel
    from training.augment import AugmentConfig, Augmenter
    from training.keywords import KEYWORD_FRONTEND
    from training.stream_training import QUICK_CONTINUOUS_TRAINING, StreamTrainer

    torch.manual_seed(0)
    model = RNNClassifier(ClassifierConfig(num_classes=len(LABELS), feature_dim=40, hidden_size=8, num_layers=1,
                                           pooling="frame_max"))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[LABELS.index(fires_on)] = 10.0
    frontend = LogMel(KEYWORD_FRONTEND)
    bank = _tone_bank()
    clips = np.zeros((4, 16000), np.int16)
    return StreamTrainer(model, {"train": bank, "mining": bank, "validation": bank}, clips, np.zeros(4, np.int64),
                         LABELS, frontend, Augmenter(AugmentConfig(), frontend), QUICK_CONTINUOUS_TRAINING)


def test_mining_adds_the_stretches_the_model_fired_on_and_nothing_when_it_is_quiet():
    quiet = _trainer(UNKNOWN)
    assert quiet.mine() == 0 and quiet.hard_negatives == []
    firing = _trainer("stop")
    added = firing.mine()
    assert added > 0 and len(firing.hard_negatives) == added
    settings = firing.settings
    longest = int((settings.mining_seconds_before + 0.3) * 16000)
    assert all(0 < len(stretch) <= longest for stretch in firing.hard_negatives)


def test_the_clip_stage_is_kept_and_read_back_only_for_the_same_settings(tmp_path):
    path = tmp_path / "clip.pt"
    model = torch.nn.Linear(3, 2)
    calls = []

    def train():
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(float(len(calls)))
        return [{"epoch": len(calls)}]

    assert _clip_stage(path, train, model, {"data": "a"}) == [{"epoch": 1}] and path.is_file()
    after_training = torch.rand(1)  # the random state the whole run goes on with
    model.weight.data.zero_()
    torch.manual_seed(123)
    assert _clip_stage(path, train, model, {"data": "a"}) == [{"epoch": 1}] and len(calls) == 1
    assert torch.all(model.weight == 1.0)
    assert torch.equal(torch.rand(1), after_training)
    # Other data or settings: trained again, and the file replaced.
    assert _clip_stage(path, train, model, {"data": "b"}) == [{"epoch": 2}] and len(calls) == 2
    assert torch.all(model.weight == 2.0)
    assert _clip_stage(None, train, model, {"data": "b"}) == [{"epoch": 3}]


@pytest.mark.parametrize(("loss", "sentence_weight"), [("max_pool", None), ("cross_entropy", None),
                                                       ("cross_entropy", 12.0)])
def test_a_round_of_stream_training_learns_with_either_loss(loss, sentence_weight):
    from dataclasses import replace

    trainer = _trainer(UNKNOWN)
    trainer.settings = replace(trainer.settings, loss=loss, rounds=1, batches_per_round=2,
                               sentence_keyword_weight=sentence_weight)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    history = trainer.train()
    assert history[-1] == {"chosen_round": 1}
    (row,) = history[:-1]
    assert np.isfinite(row["stream_loss"]) and row["stream_loss"] > 0 and row["keywords"] > 0
    assert 0.0 <= row["validation"]["recall"] <= row["validation"]["recall_at_20_per_hour"] <= 1.0
    changed = [name for name, value in trainer.model.state_dict().items() if not torch.equal(value, before[name])]
    assert "rnn.weight_hh_l0" in changed and "head.bias" in changed


def test_the_weight_average_follows_the_weights_and_gives_them_back():
    model = torch.nn.BatchNorm1d(2)  # float parameters and an integer buffer (num_batches_tracked)
    with torch.no_grad():
        model.weight.fill_(0.0)
    averaged = WeightAverage(model, 0.75, warm_up=0)
    with torch.no_grad():
        model.weight.fill_(4.0)
        model.num_batches_tracked.fill_(7)
    averaged.update(model)
    averaged.update(model)
    torch.testing.assert_close(averaged.values["weight"], torch.full((2,), 1.75))  # 0 -> 1 -> 1.75
    with averaged.swapped_into(model):
        assert torch.all(model.weight == 1.75) and int(model.num_batches_tracked) == 7
    assert torch.all(model.weight == 4.0)

    # With a warm-up of 4 the decays are min(0.75, 2/5, 3/6, 4/7, 5/8, 6/9, 7/10, 8/11): 0.4, 0.5, ...
    warmed = WeightAverage(model, 0.75, warm_up=4)
    with torch.no_grad():
        for target in (8.0, 0.0):
            model.weight.fill_(target)
            warmed.update(model)
    expected = 4.0
    for decay, target in ((0.4, 8.0), (0.5, 0.0)):
        expected = decay * expected + (1 - decay) * target
    torch.testing.assert_close(warmed.values["weight"], torch.full((2,), expected))  # 4 -> 6.4 -> 3.2
    for _ in range(20):
        warmed.update(model)
    assert warmed.updates == 22
    # 4/7, 5/8, 6/9, 7/10, 8/11, then capped at 0.75 from the 8th update (9/12) on.
    decays = [min(0.75, (1 + n) / (4 + n)) for n in range(3, 23)]
    assert decays[5:] == [0.75] * 15
    torch.testing.assert_close(warmed.values["weight"], torch.full((2,), 3.2 * float(np.prod(decays))))


def test_with_a_weight_average_the_round_kept_holds_the_averaged_weights():
    from dataclasses import replace

    trainer = _trainer(UNKNOWN)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    # Averaged so slowly that the average stays at the starting weights while the live ones move.
    trainer.settings = replace(trainer.settings, rounds=1, batches_per_round=2, weight_average=1 - 1e-9,
                               weight_average_warm_up=0)
    history = trainer.train()
    assert history[-1] == {"chosen_round": 1}
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="weight_average must be in"):
        ContinuousSpeechTraining(weight_average=1.0)
    with pytest.raises(ValueError, match="speed_perturbation must be in"):
        ContinuousSpeechTraining(speed_perturbation=1.5)


def test_an_unknown_stream_loss_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="loss must be one of") as raised:
        ContinuousSpeechTraining(loss="maxpool")
    assert all(name in str(raised.value) for name in STREAM_LOSSES)


def test_sentence_keyword_frames_are_the_target_frames_of_keywords_said_in_a_sentence():
    # A command, then a keyword inside a sentence whose frames the next command takes over in part.
    keywords = [("stop", 1.0, 1.4), ("on", 2.5, 2.7), ("go", 2.8, 2.7 + TARGET_AFTER_END_S / 1.5)]
    recording = Recording(np.zeros(5 * 16000, np.float32), keywords, [(1.0, 1.4), (2.0, 3.3)], [False, True, False])
    frames = (len(recording.samples) - WINDOW) // HOP + 1
    ends = _frame_ends(frames)
    targets = frame_targets(recording, frames, HOP, WINDOW, LABELS)
    marked = sentence_keyword_frames(recording, frames, HOP, WINDOW)
    on = (ends >= 2.7) & (ends <= 2.7 + TARGET_AFTER_END_S)
    np.testing.assert_array_equal(marked, on & (targets == LABELS.index("on")))
    assert marked.any() and (on & ~marked).any()  # the frames "go" took over are not marked
    assert not sentence_keyword_frames(Recording(recording.samples, keywords, recording.speech), frames, HOP,
                                       WINDOW).any()  # no delivery recorded: all commands


def test_free_keyword_frames_leave_the_end_of_each_keyword_free_and_nothing_else():
    # "stop" from 1.0 to 1.5 s; "go" from 3.0 to 3.1 s, shorter than the freed stretch.
    recording = Recording(np.zeros(5 * 16000, np.float32), [("stop", 1.0, 1.5), ("go", 3.0, 3.1)],
                          [(0.9, 1.5), (2.5, 3.6)])
    frames = (len(recording.samples) - WINDOW) // HOP + 1
    ends = _frame_ends(frames)
    targets = frame_targets(recording, frames, HOP, WINDOW, LABELS)
    np.testing.assert_array_equal(free_keyword_frames(targets, recording, HOP, WINDOW, LABELS, 0.0), targets)
    freed = free_keyword_frames(targets, recording, HOP, WINDOW, LABELS, 0.2)
    expected = ((ends > 1.3) & (ends < 1.5)) | ((ends > 3.0) & (ends < 3.1))
    np.testing.assert_array_equal(freed == IGNORED, expected)
    assert expected.sum() == 15  # frames ending 1.31 .. 1.49 s and 3.01 .. 3.09 s
    # Everything else keeps its target: the keywords' own frames after their ends among them.
    np.testing.assert_array_equal(freed[~expected], targets[~expected])
    assert (targets[expected] == LABELS.index(UNKNOWN)).all()
    assert (freed == LABELS.index("stop")).sum() == (targets == LABELS.index("stop")).sum() > 0


def test_weighted_cross_entropy_is_class_weighted_cross_entropy_and_weights_each_frame():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, len(LABELS), generator=generator)
    targets = torch.randint(0, len(LABELS), (2, 9), generator=generator)
    targets[0, 3] = IGNORED
    class_weights = torch.ones(len(LABELS))
    class_weights[: len(KEYWORDS)] = 4.0
    weights = class_weights[torch.where(targets == IGNORED, 0, targets)]
    weights[targets == IGNORED] = 0.0
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, len(LABELS)), targets.reshape(-1),
                                                 weight=class_weights, ignore_index=IGNORED)
    torch.testing.assert_close(weighted_cross_entropy(logits, targets, weights, class_weights), expected)
    # A frame the max-pooling loss picked after the weights were made takes its class weight.
    picked = targets.clone()
    picked[0, 3] = 0
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, len(LABELS)), picked.reshape(-1),
                                                 weight=class_weights)
    torch.testing.assert_close(weighted_cross_entropy(logits, picked, weights, class_weights), expected)
    # One frame weighted up: the loss moves toward that frame's loss.
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, len(LABELS)), picked.reshape(-1), reduction="none")
    heavier = weights.clone()
    heavier[1, 5] = 100.0
    manual = (losses * torch.where(heavier.reshape(-1) > 0, heavier.reshape(-1),
                                   class_weights[picked.reshape(-1)])).sum()
    manual = manual / torch.where(heavier.reshape(-1) > 0, heavier.reshape(-1), class_weights[picked.reshape(-1)]).sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, picked, heavier, class_weights), manual)


def test_batches_made_on_the_background_thread_are_those_one_thread_makes_in_order():
    ahead, inline = _trainer(UNKNOWN), _trainer(UNKNOWN)
    made = list(ahead._prepared(3))
    assert len(made) == 3
    for batch, expected in zip(made, (inline._batch() for _ in range(3)), strict=True):
        features, targets, windows, weights, resets, clips = batch
        torch.testing.assert_close(features, expected[0], rtol=0, atol=0)
        assert torch.equal(targets, expected[1]) and torch.equal(weights, expected[3])
        assert torch.equal(resets, expected[4]) and windows == expected[2]
        assert len(clips) == len(expected[5]) == -(-features.shape[1] // ahead.settings.chunk_frames)
        for (clip_features, clip_labels), (want_features, want_labels) in zip(clips, expected[5], strict=True):
            assert torch.equal(clip_features, want_features) and torch.equal(clip_labels, want_labels)
    # Both drew the same numbers from their generators, in the same order.
    assert ahead.rng.random() == inline.rng.random()


def test_an_error_while_making_batches_reaches_the_training_thread_and_the_thread_stops():
    import threading

    trainer = _trainer(UNKNOWN)
    made = 0

    def failing():
        nonlocal made
        made += 1
        if made == 2:
            raise RuntimeError("no more audio")
        return ("batch", made)

    trainer._batch = failing
    batches = trainer._prepared(5)
    assert next(batches) == ("batch", 1)
    with pytest.raises(RuntimeError, match="no more audio"):
        next(batches)
    assert not any(thread.name == "stream-batches" for thread in threading.enumerate())
    # A consumer that stops early does not leave the thread behind either.
    trainer._batch = lambda: ("batch", 0)
    early = trainer._prepared(50)
    next(early)
    early.close()
    assert not any(thread.name == "stream-batches" for thread in threading.enumerate())
