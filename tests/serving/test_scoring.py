"""`rnnserve score` on real files made here: every input and output format, in-process,
against a real server on port 0 and on a local Ray, bad rows, atomic output, exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from serving.dataplane import DataPlane
from serving.grpc.server import BackgroundServer
from serving.repository import load_repository
from serving.scoring.cli import score
from serving.scoring.run import ScoreOptions
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TEXTS = [
    "what a wonderful flight",
    "my bags were lost again, thanks a lot",
    'the app says "delayed", then "cancelled"',
    "ok",
    "ça va, the crew était très sympa 😊",
]


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    """What the data plane itself says for TEXTS: the ceiling every mode must reproduce."""
    plane = DataPlane(load_repository(MODELS), batching=None)
    _, predictions = plane.classify_texts("sentiment", "", TEXTS)
    plane.close()
    return np.stack([p.probabilities for p in predictions])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    files = {"txt": folder / "texts.txt", "csv": folder / "texts.csv", "tsv": folder / "texts.tsv",
             "jsonl": folder / "texts.jsonl", "parquet": folder / "texts.parquet"}
    files["txt"].write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for kind in ("csv", "tsv"):
        with open(files[kind], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="," if kind == "csv" else "\t")
            writer.writerow(["review_id", "body", "stars"])
            for index, text in enumerate(TEXTS):
                writer.writerow([f"r{index}", text, index])
    lines = [json.dumps({"review_id": f"r{i}", "body": t}, ensure_ascii=False) for i, t in enumerate(TEXTS)]
    files["jsonl"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"review_id": [f"r{i}" for i in range(len(TEXTS))], "body": TEXTS}), files["parquet"])
    return files


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _probabilities(records: list[dict]) -> np.ndarray:
    return np.array([[r["probabilities"][label] for label in ("negative", "neutral", "positive")] for r in records])


def _options(tmp_path: Path, input_path: Path, output: str = "out.jsonl", **more) -> ScoreOptions:
    return ScoreOptions(model="sentiment", input=str(input_path), output=str(tmp_path / output), models=MODELS,
                        progress=False, **more)


@pytest.mark.parametrize("kind", ["txt", "csv", "tsv", "jsonl", "parquet"])
def test_every_input_format_gives_the_data_plane_answers(tmp_path, inputs, expected, kind):
    columns = {} if kind == "txt" else {"text_column": "body", "id_column": "review_id"}
    assert score(_options(tmp_path, inputs[kind], probabilities=True, **columns)) == 0
    records = _read_jsonl(tmp_path / "out.jsonl")
    ids = [str(i) for i in range(1, len(TEXTS) + 1)] if kind == "txt" else [f"r{i}" for i in range(len(TEXTS))]
    assert [r["id"] for r in records] == ids
    np.testing.assert_allclose(_probabilities(records), expected, atol=1e-5)
    assert [r["label"] for r in records] == [("negative", "neutral", "positive")[i] for i in expected.argmax(1)]


def test_every_output_format_holds_the_same_rows(tmp_path, inputs, expected):
    for output in ("out.jsonl", "out.csv", "out.parquet"):
        assert score(_options(tmp_path, inputs["csv"], output, text_column="body", id_column="review_id",
                              probabilities=True, batch_size=2)) == 0
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert [r["id"] for r in rows] == table["id"] == [f"r{i}" for i in range(len(TEXTS))]
    from_csv = np.array([[float(r[f"p_{label}"]) for label in ("negative", "neutral", "positive")] for r in rows])
    from_parquet = np.array([table[f"p_{label}"] for label in ("negative", "neutral", "positive")]).T
    np.testing.assert_allclose(from_csv, expected, atol=1e-5)
    np.testing.assert_allclose(from_parquet, expected, atol=1e-5)
    assert [r["label"] for r in rows] == table["label"]
    # Without --probabilities: id, label, score only.
    assert score(_options(tmp_path, inputs["txt"], "plain.csv")) == 0
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == "id,label,score"


def test_local_server_and_ray_runs_agree(tmp_path, inputs):
    with BackgroundServer(ServerSettings(models=MODELS, port=0)) as server:
        assert score(_options(tmp_path, inputs["csv"], "remote.jsonl", text_column="body", id_column="review_id",
                              probabilities=True, server=server.target, batch_size=2)) == 0
    assert score(_options(tmp_path, inputs["csv"], "local.jsonl", text_column="body", id_column="review_id",
                          probabilities=True)) == 0
    assert score(_options(tmp_path, inputs["csv"], "ray.jsonl", text_column="body", id_column="review_id",
                          probabilities=True, engine="ray", batch_size=2)) == 0
    local, remote, on_ray = (_read_jsonl(tmp_path / f"{n}.jsonl") for n in ("local", "remote", "ray"))
    assert [r["id"] for r in local] == [r["id"] for r in remote] == [r["id"] for r in on_ray]
    np.testing.assert_allclose(_probabilities(remote), _probabilities(local), atol=1e-5)
    np.testing.assert_allclose(_probabilities(on_ray), _probabilities(local), atol=1e-5)


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    from training.data.speech import Speaker, synthesize

    folder = tmp_path_factory.mktemp("audio")
    (folder / "more").mkdir()
    speaker = Speaker("en-US", "m2")
    for word, rate, name in (("yes", 16000, "yes.wav"), ("stop", 22050, "more/stop.flac"), ("left", 44100, "left.wav")):
        import soxr

        speech = soxr.resample(synthesize(word, speaker), 16000, rate) if rate != 16000 else synthesize(word, speaker)
        soundfile.write(folder / name, speech, rate)
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_audio_folder_and_glob(tmp_path, audio_folder):
    options = _options(tmp_path, audio_folder, "audio.csv")
    options.model = "keywords"
    assert score(options) == 0
    with open(tmp_path / "audio.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["left.wav", "more/stop.flac", "yes.wav"]
    assert [r["label"] for r in rows] == ["left", "stop", "yes"]
    options = _options(tmp_path, Path(f"{audio_folder}/*.wav"), "glob.jsonl")
    options.model = "keywords"
    assert score(options) == 0
    assert [Path(r["id"]).name for r in _read_jsonl(tmp_path / "glob.jsonl")] == ["left.wav", "yes.wav"]


def test_a_bad_row_stops_the_run_naming_it_and_leaves_no_output(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a fine day\nbroken \xff\xfe bytes\nanother fine day\n")
    assert score(_options(tmp_path, bad)) == 1
    assert f"{bad}:2: not valid UTF-8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]  # no output, no temporary file left

    empty = tmp_path / "empty.txt"
    empty.write_text("one\n\nthree\n")
    assert score(_options(tmp_path, empty, "out.csv")) == 1
    assert f"{empty}:2: empty text" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_a_missing_column_is_a_usage_error(tmp_path, inputs, capsys):
    assert score(_options(tmp_path, inputs["csv"], text_column="review")) == 2
    assert "no column 'review' (--text-column)" in capsys.readouterr().err
    assert score(_options(tmp_path, inputs["parquet"], text_column="review")) == 2
    assert not (tmp_path / "out.jsonl").exists()


def test_a_truncated_wav_stops_the_run(tmp_path, audio_folder, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    data = (audio_folder / "yes.wav").read_bytes()
    (folder / "a.wav").write_bytes(data)
    (folder / "b.wav").write_bytes(data[:30])  # a header cut short
    options = _options(tmp_path, folder, "out.jsonl")
    options.model = "keywords"
    assert score(options) == 1
    message = capsys.readouterr().err
    assert "b.wav: not a readable WAV/FLAC/OGG file (Error in WAV file" in message and " object at " not in message
    assert not (tmp_path / "out.jsonl").exists()


def test_skip_writes_the_rejects_with_reasons(tmp_path):
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b'{"text": "lovely crew"}\n{"text": ""}\nnot json\n{"other": 1}\n{"text": 5}\n'
                       b'{"text": "' + b"x" * 5000 + b'"}\n{"text": "late again"}\n')
    assert score(_options(tmp_path, source, "out.jsonl", on_error="skip", batch_size=3)) == 0
    assert [r["id"] for r in _read_jsonl(tmp_path / "out.jsonl")] == ["1", "7"]
    rejects = _read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["row"], r["where"]) for r in rejects] == [(n, f"{source}:{n}") for n in (2, 3, 4, 5, 6)]
    reasons = [r["error"] for r in rejects]
    assert reasons[0] == "empty text" and reasons[1].startswith("not valid JSON")
    assert reasons[2] == "field 'text' is missing" and reasons[3] == "field 'text' is a int, not a string"
    assert reasons[4] == "5000 characters, limit 4096"


def test_the_cli_reads_stdin_writes_stdout_and_stays_quiet_when_piped(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "serving", "score", "--model", "sentiment", "--input", "-", "--output", "-",
         "--models", str(MODELS)], input="\n".join(TEXTS[:3]) + "\n", capture_output=True, text=True, cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["1", "2", "3"]
    assert "rows/s" not in result.stderr and "scored 3 rows -> stdout" in result.stderr


def test_an_unreachable_server_is_exit_3_and_an_unknown_model_exit_2(tmp_path, inputs, capsys):
    assert score(_options(tmp_path, inputs["txt"], server="127.0.0.1:1", retries=1)) == 3
    assert "UNAVAILABLE" in capsys.readouterr().err
    options = _options(tmp_path, inputs["txt"])
    options.model = "nope"
    assert score(options) == 2
    assert "model 'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_parquet_of_a_million_rows_is_read_in_slices(tmp_path):
    """The reader holds one record batch at a time (memory itself is measured in benchmarks/)."""
    from serving.scoring.readers import read_rows

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["fine"] * 1_000_000}), path, row_group_size=100_000)
    rows = read_rows(str(path), "parquet")
    first = next(rows)
    assert first.number == 1 and first.text == "fine"
    assert sum(1 for _ in rows) == 999_999


def test_csv_with_quoted_newlines_and_a_short_row(tmp_path):
    source = tmp_path / "odd.csv"
    source.write_text('id,text\n1,"first line\nsecond line"\n2\n3,"fine, really"\n')
    assert score(_options(tmp_path, source, "out.jsonl", id_column="id", on_error="skip")) == 0
    assert [r["id"] for r in _read_jsonl(tmp_path / "out.jsonl")] == ["1", "3"]
    (reject,) = _read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert reject["row"] == 2 and "missing column" in reject["error"] and reject["where"] == f"{source}:4"

