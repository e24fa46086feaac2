"""The ``hf`` teacher: a local Qwen-VL-family model (a plain Hugging Face image-text-to-text folder) writes traces.

Point ``synthesis.hf_model`` at a folder (or ``gs://`` prefix) such as a Qwen2.5-VL-7B-Instruct download; it is
loaded with :func:`moon3.model.backbone.load_backbone`, the same loader the embedding model uses. Like the
``openai`` teacher it sees only what the embedding model will see, the image and the text, never the catalog's
attribute data, and it gets the same system prompt and the same trace instruction.

Batching: ``run_teacher`` calls :meth:`HFTeacher.complete` once per item, ``synthesis.concurrency`` at a time.
Each call queues its item and waits; one worker task takes up to ``batch_size`` waiting items (or what has
arrived after ``max_wait_s``), renders them with the chat template, left-pads them and runs one
``model.generate`` in a worker thread (``asyncio.to_thread``), so the event loop keeps serving the other calls.
Every call gets its own answer; a failing image fails only its own item. Batches fill only when
``synthesis.concurrency >= synthesis.hf_batch_size`` (twice is better: the next batch queues while one runs),
and a call's ``timeout_s`` covers its wait in the queue, the model's first load and the batch's ``generate``.

Decoding: greedy when ``temperature`` is 0, else sampling at that temperature (plain: no top-k, top-p or
repetition penalty, whatever the folder's ``generation_config.json`` suggests, so the ``decoding`` dict of the
cache key describes the decoding completely); ``seed`` seeds each sampled batch (reproducible for the same
batch composition only). Only the new tokens are decoded, special tokens skipped, ``<think>`` markers
stripped; an empty answer is a non-retryable failure.

Images are resized to a square side, as the embedder does: ``image_size`` if given, else the folder's
``moon3_config.json`` contract (a moon3 model's ``backbone/`` folder, or the moon3 folder itself), else 448 px.
``trust_remote_code`` comes only from the config (``synthesis.hf_trust_remote_code``), never from the folder.
The weights load at the first batch (a fully cached re-run never loads them); the processor loads when the
prompt hash is first asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from moon3.synthesis.openai_teacher import SYSTEM_PROMPT, strip_think
from moon3.synthesis.teacher import TRACE_INSTRUCTION, SynthesisItem, TeacherError, prompt_hash_of

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 448
# The user turn after the image: the item's text (when it has one), then the trace instruction.
USER_TEMPLATE = "{label}: {text}\n\n{instruction}"
LABELS = {"product": "Product title", "query": "Query"}


def model_label(path_or_uri: str) -> str:
    """The name a model folder is recorded under: a local folder's basename, or a URI without credentials,
    query string and fragment (``gs://bucket/models/qwen``)."""
    text = str(path_or_uri).strip()
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{parts.path}".rstrip("/")
    path = Path(text)
    return path.name or path.resolve().name


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given (``cuda:1``, ``cpu``)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _contract_image_size(folder: Path) -> int | None:
    """``contract.image_size`` of the ``moon3_config.json`` in ``folder`` or, for a moon3 ``backbone/``, its parent."""
    from moon3.model.contract import CONTRACT_FILE

    candidates = [folder / CONTRACT_FILE] + ([folder.parent / CONTRACT_FILE] if folder.name == "backbone" else [])
    for candidate in candidates:
        if candidate.exists():
            try:
                return int(json.loads(candidate.read_text())["contract"]["image_size"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s: no readable contract.image_size; using the default", candidate)
    return None


class _Request:
    """One queued ``complete`` call: its item and the future its caller awaits."""

    __slots__ = ("future", "item")

    def __init__(self, item: SynthesisItem, future: asyncio.Future):
        self.item = item
        self.future = future


class HFTeacher:
    """Trace teacher over a local Hugging Face image-text-to-text model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

    Args:
        model_path: local folder or ``gs://`` prefix of the model (a moon3 model folder works too: its
            ``backbone/`` is used).
        batch_size: most items per ``generate`` call.
        device: ``auto`` (``cuda`` if available, else ``cpu``), ``cpu``, ``cuda``, ``cuda:1``, ...
        temperature: 0 for greedy decoding; above 0, sampling at this temperature.
        max_new_tokens: answer length limit in the model's tokens.
        seed: seed of each sampled batch (None: unseeded).
        trust_remote_code: allow model code from the folder (the caller's setting; the folder cannot ask for it).
        image_size: square side images are resized to (None: the folder's ``moon3_config.json``, else 448).
        max_wait_s: how long a batch waits for more items once its first one arrived.

    Attributes:
        backbone: the loaded model (None until the first batch).
        processor: the loaded processor (None until the prompt hash or the first batch needs it).
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        batch_size: int = 8,
        device: str = "auto",
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
        trust_remote_code: bool = False,
        image_size: int | None = None,
        max_wait_s: float = 0.05,
    ):
        if not model_path:
            raise ValueError("HFTeacher: model_path is empty")
        if batch_size < 1:
            raise ValueError(f"HFTeacher: batch_size must be >= 1, got {batch_size}")
        if temperature < 0:
            raise ValueError(f"HFTeacher: temperature must be >= 0, got {temperature}")
        self.model_path = str(model_path)
        self.model = model_label(self.model_path)
        self.batch_size = batch_size
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.max_wait_s = max_wait_s
        self.decoding: dict[str, Any] = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
        self.backbone: Any = None
        self.processor: Any = None
        self._image_size = image_size
        self._folder: Path | None = None
        self._template: str | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None

    # --- loading -------------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        """Fetch the folder, load the processor, settle the chat template and the image side (once)."""
        with self._lock:
            if self._template is not None:
                return
            from moon3.model.backbone import fetch_dir, load_processor, resolve_model_dir

            local = fetch_dir(self.model_path)
            if not (local / "config.json").exists() and (local / "backbone" / "config.json").exists():
                local = local / "backbone"  # a moon3 model folder: its backbone is the HF model
            local = resolve_model_dir(local)
            try:
                processor = load_processor(local)
            except (OSError, ValueError):
                # No processor files: load_backbone builds one from the tokenizer and the model config.
                self._load_locked(local)
                processor = self.processor
            processor.tokenizer.padding_side = "left"
            own = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
            if not isinstance(own, str):
                from moon3.model.contract import CHAT_TEMPLATE

                own = CHAT_TEMPLATE
            if self._image_size is None:
                self._image_size = _contract_image_size(local) or DEFAULT_IMAGE_SIZE
            self._folder, self._template, self.processor = local, own, processor

    def _load_locked(self, local: Path) -> None:
        from moon3.model.backbone import load_backbone

        model, processor = load_backbone(local, trust_remote_code=self.trust_remote_code)
        self.backbone = model.to(resolve_device(self.device))
        if self.processor is None:
            self.processor = processor

    def load(self) -> tuple[Any, Any]:
        """Load the processor and the model now (the first batch does it otherwise).

        Returns:
            ``(model, processor)``, the model on its device in eval mode.
        """
        self._resolve()
        with self._lock:
            if self.backbone is None:
                self._load_locked(self._folder)
        return self.backbone, self.processor

    @property
    def image_size(self) -> int:
        """The square side images are resized to (resolves the folder if not done yet)."""
        self._resolve()
        return self._image_size

    def prompt_hash(self) -> str:
        """Hash of the system prompt, the user turn's template, the trace instruction, the chat template and the
        image side (loads the processor: the chat template is the folder's)."""
        self._resolve()
        return prompt_hash_of(
            SYSTEM_PROMPT, USER_TEMPLATE, TRACE_INSTRUCTION, self._template, f"image={self._image_size}"
        )

    # --- prompts and generation ---------------------------------------------------------------------------

    def messages(self, item: SynthesisItem, has_image: bool) -> list[dict[str, Any]]:
        """The chat for ``item``: system prompt; user turn with the image (if any), the text, the instruction."""
        instruction = TRACE_INSTRUCTION.format(kind=item.kind)
        if item.text:
            label = LABELS.get(item.kind, item.kind.capitalize())
            text = USER_TEMPLATE.format(label=label, text=item.text, instruction=instruction)
        else:
            text = instruction
        content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": text})
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content},
        ]

    def prompt(self, item: SynthesisItem, has_image: bool) -> str:
        """The rendered prompt for ``item``, ending with the assistant turn's opening."""
        self._resolve()
        return self.processor.apply_chat_template(
            self.messages(item, has_image), chat_template=self._template, tokenize=False, add_generation_prompt=True
        )

    def _image(self, item: SynthesisItem):
        from PIL import Image

        from moon3.data.io import load_image

        side = self._image_size
        return load_image(item.image, item.root).convert("RGB").resize((side, side), Image.BICUBIC)

    def _generation_config(self):
        from transformers import GenerationConfig

        tokenizer = self.processor.tokenizer
        default = self.backbone.generation_config
        eos = default.eos_token_id if default.eos_token_id is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = default.pad_token_id if default.pad_token_id is not None else eos
            pad = pad[0] if isinstance(pad, list) else pad
        temperature = self.decoding["temperature"]
        # Every sampling knob is set: None values would be filled from the folder's generation_config.json.
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        return GenerationConfig(
            max_new_tokens=self.decoding["max_new_tokens"],
            repetition_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
        )

    def generate(self, items: list[SynthesisItem]) -> list[str | TeacherError]:
        """Answer ``items`` with one left-padded ``generate`` call (blocking; the batcher runs it in a thread).

        Returns:
            Per item, the answer (``strip_think``-ed, possibly empty) or the :class:`TeacherError` of its image.
        """
        import torch

        self.load()
        results: list[str | TeacherError | None] = [None] * len(items)
        prompts, images, rows = [], [], []
        for i, item in enumerate(items):
            image = None
            if item.image:
                try:
                    image = self._image(item)
                except Exception as exc:  # one unreadable image fails its item, not the batch
                    results[i] = TeacherError(f"image {item.image!r}: {type(exc).__name__}: {exc}"[:300])
                    continue
                images.append(image)
            prompts.append(self.prompt(item, image is not None))
            rows.append(i)
        if rows:
            enc = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
            enc = enc.to(self.backbone.device)
            seed = self.decoding["seed"]
            sampled = self.decoding["temperature"] > 0 and seed is not None
            devices = [self.backbone.device] if self.backbone.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=sampled), torch.inference_mode():
                if sampled:
                    # The batch's own seed: the same seed and the same batch give the same answers.
                    batch_key = "\x1f".join([str(seed), *(items[i].content_hash() for i in rows)])
                    torch.manual_seed(int(hashlib.sha256(batch_key.encode()).hexdigest()[:15], 16))
                out = self.backbone.generate(**enc, generation_config=self._generation_config())
            new = out[:, enc["input_ids"].shape[1] :].cpu()
            texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                results[i] = strip_think(text)
        return results  # type: ignore[return-value]

    # --- the micro-batcher ---------------------------------------------------------------------------------

    async def complete(self, item: SynthesisItem) -> str:
        """The trace body for ``item``, answered in a batch with the other calls waiting at the same time.

        Raises:
            TeacherError: empty answer or unreadable image (not retryable); a failed ``generate`` (not retryable).
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work(self._queue), name="hf-teacher-batcher")
        future = loop.create_future()
        self._queue.put_nowait(_Request(item, future))
        text = await future
        if not text:
            raise TeacherError("empty answer", retryable=False)
        return text

    async def _next_batch(self, queue: asyncio.Queue[_Request]) -> list[_Request]:
        """Up to ``batch_size`` live requests: the first one waited for, the rest for at most ``max_wait_s``."""
        loop = asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.max_wait_s
        try:
            while len(batch) < self.batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
        except asyncio.CancelledError:
            _fail(batch, TeacherError("hf teacher closed", retryable=True))
            raise
        return [r for r in batch if not r.future.done()]  # a caller that timed out has cancelled its future

    async def _work(self, queue: asyncio.Queue[_Request]) -> None:
        while True:
            batch = await self._next_batch(queue)
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.generate, [r.item for r in batch])
            except asyncio.CancelledError:
                _fail(batch, TeacherError("hf teacher closed", retryable=True))
                raise
            except Exception as exc:  # a failed load or generate fails the batch's calls, not the batcher
                message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
                log.warning("hf teacher: batch of %d failed: %s", len(batch), message)
                results = [TeacherError(message, retryable=False)] * len(batch)
            for r, result in zip(batch, results, strict=True):
                if r.future.done():
                    continue
                if isinstance(result, TeacherError):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)

    async def aclose(self) -> None:
        """Stop the batcher (the model stays loaded; the next call starts a new batcher, on any event loop)."""
        worker, queue = self._worker, self._queue
        self._worker = self._queue = self._loop = None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()], TeacherError("hf teacher closed", retryable=True))


def _fail(requests: list[_Request], error: TeacherError) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(error)
