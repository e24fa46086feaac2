"""MBE3.0-style zero-shot evaluation (method.md section 6).

Modules: ``data`` (the eval split), ``tasks`` (retrieval and zero-shot classification over product views),
``search`` (exact search, ranks with ties), ``metrics``, ``references`` (chance, majority and non-learned
reference embedders), ``compare`` (paired bootstrap deltas), ``variants`` (saved models as embedders),
``qualitative``, ``provenance``, ``report`` / ``tables`` / ``render`` / ``plots`` (outputs) and ``evaluate``
(the stage).
"""
