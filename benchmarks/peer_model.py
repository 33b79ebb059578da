"""The plain LSTM classifier all servers race on: vocab 20,000, embedding 128, hidden 256,
3 outputs; input `ids` INT64 [B, 64], output `logits` FP32 [B, 3]. Random weights (fixed seed):
speed does not depend on what the weights learned.

    python benchmarks/peer_model.py OUT_DIR     # writes OUT_DIR/lstm/1/model.onnx (needs torch)
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB, EMBEDDING, HIDDEN, CLASSES, STEPS = 20_000, 128, 256, 3, 64


def build(path: Path) -> Path:
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB, EMBEDDING)
            self.lstm = torch.nn.LSTM(EMBEDDING, HIDDEN, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, ids):
            outputs, _ = self.lstm(self.embedding(ids))
            return self.head(outputs[:, -1])

    torch.manual_seed(0)
    model = Classifier().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, VOCAB, (2, STEPS))
    torch.onnx.export(model, (example,), str(path), input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) / "lstm" / "1" / "model.onnx"))
