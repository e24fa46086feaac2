"""Fashion200K (Han et al., ICCV 2017; github.com/xthan/fashion-200k) into our format.

Input: the dataset root, holding ``labels/<category>_<train|test>_detect_all.txt`` and the image folders that
its lines name (``women/dresses/casual_and_day_dresses/51727804/51727804_0.jpeg``, relative to the root).
Each label line is ``image_path<TAB>detection_score<TAB>description``.

Mapping:

- **Product** = one item folder (``51727804``): the release has several images per item, and treating each
  image as a product would put views of one item on both sides of the split. The item's first image (by
  path) that decodes is the product image; the description on that line is the title.
- **Category path** = the folders above the item folder (``women > dresses > casual and day dresses``,
  underscores as spaces); the label file's category (``dress``) when the path has no folders.
- **Attributes** = ``color``, ``material`` and ``pattern`` when a description word is in the small
  vocabularies below (the descriptions are short retailer phrases such as "black leather biker jacket").
- **Queries**: each distinct description of the item is a ``text`` query; each other image of the item is an
  ``image`` query (another view). The original train/test files are ignored for the split, which is by
  product like every moon3 dataset; items present in both files are counted in the report's notes.

Skips (counted per label line): ``malformed_line`` (fewer than 3 tab fields), ``missing_image`` (empty
path), ``bad_image_path`` (absolute or with ``..``), ``missing_title`` (empty description),
``duplicate_image`` (a path already listed), ``missing_image_file``, ``undecodable_image``. Blank lines are
not rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from moon3.data.importers.common import DatasetWriter, ImportFormatError, RowSkipped, image_bytes

LABEL_FILE = re.compile(r"^(?P<category>.+)_(?P<split>train|test)_detect_all\.txt$")

COLORS = frozenset(
    "black white red blue green yellow pink purple orange brown grey gray beige navy ivory cream gold silver "
    "nude burgundy khaki tan camel coral teal turquoise olive maroon multicolor metallic mint lilac charcoal "
    "neutral".split()
)
MATERIALS = frozenset(
    "leather denim silk cotton lace wool linen satin velvet suede chiffon knit cashmere jersey sequin sequined "
    "crepe tweed mesh fur tulle corduroy".split()
)
PATTERNS = frozenset(
    "floral striped stripe plaid polka checked check leopard paisley print printed embroidered camouflage "
    "graphic houndstooth tartan".split()
)
VOCABULARIES = {"color": COLORS, "material": MATERIALS, "pattern": PATTERNS}


@dataclass(frozen=True)
class _Line:
    where: str
    path: str
    description: str
    category: str
    source_split: str


def description_attributes(description: str) -> dict[str, str]:
    """``color``/``material``/``pattern`` from the first description word in each vocabulary."""
    out: dict[str, str] = {}
    for word in re.findall(r"[a-z]+(?:-[a-z]+)?", description.lower()):
        word = word.replace("-", "")
        for key, vocabulary in VOCABULARIES.items():
            if key not in out and word in vocabulary:
                out[key] = word
    return out


def import_fashion200k(root: Path, writer: DatasetWriter, exclude: Path | None = None) -> None:
    """Read the label files under ``root/labels`` and the images they name into ``writer``.

    Raises:
        ImportFormatError: ``root`` is not a folder, ``labels/`` is missing or holds no label file.
    """
    labels = root / "labels"
    if not root.is_dir() or not labels.is_dir():
        raise ImportFormatError(f"{labels}: folder not found (Fashion200K keeps its label files there)")
    files = sorted(p for p in labels.iterdir() if LABEL_FILE.match(p.name))
    if not files:
        raise ImportFormatError(f"{labels}: no <category>_<train|test>_detect_all.txt label files")
    items = _read_labels(files, writer)
    both = sum(len({ln.source_split for ln in lines}) > 1 for lines in items.values())
    if both:
        writer.report.notes.append(f"{both} items have images in both the train and test label files")
    for item_id in tqdm(sorted(items), desc="fashion200k items", unit="item", disable=None):
        _item(writer, root, item_id, sorted(items[item_id], key=lambda ln: ln.path))


def _read_labels(files: list[Path], writer: DatasetWriter) -> dict[str, list[_Line]]:
    """Parse every label line; bad lines are counted as skipped here, good ones grouped by item folder."""
    report = writer.report
    items: dict[str, list[_Line]] = {}
    seen: set[str] = set()
    for path in files:
        match = LABEL_FILE.match(path.name)
        with path.open(encoding="utf-8") as fh:
            for n, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                where = f"labels/{path.name}:{n}"
                fields = text.rstrip("\r\n").split("\t")
                image = fields[0].strip()
                reason = None
                if len(fields) < 3:
                    reason = "malformed_line"
                elif not image:
                    reason = "missing_image"
                elif image.startswith("/") or ".." in PurePosixPath(image).parts:
                    reason = "bad_image_path"
                elif not "\t".join(fields[2:]).strip():
                    reason = "missing_title"
                elif image in seen:
                    reason = "duplicate_image"
                if reason:
                    report.read()
                    report.skip(reason, where)
                    continue
                seen.add(image)
                line = _Line(where, image, " ".join("\t".join(fields[2:]).split()), match["category"],
                             match["split"])  # fmt: skip
                pure = PurePosixPath(image)
                items.setdefault(pure.parent.name or pure.stem, []).append(line)
    return items


def _store(writer: DatasetWriter, root: Path, line: _Line) -> str:
    return writer.store_image(image_bytes(line.path, [root]), str(PurePosixPath(line.path).with_suffix("")))


def _item(writer: DatasetWriter, root: Path, item_id: str, lines: list[_Line]) -> None:
    """One product from an item's lines; each line is counted written or skipped."""
    report = writer.report
    product: _Line | None = None
    views: list[tuple[_Line, str]] = []
    for line in lines:
        report.read()
        try:
            rel = _store(writer, root, line)
        except RowSkipped as skipped:
            report.skip(skipped.reason, line.where)
            continue
        report.wrote()
        if product is None:
            product = line
            parts = PurePosixPath(line.path).parts[:-2]
            categories = [p.replace("_", " ") for p in parts] or [line.category]
            writer.add_product(item_id, line.description, rel, categories, description_attributes(line.description))
        else:
            views.append((line, rel))
    if product is None:
        return
    descriptions = list(dict.fromkeys([product.description, *(ln.description for ln, _ in views)]))
    for k, text in enumerate(descriptions):
        writer.add_query(f"{item_id}#text{k}", text, None, item_id)
    for k, (_line, rel) in enumerate(views):
        writer.add_query(f"{item_id}#view{k}", None, rel, item_id)
