"""One IRGL stage on Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python jobs/train.py --stage 1 --config jobs/configs/tiny.yaml
"""

import argparse
import json
import logging
import sys

from irg.train import INPUT_ERRORS, load_config
from irg.train.config import name_override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--config", required=True, help="YAML file, e.g. jobs/configs/tiny.yaml")
    parser.add_argument("--name", help="run name (default: run.name from the config); reuse it to resume")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set scaling.num_workers=16 (repeatable)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # a bad name or setting is one line before Ray is even imported
        overrides = args.overrides + ([name_override(args.name)] if args.name else [])
        config = load_config(args.config, args.stage, overrides)
        from irg.train.trainer import run_stage  # Ray starts (or connects) when it runs, after its own checks

        result = run_stage(config)
    except INPUT_ERRORS as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"stage": result.stage, "mlflow_run_id": result.run_id, "model_uri": result.model_uri,
                      "checkpoint": result.checkpoint_path, "metrics": result.metrics}, indent=2))


if __name__ == "__main__":
    main()
