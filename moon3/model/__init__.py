"""moon3.model: the reasoning-aware multimodal embedder (method.md sections 1-3).

- ``contract``: prompt template, special tokens, trace budget, readout, normalisation (versioned).
- ``backbone``: tiny Qwen-VL-family backbones built from ``tiny/*.json``; loading real ones (path or gs://).
- ``fusion``: multi-head modality fusion head.  ``fire``: FIRE residual injection via forward hooks.
- ``embedder``: ``Moon3Embedder`` (prepare_batch / forward / embed / generate_traces / save / load).
- ``items``: dataset rows -> model items.  ``embed``: whole tables -> embeddings files.
- ``presets``: backbone-size defaults (``model.preset``: tiny / real).  ``plan``: ``moon3 model plan``
  (parameters, memory per GPU, image tokens, FLOPs from a config on the meta device); ``real/``: the
  Qwen2.5-VL-3B and -7B configs.

Nothing heavy is imported here: ``moon3.config`` imports ``moon3.model.config`` without pulling in torch.
"""
