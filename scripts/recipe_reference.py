"""Print the recipe reference (every key, type, default, meaning) as markdown, from the schema itself.

python scripts/recipe_reference.py                           # print
python scripts/recipe_reference.py --check docs/recipes.md   # exit 1 if the docs' copy is stale

The copy lives in docs/recipes.md between the recipe-reference markers; tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from finetune.config.load import _tagged_items, section_type
from finetune.config.schema import RecipeConfig

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("finetune.config.schema.", "").replace("NoneType", "null")


def rows(model: type[BaseModel], prefix: str = "", seen: dict | None = None) -> list[str]:
    seen = {} if seen is None else seen
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        tagged = _tagged_items(field.annotation)
        if tagged is not None:  # a list of items keyed by `name` (loss.terms): one block of rows per name
            out.append(f"| `{key}` | list | `{[i.model_dump() for i in field.default_factory()]!r}` | {field.description or ''} |")
            for tag, item in tagged.items():
                for row in rows(item, f"{key}[{tag}].", seen):
                    if not row.startswith(f"| `{key}[{tag}].name`"):
                        out.append(row)
            continue
        nested = section_type(field.annotation)
        if nested is not None and nested in seen:
            optional = " (optional)" if field.default is None else ""
            out.append(f"| `{key}.*` | section{optional} | | same keys as `{seen[nested]}.*`. {field.description or ''} |")
            continue
        if nested is not None:
            seen[nested] = key
            out.extend(rows(nested, key + ".", seen))
            continue
        if field.default is not PydanticUndefined:
            default = f"`{field.default!r}`".replace("None", "null")
        elif field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        else:
            default = "**required**"
        type_name = "path or hub id" if "_existing_if_local" in str(field.annotation) else _type_name(field.annotation)
        out.append(f"| `{key}` | {type_name.replace('|', ' or ')} | {default} | {field.description or ''} |")
    return out


def reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|", *rows(RecipeConfig)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="MARKDOWN", help="fail if this file's reference block differs (docs/recipes.md)")
    args = parser.parse_args(argv)
    table = reference()
    if args.check:
        text = Path(args.check).read_text()
        if BEGIN not in text or END not in text:
            print(f"{args.check}: no {BEGIN} ... {END} block", file=sys.stderr)
            return 1
        current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
        if current != table:
            print(f"{args.check}: recipe reference is stale; regenerate with python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
