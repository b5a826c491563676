"""Every recipe key with its type, default and documentation, read from the config dataclasses.

The documentation of a field is the string literal under it in the class body (the convention of
every config class here), so docs/recipe_keys.md is generated from the code and cannot drift:

    python -m ctprune.recipe_keys > docs/recipe_keys.md

tests/test_recipes.py checks that the committed file is what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing

from detector.config import InputSpec, ModelConfig
from detector.data.sources import DataConfig
from detector.data.transforms import AugmentConfig
from detector.engine.config import TrainConfig
from detector.evaluate.config import EvaluateConfig

from .distill import DistillConfig, TeacherConfig
from .pruning.slimming import SparsityConfig
from .quantize import QuantizeConfig
from .recipe import (
    BaselineConfig,
    FinetuneConfig,
    PruneConfig,
    Recipe,
    ReportConfig,
    SyntheticConfig,
)

# (section as written in a recipe, its dataclass), in the order a recipe reads.
SECTIONS = (
    ("synthetic", SyntheticConfig),
    ("model", ModelConfig),
    ("model.input", InputSpec),
    ("data", DataConfig),
    ("baseline", BaselineConfig),
    ("train", TrainConfig),
    ("train.augment", AugmentConfig),
    ("sparsity", SparsityConfig),
    ("prune", PruneConfig),
    ("finetune", FinetuneConfig),
    ("finetune.distill", DistillConfig),
    ("finetune.distill.teachers[]", TeacherConfig),
    ("quantize", QuantizeConfig),
    ("evaluate", EvaluateConfig),
    ("report", ReportConfig),
)

# Sections whose unset keys come from another section (`ctprune.recipe.load_recipe`).
INHERITS = {"finetune": ("train", {field.name for field in dataclasses.fields(TrainConfig)})}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal that follows it in ``cls``'s body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def keys_markdown() -> str:
    """The reference of every recipe section and key, as markdown."""
    lines = [
        "# Recipe keys",
        "",
        "Generated from the config dataclasses by `python -m ctprune.recipe_keys`; do not edit.",
        "A recipe is flat YAML, one section per stage (see `ctprune/recipe.py` and `recipes/`).",
        "Override any key on the command line: `--set section.key=value`.",
        "",
    ]
    recipe_docs = {field.name: "" for field in dataclasses.fields(Recipe)}
    recipe_docs.update(field_docs(Recipe))
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        docs = {}
        for base in reversed(cls.__mro__):  # a subclass (finetune) documents only its own fields
            if dataclasses.is_dataclass(base):
                docs.update(field_docs(base))
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        lines += [
            f"## `{section}`",
            "",
            summary,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            meaning = docs.get(field.name, "").replace("\n", " ").replace("|", "\\|")
            default = f"`{_default(field)}`"
            if section in INHERITS and field.name in INHERITS[section][1]:
                default = f"`{INHERITS[section][0]}`'s"
            lines.append(
                f"| `{field.name}` | `{_type_name(hints[field.name])}` | {default} | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_markdown(), end="")
