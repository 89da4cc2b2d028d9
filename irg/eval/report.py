"""Scores per category and round, as a table, MLflow metrics, JSON and a PNG grid; and two runs side by side."""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from irg.eval.benchmarks import SPLITS, EvalPrompt
from irg.eval.scorer_settings import ScorerSettings
from irg.eval.scoring import Verdict

# What an MLflow metric name may not hold.
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
GRID_PROMPTS = 12
GRID_IMAGE = 160


@dataclass
class Report:
    name: str
    scorer: str
    # "round1" -> {line: score, ...}: the categories and "overall", or the benchmark's own lines
    # (TIIF's "short/overall", ...); None where a dimension could not be scored (absent, not zero)
    rounds: dict[str, dict[str, float | None]]
    counts: dict[str, int]  # images per category and round
    failures: int = 0  # images whose verdict could not be read (e.g. an unparsable judge reply), scored 0
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how it was scored, where a reader must know

    def metrics(self) -> dict[str, float]:
        """``round1/<line>``, ..., and ``delta/<line>`` (last round minus round 1) as MLflow metric names
        (TIIF's ``shape+color`` as ``shape-color``); absent lines are left out."""
        metrics = {f"{r}/{c}": v for r, scores in self.rounds.items() for c, v in scores.items() if v is not None}
        names = list(self.rounds)
        if len(names) > 1:
            first, last = self.rounds[names[0]], self.rounds[names[-1]]
            metrics.update({f"delta/{c}": last[c] - first[c] for c in first
                            if first[c] is not None and last.get(c) is not None})
        safe = {_METRIC_UNSAFE.sub("_", name.replace("+", "-")): v for name, v in metrics.items()}
        if len(safe) < len(metrics):
            raise ValueError(f"{self.name}: report lines that differ only in characters MLflow metric names "
                             f"cannot hold: {sorted(metrics)}")
        safe["failures"] = self.failures
        return safe

    def to_dict(self) -> dict:
        return {"name": self.name, "scorer": self.scorer, "rounds": self.rounds, "counts": self.counts,
                "failures": self.failures, "meta": self.meta, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(data["name"], data["scorer"], data["rounds"], data["counts"], data.get("failures", 0),
                   data.get("meta", {}), data.get("notes", []))


def build_report(name: str, scorer: ScorerSettings, prompts: list[EvalPrompt], rows: list[dict],
                 rounds: int) -> Report:
    """Per round, the lines ``scorer`` summarises every sample's verdict (rows from the scorer) into."""
    by_id = {p.id: p for p in prompts}
    summaries = {}
    for r in range(1, rounds + 1):
        verdicts = [(by_id[row["prompt_id"]], Verdict(row["score"], row["details"])) for row in rows
                    if row["round"] == r]
        summaries[f"round{r}"] = scorer.summarize(verdicts)
    counts = dict(Counter(by_id[row["prompt_id"]].category for row in rows if row["round"] == 1))
    failures = sum(1 for row in rows if "parse_error" in row["details"])
    return Report(name=name, scorer=scorer.kind, rounds=summaries, counts=counts, failures=failures,
                  notes=scorer.notes)


def format_table(report: Report) -> str:
    """Categories (or a benchmark's own lines) down, rounds across, then the change from round 1 to the
    last round; ``-`` marks an absent value."""
    names = list(report.rounds)
    categories = _lines(report.rounds[names[0]])
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
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def _lines(scores: dict) -> list[str]:
    """A report's lines in order, a plain ``overall`` last."""
    return [c for c in scores if c != "overall"] + (["overall"] if "overall" in scores else [])


def compare_table(a: Report, b: Report) -> str:
    """Two reports side by side: each round of A and B, and B - A on the last round."""
    rounds = [r for r in a.rounds if r in b.rounds]
    if not rounds:
        raise ValueError(f"{a.name} and {b.name} share no round to compare")
    categories = _lines(dict.fromkeys(_lines(a.rounds[rounds[0]]) + _lines(b.rounds[rounds[0]])))
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


# The paper's results table: column, the scorer behind it, its report lines (TIIF's two shown as percentages).
PAPER_COLUMNS = (("GenEval", "geneval", ("overall",)), ("WISE", "wise", ("overall",)),
                 ("TIIF short/long", "tiif", ("short/overall", "long/overall")),
                 ("GenAI-Bench", "genai_bench", ("overall",)), ("OneIG-EN", "oneig", ("overall",)))


def paper_table(reports: list[Report]) -> str:
    """Evaluations laid out like the paper's results table: a line per model and round, a column per
    benchmark; ``-`` where a model has no evaluation of it or the value is absent, ``*`` on a value
    with a note (a stand-in scorer, a prompt set other than the paper's), the notes below. Models are
    told apart by checkpoint (a registered version, or a folder's digest), not by the name given."""
    columns = {scorer: (title, lines) for title, scorer, lines in PAPER_COLUMNS}
    models: dict[str, dict[str, Report]] = {}
    for report in reports:
        if report.scorer not in columns:
            raise ValueError(f"{report.name}: scored by {report.scorer}, which is not a column of the paper's table "
                             f"({', '.join(title for title, _, _ in PAPER_COLUMNS)})")
        model = _model_label(report)
        earlier = models.setdefault(model, {}).get(report.scorer)
        if earlier is not None:
            raise ValueError(f"{earlier.name} and {report.name} both evaluate {model} on {report.scorer}: give one")
        models[model][report.scorer] = report
    rounds = sorted({r for report in reports for r in report.rounds}, key=lambda r: int(r.removeprefix("round")))
    header = ["model", *[title for title, _, _ in PAPER_COLUMNS]]
    table, notes = [], []
    for model, by_scorer in models.items():
        for r in rounds:
            cells = [f"{model} · round {r.removeprefix('round')}"]
            for _, scorer, lines in PAPER_COLUMNS:
                report = by_scorer.get(scorer)
                values = [report.rounds.get(r, {}).get(line) for line in lines] if report else [None]
                if None in values:
                    cells.append("-")
                    continue
                cell = "/".join(f"{100 * v:.2f}" for v in values) if scorer == "tiif" else f"{values[0]:.3f}"
                cells.append(cell + ("*" if _paper_notes(report) else ""))
            table.append(cells)
        notes += [f"* {model}, {scorer}: {note}" for scorer, report in by_scorer.items()
                  for note in _paper_notes(report)]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *table]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *dict.fromkeys(notes)])


def _model_label(report: Report) -> str:
    """A registered model by its pinned version; a folder by its path and digest."""
    checkpoint = str(report.meta.get("checkpoint", ""))
    if checkpoint.startswith("models:/"):
        return checkpoint
    model = str(report.meta.get("model", report.name))
    return f"{model} ({checkpoint.removeprefix('sha256:')[:8]})" if checkpoint else model


def _paper_notes(report: Report) -> list[str]:
    """The report's notes, and which prompt set it used where the paper's default was not."""
    split = report.meta.get("split")
    default = SPLITS.get(str(report.meta.get("benchmark")), (None,))[0]
    return report.notes + ([f"the {split} prompt set, not {default}"] if split and split != default else [])


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
            if value is None:
                draw.text((left, top + pad + cell + 2), "not scored", fill="gray")
            else:
                draw.text((left, top + pad + cell + 2), f"score {value:.2f}",
                          fill="darkgreen" if value >= 0.5 else "red")
    return grid
