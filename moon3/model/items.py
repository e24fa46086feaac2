"""Turning dataset rows into model items: the one place training, evaluation and serving share for it.

An *item* is ``{"image": PIL.Image | None, "text": str | None}``. A product's text is its title followed by
its attributes, one ``type: value`` line each (sorted by attribute type so the text is stable); a query's text
is its query text.

One line per attribute, not ``a: x; b: y``: a byte-level BPE tokenizes ``color: red`` at the start of a line
exactly as at the start of a text, so a zero-shot label prompt (:func:`attribute_text`) is the same token
sequence as that attribute inside a product input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from moon3.data.io import load_image

Item = dict[str, Any]


def _present(value: Any) -> bool:
    """Not None, not NaN, not an empty/blank string."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def attribute_text(key: str, value: Any) -> str:
    """One attribute as the product input writes it (also the zero-shot label prompt of that attribute)."""
    return f"{key}: {value}"


def product_text(row: Mapping[str, Any], title: bool = True, attributes: bool = True) -> str:
    """Title and attributes of a product row as one text (empty string if it has neither).

    Args:
        row: a ``products`` row.
        title: include the title.
        attributes: include the attribute lines (the zero-shot attribute task leaves them out, or it would
            measure string matching).
    """
    parts = []
    if title and _present(row.get("title")):
        parts.append(str(row["title"]).strip())
    attrs = row.get("attributes")
    if attributes and isinstance(attrs, Mapping) and attrs:
        parts += [attribute_text(k, v) for k, v in sorted(attrs.items()) if _present(v)]
    return "\n".join(p for p in parts if p)


def _image(uri: Any, root: str | Path | None, where: str) -> Image.Image | None:
    if not _present(uri):
        return None
    try:
        return load_image(str(uri), root)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot load image {uri!r}: {err}") from err


def product_item(
    row: Mapping[str, Any],
    root: str | Path | None,
    load_images: bool = True,
    image: bool = True,
    title: bool = True,
    attributes: bool = True,
) -> Item:
    """Item of a ``products`` row; images are read relative to the dataset folder ``root``.

    Args:
        row: a ``products`` row.
        root: the dataset folder (image paths are relative to it) or None for absolute paths / URIs.
        load_images: read the image (False: only check that the row can become an item).
        image, title, attributes: which parts of the product the item shows (evaluation views such as
            image + title, or image only); training and the gallery use all three.

    Raises:
        ValueError: the view has neither image nor text, or its image cannot be read (message names the id).
    """
    where = f"product {row.get('product_id')!r}"
    text = product_text(row, title=title, attributes=attributes) or None
    has_image = image and _present(row.get("image"))
    picture = _image(row.get("image"), root, where) if (load_images and has_image) else None
    if text is None and not has_image:
        raise ValueError(f"{where}: has neither an image nor a title/attributes in this view")
    return {"image": picture, "text": text}


def query_item(row: Mapping[str, Any], root: str | Path | None, load_images: bool = True) -> Item:
    """Item of a ``queries`` row (text, image or both).

    Raises:
        ValueError: the row has neither ``query_text`` nor ``query_image``, or its image cannot be read.
    """
    where = f"query {row.get('query_id')!r}"
    text = str(row["query_text"]).strip() if _present(row.get("query_text")) else None
    image = _image(row.get("query_image"), root, where) if load_images else None
    if text is None and not _present(row.get("query_image")):
        raise ValueError(f"{where}: has neither query_text nor query_image")
    return {"image": image, "text": text}


def check_items(items: list[Item]) -> None:
    """Raise ``ValueError`` naming the first item index that has neither an image nor a text."""
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"item {i}: expected a dict with 'image' and/or 'text', got {type(item).__name__}")
        image, text = item.get("image"), item.get("text")
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"item {i}: 'image' must be a PIL image, got {type(image).__name__}")
        if image is None and not _present(text):
            raise ValueError(f"item {i}: has neither an image nor a text")


def catalog_texts(root: str | Path, traces_dir: str | Path | None = None) -> list[str]:
    """The tiny tokenizer's corpus, from the catalog in ``root`` alone (no vocabulary of any other dataset).

    - train-split products: title + attribute lines (:func:`product_text`, what the model reads), and the
      category path as a trace writes it (``category: level1 > level2 > ...``);
    - train-split query texts;
    - the catalog's label texts, all splits: every category name (the zero-shot class prompt, one per level
      name) and every ``type: value`` attribute line (the zero-shot attribute prompt), once each;
    - the synthesized traces in ``traces_dir``, if given.

    Product and query texts come from the train split only (traces are only written for it), so the tokenizer of
    a model evaluated on this dataset never saw an evaluation item's text; the label texts are the catalog's
    taxonomy, which the zero-shot tasks embed anyway.
    """
    from moon3.data.schema import PRODUCTS, QUERIES, TRACES, read_table, table_path
    from moon3.synthesis.attributes import category_text  # the trace's category line; imports this module

    texts: list[str] = []
    products = table_path(root, PRODUCTS)
    if products.exists():
        df = read_table(products, PRODUCTS)
        train = df[df["split"] != "eval"]
        texts += [t for t in (product_text(r) for r in train.to_dict("records")) if t]
        texts += [category_text(list(p)) for p in train["category_path"] if p is not None and len(p)]
        names = {str(n): None for p in df["category_path"] if p is not None for n in p if _present(n)}
        lines = {
            attribute_text(k, v): None
            for attrs in df["attributes"]
            if isinstance(attrs, Mapping)
            for k, v in sorted(attrs.items())
            if _present(v)
        }
        texts += [*names, *lines]
    queries = table_path(root, QUERIES)
    if queries.exists():
        df = read_table(queries, QUERIES)
        df = df[df["split"] != "eval"]
        texts += [str(t) for t in df["query_text"] if _present(t)]
    if traces_dir is not None and table_path(traces_dir, TRACES).exists():
        texts += [str(t) for t in read_table(table_path(traces_dir, TRACES), TRACES)["trace"] if _present(t)]
    return texts
