"""`imagebind-llm ask` and `merge-delta` end to end, on the official small fixtures."""

import json

import pytest

from imagebind_llm.cli import main
from imagebind_llm.llm.templates import alpaca_prompt
from imagebind_llm.engine import ChatSession, Engine
from imagebind_llm.llm.generate import GREEDY
from imagebind_llm.model.factory import create_model
from imagebind_llm.model.media import load_media, parse_weights
from test_factory import SMALL
from test_model import ADAPTER, FIXTURES, IO

MEDIA = FIXTURES / "media"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    path = tmp_path_factory.mktemp("cfg") / "imagebind_small.json"
    path.write_text(json.dumps({**kwargs, "with_point": False}))
    return path


def test_alpaca_prompt_tokens_equal_the_official_prompt_ids():
    model = create_model(SMALL)
    ids = model.tokenizer.encode(alpaca_prompt("Describe the image in detail."), bos=True)
    assert ids == IO["results"]["finetune"]["prompt_ids"].tolist()


def test_ask_cli_matches_the_python_api(capsys, small_config):
    argv = ["ask", "--model", str(ADAPTER / "llama" / "base"), "--adapter", str(ADAPTER / "adapter_finetune.pth"),
            "--imagebind", str(FIXTURES / "imagebind" / "imagebind_small.pth"), "--imagebind-config", str(small_config),
            "--image", str(MEDIA / "girl.jpg"), "--audio", str(MEDIA / "girl_bgm.wav"), "--weight", "image=0.4,audio=0.6",
            "--temperature", "0", "--max-new-tokens", "16", "Describe the image in detail."]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    model = create_model(SMALL)
    media = load_media({"image": MEDIA / "girl.jpg", "audio": MEDIA / "girl_bgm.wav"}, parse_weights("image=0.4,audio=0.6"))
    expected = model.ask("Describe the image in detail.", media, temperature=0, max_new_tokens=16,
                         stop_strings=("### Instruction:",))
    assert printed == expected.strip()
    without_media = model.ask("Describe the image in detail.", None, temperature=0, max_new_tokens=16)
    assert without_media != expected  # the trained gates let the media change the answer


@pytest.mark.parametrize("argv, message", [
    (["ask", "--image", "missing.jpg", "Hi"], "missing.jpg"),
    (["ask", "--image", str(MEDIA / "girl.jpg"), "--weight", "smell=1", "Hi"], "smell"),
    (["ask", "--model", str(ADAPTER / "llama" / "base"), "Hi"], "--adapter"),
])
def test_ask_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_weights_parse_and_normalise():
    assert parse_weights("image=0.4, audio=0.6") == {"image": 0.4, "audio": 0.6}
    with pytest.raises(ValueError, match="MODALITY=NUMBER"):
        parse_weights("image")


def test_chat_with_media_answers_like_ask(capsys, small_config):
    shared = ["--model", str(ADAPTER / "llama" / "base"), "--adapter", str(ADAPTER / "adapter_finetune.pth"),
              "--imagebind", str(FIXTURES / "imagebind" / "imagebind_small.pth"), "--imagebind-config",
              str(small_config), "--image", str(MEDIA / "girl.jpg"), "--temperature", "0", "--max-new-tokens", "12"]
    assert main(["ask", *shared, "Describe the image in detail."]) == 0
    asked = capsys.readouterr().out.strip()
    assert main(["chat", *shared, "Describe the image in detail."]) == 0
    assert capsys.readouterr().out.strip() == asked


def test_weights_list_and_fetch_of_a_local_file(capsys, tmp_path):
    assert main(["weights", "list"]) == 0
    listed = capsys.readouterr().out
    assert "7B.pth" in listed and "imagebind_w3D.pth" in listed and "knn.index" in listed
    local = tmp_path / "adapter.pth"
    local.write_bytes(b"x")
    assert main(["weights", "fetch", str(local)]) == 0
    assert capsys.readouterr().out.strip() == str(local)
    assert main(["weights", "fetch", "no-such-weights"]) == 1
    assert "no-such-weights" in capsys.readouterr().err


def test_multi_turn_chat_keeps_the_media_injected():
    model = create_model(SMALL)
    engine = Engine(model, background=False, template="alpaca")
    session = ChatSession(engine, {"image": MEDIA / "girl.jpg"})
    first = "".join(session.respond("Describe the image in detail.", GREEDY.replace(max_new_tokens=8))).strip()
    second = "".join(session.respond("And the colours?", GREEDY.replace(max_new_tokens=8)))
    # the second turn is the whole conversation as text, generated with the same media injected
    prompt = engine.template.render([*session.history[:2], {"role": "user", "content": "And the colours?"}])
    media = load_media({"image": MEDIA / "girl.jpg"})
    expected = model.generate([prompt], media, temperature=0, max_new_tokens=8,
                              stop_token_ids=model.tokenizer.stop_ids, stop_strings=("### Instruction:",))[0].text
    assert session.history[0]["content"] == "Describe the image in detail." and session.history[1]["content"] == first
    assert second == expected
    blind = ChatSession(engine)
    assert "".join(blind.respond("And the colours?", GREEDY.replace(max_new_tokens=8))) != \
        "".join(ChatSession(engine, {"image": MEDIA / "girl.jpg"}).respond("And the colours?", GREEDY.replace(max_new_tokens=8)))


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ["chat", "ask", "merge-delta", "weights", "cache", "train"]:
        assert command in out, command
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = capsys.readouterr().out
    for option in ["--image", "--video", "--audio", "--point", "--depth", "--thermal", "--imu", "--text", "--weight",
                   "--cache", "--adapter", "--weights", "--imagebind", "--stream", "--top-p", "--temperature"]:
        assert option in out, option
