"""The toolkit's own errors: one base, caught once in the CLI (and by the service), each ending a command
with one clear line that names the problem; anything else keeps its traceback.

Exit status: 2 for bad input of any kind, 3 for a quality gate or recall target missed (`QualityGateError`).
"""

from __future__ import annotations


class DomainClipError(Exception):
    """Base of every error the toolkit raises on purpose; its message is the whole story for the user."""

    exit_code = 2


class ConfigError(DomainClipError, ValueError):
    """A recipe or override is invalid; the message lists every problem with its dotted path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        header = f"Invalid recipe {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        super().__init__("\n".join([header, *(f"  {p}" for p in problems)]))


class ModelLoadError(DomainClipError, RuntimeError):
    """The checkpoint could not be loaded; the message names the recipe key and what was tried."""


class UnsupportedModelError(DomainClipError, ValueError):
    """The checkpoint's config class has no entry in the model table."""


class LoraSetupError(DomainClipError, ValueError):
    """The recipe's LoRA settings cannot be applied to this model (targets matching nothing, bad layers)."""


class TextSwapError(DomainClipError, RuntimeError):
    """model.name_or_path / model.text_tower cannot form a dual encoder; the message names the key."""


class DataLoadError(DomainClipError, RuntimeError):
    """A dataset could not be loaded or does not have the configured columns."""


class TrainingError(DomainClipError, RuntimeError):
    """Training cannot go on (non-finite loss, adapters receiving no gradient, no readable data)."""


class TrainingInterrupted(DomainClipError):
    """Ctrl-C during training: the step reached and the last complete checkpoint, said in one line."""

    exit_code = 130

    def __init__(self, step: int, checkpoint=None):
        self.step, self.checkpoint = step, checkpoint
        saved = f"last checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint saved yet (a resume starts at step 0)"
        super().__init__(f"interrupted at step {step}; {saved}")


class ResumeError(DomainClipError, RuntimeError):
    """A checkpoint cannot be resumed exactly by this run (changed recipe, other process count)."""


class DistillError(DomainClipError, RuntimeError):
    """Stage 1 cannot go on (too little parallel text, a non-finite loss)."""


class ExportError(DomainClipError, RuntimeError):
    """An export cannot be produced as asked (bad alpha, no alpha meets the rule, unreadable folder)."""


class QualityGateError(DomainClipError, RuntimeError):
    """A quantized model retrieves worse than `export.max_r1_drop` allows."""

    exit_code = 3


class OnnxParityError(QualityGateError):
    """An ONNX graph does not reproduce the PyTorch embeddings (or its int8 copy loses too much R@1)."""


class ServeError(DomainClipError):
    """A request the service refuses: HTTP `status`, the request `field` it is about, a message saying why."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}
