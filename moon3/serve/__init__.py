"""moon3.serve: serving with KServe and deployment.

- ``moon3 serve`` (:mod:`moon3.serve.server`): a KServe ModelServer with two models over one loaded embedder,
  ``moon3`` (embeddings, v1 and v2) and ``moon3-search`` (top-k products from a FAISS index), dynamic batching
  (:mod:`~moon3.serve.batching`), input limits with 400s that say what is wrong (:mod:`~moon3.serve.inputs`),
  liveness/readiness, Prometheus metrics (:mod:`~moon3.serve.metrics`) and a demo page (:mod:`~moon3.serve.demo`);
- ``moon3 index build`` (:mod:`moon3.serve.index`): the search index, tied to its model's contract and weights;
- ``moon3 deploy`` (:mod:`moon3.serve.manifests`, :mod:`moon3.serve.deploy`): KServe manifests rendered from
  ``params.yaml`` with KServe's Python models, applied with the Kubernetes API (also the ``deploy`` KFP component).

Modules that need KServe import it through :mod:`moon3.serve.kserve_compat` (KServe parses ``sys.argv`` at
import); importing this package itself does not import KServe.
"""
