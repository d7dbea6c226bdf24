"""Evaluation: the MME benchmark (answering through the engine, the official scorer, reports).

    tasks, missing = load_mme("MME_Benchmark_release_version")
    run_mme(Engine(model, background=False, template="alpaca"), tasks, "results/")
    report, missing = score_dir("results/")
"""

from .mme import MME_HEADER, SUBTASKS, MMEError, MMEOptions, Question, load_mme, mme_prompt, run_mme
from .mme_score import ResultFileError, SubtaskScore, parse_prediction, score_dir, score_file, score_lines
from .report import draw_chart, format_table, write_report

__all__ = ["MME_HEADER", "SUBTASKS", "MMEError", "MMEOptions", "Question", "ResultFileError", "SubtaskScore",
           "draw_chart", "format_table", "load_mme", "mme_prompt", "parse_prediction", "run_mme", "score_dir",
           "score_file", "score_lines", "write_report"]
