"""Run the exported files with plain onnxruntime: no rnnserve, no server.

    python examples/onnx_direct.py "what a wonderful flight"            # batch graph
    python examples/onnx_direct.py --stream "what a wonderful flight"   # step graph, token by token

Needs only onnxruntime, tokenizers and numpy, and a version folder from the repository.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--version-dir", type=Path, default=Path("models/sentiment/1"))
    parser.add_argument("--stream", action="store_true", help="feed step.onnx one token at a time")
    args = parser.parse_args()

    card = json.loads((args.version_dir / "model.json").read_text())
    labels, max_tokens = card["labels"], card["preprocessing"]["max_tokens"]
    tokenizer = Tokenizer.from_file(str(args.version_dir / card["preprocessing"]["tokenizer_file"]))
    token_ids = [encoding.ids[:max_tokens] for encoding in tokenizer.encode_batch(args.texts)]

    if not args.stream:
        # model.onnx: input_ids int64 [B, T] padded with pad_id, lengths int64 [B] -> logits [B, C].
        session = onnxruntime.InferenceSession(str(args.version_dir / "model.onnx"))
        width = max(len(ids) for ids in token_ids)
        input_ids = np.full((len(token_ids), width), card["preprocessing"]["pad_id"], np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
        lengths = np.array([len(ids) for ids in token_ids], np.int64)
        (logits,) = session.run(["logits"], {"input_ids": input_ids, "lengths": lengths})
        for text, row in zip(args.texts, logits, strict=True):
            print(f"{labels[int(row.argmax())]:<10} {text}")
        return

    # step.onnx: one chunk plus the state tensors the card declares; feed the *_out tensors back.
    streaming = card["streaming"]
    session = onnxruntime.InferenceSession(str(args.version_dir / streaming["graph"]))
    for text, ids in zip(args.texts, token_ids, strict=True):
        state = {s["name"]: np.full((1, *s["shape"]), s["initial"], np.float32) for s in streaming["state"]}
        words = []
        for token_id, token in zip(ids, tokenizer.encode(text).tokens[:max_tokens], strict=True):
            outputs = session.run(None, {"input_ids": np.array([[token_id]]), "lengths": np.array([1]), **state})
            named = dict(zip([o.name for o in session.get_outputs()], outputs, strict=True))
            state = {s["name"]: named[s["output"]] for s in streaming["state"]}
            probabilities = np.exp(named["logits"][0] - named["logits"][0].max())
            probabilities /= probabilities.sum()
            words.append(f"{token}->{labels[int(probabilities.argmax())]}({probabilities.max():.2f})")
        print(" ".join(words))


if __name__ == "__main__":
    main()
