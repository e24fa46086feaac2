"""Stage B, RL fine-tuning (method.md section 4): TRL's ``GRPOTrainer`` driving the moon3 embedder.

What TRL does, unchanged: the repeat sampler (G traces per query), generation with the policy, group-normalised
advantages, the clipped GRPO policy loss, the KL to the frozen reference, gradient accumulation, optimizer and
scheduler steps, Accelerate/DeepSpeed, PEFT (LoRA), checkpoints and resume, and the per-reward logging.

What moon3 adds (this subclass):

- **The policy is the backbone with the moon3 heads attached.** FIRE's hooks sit on the backbone, so generation
  and TRL's log-probabilities see exactly the model that embeds. The fusion head, FIRE and the projection are
  registered as ``backbone.moon3_heads`` so TRL's optimizer, DeepSpeed and the checkpoints carry them too.
- **The reference model gets FIRE as well.** TRL rebuilds the reference from the backbone folder, which holds no
  moon3 heads; a frozen copy of the starting FIRE is attached to it, so the KL is measured against the model RL
  started from, not against the backbone without FIRE.
- **The prompt is the embedding contract's.** The processor's chat template renders the contract's prompt with
  ``<think>`` opened (:data:`RL_CHAT_TEMPLATE`); every batch TRL tokenizes is compared with
  :meth:`Moon3Embedder.prepare_batch` and any difference is an error, so RL trains the policy that serving runs.
- **Rewards** (:mod:`moon3.rl.rewards`): ``r_rank`` embeds each query after its sampled trace and ranks its
  positive among the step's products (positives plus ``rl.hard_negatives_per_query`` hard negatives each, every
  product embedded after its own greedy trace, as in evaluation); ``r_format``; ``r_len``.
- **InfoNCE anchor**: ``rl.infonce_weight`` times InfoNCE between the post-trace query embeddings (with
  gradient) and the step's products, added to TRL's loss, so the embedding space does not drift while the
  traces change.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from trl import GRPOTrainer

from moon3.model import contract as C
from moon3.model.contract import ContractError
from moon3.model.fire import FIRE
from moon3.rl.finetune import COMPLETE_MARKER, is_timing
from moon3.rl.grpo_config import RLConfig
from moon3.rl.rewards import format_reward, grounded_format_reward, length_reward, rank_reward
from moon3.synthesis.teacher import QUERY, SynthesisItem, catalog_truth
from moon3.train.data import PairData
from moon3.train.loss import contrastive_loss

HEADS_ATTR = "moon3_heads"
HEADS_CHECKPOINT_FILE = "moon3_heads.safetensors"

# The contract's prompt as a chat template: the same string `prompt_segments` builds, with `<think>` opened.
RL_CHAT_TEMPLATE = C.CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n" + C.THINK_START + "{% endif %}",
)


def conversation(text: str | None, has_image: bool, contract: C.EmbeddingContract) -> list[dict[str, Any]]:
    """The chat messages TRL renders into the contract's prompt (the image itself goes in the ``image`` column)."""
    content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": f"{text or ''}\n{contract.instruction}"})
    return [
        {"role": "system", "content": [{"type": "text", "text": contract.system_prompt}]},
        {"role": "user", "content": content},
    ]


def attach_heads(embedder: nn.Module) -> None:
    """Register the moon3 heads under the backbone, so whoever optimises or saves the backbone has them too."""
    heads = {name: getattr(embedder, name) for name in ("fusion", "fire", "proj") if getattr(embedder, name)}
    setattr(embedder.backbone, HEADS_ATTR, nn.ModuleDict(heads))


def detach_heads(embedder: nn.Module) -> None:
    """Undo :func:`attach_heads` (the saved backbone folder stays a plain HF model)."""
    if hasattr(embedder.backbone, HEADS_ATTR):
        delattr(embedder.backbone, HEADS_ATTR)


class Moon3GRPOTrainer(GRPOTrainer):
    """GRPO over the moon3 embedder's traces (see the module docstring).

    Args:
        embedder: the starting :class:`~moon3.model.embedder.Moon3Embedder` (the policy; updated in place).
        data: the training pairs (queries, their positives, hard-negative pools, relevance of category queries).
        rl: the ``rl`` config section.
        **kwargs: passed to :class:`trl.GRPOTrainer` (``args``, ``train_dataset``, ``optimizers``, ``callbacks``,
            ``peft_config``).
    """

    def __init__(self, embedder: nn.Module, data: PairData, rl: RLConfig, **kwargs: Any):
        self.embedder = embedder
        self.data = data
        self.rl = rl
        self.end_id = embedder.token_ids[C.THINK_END]
        # Set by the step's rank reward, read by the InfoNCE anchor of its micro-batches (one generation per step).
        self._step_products: list[int] = []  # product rows every query of the step is ranked against
        self._product_traces: list[list[int]] | None = None  # their greedy trace ids (None: reasoning off)
        self._truths: dict[int, SynthesisItem] = {}  # query row -> its positive's catalog truth (grounded r_format)
        processor = embedder.processor
        processor.chat_template = RL_CHAT_TEMPLATE
        processor.tokenizer.chat_template = RL_CHAT_TEMPLATE
        backbone = embedder.backbone
        backbone.generation_config.eos_token_id = self.end_id
        attach_heads(embedder)
        # The embedder follows TRL's train/eval switches of the backbone (generate_traces restores the mode it
        # found, so both must agree).
        embedder.train()
        self._seconds: dict[str, float] = defaultdict(float)
        self._timed_steps = 0
        super().__init__(
            model=backbone,
            reward_funcs=[self.r_rank, self.r_format, self.r_len],
            processing_class=processor,
            **kwargs,
        )
        if self.ref_model is not None and embedder.fire is not None:
            self._attach_reference_fire(embedder.fire)
        if kwargs.get("peft_config") is not None:
            # PEFT freezes everything but the adapters; the moon3 heads are new weights and keep training.
            for p in getattr(backbone, HEADS_ATTR).parameters():
                p.requires_grad_(True)

    def _attach_reference_fire(self, fire: FIRE) -> None:
        ref = self.accelerator.unwrap_model(self.ref_model)
        ref_fire = FIRE.for_backbone(ref, self.embedder.cfg.fire_every, self.embedder.cfg.fire_vision_layer)
        ref_fire.load_state_dict(copy.deepcopy(fire.state_dict()))
        ref_fire.to(next(ref.parameters()).device).requires_grad_(False).eval()
        ref_fire.attach(ref)
        self._ref_fire = ref_fire  # keeps the module (and its hooks) alive with the trainer

    # --- optimizer ---------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """AdamW with the backbone at ``rl.lr`` and the moon3 heads at ``rl.lr_heads``; 1-D weights (biases,
        norms, FIRE's gates) without weight decay."""
        if self.optimizer is None:
            heads = {id(p) for p in getattr(self.embedder.backbone, HEADS_ATTR).parameters()}
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = []
            for is_head, lr in ((False, self.rl.lr), (True, self.rl.lr_heads)):
                for decay in (True, False):
                    chosen = [p for p in params if (id(p) in heads) == is_head and (p.ndim >= 2) == decay]
                    if chosen:
                        groups.append({"params": chosen, "lr": lr, "weight_decay": self.rl.weight_decay * decay})
            self.optimizer = torch.optim.AdamW(
                groups, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        return self.optimizer

    # --- checkpoints ------------------------------------------------------------------------------------------

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No TRL model card: it describes a text-generation model fine-tuned from ``None`` (wrong for an embedder),
        and its tags come from a set, so two identical runs wrote different READMEs into a DVC output."""
        return None

    def _save_checkpoint(self, model, trial):
        # TRL's checkpoint, then the moon3 heads (a LoRA checkpoint holds only the adapters), then the marker.
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        # The checkpoints are part of a DVC output, which a repeated run reproduces: no wall-clock numbers in them.
        state_file = folder / "trainer_state.json"
        if state_file.exists():
            saved = json.loads(state_file.read_text())
            saved["log_history"] = [{k: v for k, v in row.items() if not is_timing(k)} for row in saved["log_history"]]
            state_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        heads = getattr(self.accelerator.unwrap_model(self.embedder.backbone), HEADS_ATTR, None)
        heads = heads if heads is not None else nn.ModuleDict()
        state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
        save_file(state, str(folder / HEADS_CHECKPOINT_FILE))
        (folder / COMPLETE_MARKER).write_text(json.dumps({"step": self.state.global_step}) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5 saves Qwen-VL weights under the original checkpoint key names (``visual.*``,
        # ``model.layers.*``) but its Trainer restores them without mapping the names back: every backbone weight
        # is reported missing and silently keeps its starting value (measured with transformers 5.23, TRL 1.16).
        # Loading the checkpoint folder with ``from_pretrained`` applies the mapping; the heads come from their file.
        hf_folder = Path(resume_from_checkpoint, "config.json").exists()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not hf_folder:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            from moon3.model.backbone import quiet_hf

            base = self.accelerator.unwrap_model(model if model is not None else self.model)
            with quiet_hf():
                fresh = type(base).from_pretrained(resume_from_checkpoint, dtype=next(base.parameters()).dtype)
            missing, unexpected = base.load_state_dict(fresh.state_dict(), strict=False)
            missing = [k for k in missing if not k.startswith(HEADS_ATTR + ".")]
            if missing or unexpected:
                raise RuntimeError(f"{resume_from_checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        heads = getattr(self.accelerator.unwrap_model(self.embedder.backbone), HEADS_ATTR)
        heads.load_state_dict(load_file(str(Path(resume_from_checkpoint) / HEADS_CHECKPOINT_FILE)))

    # --- timing (bench/bench_rl.py reads it) ------------------------------------------------------------------

    def _generate(self, prompts: list):
        started = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self._seconds["generation"] += time.perf_counter() - started

    def training_step(self, model, inputs, num_items_in_batch):
        started = time.perf_counter()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._seconds["step"] += time.perf_counter() - started
            self._timed_steps += 1

    def timing_summary(self) -> dict[str, float]:
        """Mean seconds per GRPO step: ``generation`` (sampling the traces), ``reward`` (embedding and ranking),
        ``scoring`` (old/reference log-probabilities), ``update`` (loss, backward, optimizer) and ``step``."""
        n = max(1, self._timed_steps)
        s = self._seconds
        scoring = s["generate_and_score"] - s["generation"] - s["reward"]
        update = s["step"] - s["generate_and_score"]
        parts = {"generation": s["generation"], "reward": s["reward"], "scoring": scoring, "update": update,
                 "step": s["step"]}  # fmt: skip
        return {k: v / n for k, v in parts.items()} | {"steps_timed": self._timed_steps}

    # --- prompts ---------------------------------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        items = [_item_of(p) for p in prompts]
        ours = self.embedder.prepare_batch(items, open_trace=True)
        mask = ours["attention_mask"].bool()
        for i, ids in enumerate(prompt_ids):
            expected = ours["input_ids"][i][mask[i]].tolist()
            if list(ids) != expected:
                raise ContractError(
                    f"RL prompt {i} differs from the embedding contract's ({len(ids)} vs {len(expected)} tokens): "
                    f"TRL rendered {self._tokenizer.decode(ids)[-200:]!r}"
                )
        return prompt_ids, images, fields

    # --- rewards ---------------------------------------------------------------------------------------------

    def _products_for(self, query_rows: list[int]) -> list[int]:
        """The step's products: each distinct query's positive, then its hard negatives (one copy of each)."""
        rng = np.random.default_rng([self.rl.seed, int(self.state.global_step), 17])
        positives = list(dict.fromkeys(int(self.data.positive_rows[q]) for q in query_rows))
        taken = set(positives)
        negatives = [n for q in query_rows for n in self.data.pick_hard_negatives(
            q, rng, self.rl.hard_negative_mode, self.rl.hard_negatives_per_query, taken)]  # fmt: skip
        return positives + negatives

    def _embed(self, items: list[dict[str, Any]], traces: list | None) -> torch.Tensor:
        """Embeddings of items after the given traces (inputs, not targets: no trace loss)."""
        batch = self.embedder.prepare_batch(items, traces)
        batch["labels"] = None
        return self.embedder(batch).embeddings

    def _product_items(self, product_rows: list[int]) -> list[dict[str, Any]]:
        from moon3.model.items import product_item

        return [product_item(self.data.products.iloc[p], self.data.root) for p in product_rows]

    @torch.no_grad()
    def _product_embeddings(self, product_rows: list[int]) -> torch.Tensor:
        """Each product embedded after its own greedy trace (the evaluation's form); traces kept for the anchor."""
        items = self._product_items(product_rows)
        traces = self.embedder.generate_traces(items, return_ids=True) if self.embedder.contract.reasoning else None
        self._product_traces = traces
        return self._embed(items, traces)

    def _query_embeddings(self, query_rows: list[int], completion_ids: list[list[int]]) -> torch.Tensor:
        from moon3.model.items import query_item

        items = [query_item(self.data.queries.iloc[q], self.data.root) for q in query_rows]
        return self._embed(items, [list(c) for c in completion_ids])

    def _relevant(self, query_rows: list[int], product_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positives, relevant)``: each query's positive column, and (Q, N) True where another product also
        answers it (every product under a category query's category): never counted as its competitor."""
        position = {p: j for j, p in enumerate(product_rows)}
        positives = torch.tensor([position[int(self.data.positive_rows[q])] for q in query_rows])
        relevant = torch.as_tensor(self.data.relevant(np.array(query_rows), np.array(product_rows)))
        return positives, relevant & ~torch.nn.functional.one_hot(positives, len(product_rows)).bool()

    def r_rank(self, prompts, completions, completion_ids, query_row, **_: Any) -> list[float]:
        """``1 - log(rank)/log(N)`` of each query's positive among the step's N products, after its trace."""
        started = time.perf_counter()
        try:
            return self._rank_rewards(completion_ids, query_row)
        finally:
            self._seconds["reward"] += time.perf_counter() - started

    def _rank_rewards(self, completion_ids, query_row) -> list[float]:
        rows = [int(q) for q in query_row]
        self._step_products = self._products_for(list(dict.fromkeys(rows)))
        with torch.no_grad():
            products = self._product_embeddings(self._step_products)
            queries = self._query_embeddings(rows, completion_ids)
        positives, relevant = self._relevant(rows, self._step_products)
        scores = (queries @ products.T).masked_fill(relevant.to(queries.device), float("-inf"))
        return rank_reward(scores.float().cpu(), positives).tolist()

    def r_format(self, prompts, completions, completion_ids, query_row, **_: Any) -> list[float]:
        """``rl.format_reward``: grounded (true claims about the query's positive) or syntax (closed ``key: value``
        lines); see :mod:`moon3.rl.rewards`."""
        bodies = [_completion_text(c) for c in completions]
        if self.rl.format_reward == "syntax":
            return format_reward(bodies, completion_ids, self.end_id)
        truths = [self._query_truth(int(q)) for q in query_row]
        return grounded_format_reward(bodies, completion_ids, self.end_id, truths)

    def _query_truth(self, row: int) -> SynthesisItem:
        """What the catalog knows of query ``row``'s positive, as the synthesis grounding filter checks it: its
        category path and attributes; a category query keeps the category only (its positives share no more)."""
        if row not in self._truths:
            query = self.data.queries.iloc[row]
            product = self.data.products.iloc[int(self.data.positive_rows[row])]
            path, attrs = catalog_truth(product["category_path"], product["attributes"])
            if query.get("query_type") == "category":
                attrs = ()
            self._truths[row] = SynthesisItem(str(query["query_id"]), QUERY, None, None, "", path, attrs)
        return self._truths[row]

    def r_len(self, prompts, completions, completion_ids, **_: Any) -> list[float]:
        """1 inside the contract's trace budget, falling linearly to 0 at twice it."""
        budget = self.embedder.contract.max_trace_tokens
        # Closure as the evaluation counts it: closed by the model within the budget (logged as closure_rate).
        closed = [bool(c) and int(c[-1]) == self.end_id and len(c) - 1 <= budget for c in completion_ids]
        self._metrics["train" if self.model.training else "eval"]["closure_rate"].append(sum(closed) / len(closed))
        return length_reward(completion_ids, self.end_id, budget)

    # --- loss ------------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        started = time.perf_counter()
        if all(x.get("image") is None for x in inputs):
            # TRL 1.16 treats a batch whose image column holds only None as multimodal and then looks for
            # pixel values that do not exist (KeyError 'pixel_values'): a batch without images has no image column.
            inputs = [{k: v for k, v in x.items() if k != "image"} for x in inputs]
        output = super()._generate_and_score_completions(inputs)
        self._seconds["generate_and_score"] += time.perf_counter() - started
        # Travels with the completions through TRL's shuffle and split, for the InfoNCE anchor.
        output["moon3_query_row"] = torch.tensor([int(x["query_row"]) for x in inputs], device=self.accelerator.device)
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.rl.infonce_weight > 0:
            anchor = self._infonce(inputs)
            self._metrics["train"]["infonce"].append(float(anchor.detach()))
            loss = loss + self.rl.infonce_weight * anchor
        return loss

    def _infonce(self, inputs: dict[str, Any]) -> torch.Tensor:
        """InfoNCE between the micro-batch's post-trace queries and the step's products (both with gradient;
        each product after the greedy trace the reward embedded it with)."""
        rows = inputs["moon3_query_row"].tolist()
        mask = inputs["completion_mask"].bool()
        completions = [ids[m].tolist() for ids, m in zip(inputs["completion_ids"], mask, strict=True)]
        products = self._embed(self._product_items(self._step_products), self._product_traces)
        queries = self._query_embeddings(rows, completions)
        positives, relevant = self._relevant(rows, self._step_products)
        device = queries.device
        ids = torch.arange(len(self._step_products), device=device)
        tau = torch.tensor(self.rl.infonce_temperature, device=device)
        return contrastive_loss(queries, products, positives.to(device), ids, tau, relevant.to(device))


def _item_of(prompt: list[dict[str, Any]]) -> dict[str, Any]:
    """The embedder item a rendered RL prompt came from: its image and its text without the instruction."""
    image, text = None, None
    for message in prompt:
        if message["role"] != "user":
            continue
        for part in message["content"]:
            if part.get("type") == "image":
                image = part.get("image")
            elif part.get("type") == "text":
                text = part["text"].rsplit("\n", 1)[0]
    return {"image": image, "text": text or None}


def _completion_text(completion: Any) -> str:
    """A TRL completion (text, or conversational ``[{"role": "assistant", "content": ...}]``) as plain text."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)
