"""IRGL end to end: stage 1 (all six modes), stage 2 (the two full modes) from stage 1's EMA weights,
then the stage-2 model registered in MLflow.

    ray job submit --working-dir . -- python jobs/irgl.py --config jobs/configs/tiny.yaml

Submitting again with the same --name resumes: finished stages return at once, a stage that was cut
off continues from its latest checkpoint, and the MLflow runs continue.
"""

import argparse
import json
import logging
import sys

from irg.train import INPUT_ERRORS, load_config
from irg.train.config import name_override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. jobs/configs/tiny.yaml")
    parser.add_argument("--name", help="job name (default: run.name from the config); reuse it to resume")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of both stages, e.g. --set data.root=s3://bucket/irgl")
    parser.add_argument("--no-register", action="store_true", help="do not register the final model")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # a bad name or setting is one line before Ray is even imported
        overrides = args.overrides + ([name_override(args.name)] if args.name else [])
        configs = {stage: load_config(args.config, stage, overrides) for stage in (1, 2)}
        from irg.train.trainer import run_irgl  # Ray starts (or connects) when it runs, after its own checks

        results, version = run_irgl(configs, job_name=configs[1].run.name, register=not args.no_register)
    except INPUT_ERRORS as e:
        print(f"irgl: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({
        "stages": {s: {"mlflow_run_id": r.run_id, "model_uri": r.model_uri, "metrics": r.metrics}
                   for s, r in results.items()},
        "registered": None if version is None else {"name": version.name, "version": version.version,
                                                    "uri": f"models:/{version.name}/{version.version}"},
    }, indent=2))


if __name__ == "__main__":
    main()
