"""Keep a user's screen for the toolkit's own lines: silence notices that are not theirs to act on.

Called once, first thing, by entry points (before transformers / peft / accelerate are imported), not on
import of the package: a library that imports `finetune` keeps its own logging as it set it up.
"""

from __future__ import annotations

import logging
import warnings


def quiet_third_party_notices() -> None:
    # peft imports bitsandbytes, whose CPU backend logs at import that an optional kernel package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers draws a bar for copying a few hundred tensors into the model; downloads keep theirs
    # (they come from huggingface_hub, not from this switch).
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # peft asks transformers for a renamed attribute on every wrap; the notice is theirs, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
