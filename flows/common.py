"""What every flow entry point shares: config overrides from flat parameters and the command line."""

import argparse

from alignment_core.config import PipelineConfig, load_config


def with_overrides(config: PipelineConfig, iterations: int | None = None, run_name: str | None = None,
                   store_root: str | None = None) -> PipelineConfig:
    """Flat flow parameters win over the config object (what users change most, without resending it)."""
    update = {}
    if iterations is not None:
        update["iterations"] = iterations
    if run_name is not None or store_root is not None:
        update["store"] = config.store.model_copy(update={
            k: v for k, v in (("run_name", run_name), ("root", store_root)) if v is not None})
    return PipelineConfig.model_validate({**config.model_dump(), **{
        k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in update.items()}})


def parse_cli(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (see configs/)")
    parser.add_argument("--store-root", help="where artifacts go: a folder or s3://bucket/prefix")
    parser.add_argument("--run-name", help="run folder under the store root")
    parser.add_argument("--iterations", type=int, help="online iterations to run")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set training.beta=0.2 (YAML value)")
    return parser.parse_args()


def config_from_cli(args: argparse.Namespace) -> PipelineConfig:
    import yaml

    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    config = load_config(args.config, overrides)
    return with_overrides(config, args.iterations, args.run_name, args.store_root)
