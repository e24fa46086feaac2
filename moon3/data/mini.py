"""mbe3-mini: a small, deterministic, learnable stand-in for an MBE3.0-style catalog.

Generative process (all draws from one ``numpy`` generator seeded with ``seed``):

1. **Category.** A 3-level tree (level 1: Home / Clothing / Accessories; 12 leaves). Each leaf is drawn as its
   own *shape* (plate = circle, t-shirt = T, ring = annulus, ...), so the category is visible in the pixels.
2. **Visual attributes**, each uniform: ``color`` (10 fill colours), ``pattern`` (solid, striped, dotted,
   checked: drawn over the fill), ``size`` (small/medium/large: the shape covers 45/65/85 % of the frame) and
   ``logo`` (a letter A-H stamped in the middle in a contrasting colour). A background colour is drawn too; it
   is a nuisance, not an attribute.
3. **Text-only attributes**: ``material`` and ``brand``. They appear only in the title (and in the
   attributes dict), never in the image.
4. **Title**: brand, then each of color/pattern/size/material mentioned with probability 0.6, the leaf name,
   ``logo X`` with probability 0.4, and 0-2 noise words ("free shipping", "2026 new", ...).
5. **Split**: a product is in ``eval`` with probability ``eval_fraction``; its queries share its split, so
   no evaluation product or query is ever seen in training.
6. **Queries**, each pointing at one product bought after it (the positive), of three types:
   ``text`` (40 %): an attribute paraphrase with synonyms ("crimson mini pinstripe tee"), sometimes naming
   the logo letter, the material or the brand ("... with letter A in leather by Nordvik");
   ``image`` (30 %): another view of the product, re-rendered shifted, rotated (up to 25 degrees), rescaled
   and on a new background; ``multimodal`` (30 %): such a view plus text naming a text-only attribute
   ("in leather, by Nordvik"). Then ``category_queries`` times as many ``category`` queries: a category name
   (levels 1, 2, 3 and the names of each level in turn) as the text, and a random training product under it
   as the positive, so every name the zero-shot classification asks about occurs in the training signal
   (drawn from a second generator, so adding them leaves every other draw unchanged).
7. **Scale** ``N``: N copies of the catalog; copy ``r > 0`` re-draws brand, material, title, price, shop and
   query texts but reuses the images of copy 0, so a 1M-row table is cheap to make for benchmarks.

Images are PNG, ``image_size`` pixels square (products) and 64-128 pixels (query views). Same seed, same
bytes: the tests compare file hashes of two runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from moon3.data.config import DataConfig
from moon3.data.schema import PRODUCTS, QUERIES, table_path, write_table

# leaf -> (level1, level2, shape)
CATEGORY_TREE: dict[str, tuple[str, str, str]] = {
    "plate": ("Home", "Kitchen", "circle"),
    "cutting board": ("Home", "Kitchen", "square"),
    "cushion": ("Home", "Decor", "diamond"),
    "wall clock": ("Home", "Decor", "hexagon"),
    "star lamp": ("Home", "Lighting", "star"),
    "t-shirt": ("Clothing", "Tops", "tee"),
    "poncho": ("Clothing", "Outerwear", "triangle"),
    "skirt": ("Clothing", "Bottoms", "trapezoid"),
    "ring": ("Accessories", "Jewelry", "ring"),
    "pendant": ("Accessories", "Jewelry", "pentagon"),
    "clutch": ("Accessories", "Bags", "ellipse"),
    "patch": ("Accessories", "Badges", "cross"),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 210, 30),
    "green": (44, 160, 44),
    "teal": (23, 190, 207),
    "blue": (31, 90, 200),
    "purple": (148, 103, 189),
    "pink": (247, 129, 191),
    "brown": (140, 86, 75),
    "black": (30, 30, 30),
}
PATTERNS = ("solid", "striped", "dotted", "checked")
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.85}
LOGOS = tuple("ABCDEFGH")
MATERIALS = ("cotton", "leather", "ceramic", "wood", "metal", "silk")
BRANDS = ("Nordvik", "Aurelo", "Kasumi", "Brightfox", "Velto", "Marrow", "Ziza", "Olmo")
BACKGROUNDS = ((250, 250, 250), (215, 215, 215), (240, 228, 200), (205, 225, 245), (225, 245, 215))
NOISE = (
    "free shipping",
    "2026 new",
    "hot sale",
    "premium",
    "best seller",
    "limited",
    "gift idea",
    "official",
)
ATTRIBUTE_TYPES = ("color", "pattern", "size", "logo", "material", "brand")

SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "lemon", "golden"),
    "green": ("green", "emerald"),
    "teal": ("teal", "turquoise", "cyan"),
    "blue": ("blue", "navy", "cobalt"),
    "purple": ("purple", "violet", "lilac"),
    "pink": ("pink", "rose"),
    "brown": ("brown", "chocolate", "tan"),
    "black": ("black", "jet black", "dark"),
    "solid": ("solid", "plain", "single-colour"),
    "striped": ("striped", "pinstripe", "with stripes"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "checked": ("checked", "plaid", "chequered"),
    "small": ("small", "mini", "compact"),
    "medium": ("medium", "regular", "mid-size"),
    "large": ("large", "big", "oversized"),
    "plate": ("plate", "dish"),
    "cutting board": ("cutting board", "chopping board"),
    "cushion": ("cushion", "pillow"),
    "wall clock": ("wall clock", "clock"),
    "star lamp": ("star lamp", "star light"),
    "t-shirt": ("t-shirt", "tee"),
    "poncho": ("poncho", "cape"),
    "skirt": ("skirt", "midi skirt"),
    "ring": ("ring", "band ring"),
    "pendant": ("pendant", "necklace charm"),
    "clutch": ("clutch", "evening bag"),
    "patch": ("patch", "badge"),
}


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) with radius ``r``, rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
    elif shape == "pentagon":
        pts = [(math.cos(a - math.pi / 2), math.sin(a - math.pi / 2)) for a in np.linspace(0, 2 * math.pi, 6)[:-1]]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = i * math.pi / 5 - math.pi / 2
            rad = 1.0 if i % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "triangle":
        pts = [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    elif shape == "trapezoid":
        pts = [(-0.45, -0.85), (0.45, -0.85), (0.95, 0.85), (-0.95, 0.85)]
    elif shape == "tee":
        pts = [
            (-0.35, -0.85),
            (0.35, -0.85),
            (1, -0.5),
            (0.8, -0.15),
            (0.45, -0.3),
            (0.45, 0.9),
            (-0.45, 0.9),
            (-0.45, -0.3),
            (-0.8, -0.15),
            (-1, -0.5),
        ]
    elif shape == "cross":
        a, b = 0.33, 1.0
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _mask(shape: str, side: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            h = r * 0.5
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    elif shape == "ellipse":
        ell = Image.new("L", (side, side), 0)
        ImageDraw.Draw(ell).ellipse([cx - r, cy - r * 0.55, cx + r, cy + r * 0.55], fill=255)
        mask = ell.rotate(math.degrees(-rot), center=(cx, cy))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    return mask


def _pattern_layer(pattern: str, side: int, fill: tuple[int, int, int]) -> Image.Image:
    layer = Image.new("RGB", (side, side), fill)
    if pattern == "solid":
        return layer
    draw = ImageDraw.Draw(layer)
    ink = tuple(255 - v if sum(fill) < 380 else v // 4 for v in fill)
    step = max(6, side // 10)
    if pattern == "striped":
        for x in range(-side, side, step):
            draw.line([(x, 0), (x + side, side)], fill=ink, width=max(2, step // 3))
    elif pattern == "dotted":
        rad = max(1, step // 4)
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=ink)
    elif pattern == "checked":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    return layer


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def render_product(
    shape: str,
    color: str,
    pattern: str,
    size: str,
    logo: str,
    background: tuple[int, int, int],
    side: int = 96,
    shift: tuple[float, float] = (0.0, 0.0),
    rotation: float = 0.0,
    zoom: float = 1.0,
) -> Image.Image:
    """Draw one product view. Every visual attribute is visible: shape, fill, pattern, scale, logo letter."""
    img = Image.new("RGB", (side, side), background)
    r = side / 2 * SIZES[size] * zoom
    cx, cy = side / 2 + shift[0] * side, side / 2 + shift[1] * side
    mask = _mask(shape, side, cx, cy, r, rotation)
    img.paste(_pattern_layer(pattern, side, COLORS[color]), (0, 0), mask)
    # The logo sits on a white disc so it stays readable on every pattern.
    lr = max(5.0, r * 0.32)
    draw = ImageDraw.Draw(img)
    draw.ellipse([cx - lr, cy - lr, cx + lr, cy + lr], fill=(255, 255, 255))
    font = _font(int(lr * 1.5))
    draw.text((cx, cy), logo, fill=(0, 0, 0), font=font, anchor="mm")
    return img


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _title(rng: np.random.Generator, leaf: str, attrs: dict[str, str]) -> str:
    words = [attrs["brand"]]
    for key in ("size", "color", "pattern", "material"):
        if rng.random() < 0.6:
            words.append(attrs[key])
    words.append(leaf)
    if rng.random() < 0.4:
        words.append(f"logo {attrs['logo']}")
    noise = [NOISE[i] for i in rng.choice(len(NOISE), size=int(rng.integers(0, 3)), replace=False)]
    return " ".join(words) + ("" if not noise else " - " + ", ".join(noise))


def _query_text(rng: np.random.Generator, leaf: str, attrs: dict[str, str]) -> str:
    keys = list(rng.choice(["color", "pattern", "size"], size=int(rng.integers(2, 4)), replace=False))
    words = [_pick(rng, SYNONYMS[attrs[k]]) for k in ("size", "color", "pattern") if k in keys]
    text = " ".join(words + [_pick(rng, SYNONYMS[leaf])])
    if rng.random() < 0.5:
        text += f" with letter {attrs['logo']}"
    # Shoppers also type what no picture shows: the material and the brand.
    if rng.random() < 0.3:
        text += f" in {attrs['material']}"
    if rng.random() < 0.3:
        text += f" by {attrs['brand']}"
    return _pick(rng, ("", "looking for ", "need a ", "buy ")) + text


def _draw_product(rng: np.random.Generator) -> tuple[str, dict[str, str], int]:
    leaf = _pick(rng, list(CATEGORY_TREE))
    attrs = {
        "color": _pick(rng, list(COLORS)),
        "pattern": _pick(rng, PATTERNS),
        "size": _pick(rng, list(SIZES)),
        "logo": _pick(rng, LOGOS),
        "material": _pick(rng, MATERIALS),
        "brand": _pick(rng, BRANDS),
    }
    return leaf, attrs, int(rng.integers(len(BACKGROUNDS)))


def _render_view(rng: np.random.Generator, leaf: str, attrs: dict[str, str], bg_index: int) -> Image.Image:
    """Another view of a product: new background, shift, rotation, zoom and resolution."""
    new_bg = (bg_index + 1 + int(rng.integers(len(BACKGROUNDS) - 1))) % len(BACKGROUNDS)
    return render_product(
        CATEGORY_TREE[leaf][2],
        attrs["color"],
        attrs["pattern"],
        attrs["size"],
        attrs["logo"],
        BACKGROUNDS[new_bg],
        side=int(rng.choice([64, 96, 128])),
        shift=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        rotation=float(rng.uniform(-0.44, 0.44)),
        zoom=float(rng.uniform(0.85, 1.1)),
    )


def make_sample(cfg: DataConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, int]:
    """Generate mbe3-mini into ``out_dir`` (default ``cfg.out_dir``): tables plus PNG images.

    Args:
        cfg: sizes, seed, eval fraction, scale and image size.
        out_dir: overrides ``cfg.out_dir``.
        progress: show progress bars.

    Returns:
        Counts: products, queries, images written.
    """
    out = Path(out_dir or cfg.out_dir)
    (out / "images" / "products").mkdir(parents=True, exist_ok=True)
    (out / "images" / "queries").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    base = [_draw_product(rng) for _ in range(cfg.n_products)]
    base_split = ["eval" if rng.random() < cfg.eval_fraction else "train" for _ in range(cfg.n_products)]
    n_images = 0
    for k, (leaf, attrs, bg) in enumerate(tqdm(base, desc="render products", disable=not progress)):
        img = render_product(
            CATEGORY_TREE[leaf][2],
            attrs["color"],
            attrs["pattern"],
            attrs["size"],
            attrs["logo"],
            BACKGROUNDS[bg],
            side=cfg.image_size,
        )
        img.save(out / "images" / "products" / f"{k:07d}.png", optimize=False)
        n_images += 1
    # Query skeletons of copy 0: positive product, type and (for image/multimodal) a rendered view.
    base_queries = []
    for j in tqdm(range(cfg.n_queries), desc="render queries", disable=not progress):
        k = int(rng.integers(cfg.n_products))
        u = rng.random()
        qtype = "text" if u < 0.4 else ("image" if u < 0.7 else "multimodal")
        image = None
        if qtype != "text":
            leaf, attrs, bg = base[k]
            image = f"images/queries/{j:07d}.png"
            _render_view(rng, leaf, attrs, bg).save(out / image, optimize=False)
            n_images += 1
        base_queries.append((k, qtype, image))

    # Category queries of copy 0: (product, level). Levels and names go round-robin, so every name occurs;
    # the positive is a training product under the name where there is one (so every name is in the training
    # signal). A separate generator keeps the draws above unchanged.
    cat_rng = np.random.default_rng([cfg.seed, 1])
    n_category = int(round(cfg.category_queries * cfg.n_queries))
    names = category_names()
    under: dict[tuple[int, str], list[int]] = {}
    for k, (leaf, _, _) in enumerate(base):
        for level, name in enumerate(_path(leaf)):
            under.setdefault((level, name), []).append(k)
    base_category = []
    for j in range(n_category):
        level = j % 3
        name = names[level + 1][(j // 3) % len(names[level + 1])]
        products_under = under.get((level, name), [])
        pool = [k for k in products_under if base_split[k] == "train"] or products_under
        if pool:
            base_category.append((pool[int(cat_rng.integers(len(pool)))], level))

    products, queries = [], []
    per_copy = cfg.n_queries + n_category
    width = len(str(max(cfg.n_products, per_copy) * cfg.scale))
    for r in tqdm(range(cfg.scale), desc="write copies", disable=not progress or cfg.scale == 1):
        for k, (leaf, attrs, _bg) in enumerate(base):
            if r > 0:
                attrs = {**attrs, "brand": _pick(rng, BRANDS), "material": _pick(rng, MATERIALS)}
            products.append(
                {
                    "product_id": f"p{r * cfg.n_products + k:0{width}d}",
                    "title": _title(rng, leaf, attrs),
                    "image": f"images/products/{k:07d}.png",
                    "category_path": _path(leaf),
                    "attributes": attrs,
                    "price": round(float(rng.lognormal(3.0, 0.8)), 2),
                    "shop_id": f"shop{int(rng.integers(50)):02d}",
                    "split": base_split[k],
                }
            )
        for j, (k, qtype, image) in enumerate(base_queries):
            product = products[r * cfg.n_products + k]
            leaf = product["category_path"][-1]
            attrs = product["attributes"]
            if qtype == "text":
                text = _query_text(rng, leaf, attrs)
            elif qtype == "multimodal":
                text = f"in {attrs['material']}, by {attrs['brand']}"
            else:
                text = None
            queries.append(
                {
                    "query_id": f"q{r * per_copy + j:0{width}d}",
                    "query_text": text,
                    "query_image": image,
                    "positive_product_id": product["product_id"],
                    "split": product["split"],
                    "query_type": qtype,
                }
            )
        for j, (k, level) in enumerate(base_category, start=cfg.n_queries):
            product = products[r * cfg.n_products + k]
            queries.append(
                {
                    "query_id": f"q{r * per_copy + j:0{width}d}",
                    "query_text": product["category_path"][level],
                    "query_image": None,
                    "positive_product_id": product["product_id"],
                    "split": product["split"],
                    "query_type": "category",
                }
            )
    write_table(pd.DataFrame(products), table_path(out, PRODUCTS), PRODUCTS)
    write_table(pd.DataFrame(queries), table_path(out, QUERIES), QUERIES)
    return {"products": len(products), "queries": len(queries), "images": n_images}


def _path(leaf: str) -> list[str]:
    """The 3-level category path of a leaf."""
    level1, level2, _ = CATEGORY_TREE[leaf]
    return [level1, level2, leaf]


def category_names() -> dict[int, list[str]]:
    """Category names per level (1-based) of the mbe3-mini tree."""
    levels: dict[int, list[str]] = {1: [], 2: [], 3: []}
    for leaf, (l1, l2, _) in CATEGORY_TREE.items():
        for level, name in ((1, l1), (2, l2), (3, leaf)):
            if name not in levels[level]:
                levels[level].append(name)
    return levels


def attribute_values() -> dict[str, list[str]]:
    """Allowed values per attribute type of mbe3-mini."""
    return {
        "color": list(COLORS),
        "pattern": list(PATTERNS),
        "size": list(SIZES),
        "logo": list(LOGOS),
        "material": list(MATERIALS),
        "brand": list(BRANDS),
    }
