"""Scores per category and round, as a table, MLflow metrics, JSON and a PNG grid; and two runs side by side."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from irg.eval.benchmarks import EvalPrompt
from irg.eval.scoring import summarize

GRID_PROMPTS = 12
GRID_IMAGE = 160


@dataclass
class Report:
    name: str
    scorer: str
    rounds: dict[str, dict[str, float]]  # "round1" -> {category: mean, ..., "overall": x}
    counts: dict[str, int]  # images per category and round
    failures: int = 0  # images whose verdict could not be read (e.g. an unparsable judge reply), scored 0
    meta: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``round1/<category>``, ..., and ``delta/<category>`` (last round minus round 1)."""
        metrics = {f"{r}/{c}": v for r, scores in self.rounds.items() for c, v in scores.items()}
        names = list(self.rounds)
        if len(names) > 1:
            first, last = self.rounds[names[0]], self.rounds[names[-1]]
            metrics.update({f"delta/{c}": last[c] - first[c] for c in first if c in last})
        metrics["failures"] = self.failures
        return metrics

    def to_dict(self) -> dict:
        return {"name": self.name, "scorer": self.scorer, "rounds": self.rounds, "counts": self.counts,
                "failures": self.failures, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(data["name"], data["scorer"], data["rounds"], data["counts"], data.get("failures", 0),
                   data.get("meta", {}))


def build_report(name: str, scorer: str, overall: str, prompts: list[EvalPrompt], rows: list[dict],
                 rounds: int) -> Report:
    """Per round, the category means over every sample's score (rows from the scorer) and the overall."""
    category = {p.id: p.category for p in prompts}
    summaries = {}
    for r in range(1, rounds + 1):
        scored = [(category[row["prompt_id"]], row["score"]) for row in rows if row["round"] == r]
        summaries[f"round{r}"] = summarize(scored, overall)
    counts = dict(Counter(category[row["prompt_id"]] for row in rows if row["round"] == 1))
    failures = sum(1 for row in rows if "parse_error" in row["details"])
    return Report(name=name, scorer=scorer, rounds=summaries, counts=counts, failures=failures)


def format_table(report: Report) -> str:
    """Categories down, rounds across, then the change from round 1 to the last round."""
    names = list(report.rounds)
    categories = [c for c in report.rounds[names[0]] if c != "overall"] + ["overall"]
    width = max(len(c) for c in categories + ["category"]) + 2
    header = "category".ljust(width) + "".join(f"{n:>10}" for n in names) + ("       Δ" if len(names) > 1 else "")
    lines = [f"{report.name}: {report.scorer}", header, "-" * len(header)]
    for c in categories:
        values = [report.rounds[n].get(c) for n in names]
        cells = "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in values)
        delta = f"{values[-1] - values[0]:>+8.3f}" if len(names) > 1 and None not in values else ""
        count = f"  (n={report.counts[c]})" if c in report.counts else ""
        lines.append(c.ljust(width) + cells + delta + count)
    if report.failures:
        lines.append(f"{report.failures} images had no readable verdict and scored 0")
    return "\n".join(lines)


def compare_table(a: Report, b: Report) -> str:
    """Two reports side by side: each round of A and B, and B - A on the last round."""
    rounds = [r for r in a.rounds if r in b.rounds]
    if not rounds:
        raise ValueError(f"{a.name} and {b.name} share no round to compare")
    categories = list(dict.fromkeys([c for c in a.rounds[rounds[0]] if c != "overall"]
                                    + [c for c in b.rounds[rounds[0]] if c != "overall"] + ["overall"]))
    width = max(len(c) for c in categories + ["category"]) + 2
    columns = [(label, r) for r in rounds for label in ("A", "B")]
    header = "category".ljust(width) + "".join(f"{f'{label} {r}':>12}" for label, r in columns) + f"{'B-A':>9}"
    lines = [f"A = {a.name} ({a.scorer}), B = {b.name} ({b.scorer})", header, "-" * len(header)]
    last = rounds[-1]
    for c in categories:
        cells = ""
        for label, r in columns:
            value = (a if label == "A" else b).rounds[r].get(c)
            cells += f"{value:>12.3f}" if value is not None else f"{'-':>12}"
        va, vb = a.rounds[last].get(c), b.rounds[last].get(c)
        lines.append(c.ljust(width) + cells + (f"{vb - va:>+9.3f}" if va is not None and vb is not None else ""))
    return "\n".join(lines)


def load_run_report(run: str, experiment: str = "irg-eval") -> Report:
    """The report an evaluation logged to MLflow; ``run`` is a run id or an evaluation name."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from irg import tracking

    client = MlflowClient(tracking.configure())
    found = client.get_experiment_by_name(experiment)
    named = tracking.find_run(client, found.experiment_id, run) if found else None
    run_id = named.info.run_id if named else run
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{run_id}/report.json")
    except MlflowException as e:
        raise FileNotFoundError(f"{run}: no evaluation named so in experiment {experiment!r}, and no run with that "
                                f"id holding a report.json ({e.message.splitlines()[0]})") from None
    return Report.from_dict(data)


def grid_image(output: str, prompts: list[EvalPrompt], rows: list[dict], rounds: int,
               max_prompts: int = GRID_PROMPTS) -> Image.Image:
    """One line per prompt (its first sample): the prompt, then each round's image with its score."""
    from irg.eval.generate import read_image

    score = {(row["prompt_id"], row["sample"], row["round"]): row["score"] for row in rows}
    shown = [p for p in prompts if (p.id, 0, 1) in score][:max_prompts]
    text_width, pad, cell = 260, 8, GRID_IMAGE
    row_height = cell + 2 * pad + 14
    grid = Image.new("RGB", (text_width + rounds * (cell + pad) + pad, 24 + row_height * max(1, len(shown))), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rounds):
        draw.text((text_width + r * (cell + pad), 6), f"round {r + 1}", fill="black")
    for i, prompt in enumerate(shown):
        top = 24 + i * row_height
        wrapped = "\n".join(textwrap.wrap(f"[{prompt.category}] {prompt.prompt}", 40)[:8])
        draw.multiline_text((pad, top + pad), wrapped, fill="black")
        for r in range(rounds):
            left = text_width + r * (cell + pad)
            image = read_image(output, prompt.id, 0, r).resize((cell, cell))
            grid.paste(image, (left, top + pad))
            value = score.get((prompt.id, 0, r + 1))
            draw.text((left, top + pad + cell + 2), f"score {value:.2f}", fill="darkgreen" if value >= 0.5 else "red")
    return grid
