"""What a Chinese-speaking user of the bilingual release needs: the named composite model, and Chinese text
through a SentencePiece tokenizer (trained here, LLaMA's settings: BPE, byte fallback, no normalisation)
— encode/decode round trips, the Alpaca prompt with a Chinese question, and streaming decode piece by piece."""

import pytest

from imagebind_llm.hub import MODELS, REGISTRY
from imagebind_llm.llm.generate import RowText
from imagebind_llm.llm.templates import alpaca_prompt, get_template
from imagebind_llm.llm.tokenizer import SentencePieceTokenizer, load_tokenizer

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "这张图片里有什么？图片里有一只狗在草地上奔跑。",
    "请描述这段音频。这是雨声，还有远处的雷声。",
    "你好，我是一个多模态大语言模型，可以理解图像、音频、视频和点云。",
    "What is in this image? A dog is running on the grass.",
    "Describe the audio. It is the sound of rain and distant thunder.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Response:\n### Input:\n",
    "天气很好，我们去公园散步吧。今天是星期六，2023年5月。",
]
# Characters the tokenizer never saw go through byte fallback (several tokens per character).
UNSEEN = "龘靐齉，𠀋 emoji 😀 and ünïcödé"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return load_tokenizer(folder / "tokenizer.model")


def test_the_released_bilingual_model_is_one_name():
    named = MODELS["imagebind-llm-7b"]
    assert (named.base, named.delta, named.adapter, named.imagebind) == (
        "llama-7b", ("7B_chinese_delta.pth", "7B_chinese_params.json"), "7B.pth", "imagebind_w3D.pth")
    assert named.template == "alpaca" and named.phase == "finetune"
    assert "Open-Chinese-LLaMA" in REGISTRY[named.delta[0]].url
    assert all(part in REGISTRY for part in (*named.delta, named.adapter, named.imagebind))


@pytest.mark.parametrize("text", [
    "这张图片里有什么？", "图片里有一只狗在草地上奔跑。", "你好，世界！Hello, world!", UNSEEN,
    "第一行\n第二行\n\n  两个空格", "2023年5月",
])
def test_chinese_round_trip(tokenizer, text):
    assert isinstance(tokenizer, SentencePieceTokenizer)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids, skip_special=True) == text
    with_eos = tokenizer.encode(text, bos=False, eos=True)
    assert tokenizer.decode(with_eos) == text + tokenizer.eos_token


def test_unseen_characters_use_byte_fallback(tokenizer):
    ids = tokenizer.encode("龘", bos=False)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert [p for p in pieces if p.startswith("<0x")] == ["<0xE9>", "<0xBE>", "<0x98>"]  # UTF-8 of 龘
    assert tokenizer.sp.unk_id() not in tokenizer.encode(UNSEEN)


def test_alpaca_prompt_with_a_chinese_question(tokenizer):
    question, context = "这张图片里有什么？", "一张在公园拍的照片"
    prompt = get_template("alpaca").render([{"role": "user", "content": question}])
    assert prompt == alpaca_prompt(question)
    assert prompt.endswith(f"### Instruction:\n{question}\n\n### Response:")
    for text in (prompt, alpaca_prompt(question, context)):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special=True) == text
    # a two-turn Chinese conversation renders and round-trips too
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": "一只狗。"},
             {"role": "user", "content": "它在做什么？"}]
    prompt = get_template("alpaca").render(turns)
    assert "### Response:一只狗。\n\n### Instruction:\n它在做什么？" in prompt
    assert tokenizer.decode(tokenizer.encode(prompt), skip_special=True) == prompt


@pytest.mark.parametrize("answer", [
    "图片里有一只狗在草地上奔跑。", UNSEEN + "。结束", "雷声😀和雨声", "中文 and English 混合",
])
def test_streaming_decode_of_chinese_piece_by_piece(tokenizer, answer):
    """Generation's streaming decoder (`RowText`) never emits half a character; the pieces make the text."""
    stop = get_template("alpaca").stop_strings
    row = RowText(tokenizer, set(tokenizer.stop_ids), stop)
    ids = tokenizer.encode(answer, bos=False)
    pieces = [row.push(i) for i in ids]
    pieces.append(row.push(tokenizer.eos_id))
    assert row.done and row.result.finish_reason == "eos"
    assert "".join(pieces) == answer == row.result.text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it did stream


def test_streaming_stops_at_the_next_instruction_in_chinese(tokenizer):
    row = RowText(tokenizer, set(tokenizer.stop_ids), get_template("alpaca").stop_strings)
    text = "一只狗。\n\n### Instruction:\n下一个问题"
    out = "".join(row.push(i) for i in tokenizer.encode(text, bos=False) if not row.done)
    assert row.done and row.result.finish_reason == "stop"
    assert out == "一只狗。\n\n" == row.result.text
