"""What a peftlab process prints: our own log lines at INFO on stderr, other libraries' only from WARNING.
Set up once by the CLI, and by every process it starts (compare's training cells)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(verbose: bool) -> None:
    # onnxruntime's quantiser, for one, logs every tensor at INFO on the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("peftlab").setLevel(logging.INFO)
    if not verbose:
        # transformers' load report and deprecation chatter drown the useful lines; peftlab reports
        # newly initialised modules itself (run config: _run.newly_initialised).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars; ours stay
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")
