"""`rnnserve score` as a command: runs the job and reports on stderr with an exit code.

Exit codes: 0 done (rows may have been skipped with --on-error skip), 1 a bad row stopped
the run, 2 a usage problem (arguments, unreadable input, missing column, unknown model,
refused token), 3 the server failed or stayed unavailable through the retries, 130
interrupted.
"""

from __future__ import annotations

import sys

from serving.scoring.engines import ScoringError
from serving.scoring.readers import InputError
from serving.scoring.run import BadRow, ScoreOptions, run
from serving.scoring.writers import OutputError


def score(options: ScoreOptions) -> int:
    """Run the whole job; returns the exit code (messages go to stderr)."""
    try:
        summary = run(options)
    except BadRow as error:
        print(f"error: {error} (use --on-error skip to continue past bad rows)", file=sys.stderr)
        return 1
    except (InputError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ScoringError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    where = "stdout" if options.output == "-" else options.output
    message = f"scored {summary.written} rows -> {where}"
    if summary.rejects_path is not None:
        message += f"; {summary.rejected} rejected -> {summary.rejects_path}"
    print(message, file=sys.stderr)
    return 0
