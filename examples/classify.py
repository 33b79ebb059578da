"""Classify texts with a running rnnserve server through the typed API.

    python examples/classify.py "what a wonderful flight" "the bags never arrived"
    python examples/classify.py --server 127.0.0.1:50051 --model sentiment "..."
"""

from __future__ import annotations

import argparse
import sys

import grpc

from serving.grpc.client import DEFAULT_TARGET, RnnServeClient


def main() -> int:
    parser = argparse.ArgumentParser(description="Classify texts with a running rnnserve server.")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    parser.add_argument("--model", default="sentiment", help="model name (default sentiment)")
    args = parser.parse_args()
    with RnnServeClient(args.server) as client:
        try:
            labels = list(client.get_model(args.model).labels)
            results = client.classify(args.model, args.texts)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    for text, result in zip(args.texts, results, strict=True):
        probabilities = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, result.probabilities, strict=True))
        print(f"{result.label:<9} {result.score:.3f}  [{probabilities}]  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
