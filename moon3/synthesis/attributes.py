"""The ``attributes`` teacher: traces written from the catalog's structured data, offline (the ``make run`` default).

A trace is one ``key: value`` line per fact, the category path first (``category: Home > Kitchen > plate``),
then attributes in a varied order: exactly the lines a product input carries (:func:`moon3.model.items
.attribute_text`), so what the model learns to write is what it reads. Only facts the item supports:

- a product: its category path and every attribute (its own structured data);
- a text or multimodal query: the category when the text names its leaf, and each attribute the text names
  (its value or a known synonym of it);
- a category query: the path down to the named category;
- an image-only query: nothing (:meth:`AttributesTeacher.answers` is False). This teacher cannot see
  pixels, and a trace copied from the positive's data would hand the model the answer the image must be
  read for: measured on mbe3-mini, training with such traces took image->mm R@10 from 0.46 to 0.04-0.16.

Attribute lines come in key order; with ``vary_order`` their order varies with the item (drawn from a
generator seeded by the item's content, so a re-run writes the same trace).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moon3.model.items import attribute_text
from moon3.synthesis.teacher import PRODUCT, SynthesisItem, prompt_hash_of

CATEGORY_KEY = "category"
PATH_SEPARATOR = " > "


def category_text(path: Sequence[str]) -> str:
    """The category line of a trace: ``category: level1 > level2 > ...``."""
    return attribute_text(CATEGORY_KEY, PATH_SEPARATOR.join(path))


def _mentions(text: str, words: Sequence[str]) -> bool:
    lowered = text.lower()
    return any(re.search(rf"(?<!\w){re.escape(w.lower())}(?!\w)", lowered) for w in words if w)


class AttributesTeacher:
    """Writes traces from structured data; see the module docstring for what each item may claim.

    Args:
        seed: seed of the phrasing (line order, with ``vary_order``).
        synonyms: value -> words a shopper may type for it (the value itself always counts).
        vary_order: shuffle the attribute lines per item. Off by default: measured on mbe3-mini, a shuffled
            order left the trace loss at 1.09 nats/token after 600 steps and only 33% of generated traces closed.
    """

    name = "attributes"
    model = "attributes"

    def __init__(
        self,
        seed: int = 0,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        vary_order: bool = False,
    ):
        self.seed = seed
        self.vary_order = vary_order
        self.synonyms = {k: tuple(v) for k, v in (synonyms or {}).items()}
        self.decoding: dict[str, Any] = {"seed": seed, "vary_order": vary_order, "synonyms": len(self.synonyms)}

    def answers(self, item: SynthesisItem) -> bool:
        """Whether this teacher has facts of the item's own: not for an image-only query."""
        return item.kind == PRODUCT or bool(item.text)

    def prompt_hash(self) -> str:
        """Version of the rules above (change it when they change)."""
        return prompt_hash_of("attributes-teacher", "v2", CATEGORY_KEY, PATH_SEPARATOR)

    def facts(self, item: SynthesisItem) -> list[tuple[str, str]]:
        """The ``(key, value)`` facts ``item`` supports, category first, attributes in a varied order."""
        path, attrs = list(item.category_path), dict(item.attributes)
        text = item.text or ""
        if item.kind == PRODUCT:
            category, keys = path, list(attrs)
        elif item.query_type == "category":
            named = [i for i, name in enumerate(path) if name == text.strip()]
            category, keys = (path[: named[0] + 1] if named else []), []
        else:
            category, keys = [], []
            if text:
                if path and _mentions(text, [path[-1], *self.synonyms.get(path[-1], ())]):
                    category = path
                keys += [
                    k for k in attrs if k not in keys and _mentions(text, [attrs[k], *self.synonyms.get(attrs[k], ())])
                ]
        if self.vary_order:
            rng = np.random.default_rng([self.seed, int(item.content_hash()[:8], 16)])
            order = [keys[i] for i in rng.permutation(len(keys))]
        else:
            order = sorted(keys)
        facts = [(CATEGORY_KEY, PATH_SEPARATOR.join(category))] if category else []
        return facts + [(k, str(attrs[k])) for k in order]

    def trace(self, item: SynthesisItem) -> str:
        """The trace body (no ``<think>`` tags)."""
        return "\n".join(attribute_text(k, v) for k, v in self.facts(item))

    async def complete(self, item: SynthesisItem) -> str:
        """:class:`~moon3.synthesis.teacher.Teacher` interface: the trace, at once."""
        return self.trace(item)
