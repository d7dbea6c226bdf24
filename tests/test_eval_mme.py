"""MME: reading both layouts of the release, answering through the engine into the official result files,
resuming after a kill, the likelihood mode, the official scorer's parsing rules on hand-scored files, and
the `eval mme` / `eval mme-score` commands end to end."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from imagebind_llm.cli import main
from imagebind_llm.engine import Engine, Request, loglikelihood, text_pairs
from imagebind_llm.eval import MMEError, MMEOptions, load_mme, mme_prompt, parse_prediction, run_mme, score_dir
from imagebind_llm.eval.mme import SETTINGS_FILE, Question
from imagebind_llm.eval.report import load_compare, write_report
from imagebind_llm.llm.generate import GREEDY

SRC = Path(__file__).parent.parent / "src"
# subtask -> (layout, suffix, images as (name, colour, shape)); names listed out of order on purpose
DATA = {
    "existence": ("side", ".jpg", [("street_10", "red", "square"), ("street_2", "blue", "circle")]),
    "artwork": ("folders", ".jpg", [("b_painting", "green", "circle"), ("a_painting", "yellow", "square"),
                                    ("c_painting", "black", "square")]),
    "code_reasoning": ("side", ".png", [("code_1", "white", "circle"), ("code_0", "purple", "square")]),
}


def _make_mme(root: Path) -> Path:
    """A small MME release: artwork in images/ + questions_answers_YN/, the others image + .txt side by side."""
    release = root / "MME_Benchmark_release_version"
    for subtask, (layout, suffix, images) in DATA.items():
        image_dir = release / subtask / ("images" if layout == "folders" else "")
        text_dir = release / subtask / ("questions_answers_YN" if layout == "folders" else "")
        image_dir.mkdir(parents=True, exist_ok=True)
        text_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, colour, shape) in enumerate(images):
            image = Image.new("RGB", (96, 72), "gray")
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)([16, 10, 80, 62], fill=colour)
            image.save(image_dir / f"{name}{suffix}")
            yes = f"Is there a {colour} {shape} in the image? Please answer yes or no.\tYes\n"
            no = f"Is there an orange {shape} in the image? Please answer yes or no.\tNo\n"
            (text_dir / f"{name}.txt").write_text(yes + no if i % 2 else no + "\n" + yes, encoding="utf-8")
    return release


def _engine(model, batch: int = 3) -> Engine:
    return Engine(model, max_batch=batch, max_context=512, background=False, template="alpaca")


def _files(out: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.txt"))}


# ---------------------------------------------------------------- reading the release
def test_both_layouts_are_read_in_the_fixed_order(tmp_path):
    release = _make_mme(tmp_path)
    tasks, missing = load_mme(tmp_path)  # the folder holding the release works too
    assert list(tasks) == ["existence", "artwork", "code_reasoning"] and len(missing) == 11
    artwork = tasks["artwork"]
    assert [q.image for q in artwork] == [release / "artwork" / "images" / f"{n}.jpg" for n in
                                         ("a_painting", "a_painting", "b_painting", "b_painting", "c_painting",
                                          "c_painting")]
    assert [q.answer for q in artwork] == ["Yes", "No", "No", "Yes", "No", "Yes"]  # the .txt order, blank lines skipped
    assert artwork[0].question == "Is there a yellow square in the image? Please answer yes or no."
    assert [q.image.name for q in tasks["existence"]][::2] == ["street_10.jpg", "street_2.jpg"]
    assert {q.image.suffix for q in tasks["code_reasoning"]} == {".png"}
    assert load_mme(release, ["code_reasoning", "OCR"])[1] == ["OCR"]


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "existence" / "street_2.jpg").unlink(), r"street_2.txt: no image street_2.jpg or .png"),
    (lambda r: (r / "existence" / "street_2.txt").write_text("Is it red?\tMaybe\nIs it?\tNo\n"),
     r"street_2.txt:1: expected 'question<TAB>Yes\|No'"),
    (lambda r: (r / "existence" / "street_2.txt").write_text("A?\tYes\nB?\tNo\nC?\tNo\n"),
     r"street_2.txt: 3 questions; MME has exactly two per image"),
])
def test_a_malformed_release_is_a_clear_error(tmp_path, damage, message):
    damage(_make_mme(tmp_path))
    with pytest.raises(MMEError, match=message):
        load_mme(tmp_path)


def test_unknown_subtasks_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(MMEError, match="unknown MME subtasks"):
        load_mme(tmp_path, ["existance"])
    with pytest.raises(MMEError, match="no MME subtask folder"):
        load_mme(tmp_path)


def test_the_prompt_is_the_official_mme_script_one():
    official = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request using a single word or phrase.\n\n### Instruction:\n{instruction}\n\n### Response:")
    assert mme_prompt("Is it red? Please answer yes or no.") == official.format(
        instruction="Is it red? Please answer yes or no.")


def test_tabs_and_line_breaks_leave_the_prediction():
    q = Question(Path("x/a.jpg"), "Is it?", "Yes")
    assert q.line(" Yes\tit is\r\nred \n") == "a.jpg\tIs it?\tYes\tYes it is red\n"


# ---------------------------------------------------------------- answering
def test_answers_are_the_engine_greedy_answers_in_official_files_and_a_rerun_resumes(seeing_demo, tmp_path):
    tasks, _ = load_mme(_make_mme(tmp_path / "data"), ["artwork", "code_reasoning"])  # both layouts
    out, options = tmp_path / "out", MMEOptions(max_new_tokens=3, batch=3)
    engine = _engine(seeing_demo)
    assert run_mme(engine, tasks, out, options, progress=False) == 10
    files = _files(out)
    assert list(files) == ["artwork.txt", "code_reasoning.txt"]
    for name, questions in tasks.items():
        lines = files[f"{name}.txt"].split("\n")
        assert lines.pop() == "" and len(lines) == len(questions)
        for line, q in zip(lines, questions):  # pairs adjacent: the questions come image by image
            assert line.split("\t")[:3] == [q.image.name, q.question, q.answer]
        q, prediction = questions[-1], lines[-1].split("\t")[3]  # the answer it gets asked alone
        ids = engine.tokenizer.encode(mme_prompt(q.question), bos=engine.tokenizer.add_bos)
        alone = engine.generate(Request.ask(q.question, {"image": q.image}, sampling=GREEDY.replace(max_new_tokens=3),
                                            prompt_ids=ids))
        assert prediction == " ".join(alone.text.split())

    assert run_mme(engine, tasks, out, options, progress=False) == 0  # all answered: nothing to do
    # runs killed while writing: five complete lines and half of the sixth, one line and half of the second
    for name, kept in (("artwork.txt", 5), ("code_reasoning.txt", 1)):
        with open(out / name, "r+b") as f:
            f.truncate(sum(len(line) for line in f.read().splitlines(keepends=True)[:kept]) + 9)
    assert run_mme(_engine(seeing_demo, batch=2), tasks, out, MMEOptions(max_new_tokens=3, batch=2),
                   progress=False) == 1 + 3
    assert _files(out) == files


def test_a_rerun_refuses_other_settings_or_other_data(seeing_demo, tmp_path):
    tasks, _ = load_mme(_make_mme(tmp_path / "data"), ["existence"])
    out, engine, options = tmp_path / "out", _engine(seeing_demo), MMEOptions(max_new_tokens=2)
    out.mkdir()
    lines = [q.line("yes") for q in tasks["existence"]]
    (out / "existence.txt").write_text("".join(lines))  # all answered: nothing is generated below
    assert run_mme(engine, tasks, out, options, model={"name": "demo"}, progress=False) == 0
    assert json.loads((out / SETTINGS_FILE).read_text())["max_new_tokens"] == 2
    with pytest.raises(MMEError, match=r"other settings \(max_new_tokens: \[2\] there, \[3\] now\)"):
        run_mme(engine, tasks, out, MMEOptions(max_new_tokens=3), model={"name": "demo"})
    with pytest.raises(MMEError, match="other settings .*model"):
        run_mme(engine, tasks, out, options, model={"name": "imagebind-llm-7b"})
    (out / "existence.txt").write_text(lines[1] + lines[0])
    with pytest.raises(MMEError, match=r"existence.txt:1: not the answer to 'street_10.jpg'"):
        run_mme(engine, tasks, out, options, model={"name": "demo"})
    (out / "existence.txt").write_text("".join(lines + lines[:1]))
    with pytest.raises(MMEError, match=r"existence.txt: 5 answers but the subtask has 4 questions"):
        run_mme(engine, tasks, out, options, model={"name": "demo"})


def test_likelihood_mode_answers_the_likelier_of_yes_and_no(seeing_demo, tmp_path):
    tasks, _ = load_mme(_make_mme(tmp_path / "data"), ["existence"])
    out = tmp_path / "likelihood"
    engine = _engine(seeing_demo)
    assert run_mme(engine, tasks, out, MMEOptions(mode="likelihood", batch=4), progress=False) == 4
    predictions = [line.split("\t")[3] for line in (out / "existence.txt").read_text().splitlines()]
    assert set(predictions) <= {"Yes", "No"}
    tokenize = lambda text: engine.tokenizer.encode(text, bos=engine.tokenizer.add_bos)  # noqa: E731
    for q, prediction in list(zip(tasks["existence"], predictions))[:2]:
        media = Request.ask(q.question, {"image": q.image}).media()
        yes, no = loglikelihood(seeing_demo, text_pairs(tokenize, [mme_prompt(q.question)] * 2, ["Yes", "No"]),
                                [media, media])
        assert prediction == ("Yes" if yes.logprob > no.logprob else "No")
    assert json.loads((out / SETTINGS_FILE).read_text())["mode"] == "likelihood"


# ---------------------------------------------------------------- the official scorer, by hand
@pytest.mark.parametrize("prediction, label", [
    ("yes", "yes"), ("no", "no"), ("yes, there is", "yes"), ("no.", "no"), ("not sure", "no"), ("know", "no"),
    ("i don't know", "other"), ("i think yes", "other"), ("", "other"), ("eyes", "yes"), (" yes", "yes"),
    ("  yes", "other"), ("none", "no"), ("nope", "no"), ("是的", "other"), ("yés", "other"), ("noël", "no"),
    ("unknown", "other"), ("yes\n", "yes"), ("no\n", "no"),
])
def test_the_official_parsing_rule(prediction, label):
    assert parse_prediction(prediction) == label


# (ground truth, prediction as written): the parsed answer and whether it is right, worked out by hand
HAND_SCORED = [
    [("Yes", "Yes"), ("No", "no")],                           # yes ✓, no ✓            both right
    [("Yes", "YES, there is a dog."), ("No", "No.")],         # upper case, trailing text: yes ✓, no ✓   both
    [("Yes", "Not sure"), ("No", "Know")],                    # "not" -> no ✗ (FN), "know" -> no ✓
    [("Yes", "I think yes"), ("No", "")],                     # other ✗, empty -> other ✗
    [("Yes", "Eyes open"), ("No", "None")],                   # "eyes" holds "yes" -> yes ✓, no ✓       both
    [("Yes", "是的"), ("No", "Nö")],                           # non-ASCII: other ✗, other ✗
    [("Yes", " yes"), ("No", "Noël")],                        # yes ✓, no ✓                              both
    [("yes", "Yés"), ("NO", "nope")],                         # gt case ignored: other ✗, no ✓
    [("No", "yes"), ("Yes", "no")],                           # FP ✗, FN ✗
    [("Yes", "I don't know"), ("No", "Unknown")],             # other ✗, other ✗
]


def _write_results(path: Path, images: list[list[tuple[str, str]]], final_newline: bool = True) -> None:
    lines = [f"img{i}.jpg\tQuestion {i}{j}? Please answer yes or no.\t{gt}\t{pred}"
             for i, pair in enumerate(images) for j, (gt, pred) in enumerate(pair)]
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")


def test_hand_scored_files_get_their_official_scores(tmp_path):
    _write_results(tmp_path / "existence.txt", HAND_SCORED, final_newline=False)  # as the official script writes
    _write_results(tmp_path / "code_reasoning.txt", [[("Yes", "Yes"), ("No", "No")]] * 2)
    report, missing = score_dir(tmp_path)
    s = report["perception"]["subtasks"]["existence"]
    # 20 questions, 10 right; 10 images, 4 with both right (1, 2, 5, 7); 7 others
    assert (s["questions"], s["images"], s["acc"], s["acc_plus"], s["other"]) == (20, 10, 0.5, 0.4, 7)
    assert s["score"] == pytest.approx(90.0)
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (4, 2, 6, 1)
    assert (s["precision"], s["recall"]) == pytest.approx((4 / 5, 4 / 6))
    assert report["perception"]["total"] == pytest.approx(90.0) and report["cognition"]["total"] == 200.0
    assert "existence" not in missing and "code_reasoning" not in missing and len(missing) == 12


@pytest.mark.parametrize("content, message", [
    ("a.jpg\tQ1\tYes\tYes\na.jpg\tQ2\tNo\tNo\nb.jpg\tQ1\tYes\tYes\n", r"existence.txt: 3 lines"),
    ("a.jpg\tQ1\tYes\tYes\na.jpg\tQ2\tNo\n", r"existence.txt:2: 3 tab-separated columns"),
    ("a.jpg\tQ1\tYes\tYes\na.jpg\tQ2\tNo\tNo\tsee\tabove\n", r"existence.txt:2: 6 tab-separated columns"),
    ("a.jpg\tQ1\tMaybe\tYes\na.jpg\tQ2\tNo\tNo\n", r"existence.txt:1: ground truth 'Maybe' is not yes or no"),
])
def test_a_malformed_result_file_is_a_one_line_error_naming_the_line(tmp_path, capsys, content, message):
    (tmp_path / "existence.txt").write_text(content, encoding="utf-8")
    assert main(["eval", "mme-score", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imagebind-llm eval: error:")
    assert re.search(message, err)


def test_mme_score_prints_a_table_or_json_and_writes_the_report(tmp_path, capsys):
    _write_results(tmp_path / "existence.txt", HAND_SCORED)
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"perception": {"total": 775.77, "subtasks": {"existence": {"score": 128.33}}}}))
    assert main(["eval", "mme-score", str(tmp_path), "--compare", f"ImageBind-LLM={paper}"]) == 0
    out, err = capsys.readouterr()
    assert "existence" in out and "90.00" in out and "128.33" in out and "ImageBind-LLM" in out
    assert "no result file for subtasks count" in err
    report = (tmp_path / "report.md").read_text()
    assert "| existence | 90.00 | 50.00 | 40.00 | 7 | 128.33 |" in report and "![MME scores" in report
    with Image.open(tmp_path / "scores.png") as chart:
        assert chart.width > 500 and chart.height > 300

    assert main(["eval", "mme-score", str(tmp_path), "--json", "--report-dir", str(tmp_path / "r")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["perception"]["subtasks"]["existence"]["score"] == pytest.approx(90.0)
    assert printed["cognition"] == {"total": 0, "subtasks": {}}
    (tmp_path / "saved.json").write_text(json.dumps(printed))
    assert load_compare(f"ours={tmp_path / 'saved.json'}")[1] == printed  # --json output is --compare input


def test_bad_compare_files_and_empty_results_are_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"perception": {"subtasks": {"OCR": {"acc": 1}}}}))
    with pytest.raises(ValueError, match="not MME scores"):
        load_compare(f"x={tmp_path / 'bad.json'}")
    with pytest.raises(ValueError, match="expected NAME=FILE"):
        load_compare(str(tmp_path / "bad.json"))
    assert main(["eval", "mme-score", str(tmp_path)]) == 1
    assert "no MME result files" in capsys.readouterr().err


def test_the_report_draws_missing_and_compared_subtasks(tmp_path):
    _write_results(tmp_path / "OCR.txt", HAND_SCORED[:2])
    report, missing = score_dir(tmp_path)
    other = {"perception": {"total": 1.0, "subtasks": {"color": {"score": 150.0}}}}
    markdown, chart = write_report(report, tmp_path / "report", {"PandaGPT": other}, missing)
    text = markdown.read_text()
    assert "| color | - | - | - | - | 150.00 |" in text and "| OCR | 200.00 | 100.00 | 100.00 | 0 | - |" in text
    assert "Missing subtasks (not scored): existence" in text
    with Image.open(chart) as image:
        assert image.format == "PNG"


# ---------------------------------------------------------------- the commands, killed and resumed
def _complete_lines(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in out.glob("*.txt"))


@pytest.mark.slow  # three fresh processes load torch and the model: ~25 s on 2 idle cores
def test_eval_mme_killed_half_way_resumes_to_what_an_uninterrupted_run_writes(tmp_path, capsys):
    _make_mme(tmp_path / "data")
    command = [sys.executable, "-m", "imagebind_llm", "eval", "mme", "--data", str(tmp_path / "data"),
               "--subtasks", "artwork,code_reasoning", "--max-new-tokens", "3"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    reference, run = tmp_path / "reference", tmp_path / "run"
    subprocess.run([*command, "--out", str(reference), "--batch", "3"], env=env, check=True, capture_output=True)
    expected = _files(reference)
    assert list(expected) == ["artwork.txt", "code_reasoning.txt"]
    assert sum(text.count("\n") for text in expected.values()) == 10

    killed = subprocess.Popen([*command, "--out", str(run), "--batch", "2"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _complete_lines(run) < 4:
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    partial = _files(run)
    assert 4 <= _complete_lines(run) < 10
    assert all(expected[name].startswith(text) for name, text in partial.items())
    name = "code_reasoning.txt"  # written last, so never complete yet: cut a line of it in half
    written = partial.get(name, "").encode()
    with open(run / name, "ab") as f:
        f.write(expected[name].encode()[len(written):len(written) + 7])
    answered = _complete_lines(run)

    resumed = subprocess.run([*command, "--out", str(run), "--batch", "2"], env=env, check=True, capture_output=True,
                             text=True)
    assert f"{10 - answered} questions answered now" in resumed.stderr
    assert _files(run) == expected
    for text in expected.values():  # the two questions of each image on adjacent lines
        images = [line.split("\t")[0] for line in text.splitlines()]
        assert images[::2] == images[1::2] and len(set(images)) == len(images) // 2

    assert main(["eval", "mme-score", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == score_dir(reference)[0]
