"""moon3.validation: the data gate every pipeline run starts with (issue 3).

``moon3.validation.gate.validate(cfg, in_dir, out_dir, quarantine_dir, report_dir)`` returns a
``ValidationResult`` (passed, metrics, failures, paths) and never raises on bad data. Modules: ``config``
(``params.yaml`` section ``validation``), ``images`` (per-path image checks), ``checks`` (vectorised check
frames and the rules), ``suites`` (the Great Expectations 1.x run; the only module that imports GX),
``report`` (HTML/JSON; its blocks also render the synthesis report), ``gate`` (the flow, quarantine and
outputs; traces that arrive with the dataset are carried through, see :mod:`moon3.validation.gate`).
"""
