"""The shapes model from scratch, every step of its recipe in one command (see irg/train/shapes_recipe.py).

    python jobs/shapes.py --ship-to irg/models/shapes   # local Ray, the embedded store, MLflow on sqlite
    ray job submit --working-dir . -- python jobs/shapes.py --work s3://...   # on a cluster

Running it again resumes: finished steps are skipped, interrupted training continues from its checkpoint.
"""

import argparse
import json
import logging
import sys

from irg.storage import irg_home
from irg.train import INPUT_ERRORS
from irg.train import shapes_recipe as recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(irg_home() / "shapes"),
                        help="folder for the tokenizer, autoencoder and initial checkpoint (default: $IRG_HOME/shapes, "
                             "outside the work tree; training checkpoints go to the store, also under $IRG_HOME)")
    parser.add_argument("--data", default="", help="where the rows go (default: s3://<bucket>/shapes)")
    parser.add_argument("--ship-to", help="copy the final model here, e.g. irg/models/shapes (what irg:shapes loads)")
    parser.add_argument("--base", help="use this base model (e.g. trained on a GPU by benchmarks/shapes_probe.py "
                                           "--save) instead of the base step's training")
    parser.add_argument("--until", choices=recipe.STEPS, default=recipe.STEPS[-1], help="stop after this step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training setting of every stage, e.g. --set run.max_steps=10")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = recipe.RecipeSettings(work=args.work, data=args.data, ship_to=args.ship_to, base=args.base)
    try:
        outputs = recipe.run(settings, until=args.until, overrides=args.overrides)
    except INPUT_ERRORS as e:
        print(f"shapes: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(outputs, indent=2))


if __name__ == "__main__":
    main()
