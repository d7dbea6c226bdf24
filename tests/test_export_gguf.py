"""``imagebind-llm export-gguf``: Meta and Hugging Face models to GGUF files that our loader reads back to the very
blocks ``load_llm(..., quantize=...)`` builds, and that llama.cpp runs with the same tokens and close logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from imagebind_llm.cli import main
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.weights import BASE_MARKER, base_marker, load_llm
from imagebind_llm.llm.weights.export import export_gguf
from imagebind_llm.llm.weights.hf import hf_config_dict, save_hf
from imagebind_llm.llm.weights.meta import save_meta

SPM = Path(__file__).parent / "fixtures" / "adapter" / "llama" / "tokenizer.model"  # 300 pieces
# dim 256: rows of whole Q4_K super-blocks; 400 embeddings: the SentencePiece vocabulary gets padded.
CONFIG = LLMConfig(vocab_size=400, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=256, norm_eps=1e-5,
                   max_seq_len=128)
QUANTIZE = {"q4_1": "q4_1", "q8_0": "q8", "q4_k": "q4_k"}
# SentencePiece normalises whitespace (GGUF keeps no normaliser, as llama.cpp has none): its texts are normalised.
TEXTS = {"meta": ["Hello world, this is a test.", "The year 2024 had 366 days! It's (really) true: x=12345.",
                  "émigré naïve façade"],
         "hf": ["Hello world, this is a test.", "The year 2024 had 366 days!\n\nIt's (really) true: x=12345.",
                "  spaces\tand tabs  ", "émigré naïve façade"]}
CORPUS = TEXTS["hf"] + ["the quick brown fox jumps over the lazy dog " * 3, "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
                        "I've been told he's there, you're sure? We'll see.", "import torch\nprint(x[0])\n"]
# Llama-3's split pattern, as its tokenizer.json spells it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_byte_level_tokenizer(folder: Path, pre: str) -> None:
    """A small byte-level BPE ``tokenizer.json`` trained here on text split as SmolLM's ("smollm") or Llama-3's
    ("llama-bpe") is, with a ``tokenizer_config.json`` naming BOS / EOS and a chat template."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "smollm")
    first = (pre_tokenizers.Digits(individual_digits=True) if pre == "smollm"
             else pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 10, trainer)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The same random float16 model in Meta layout (SentencePiece tokenizer.model) and Hugging Face layout
    (a byte-level BPE tokenizer.json split like SmolLM)."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) * 0.4 + 0.8 if "norm" in name else torch.randn_like(p) * 0.03)
    state = {k: v.half() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("export")
    save_meta(root / "meta", state, CONFIG)
    (root / "meta" / "tokenizer.model").write_bytes(SPM.read_bytes())
    save_hf(root / "hf", state, CONFIG)
    write_byte_level_tokenizer(root / "hf", "smollm")
    return root


@pytest.fixture
def same_blocks(quantised_weights, same_weights):
    """``same_blocks(a, b)``: the two models' quantised modules are the same ones, holding the same formats,
    blocks, scales and offsets."""
    def same(a: Transformer, b: Transformer) -> bool:
        ours, theirs = quantised_weights(a), quantised_weights(b)
        return ours.keys() == theirs.keys() and all(same_weights(ours[n], theirs[n]) for n in ours)
    return same


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("gguf_type", ["q4_1", "q8_0", "q4_k", "f16"])
def test_round_trip_equals_quantising_on_load(models_dir, layout, gguf_type, tmp_path, same_blocks,
                                             quantised_weights):
    source = models_dir / layout
    path = export_gguf(source, tmp_path / "model.gguf", gguf_type=gguf_type)
    exported = load_llm(path, quantized=True)
    direct = load_llm(source, quantize=QUANTIZE.get(gguf_type))
    assert exported.config.vocab_size == CONFIG.vocab_size and not exported.config.tie_embeddings
    assert same_blocks(exported.model, direct.model)
    assert len(quantised_weights(direct.model)) == (0 if gguf_type == "f16" else 7 * CONFIG.n_layers + 2)
    tokens = torch.tensor([direct.tokenizer.encode(TEXTS[layout][1])])
    with torch.no_grad():
        assert torch.equal(exported.model(tokens), direct.model(tokens))  # f16: the file's values are the model's
    for text in TEXTS[layout]:
        assert exported.tokenizer.encode(text) == direct.tokenizer.encode(text)
    metadata = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert metadata["general.architecture"] == "llama" and len(metadata["tokenizer.ggml.tokens"]) == 400
    assert metadata["tokenizer.ggml.model"] == {"meta": "llama", "hf": "gpt2"}[layout]
    norm = gguf.GGUFReader(path).tensors[1]
    assert norm.name == "blk.0.attn_norm.weight" and norm.tensor_type == gguf.GGMLQuantizationType.F32


def test_meta_base_with_its_tokenizer_one_level_up(tmp_path, same_blocks):
    """The ImageBind-LLM base fixture (llama_dir/base + llama_dir/tokenizer.model, dim 64): its rows are not whole
    Q4_K super-blocks, so the file holds the Q4_1 blocks that loading it with quantize="q4_k" makes."""
    base = SPM.parent / "base"
    path = export_gguf(base, tmp_path / "base.gguf", gguf_type="q4_k")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["output_norm.weight"] == "F32"
    assert same_blocks(load_llm(path, quantized=True).model, load_llm(base, quantize="q4_k").model)


def test_byte_level_metadata(models_dir, tmp_path):
    path = export_gguf(models_dir / "hf", tmp_path / "model.gguf", gguf_type="q8_0")
    md = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert md["tokenizer.ggml.pre"] == "smollm" and md["tokenizer.chat_template"] == TEMPLATE
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert (tokens[md["tokenizer.ggml.bos_token_id"]], tokens[md["tokenizer.ggml.eos_token_id"]]) == (
        "<|im_start|>", "<|im_end|>")
    assert types[tokens.index("<|im_end|>")] == gguf.TokenType.CONTROL and tokens[-1] == "[PAD399]"
    assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.merges"][0].count(" ") == 1
    loaded = load_llm(path)
    assert loaded.tokenizer.chat_template == TEMPLATE and loaded.tokenizer.eos_id == tokens.index("<|im_end|>")


def test_llama3_style_split_is_detected(models_dir, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((models_dir / "hf" / name).read_bytes())
    write_byte_level_tokenizer(folder, "llama-bpe")
    path = export_gguf(folder, tmp_path / "model.gguf", gguf_type="q8_0")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    exported, direct = load_llm(path), load_llm(folder)
    for text in TEXTS["hf"]:
        assert exported.tokenizer.encode(text) == direct.tokenizer.encode(text)


@pytest.fixture
def llama_cpp(monkeypatch):
    """llama-cpp-python (optional) with its extra weight buffers off: with them 0.3.36 crashes on AMX CPUs for any
    prompt of more than one token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
    return llama_cpp


# max |llama.cpp - ours| / max |logit|: llama.cpp also rounds the activations (to 8 bits for the quantised
# types, to float16 for f16) before each product. Measured: 0.05 % (f16), 1.2-1.8 % (the others), while the
# weights' own quantisation moves the logits 1.6 % (q8_0) to 20-30 % (q4_1, q4_k) from the float model's.
TOLERANCE = {"f16": 0.005, "q8_0": 0.05, "q4_1": 0.05, "q4_k": 0.05}


@pytest.mark.parametrize("layout, gguf_type", [("meta", "q4_1"), ("meta", "q8_0"), ("meta", "q4_k"),
                                               ("meta", "f16"), ("hf", "q8_0")])
def test_llama_cpp_reads_the_file_like_we_do(models_dir, layout, gguf_type, tmp_path, llama_cpp):
    path = export_gguf(models_dir / layout, tmp_path / "model.gguf", gguf_type=gguf_type)
    ours = load_llm(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
    try:
        for text in TEXTS[layout]:
            assert llm.tokenize(text.encode(), add_bos=True) == ours.tokenizer.encode(text), text
        ids = ours.tokenizer.encode(TEXTS[layout][1])
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        expected = ours.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - expected).max() < TOLERANCE[gguf_type] * np.abs(expected).max()


def test_command_line(models_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-gguf", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--overwrite" in out and "q4_1,q8_0,q4_k,f16" in out
    out_file = tmp_path / "out" / "model.gguf"
    assert main(["export-gguf", "--model", str(models_dir / "meta"), "--out", str(out_file), "--type", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out_file}" and out_file.is_file()
    assert main(["export-gguf", "--model", str(models_dir / "meta"), "--out", str(out_file)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"imagebind-llm export-gguf: error: {out_file} already exists; pass --overwrite to replace it, or " \
                  "write elsewhere"
    assert main(["export-gguf", "--model", str(models_dir / "meta"), "--out", str(out_file), "--overwrite"]) == 0
    assert gguf.GGUFReader(out_file).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["model.gguf"]  # no temporary left behind
    capsys.readouterr()
    assert main(["export-gguf", "--model", str(out_file), "--out", str(tmp_path / "again.gguf")]) == 1
    assert "is a GGUF file already" in capsys.readouterr().err
    assert main(["export-gguf", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagebind-llm export-gguf: error: model path") and "does not exist" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "m", "--out", "o.gguf", "--type", "q5_0"], "invalid choice: 'q5_0'"),
    (["--out", "o.gguf"], "the following arguments are required: --model"),
])
def test_command_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-gguf", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_models_gguf_cannot_describe_are_refused(models_dir, tmp_path):
    folder = tmp_path / "llama3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((models_dir / "hf" / "model.safetensors").read_bytes())
    (folder / "tokenizer.model").write_bytes(SPM.read_bytes())
    config = hf_config_dict(LLMConfig(**{**CONFIG.to_dict(), "rope_scaling": {}}))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Llama-3 RoPE frequency scaling"):
        export_gguf(folder, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
    with pytest.raises(ValueError, match="unknown GGUF type 'q2_k'"):
        export_gguf(models_dir / "meta", tmp_path / "model.gguf", gguf_type="q2_k")


def test_a_merged_base_stays_marked_in_its_gguf(models_dir, tmp_path):
    """`merge_delta`'s marker goes into the file's metadata, so the 7B adapter's vanilla-base warning stays quiet."""
    base = shutil.copytree(models_dir / "meta", tmp_path / "merged")
    (base / BASE_MARKER).write_text('{"delta": "7B_chinese_delta"}')
    assert base_marker(export_gguf(base, tmp_path / "merged.gguf", gguf_type="q8_0")) == '{"delta": "7B_chinese_delta"}'
    assert base_marker(export_gguf(models_dir / "meta", tmp_path / "plain.gguf", gguf_type="q8_0")) is None
