"""ImageBind encoder: parity with the official outputs, checkpoint layout, dtypes, batching, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagebind_llm.encoders import ImageBind, ImageBindConfig, load_official, official_shapes, to_official
from imagebind_llm.hub import read_state_dict
from imagebind_llm.encoders.layers import Attention

FIX = Path(__file__).parent / "fixtures" / "imagebind"
CASES = ["vision", "vision_clips", "text", "audio", "depth", "thermal", "imu"]


def _modality(case: str) -> str:
    return "vision" if case == "vision_clips" else case


@pytest.fixture(scope="module")
def small_config() -> ImageBindConfig:
    kwargs = json.loads((FIX / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    return ImageBindConfig.from_dict({**kwargs, "with_point": False})


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    return read_state_dict(FIX / "imagebind_small.pth")


@pytest.fixture(scope="module")
def small(small_config, small_state) -> ImageBind:
    return ImageBind(small_config).load_official(small_state)


@pytest.fixture(scope="module")
def io() -> dict:
    return torch.load(FIX / "imagebind_small_io.pt", weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_small_matches_official(small, io, case):
    m = _modality(case)
    with torch.no_grad():
        out = small({m: io["inputs"][case]})[m]
    torch.testing.assert_close(out, io["outputs"][case], atol=1e-4, rtol=1e-4)


def test_all_modalities_in_one_call(small, io):
    inputs = {c: io["inputs"][c] for c in CASES if c != "vision_clips"}
    with torch.no_grad():
        out = small(inputs)
    assert set(out) == set(inputs)
    for c in inputs:
        torch.testing.assert_close(out[c], io["outputs"][c], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_point,manifest",
                         [(False, "imagebind_huge_keys.json"), (True, "imagebind_w3D_keys.json")])
def test_huge_keys_and_shapes_match_manifest(with_point, manifest):
    with torch.device("meta"):
        model = ImageBind(ImageBindConfig.huge(with_point=with_point))
    expected = json.loads((FIX / manifest).read_text())
    got = official_shapes(model)
    assert sorted(set(got) ^ set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


def test_huge_config_values():
    c = ImageBindConfig.huge()
    assert (c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads) == (1280, 32, 16)
    assert (c.text_embed_dim, c.text_num_blocks, c.text_num_heads) == (1024, 24, 16)
    assert c.out_embed_dim == 1024 and c.with_point and c.point_depth == 12 and c.point_num_group == 512
    assert not ImageBindConfig.huge(with_point=False).with_point


def test_config_json_round_trip(small_config):
    d = json.loads(json.dumps(small_config.to_dict()))
    assert ImageBindConfig.from_dict(d) == small_config
    with pytest.raises(ValueError, match="unknown ImageBindConfig fields.*'vision_width'"):
        ImageBindConfig.from_dict({"vision_width": 3})
    with pytest.raises(ValueError, match="not divisible"):
        ImageBindConfig(vision_embed_dim=100, vision_num_heads=16)


def test_official_round_trip_and_text_mask(small, small_state):
    exported = to_official(small)
    assert set(exported) == set(small_state)
    for k, v in small_state.items():
        torch.testing.assert_close(exported[k].to(v.dtype), v, msg=k)


def test_meta_init_loads_in_target_dtype(small_config, small_state, io):
    with torch.device("meta"):
        model = ImageBind(small_config)
    model.load_official(small_state, dtype=torch.bfloat16)
    tensors = model.state_dict()
    assert not any(t.is_meta for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point() and t.ndim)
    assert tensors["towers.audio.log_logit_scale"].dtype == torch.float32


def test_bf16_close_to_fp32(small_config, small_state, small, io):
    model = load_official(small_state, small_config, dtype=torch.bfloat16)
    with torch.no_grad():
        for case in CASES:
            m = _modality(case)
            lo, ref = model({m: io["inputs"][case]})[m], small({m: io["inputs"][case]})[m]
            assert lo.dtype == torch.float32
            cos = F.cosine_similarity(lo, ref, dim=-1)
            assert cos.min() > 0.999, (case, cos)
            torch.testing.assert_close(lo.norm(dim=-1), ref.norm(dim=-1), rtol=1e-3, atol=0)  # exact scales


def test_safetensors_file(tmp_path, small_config, small_state, io):
    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small_state.items()}, str(path))
    model = load_official(path, small_config)
    with torch.no_grad():
        out = model({"audio": io["inputs"]["audio"]})["audio"]
    torch.testing.assert_close(out, io["outputs"]["audio"], atol=1e-4, rtol=1e-4)


def test_batch_of_one_equals_batch(small, io):
    with torch.no_grad():
        for case in ("vision", "text", "audio", "imu"):
            m, x = _modality(case), io["inputs"][case]
            full = small({m: x})[m]
            singles = torch.cat([small({m: x[i : i + 1]})[m] for i in range(x.shape[0])])
            torch.testing.assert_close(singles, full, atol=1e-5, rtol=1e-5)


def test_prenorm_is_head_output(small, io):
    x = io["inputs"]["depth"]
    with torch.no_grad():
        out, pre = small({"depth": x}, return_prenorm=True)
    assert pre["depth"].shape == out["depth"].shape
    torch.testing.assert_close(F.normalize(pre["depth"], dim=-1) * 5.0, out["depth"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pre["depth"].norm(dim=-1), torch.full((2,), 5.0))


def test_image_as_video_clip_equals_image(small, io):
    """A 2-frame clip whose frames are equal gives the same tokens as the image (PadIm2Video repeat)."""
    img = io["inputs"]["vision"][:1]
    clip = img.unsqueeze(2).expand(-1, -1, 2, -1, -1)  # [1, 3, 2, 224, 224]
    with torch.no_grad():
        a = small({"vision": img})["vision"]
        b = small({"vision": clip.unsqueeze(1)})["vision"]  # [1, 1, 3, 2, 224, 224]: one clip
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,bias_kv", [(False, True), (True, False), (False, False)])
def test_attention_matches_torch_multihead_attention(causal, bias_kv):
    torch.manual_seed(0)
    dim, heads, B, N = 32, 4, 3, 9
    peer = torch.nn.MultiheadAttention(dim, heads, add_bias_kv=bias_kv, batch_first=True).eval()
    ours = Attention(dim, heads, add_bias_kv=bias_kv).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(peer.in_proj_weight)
        ours.qkv.bias.copy_(peer.in_proj_bias)
        ours.proj.weight.copy_(peer.out_proj.weight)
        ours.proj.bias.copy_(peer.out_proj.bias)
        if bias_kv:
            ours.bias_k.copy_(peer.bias_k.view(1, 1, dim))
            ours.bias_v.copy_(peer.bias_v.view(1, 1, dim))
        x = torch.randn(B, N, dim)
        mask = torch.full((N, N), float("-inf")).triu(1) if causal else None
        ref = peer(x, x, x, need_weights=False, attn_mask=mask)[0]
        torch.testing.assert_close(ours(x, causal), ref, atol=1e-5, rtol=1e-5)


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_modality(small):
    with pytest.raises(ValueError, match="unknown modality 'video'.*vision"):
        small({"video": torch.zeros(1, 3, 224, 224)})
    with pytest.raises(ValueError, match="no point branch"):
        small({"point": torch.zeros(1, 1024, 3)})


@pytest.mark.parametrize("modality,x,pattern", [
    ("vision", torch.zeros(1, 3, 1, 224, 224), r"vision: got shape \[1, 3, 1, 224, 224\], expected \[B, 3, 224, 224\]"),
    ("vision", torch.zeros(2, 3, 112, 112), r"vision: got shape .*expected"),
    ("audio", torch.zeros(2, 3, 1, 128, 200), r"audio: got shape .*\[B, S, 1, 128, 204\]"),
    ("text", torch.zeros(2, 76, dtype=torch.long), r"text: got shape \[2, 76\].*\[B, 77\]"),
    ("text", torch.zeros(2, 77), r"text: token ids must be an integer tensor"),
    ("text", torch.full((1, 77), 49408), r"text: token ids must lie in \[0, 49408\)"),
    ("imu", torch.zeros(1, 6, 2000, dtype=torch.long), r"imu: expected a floating-point tensor"),
    ("depth", torch.full((1, 1, 224, 224), float("nan")), r"depth: input contains NaN"),
    ("thermal", torch.zeros(0, 1, 224, 224), r"thermal: got shape \[0, 1, 224, 224\]"),
])
def test_bad_inputs(small, modality, x, pattern):
    with pytest.raises(ValueError, match=pattern):
        small({modality: x})


def test_strict_loading_errors(small_config, small_state):
    state = dict(small_state)
    del state["modality_trunks.audio.blocks.0.attn.bias_k"]
    state["modality_heads.vision.9.weight"] = torch.zeros(1)
    state["modality_heads.text.proj.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        ImageBind(small_config).load_official(state)
    msg = str(err.value)
    assert "missing keys (1): modality_trunks.audio.blocks.0.attn.bias_k" in msg
    assert "unexpected keys (1): modality_heads.vision.9.weight" in msg
    assert "modality_heads.text.proj.1.weight: checkpoint [3, 3]" in msg


def test_point_checkpoint_into_model_without_point_branch(small_config):
    state = read_state_dict(Path(__file__).parent / "fixtures" / "point" / "point_small.pth")
    with pytest.raises(ValueError, match="unexpected keys.*with_point=True.*point_trunk"):
        ImageBind(small_config).load_official(state)


def test_missing_checkpoint_file(tmp_path, small_config):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ImageBind(small_config).load_official(tmp_path / "nope.pth")


@pytest.mark.parametrize("key,modality", [("vision", "vision"), ("audio", "audio"), ("text_tokens", "text"),
                                          ("video", "vision")])
def test_official_preprocessed_media(small, key, modality):
    """Real media, preprocessed by the official loaders, embed to the official small-model outputs."""
    src = FIX / ("preprocess_public_video.pt" if key == "video" else "preprocess_public.pt")
    x = torch.load(src, weights_only=True)[key]
    ref = torch.load(FIX / "media_embeddings_small.pt", weights_only=True)["embeddings"][key]
    with torch.no_grad():
        out = small({modality: x})[modality]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_load_official_takes_a_json_config_and_detects_the_point_branch():
    from imagebind_llm.encoders import load_official

    model = load_official(FIX / "imagebind_small.pth", FIX / "imagebind_small.json")
    assert not model.config.with_point and model.config.out_embed_dim == 32


def _frame_by_frame_stem(stem, x: torch.Tensor, frames: int) -> torch.Tensor:
    """``vision_conv_stem`` by hand: each frame through conv/BN(eval)/ReLU with the functional API, the image
    repeated to ``frames``, then the patchify as a plain convolution per frame pair."""
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stem.convs if isinstance(m, torch.nn.BatchNorm2d)]
    outs = []
    for t in range(x.shape[2]):
        h = x[:, :, t]
        for conv, bn in zip(convs, norms):
            h = F.conv2d(h, conv.weight, stride=2, padding=1)
            h = F.relu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))
        outs.append(h)
    h = torch.stack(outs * frames if len(outs) == 1 else outs, dim=2)
    return F.conv3d(h, stem.proj.weight, stride=stem.proj.stride).flatten(2).transpose(1, 2)


def test_vision_conv_stem_tokens_and_official_round_trip(small_config):
    """Our extension: stride-2 convolutions per frame before the patchify, same patch count, an image equal
    to a clip of copies of it, and a checkpoint round trip through the official layout."""
    plain = {**small_config.to_dict(), "kernel_size": [2, 28, 28]}
    config = ImageBindConfig.from_dict({**plain, "vision_conv_stem": [4, 8]})
    assert config.num_patches("vision") == ImageBindConfig.from_dict(plain).num_patches("vision") == 64
    torch.manual_seed(0)
    model = ImageBind(config)
    stem = model.towers["vision"].stem
    for bn in (m for m in stem.convs if isinstance(m, torch.nn.BatchNorm2d)):  # trained-looking statistics
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    img = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    frames = config.video_frames
    with torch.no_grad():
        tokens = stem(img)
        torch.testing.assert_close(tokens, _frame_by_frame_stem(stem, img.unsqueeze(2), frames))
        clip = torch.stack([img, img.flip(-1)], dim=2)  # two different frames
        torch.testing.assert_close(stem(clip), _frame_by_frame_stem(stem, clip, frames))
        out = model({"vision": img})["vision"]
        same = model({"vision": img.unsqueeze(2).expand(-1, -1, frames, -1, -1).unsqueeze(1)})["vision"]
    assert tokens.shape == (2, config.num_patches("vision"), config.vision_embed_dim)
    torch.testing.assert_close(same, out, atol=1e-5, rtol=1e-5)

    official = to_official(model)
    assert any(".rgbt_stem.conv_stem.1.running_mean" in k for k in official)
    again = ImageBind(config).load_official(official).eval()
    with torch.no_grad():
        torch.testing.assert_close(again({"vision": img})["vision"], out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strict|missing|unexpected"):
        ImageBind(ImageBindConfig.from_dict(plain)).load_official(official)  # a stem the config lacks


@pytest.mark.parametrize("stem,pattern", [([8, 8], "must divide the patch size 14x14"), ([0], "must be positive")])
def test_vision_conv_stem_bad_configs(small_config, stem, pattern):
    with pytest.raises(ValueError, match=pattern):
        ImageBindConfig.from_dict({**small_config.to_dict(), "vision_conv_stem": stem})


def test_vision_max_pool_reads_the_maximum_over_patch_tokens(small_config, small_state, small, io):
    """``vision_pool="max"`` changes only the pooling: same weights and keys, head on the element-wise max
    of the last block's patch tokens (CLS excluded) instead of on CLS."""
    pooled = ImageBind(ImageBindConfig.from_dict({**small_config.to_dict(), "vision_pool": "max"}))
    pooled = pooled.load_official(small_state).eval()
    x = io["inputs"]["vision"]
    tokens = {}
    for name, model in (("max", pooled), ("cls", small)):
        tower = model.towers["vision"]
        hook = tower.blocks[-1].register_forward_hook(lambda m, i, o, name=name: tokens.__setitem__(name, o))
        with torch.no_grad():
            _, pre = model({"vision": x}, return_prenorm=True)
        hook.remove()
        picked = tokens[name][:, 1:].amax(dim=1) if name == "max" else tokens[name][:, 0]
        with torch.no_grad():
            torch.testing.assert_close(pre["vision"], tower.head_proj(tower.head_norm(picked)))
    torch.testing.assert_close(tokens["max"], tokens["cls"])
    with pytest.raises(ValueError, match="vision_pool='mean'"):
        ImageBindConfig(vision_pool="mean")
