"""YAML loading that refuses a key given twice in one mapping.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a config with
``lr: 1e-3`` on line 4 and ``lr: 3e-4`` on line 20 silently trains with the second. The data
schema (:func:`mtfm.config.load_schema`) and the training config
(:func:`mtfm.train.config.load_train_config`) are read with :func:`safe_load`, which raises
:class:`DuplicateKeyError` naming the key and both lines; the model config loader
(:func:`mtfm.model.config.load_model_config`) is meant to use it too.
"""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.nodes import MappingNode

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice; ``str`` names the key and both lines."""

    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line

    def __str__(self) -> str:
        return f"line {self.line}: key {self.key!r} given twice (first on line {self.first_line})"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a repeated mapping key.

    Only keys written in the mapping itself count: a key that overrides one brought in by a
    merge (``<<: *defaults``) is what merges are for, and stays allowed.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the base constructor names it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise DuplicateKeyError(key, line, seen)
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(stream: str | bytes | IO[str] | IO[bytes]) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (see :class:`UniqueKeyLoader`)."""
    return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
