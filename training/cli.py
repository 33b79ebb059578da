"""`rnnserve train`, `rnnserve export` and `rnnserve diagnose` (also `python -m training`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields, replace
from pathlib import Path


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig
    from training.tasks import TASKS

    train = subparsers.add_parser(
        "train", help="train a bundled task's model, or a text classifier on your own data (--data)",
        description="Train a bundled task (sentiment, topic, keywords) on its data, or a model on your own "
        "data with --data PATH --name NAME: a text classifier from a CSV/TSV/JSONL file or an aclImdb "
        "folder, a keyword spotter from a Google Speech Commands folder.",
    )
    train.add_argument("task", nargs="?", choices=sorted(TASKS), help="bundled task (omit with --data)")
    train.add_argument("--data", type=Path,
                       help="your own data: .csv, .tsv, .jsonl, an aclImdb folder or a Speech Commands folder")
    train.add_argument("--name", help="model name for --data runs (default: the file or folder name)")
    train.add_argument("--text-column", default="text", help="text column/field of --data (default text)")
    train.add_argument("--label-column", default="label", help="label column/field of --data (default label)")
    train.add_argument("--labels", help="comma-separated label order for --data (default: sorted)")
    train.add_argument("--quick", action="store_true", help="a small, seconds-long run (smoke tests)")
    train.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default runs/)")
    train.add_argument("--cell", choices=["lstm", "gru"], help="recurrent cell (default: the task's)")
    train.add_argument("--hidden-size", type=int)
    train.add_argument("--embedding-dim", type=int)
    train.add_argument("--num-layers", type=int)
    train.add_argument("--pooling", choices=["last", "mean", "max", "max_mean", "frame_max"])
    train.add_argument("--bidirectional", action=argparse.BooleanOptionalAction,
                       help="bidirectional RNN (batch only; needs --pooling mean or max)")
    train.add_argument("--dropout", type=float)
    train.add_argument("--chunk-tokens", type=int,
                       help="read texts in independent chunks of this many tokens, pooled (batch only; 0: whole)")
    train.add_argument("--embedding-dropout", type=float, help="drop whole embedding rows (training only)")
    train.add_argument("--weight-dropout", type=float, help="DropConnect on hidden-to-hidden weights (training only)")
    for config_field in fields(TrainConfig):
        train.add_argument(f"--{config_field.name.replace('_', '-')}", type=type(config_field.default))
    train.add_argument("--clip-checkpoint", type=Path, metavar="PATH",
                       help="keywords: keep the clip stage's weights here and start from them when this file "
                       "holds the same data, model and settings (compare stream-training variants)")
    train.add_argument("--export-to", type=Path, metavar="MODELS_DIR",
                       help="export the run into this model repository when training ends")
    train.set_defaults(handler=_train)

    export = subparsers.add_parser("export", help="export a training run to a model repository version")
    export.add_argument("run", type=Path, nargs="?",
                        help="run folder (default: the newest under runs/<name>/)")
    export.add_argument("--name", default="sentiment", help="model name (default sentiment)")
    export.add_argument("--models", type=Path, default=Path("models"), help="model repository (default models/)")
    export.add_argument("--runs-dir", type=Path, default=Path("runs"))
    export.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    export.set_defaults(handler=_export)

    evaluate = subparsers.add_parser(
        "evaluate-stream", help="keyword spotting on continuous speech: recall and false alarms per hour",
        description="Stream continuous prose with no keyword (false alarms per hour) and recordings of keywords "
        "said as commands and inside running speech (recall), by espeak-ng voices never trained on and by the "
        "held-out Festival HTS voice, through the server's streaming code; choose the detector's operating point "
        "on validation voices (most recall at <= 2 false alarms/h), measure it on test voices and the held-out "
        "engine, and draw the DET curve (det.png beside the card).",
    )
    evaluate.add_argument("version_dir", type=Path, help="a keyword model version, e.g. models/keywords/2")
    evaluate.add_argument("--quick", action="store_true", help="the small recordings of --quick training (tests)")
    evaluate.add_argument("--write-card", action="store_true",
                          help="store the result in the card (the server takes its stream defaults from it)")
    evaluate.set_defaults(handler=_evaluate_stream)

    diagnose = subparsers.add_parser(
        "diagnose", help="gradient flow of a plain RNN vs LSTM vs GRU, and gradient clipping",
        description="Measure on a long-range recall task how gradients vanish in a plain RNN but flow "
        "through LSTM and GRU cells, what each learns in a fixed budget at several sequence lengths, "
        "and how clipping rescues a plain RNN whose gradients explode. Writes a table and PNG plots.",
    )
    diagnose.add_argument("--quick", action="store_true", help="short sequences and budgets (seconds)")
    diagnose.add_argument("--output", type=Path, default=Path("runs/diagnose"), help="output folder")
    diagnose.add_argument("--lengths", help="comma-separated sequence lengths (default 15,30,60)")
    diagnose.add_argument("--steps", type=int, help="training steps per cell and length (default 400)")
    diagnose.set_defaults(handler=_diagnose)


def _evaluate_stream(args: argparse.Namespace) -> int:
    from training.stream_eval import run

    result = run(args.version_dir, quick=args.quick, write_card=args.write_card)
    point = result["operating_points"][0]
    detector = point["detector"]
    print(f"operating point (validation voices, <= {point['false_alarm_budget_per_hour']:g} false alarms/h): "
          f"threshold {detector['threshold']}, smoothing {detector['smoothing_ms']:g} ms, "
          f"decision {detector['decision_ms']:g} ms"
          + "".join(f"; {keyword} {value:g}" for keyword, value in detector.get("keyword_thresholds", {}).items()))
    for split in ("validation", "test", "held_out_engine"):
        if split in point:
            measured = point[split]
            print(f"  {split}: recall {measured['recall']:.3f} over {measured['keywords']} keywords, "
                  f"{measured['false_alarms_per_hour']:.2f} false alarms/h over {measured['speech_hours']:.2f} h "
                  f"of continuous speech")
            print("    per keyword: " + ", ".join(f"{k} {v:.2f}" for k, v in measured["recall_per_keyword"].items()))
            delivery = measured.get("recall_by_delivery", {})
            if delivery:
                print("    said as: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in delivery.items()))
    if args.write_card:
        print(f"wrote {args.version_dir / 'model.json'} and {args.version_dir / 'det.png'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig, quick
    from training.tasks import TASKS
    from training.train import train_text_classifier

    if (args.task is None) == (args.data is None):
        print("error: name a bundled task or give --data PATH (one of the two)", file=sys.stderr)
        return 2
    spec = TASKS[args.task] if args.task else _custom_task(args)
    config = replace(quick(spec.train), **spec.quick_train) if args.quick else spec.train
    config = replace(config, **{
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None
    })
    if spec.modality == "audio" and config.seeds > 1:
        print("error: --seeds trains text models; a keyword spotter trains one seed", file=sys.stderr)
        return 2
    if args.clip_checkpoint is not None and not spec.continuous_speech:
        print("error: --clip-checkpoint is for the bundled keywords task (two-stage training)", file=sys.stderr)
        return 2
    model = dict(spec.model, **(spec.quick_model if args.quick else {}))
    for name in ("cell", "hidden_size", "embedding_dim", "num_layers", "pooling", "dropout", "bidirectional",
                 "chunk_tokens", "embedding_dropout", "weight_dropout"):
        if getattr(args, name) is not None:
            model[name] = getattr(args, name)
    if spec.modality == "audio":
        model.pop("embedding_dim", None)
    if model.get("pooling") != "frame_max":
        model.pop("frame_head", None)  # the detector's own head sits beside a frame_max clip head only
    from training.data.files import DataFormatError
    from training.data.speech import SynthesisError

    print(f"loading {spec.name} data ...", flush=True)
    try:
        dataset = spec.load(args.quick)
    except (DataFormatError, FileNotFoundError, UnicodeDecodeError, SynthesisError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainer, extra = train_text_classifier, {}
    if spec.modality == "audio":
        from training.keywords import train_keyword_spotter as trainer
    if spec.modality == "text":
        extra["limits"] = spec.limits
    if spec.continuous_speech:
        from training.data.streams import (
            QUICK_STREAM_DATA,
            TRAINING_SPLITS,
            StreamDataConfig,
            StreamDataError,
            build_banks,
        )
        from training.stream_training import QUICK_CONTINUOUS_TRAINING, ContinuousSpeechTraining
        from training.tasks import cache_dir

        print("synthesising continuous speech (cached after the first run) ...", flush=True)
        try:
            banks = build_banks(cache_dir() / "streams", QUICK_STREAM_DATA if args.quick else StreamDataConfig(),
                                workers=os.cpu_count() or 1, progress=sys.stderr.isatty(), splits=TRAINING_SPLITS)
        except (StreamDataError, SynthesisError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        settings = QUICK_CONTINUOUS_TRAINING if args.quick else ContinuousSpeechTraining()
        extra["continuous"] = (banks, replace(settings, seed=config.seed))
        extra["clip_checkpoint"] = args.clip_checkpoint
    run_dir = trainer(
        spec.name, spec.description, dataset, model, config, args.runs_dir,
        "rnnserve " + shlex.join(sys.argv[1:]), progress=sys.stderr.isatty(), **extra,
    )
    if run_dir is None:  # a torchrun worker other than rank 0: rank 0 reports and exports
        return 0
    _print_run(run_dir)
    if args.export_to:
        return _export_run(run_dir, spec.name, args.export_to, "dynamo")
    return 0


def _custom_task(args: argparse.Namespace):
    from training.data.files import load_aclimdb, load_table
    from training.tasks import CUSTOM, CUSTOM_AUDIO

    path: Path = args.data
    if path.is_dir() and (path / "testing_list.txt").is_file():
        from training.data.speech_commands import load_speech_commands

        return replace(CUSTOM_AUDIO, name=args.name or path.name,
                       description=f"keyword spotter trained on the Speech Commands folder {path.name}",
                       load=lambda quick: load_speech_commands(path))
    if path.is_dir():
        def load(quick):
            return load_aclimdb(path)
    else:
        labels = args.labels.split(",") if args.labels else None

        def load(quick):
            return load_table(path, args.text_column, args.label_column, labels)
    name = args.name or path.stem
    return replace(CUSTOM, name=name, description=f"text classifier trained on {path.name}", load=load)


def _diagnose(args: argparse.Namespace) -> int:
    from training.diagnose import QUICK, DiagnoseConfig, run_diagnosis

    config = QUICK if args.quick else DiagnoseConfig()
    if args.lengths:
        config = replace(config, sequence_lengths=tuple(int(n) for n in args.lengths.split(",")))
    if args.steps:
        config = replace(config, train_steps=args.steps)

    def progress(row: dict) -> None:
        print(f"  {row['cell']:>4} T={row['length']:<4} held-out accuracy {row['accuracy']:.3f}", flush=True)

    print(f"training 3 cells x {len(config.sequence_lengths)} lengths, {config.train_steps} steps each ...")
    run_diagnosis(config, args.output, progress)
    print((args.output / "diagnose.md").read_text())
    print(f"plots and diagnose.json in {args.output}/")
    return 0


def _print_run(run_dir: Path) -> None:
    import json

    run = json.loads((run_dir / "run.json").read_text())
    metrics, baseline = run["metrics"], run["baseline"]
    print(f"run: {run_dir}")
    print(f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"(baseline {baseline['accuracy']:.4f} / {baseline['macro_f1']:.4f}) "
          f"in {run['training_seconds']:.0f} s")
    if "seeds" in run:
        seeds = run["seeds"]
        print(f"{len(seeds['seeds'])} seeds: test accuracy {seeds['test_accuracy_mean']:.4f} +- "
              f"{seeds['test_accuracy_std']:.4f}, macro-F1 {seeds['test_macro_f1_mean']:.4f} +- "
              f"{seeds['test_macro_f1_std']:.4f}; chose seed {seeds['chosen_seed']} on validation "
              f"({seeds['training_seconds_total']:.0f} s in all)")
    for name, extra in run.get("evaluations", {}).items():
        print(f"{name}: accuracy {extra['accuracy']:.4f}, macro-F1 {extra['macro_f1']:.4f}")


def _export(args: argparse.Namespace) -> int:
    run_dir = args.run
    if run_dir is None:
        candidates = sorted((args.runs_dir / args.name).glob("*/run.json"))
        if not candidates:
            print(f"error: no training run under {args.runs_dir / args.name}; "
                  f"run `rnnserve train {args.name}` first", file=sys.stderr)
            return 2
        run_dir = candidates[-1].parent
    return _export_run(run_dir, args.name, args.models, args.exporter)


def _export_run(run_dir: Path, name: str, models_dir: Path, exporter: str) -> int:
    from training.export import ExportError, export_run

    try:
        version_dir = export_run(run_dir, models_dir, name=name, exporter=exporter)
    except ExportError as error:
        print(f"error: export failed: {error}", file=sys.stderr)
        return 1
    print(f"exported {run_dir} -> {version_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from serving.cli import configure_logging

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    configure_logging("INFO", "%(message)s")
    return args.handler(args)
