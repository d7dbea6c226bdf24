"""MME scores for people: a text table, a Markdown report and a bar chart (drawn with Pillow).

A report is `imagebind_llm.eval.mme_score.score_dir`'s ``{"perception": {"total", "subtasks": {name:
{"score", "acc", "acc_plus", ...}}}, "cognition": {...}}``. Other results (the paper's numbers for
ImageBind-LLM or PandaGPT, another run) can be shown beside ours: a JSON file in the same shape, in which
each subtask needs only its ``"score"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from imagebind_llm.eval.mme_score import GROUPS

Report = Mapping[str, Mapping]
OURS = "ours"
MAX_SCORE = 200  # per subtask: 100 * acc + 100 * acc_plus
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def load_compare(spec: str) -> tuple[str, Report]:
    """``NAME=FILE`` -> ``(NAME, scores)``: scores to show beside ours, in the ``mme-score --json`` shape.

    Raises:
        ValueError: not ``NAME=FILE``, or the file is not in that shape.
        OSError: the file cannot be read.
    """
    name, sep, file = spec.partition("=")
    if not (sep and name and file):
        raise ValueError(f"--compare {spec!r}: expected NAME=FILE, e.g. PandaGPT=pandagpt.json")
    try:
        scores = json.loads(Path(file).read_text(encoding="utf-8"))
        for group in scores.values():
            for subtask in group.get("subtasks", {}).values():
                float(subtask["score"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: not MME scores in the `eval mme-score --json` shape ({{\"perception\": "
                         f"{{\"total\": x, \"subtasks\": {{name: {{\"score\": x}}}}}}}}): {e!r}") from e
    return name, scores


def score(report: Report, group: str, subtask: str | None = None) -> float | None:
    """A subtask's score, or the group total without ``subtask``; None where the report has none."""
    entry = report.get(group, {})
    if subtask is None:
        return entry.get("total")
    return entry.get("subtasks", {}).get(subtask, {}).get("score")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: Report, compare: Mapping[str, Report] = {}) -> str:
    """A plain-text table: per group its total and, per subtask, score, acc, acc+, other (and the compared scores)."""
    widths = {other: max(12, len(other)) for other in compare}
    lines = []
    for group, names in GROUPS.items():
        subtasks = report[group]["subtasks"]
        lines.append(f"{group}: {_fmt(report[group]['total'])} / {MAX_SCORE * len(names)} "
                     f"({len(subtasks)} of {len(names)} subtasks)"
                     + "".join(f"   {other}: {_fmt(score(scores, group))}" for other, scores in compare.items()))
        lines.append(f"  {'subtask':<22} {'score':>7} {'acc %':>7} {'acc+ %':>7} {'other':>6}"
                     + "".join(f" {other:>{w}}" for other, w in widths.items()))
        for name in names:
            if name in subtasks:
                s = subtasks[name]
                lines.append(f"  {name:<22} {s['score']:7.2f} {100 * s['acc']:7.2f} {100 * s['acc_plus']:7.2f} "
                             f"{s['other']:6d}" + "".join(f" {_fmt(score(c, group, name)):>{widths[o]}}"
                                                         for o, c in compare.items()))
    return "\n".join(lines)


def write_report(report: Report, folder: Path, compare: Mapping[str, Report] = {}, missing: Sequence[str] = (),
                 title: str = "MME results") -> tuple[Path, Path]:
    """Write ``folder/report.md`` and the chart it shows, ``folder/scores.png``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chart = folder / "scores.png"
    draw_chart(report, chart, compare)
    markdown = folder / "report.md"
    markdown.write_text(format_markdown(report, compare, missing, title, chart.name), encoding="utf-8")
    return markdown, chart


def format_markdown(report: Report, compare: Mapping[str, Report] = {}, missing: Sequence[str] = (),
                    title: str = "MME results", chart: str = "scores.png") -> str:
    """The Markdown report: per group a table of the subtasks (score, acc, acc+ and the compared scores)."""
    others = list(compare)
    out = [f"# {title}", "",
           "Score per subtask = 100 × acc + 100 × acc+ (at most 200); acc over questions, acc+ over images "
           "(both questions right), as the official `calculation.py` computes them.", ""]
    if missing:
        out += [f"Missing subtasks (not scored): {', '.join(missing)}.", ""]
    for group, names in GROUPS.items():
        subtasks = report[group]["subtasks"]
        out += [f"## {group.capitalize()}: {_fmt(report[group]['total'])} / {MAX_SCORE * len(names)}", "",
                "| subtask | score | acc % | acc+ % | other |" + "".join(f" {o} |" for o in others),
                "|---|---:|---:|---:|---:|" + "---:|" * len(others)]
        for name in names:
            s = subtasks.get(name)
            cells = [_fmt(s["score"]), f"{100 * s['acc']:.2f}", f"{100 * s['acc_plus']:.2f}", str(s["other"])] \
                if s else ["-"] * 4
            out.append(f"| {name} | " + " | ".join(cells + [_fmt(score(compare[o], group, name)) for o in others]) + " |")
        out.append(f"| **total** | **{_fmt(report[group]['total'])}** | | | |"
                   + "".join(f" {_fmt(score(compare[o], group))} |" for o in others))
        out.append("")
    out += [f"![MME scores per subtask]({chart})", ""]
    return "\n".join(out)


def draw_chart(report: Report, path: Path, compare: Mapping[str, Report] = {}) -> None:
    """A horizontal bar chart of every subtask's score (0-200), ours first and the compared results beside it."""
    series = {OURS: report, **compare}
    font = ImageFont.load_default(size=13)
    bar, gap, label_w, plot_w, top = 14, 12, 190, 560, 60
    rows = [(group, name) for group, names in GROUPS.items() for name in names]
    height = top + len(rows) * (len(series) * bar + gap) + 2 * 24 + 30
    image = Image.new("RGB", (label_w + plot_w + 80, height), "white")
    draw = ImageDraw.Draw(image)
    x0 = label_w
    for i, name in enumerate(series):  # the legend
        x = x0 + i * 130
        draw.rectangle([x, 12, x + 12, 24], fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 18, 11), name[:16], fill="black", font=font)
    for tick in range(0, MAX_SCORE + 1, 50):  # grid lines and their values
        x = x0 + tick * plot_w / MAX_SCORE
        draw.line([x, top - 8, x, height - 24], fill="#dddddd")
        draw.text((x - 8, height - 20), str(tick), fill="#555555", font=font)
    y = top
    for group, names in GROUPS.items():
        totals = ", ".join(f"{n} {_fmt(score(r, group))}" for n, r in series.items())
        draw.text((8, y), f"{group.capitalize()} (total: {totals})", fill="black", font=font)
        y += 24
        for name in names:
            draw.text((8, y + (len(series) * bar - 13) / 2), name, fill="black", font=font)
            for i, scores in enumerate(series.values()):
                value = score(scores, group, name)
                if value is not None:
                    x1 = x0 + max(value, 0) * plot_w / MAX_SCORE
                    draw.rectangle([x0, y + i * bar, x1, y + (i + 1) * bar - 2], fill=COLOURS[i % len(COLOURS)])
                    draw.text((x1 + 4, y + i * bar), f"{value:.1f}", fill="#333333", font=font)
            y += len(series) * bar + gap
    image.save(path)
