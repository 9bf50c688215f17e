"""What a request may ask for, and how a bad one is answered.

Every refusal is a `ServeError` with an HTTP status (4xx) and the request field it is about; the app
turns it into `{"error": ..., "field": ...}`. Images are checked for their pixel count from the header
BEFORE any pixel is decoded (PIL's `Image.open` reads only the header), so a small file that claims
huge dimensions (a decompression bomb) costs nothing. PIL's own guard (`Image.MAX_IMAGE_PIXELS`,
`DecompressionBombError`) stays in place behind it; the service does not change that global.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

from PIL import Image

from finetune.errors import ServeError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20  # a request body, JSON or multipart (413)
    max_image_pixels: int = 16_000_000  # width x height of an uploaded image, read from its header (413)
    max_text_chars: int = 1000  # a text query (422); the text tower reads at most its token limit anyway
    max_k: int = 100  # k in 1..max_k (422)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batching:
    enabled: bool = True
    max_batch: int = 32  # items per forward
    max_wait_ms: float = 5.0  # how long the first item of a window waits for others

    def as_dict(self) -> dict:
        return asdict(self)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB, or ServeError(413) for too many pixels / ServeError(422) when undecodable."""
    if not data:
        raise ServeError(422, "image", "image: the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))  # header only
        width, height = image.size
        if width * height > max_pixels:
            raise ServeError(
                413,
                "image",
                f"image: {width}x{height} = {width * height:,} pixels, the limit is {max_pixels:,} (--max-image-pixels); not decoded",
            )
        image.load()
        return image.convert("RGB")
    except ServeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ServeError(413, "image", f"image: refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # any decoder failure is the file's fault, never the server's
        raise ServeError(422, "image", f"image: not an image PIL can decode ({type(exc).__name__}: {exc})") from None


def check_query(text: str | None, has_image: bool, k: int, weight: float, limits: Limits) -> None:
    """The fields of one search, checked the same way for the service (422) and `domainclip search` (exit 2)."""
    if text is not None:
        if not text.strip():
            raise ServeError(422, "text", "text: empty; give a query text or leave the field out")
        if len(text) > limits.max_text_chars:
            raise ServeError(422, "text", f"text: {len(text):,} characters, the limit is {limits.max_text_chars:,} (--max-text-chars)")
    if text is None and not has_image:
        raise ServeError(422, "text", "text: give a text, an image (multipart `image` file), or both")
    if not 1 <= k <= limits.max_k:
        raise ServeError(422, "k", f"k: must be within 1..{limits.max_k} (--max-k), got {k}")
    if not 0 <= weight <= 1:
        raise ServeError(422, "weight", f"weight: the image's weight in a fused query must be within 0..1, got {weight}")
