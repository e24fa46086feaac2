"""KFP components ``fingerprint`` (what the data steps read, by content) and ``prepare`` (``moon3 data prepare``)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def fingerprint(params: str, overrides: list, dataset_uri: str = "") -> str:
    """A content fingerprint of the catalog ``params.data`` names (or of ``dataset_uri``): never cached, and an
    input of ``prepare``/``validate``, so their cache keys on the catalog's content, not on its URI.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset_uri: an imported moon3-format dataset folder ('' = the catalog of ``data.source``).

    Returns:
        ``kind:digest`` (object names, sizes and content hashes; no downloads).
    """
    from moon3.pipelines.steps import fingerprint_step

    found = fingerprint_step(params, overrides, dataset_uri)
    print(found)
    return found


@dsl.component(base_image=default_image(), install_kfp_package=False)
def prepare(
    params: str, overrides: list, dataset: Output[Dataset], stats: Output[Metrics], source_fingerprint: str = ""
):
    """Build the dataset as ``params.data`` says (``products.parquet``, ``queries.parquet``, ``images/``).

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the dataset folder.
        stats: row counts per split and query type, category count, bytes on disk.
        source_fingerprint: the ``fingerprint`` step's output (only keys the cache).
    """
    from moon3.pipelines.steps import prepare_step

    for name, value in prepare_step(params, overrides, dataset.path).items():
        stats.log_metric(name, value)
    dataset.metadata["format"] = "moon3-mbe3"
    dataset.metadata["source_fingerprint"] = source_fingerprint
