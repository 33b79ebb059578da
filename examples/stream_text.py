"""Stream text to a running rnnserve server as it is typed and print the running sentiment.

    python examples/stream_text.py "what a wonderful flight, the crew was great"
    echo "delayed again... but the crew was lovely" | python examples/stream_text.py -

The text is sent a few characters at a time, words split anywhere, as a keyboard or a
speech recogniser would deliver it. The server commits whole words to the stream's state and
scores an unfinished last word provisionally; the final answer equals Classify on the whole text.
"""

from __future__ import annotations

import argparse
import sys
import time

from serving.grpc.client import DEFAULT_TARGET, RnnServeClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", help="the text, or - to read stdin")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"HOST:PORT (default {DEFAULT_TARGET})")
    parser.add_argument("--model", default="sentiment")
    parser.add_argument("--chars", type=int, default=5, help="characters per chunk (default 5)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between chunks (default 0.05)")
    args = parser.parse_args()
    text = sys.stdin.read() if args.text == "-" else args.text

    def typing():
        for start in range(0, len(text), args.chars):
            time.sleep(args.delay)
            yield text[start : start + args.chars]

    with RnnServeClient(args.server) as client:
        sent = 0
        for update in client.stream(args.model, typing()):
            sent = min(len(text), sent + args.chars)
            shown = text if update.final else text[:sent]
            marker = "final" if update.final else f"{update.tokens:3d} tok"
            print(f"[{marker}] {update.running.label:<8} {update.running.score:.2f}  {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
