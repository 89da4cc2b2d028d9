"""Evaluation: generate every round's image for a benchmark's prompts on Ray, score each round, report.

The scorers (:mod:`irg.eval.geneval`, :mod:`irg.eval.wise`) and the prompt sets do not import Ray;
:mod:`irg.eval.generate` and :mod:`irg.eval.run` do.
"""

from irg.eval.benchmarks import BENCHMARKS, EvalPrompt, load_benchmark
from irg.eval.scoring import Scorer, Verdict, summarize

__all__ = ["BENCHMARKS", "EvalPrompt", "Scorer", "Verdict", "load_benchmark", "summarize"]
