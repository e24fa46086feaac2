"""Request parsing for both protocols: a request becomes model items, or a :class:`RequestError` saying what is
wrong with it (the server answers 400 with that message).

v1 (``/v1/models/NAME:predict``)::

    {"instances": [{"text": "red cotton shirt"}, {"image": "<base64 or data: URL>"}, {"text": "...", "image": "..."}],
     "parameters": {"reasoning": false, "return_trace": false, "top_k": 10}}

An instance may also be a plain string (a text query). v2 (``/v2/models/NAME/infer``, Open Inference Protocol)::

    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["red shirt", ""]},
                {"name": "image", "datatype": "BYTES", "shape": [2], "data": ["", "<base64>"]}],
     "parameters": {"reasoning": false}}

``text`` and/or ``image``, each BYTES of shape ``[N]`` (or ``[N, 1]``); an empty string means "absent" for that
row. Limits (items per request, text length, image bytes and pixels) come from :class:`~moon3.serve.config.ServeConfig`.
Images are decoded exactly as training reads image files (:func:`moon3.data.io.decode_image`, RGB).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from moon3.data.io import decode_image
from moon3.model.items import Item
from moon3.serve.config import ServeConfig

ITEM_FIELDS = ("text", "image")
PARAMETERS = {"reasoning": bool, "return_trace": bool, "top_k": int}
SEARCH_ONLY = ("top_k",)


class RequestError(ValueError):
    """A malformed request; the message says what is wrong (the server answers 400 with it)."""


@dataclass
class Limits:
    """Input limits of one request."""

    max_items: int = 64
    max_text_chars: int = 8192
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_top_k: int = 100

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Limits:
        """The limits ``cfg`` sets."""
        return cls(cfg.max_items_per_request, cfg.max_text_chars, cfg.max_image_bytes, cfg.max_image_pixels,
                   cfg.max_top_k)  # fmt: skip


@dataclass
class ParsedRequest:
    """A validated request.

    Attributes:
        items: ``{"image": PIL.Image | None, "text": str | None}`` each, at least one of them present.
        parameters: the request's parameters (``reasoning``, ``return_trace``, ``top_k``), checked.
        request_id: the v2 request id (None for v1 or when not given).
        outputs: the v2 outputs the request names (None: all).
    """

    items: list[Item]
    parameters: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    outputs: list[str] | None = None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_text(value: Any, where: str, limits: Limits) -> str | None:
    """A text field: a string (blank = absent) within ``max_text_chars``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{where}: 'text' is not UTF-8") from None
    if not isinstance(value, str):
        raise RequestError(f"{where}: 'text' must be a string, got {_kind(value)}")
    if len(value) > limits.max_text_chars:
        raise RequestError(f"{where}: 'text' has {len(value)} characters, more than the limit {limits.max_text_chars}")
    return value.strip() or None


# Leading bytes of image files: a BYTES row (v2 binary or gRPC) that starts with one is the file itself.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _image_bytes(value: Any, where: str, limits: Limits) -> bytes:
    if isinstance(value, Mapping) and set(value) == {"b64"}:  # the TF-serving convention {"b64": "..."}
        value = value["b64"]
    if isinstance(value, bytes):
        if value.startswith(IMAGE_MAGIC):
            if len(value) > limits.max_image_bytes:
                raise RequestError(
                    f"{where}: 'image' is {len(value)} bytes, more than the limit {limits.max_image_bytes}"
                )
            return value
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise RequestError(f"{where}: 'image' must be a base64 string (or a data: URL), got {_kind(value)}")
    data = value.strip()
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{where}: 'image' data URL must be base64 (data:image/...;base64,...)")
    # Refuse an oversized image before decoding it (base64 is 4 characters per 3 bytes).
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(
            f"{where}: 'image' is about {len(data) * 3 // 4} bytes, more than the limit {limits.max_image_bytes}"
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: 'image' is not valid base64") from None
    if not raw:
        raise RequestError(f"{where}: 'image' is empty")
    if len(raw) > limits.max_image_bytes:
        raise RequestError(f"{where}: 'image' is {len(raw)} bytes, more than the limit {limits.max_image_bytes}")
    return raw


def parse_image(value: Any, where: str, limits: Limits) -> Image.Image | None:
    """An image field: base64 (or a ``data:`` URL) of a PNG/JPEG/WebP/... file within the byte and pixel limits,
    decoded to RGB the way training reads image files."""
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return None
    raw = _image_bytes(value, where, limits)
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # reads the header only: the size before any pixel
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"{where}: 'image' is not a decodable image (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"{where}: 'image' is {width}x{height} = {width * height} pixels, more than the limit "
            f"{limits.max_image_pixels}"
        )
    try:
        return decode_image(raw)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(f"{where}: 'image' could not be decoded ({err})") from None


def make_item(text: Any, image: Any, where: str, limits: Limits) -> Item:
    """One model item from a text and an image field (at least one present)."""
    item = {"text": parse_text(text, where, limits), "image": parse_image(image, where, limits)}
    if item["text"] is None and item["image"] is None:
        raise RequestError(f"{where}: needs a non-empty 'text' and/or 'image'")
    return item


def parse_parameters(raw: Any, search: bool, where: str = "parameters") -> dict[str, Any]:
    """Checked request parameters: ``reasoning`` and ``return_trace`` (bool), ``top_k`` (int, search only)."""
    if raw is None:
        return {}
    if hasattr(raw, "model_dump"):  # a pydantic Parameters object (v2 REST)
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, Mapping):
        raise RequestError(f"'{where}' must be an object, got {_kind(raw)}")
    known = [k for k in PARAMETERS if search or k not in SEARCH_ONLY]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise RequestError(f"{where}: unknown parameter '{key}' (known: {', '.join(known)})")
        expected = PARAMETERS[key]
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise RequestError(f"{where}: '{key}' must be {expected.__name__}, got {_kind(value)} {value!r}")
        out[key] = value
    return out


def _check_count(n: int, limits: Limits, what: str) -> None:
    if n == 0:
        raise RequestError(f"no {what}: send at least one")
    if n > limits.max_items:
        raise RequestError(f"{n} {what} in one request, more than the limit {limits.max_items}")


def parse_v1(body: Any, limits: Limits, search: bool = False) -> ParsedRequest:
    """Items and parameters of a v1 request body (the decoded JSON).

    Raises:
        RequestError: the body is not ``{"instances": [...], "parameters": {...}}`` with valid instances.
    """
    if isinstance(body, bytes | str):
        raise RequestError("expected a JSON body (Content-Type: application/json)")
    if not isinstance(body, Mapping):
        raise RequestError(f"request body must be a JSON object with 'instances', got {_kind(body)}")
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown} in the request body (expected 'instances', 'parameters')")
    if "instances" not in body:
        raise RequestError('missing \'instances\': a list of {"text": ..., "image": ...} objects')
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError(f"'instances' must be a list, got {_kind(instances)}")
    _check_count(len(instances), limits, "instances")
    parameters = parse_parameters(body.get("parameters"), search)
    items = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(inst, str):
            inst = {"text": inst}
        if not isinstance(inst, Mapping):
            raise RequestError(f"{where}: expected an object with 'text' and/or 'image' or a string, got {_kind(inst)}")
        extra = sorted(set(inst) - set(ITEM_FIELDS))
        if extra:
            raise RequestError(f"{where}: unknown field(s) {extra} (expected 'text' and/or 'image')")
        items.append(make_item(inst.get("text"), inst.get("image"), where, limits))
    return ParsedRequest(items, parameters)


def _v2_column(inp: Any, limits: Limits) -> list[Any]:
    """The rows of one v2 input (``text`` or ``image``), checked against its declared datatype and shape."""
    name = inp.name
    if inp.datatype != "BYTES":
        raise RequestError(f"input '{name}': datatype must be BYTES, got {inp.datatype}")
    shape = list(inp.shape or [])
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or any(d < 0 for d in shape):
        raise RequestError(f"input '{name}': shape must be [N] or [N, 1], got {shape}")
    data = inp.data
    empty = data is None or (isinstance(data, list) and not data)
    if empty and getattr(inp, "_raw_data", None) is not None:  # binary extension / gRPC raw contents
        data = inp.as_numpy()
    if hasattr(data, "tolist"):
        data = data.reshape(-1).tolist() if len(shape) == 2 else data.tolist()
    if not isinstance(data, list):
        raise RequestError(f"input '{name}': 'data' must be a list, got {_kind(data)}")
    if len(shape) == 2 and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]
    if len(data) != shape[0]:
        raise RequestError(f"input '{name}': shape {shape} declares {shape[0]} rows, 'data' has {len(data)}")
    bad = next((i for i, v in enumerate(data) if not isinstance(v, str | bytes)), None)
    if bad is not None:
        raise RequestError(f"input '{name}': row {bad} must be a string, got {_kind(data[bad])}")
    _check_count(len(data), limits, "rows")
    return data


def parse_v2(request: Any, limits: Limits, search: bool = False) -> ParsedRequest:
    """Items and parameters of a v2 ``InferRequest`` (inputs ``text`` and/or ``image``, BYTES ``[N]``).

    Raises:
        RequestError: unknown, repeated or missing inputs; wrong datatype or shape; rows that disagree in number;
            an invalid row (the message names the input and row).
    """
    inputs = list(request.inputs or [])
    if not inputs:
        raise RequestError("no inputs: send 'text' and/or 'image' (BYTES, shape [N])")
    names = [inp.name for inp in inputs]
    unknown = sorted(set(names) - set(ITEM_FIELDS))
    if unknown:
        raise RequestError(f"unknown input(s) {unknown} (expected 'text' and/or 'image', BYTES, shape [N])")
    if len(set(names)) != len(names):
        raise RequestError(f"input(s) given more than once: {sorted({n for n in names if names.count(n) > 1})}")
    columns = {inp.name: _v2_column(inp, limits) for inp in inputs}
    counts = {name: len(col) for name, col in columns.items()}
    if len(set(counts.values())) > 1:
        raise RequestError(f"inputs have different numbers of rows: {counts}")
    raw_parameters = request.parameters
    if getattr(request, "from_grpc", False) and raw_parameters:
        from kserve.protocol.infer_type import to_http_parameters  # kserve is imported (the request is one)

        raw_parameters = to_http_parameters(raw_parameters)
    parameters = parse_parameters(raw_parameters, search)
    n = next(iter(counts.values()))
    texts, images = columns.get("text", [None] * n), columns.get("image", [None] * n)
    items = [make_item(texts[i], images[i], f"row {i}", limits) for i in range(n)]
    outputs = None
    if getattr(request, "request_outputs", None):
        outputs = [o.name for o in request.request_outputs]
        known = ["product_id", "score", "trace"] if search else ["embedding", "trace"]
        unknown = sorted(set(outputs) - set(known))
        if unknown:
            raise RequestError(f"unknown output(s) {unknown} requested (this model has {', '.join(known)})")
        if "trace" in outputs:
            parameters["return_trace"] = True
    return ParsedRequest(items, parameters, request_id=request.id, outputs=outputs)
