"""KFP component ``prepare``: make mbe3-mini or import a public dataset (``moon3 data prepare``)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def prepare(params: dict, overrides: list, dataset: Output[Dataset], stats: Output[Metrics]):
    """Build the dataset as ``params.data`` says (``products.parquet``, ``queries.parquet``, ``images/``).

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the dataset folder.
        stats: row counts per split and query type, category count, bytes on disk.
    """
    from moon3.pipelines.steps import prepare_step

    for name, value in prepare_step(params, overrides, dataset.path).items():
        stats.log_metric(name, value)
    dataset.metadata["format"] = "moon3-mbe3"
