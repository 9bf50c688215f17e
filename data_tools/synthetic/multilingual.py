"""Demo-only parallel captions: the synthetic source domain's captions in English, German, Spanish and Chinese.

The source domain's English captions ("a large red circle in the top left") come from
`data_tools.synthetic.domains`; this module wraps it and never changes what it generates: an English caption is
mapped back to its concept and template (each template names all four attributes, so the map is
one-to-one) and rendered with the same template in German, Spanish or Chinese. A caption in language L
of image i is therefore a translation of image i's English caption, word for word in meaning.

    generate_synthetic(domain="source", num_images=300, seed=1, languages=["de"])   # an eval set in German
    parallel_text_rows(num_samples=4000, seed=0, languages=["en", "de", "es", "zh"])  # {"en": [...], "de": [...]}

`data_tools.loading` generates a recipe's `synthetic` sets with `generate_synthetic`, and
`data_tools.multilingual` reads `parallel_text_rows` as distillation's synthetic parallel text.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from data_tools.synthetic.domains import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    SOURCE_TEMPLATES,
    Sample,
    generate_domain,
    sample_concepts,
)

# ISO 639-1 codes of the languages the synthetic source domain is captioned in; zh is a non-Latin script.
SYNTHETIC_LANGUAGES = ("en", "de", "es", "zh")

# Same template index = same sentence in every language (template k of English <-> template k here).
_TEMPLATES = {
    "de": [
        "{shape} in {color}, {size}, {position}",
        "ein Foto: {shape} in {color}, {size}, {position}",
        "{position}: {shape}, {color}, {size}",
    ],
    "es": [
        "{shape} de color {color}, tamaño {size}, {position}",
        "una foto: {shape} {color}, {size}, {position}",
        "{position}: {shape} {color} {size}",
    ],
    "zh": [
        "{position}有一个{size}的{color}{shape}",
        "一张{color}{shape}的照片，{size}，在{position}",
        "{position}：{size}{color}{shape}",
    ],
}
_WORDS = {
    "de": {
        "shape": dict(zip(SHAPES, ["Kreis", "Quadrat", "Dreieck", "Kreuz", "Ring", "Raute", "Balken", "Stern"])),
        "color": dict(zip(COLORS, ["Rot", "Grün", "Blau", "Gelb", "Lila", "Orange"])),
        "size": dict(zip(SIZES, ["klein", "groß"])),
        "position": dict(zip(POSITIONS, ["oben links", "oben rechts", "unten links", "unten rechts", "in der Mitte"])),
    },
    "es": {
        "shape": dict(zip(SHAPES, ["círculo", "cuadrado", "triángulo", "cruz", "anillo", "rombo", "barra", "estrella"])),
        "color": dict(zip(COLORS, ["rojo", "verde", "azul", "amarillo", "morado", "naranja"])),
        "size": dict(zip(SIZES, ["pequeño", "grande"])),
        "position": dict(
            zip(
                POSITIONS,
                [
                    "arriba a la izquierda",
                    "arriba a la derecha",
                    "abajo a la izquierda",
                    "abajo a la derecha",
                    "en el centro",
                ],
            )
        ),
    },
    "zh": {
        "shape": dict(zip(SHAPES, ["圆形", "正方形", "三角形", "十字形", "圆环", "菱形", "长条", "星形"])),
        "color": dict(zip(COLORS, ["红色", "绿色", "蓝色", "黄色", "紫色", "橙色"])),
        "size": dict(zip(SIZES, ["小", "大"])),
        "position": dict(zip(POSITIONS, ["左上角", "右上角", "左下角", "右下角", "中间"])),
    },
}


def check_languages(languages, where: str = "languages") -> None:
    """Raise `ValueError` naming `where` when a language has no synthetic captions (the recipe schema checks with it)."""
    unknown = [lang for lang in languages if lang not in SYNTHETIC_LANGUAGES]
    if unknown:
        raise ValueError(f"{where}: {unknown} not among the synthetic languages {list(SYNTHETIC_LANGUAGES)}")


def caption_in(sample: Sample, template: int, language: str) -> str:
    """The source-domain caption of `sample` with template `template`, in `language`."""
    if language == "en":
        return sample.caption("source", template)
    words = _WORDS[language]
    return _TEMPLATES[language][template % len(SOURCE_TEMPLATES)].format(
        shape=words["shape"][sample.shape],
        color=words["color"][sample.color],
        size=words["size"][sample.size],
        position=words["position"][sample.position],
    )


@lru_cache(maxsize=1)
def _english_index() -> dict[str, tuple[Sample, int]]:
    """Every English source caption -> (concept, template). One-to-one: each template names all four attributes."""
    index = {}
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for position in POSITIONS:
                    sample = Sample(shape, color, size, position)
                    for template in range(len(SOURCE_TEMPLATES)):
                        index[sample.caption("source", template)] = (sample, template)
    return index


def translate_source_caption(caption: str, language: str) -> str:
    """An English source-domain caption in `language` (en returns it unchanged)."""
    check_languages([language])
    try:
        sample, template = _english_index()[caption]
    except KeyError:
        raise ValueError(f"not a source-domain caption of data_tools.synthetic.domains: {caption!r}") from None
    return caption_in(sample, template, language)


def generate_synthetic(
    domain: str,
    num_images: int,
    captions_per_image: int = 1,
    image_size: int = 32,
    seed: int = 0,
    languages: list[str] | tuple[str, ...] | None = None,
) -> dict[str, list]:
    """`generate_domain`'s columns with each image's captions in every language of `languages`.

    None or ["en"] is exactly `generate_domain`. Otherwise an image's caption list holds its English
    captions translated into each language in turn (language-major): the same images and concepts as the
    English set of the same seed, so per-language eval sets differ only in their captions.
    """
    columns = generate_domain(domain, num_images, captions_per_image=captions_per_image, image_size=image_size, seed=seed)
    languages = list(languages) if languages is not None else ["en"]
    if languages == ["en"]:
        return columns
    check_languages(languages)
    if domain != "source":
        raise ValueError(f"captions in {languages} exist for the source domain only, got domain {domain!r}")
    columns["caption"] = [[translate_source_caption(c, lang) for lang in languages for c in captions] for captions in columns["caption"]]
    return columns


def parallel_text_rows(num_samples: int, seed: int, languages: list[str] | tuple[str, ...], domain: str = "source") -> dict[str, list[str]]:
    """Parallel captions, one row per sampled concept and template: {language: [caption, ...]}.

    Drawn with its own random stream (not the one images are rendered from); the concept space is small
    (480 concepts x 3 templates), so a few thousand rows cover most of it.
    """
    check_languages(languages)
    if domain != "source":
        raise ValueError(f"parallel captions exist for the source domain only, got domain {domain!r}")
    rng = np.random.default_rng([seed, 3])
    samples = sample_concepts("source", num_samples, rng)
    templates = rng.integers(0, len(SOURCE_TEMPLATES), size=num_samples)
    return {lang: [caption_in(s, int(t), lang) for s, t in zip(samples, templates)] for lang in languages}


def all_multilingual_caption_text() -> list[str]:
    """Every source caption in every synthetic language: what the demo's tokenizer is trained on."""
    return [caption_in(sample, template, lang) for sample, template in _english_index().values() for lang in SYNTHETIC_LANGUAGES]
