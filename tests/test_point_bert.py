"""Point-BERT branch: parity with ImageBind-LLM's encoder, sampling/grouping, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagebind_llm.encoders import ImageBind, ImageBindConfig, farthest_point_sample, knn_group
from imagebind_llm.hub import read_state_dict

FIX = Path(__file__).parent / "fixtures" / "point"


@pytest.fixture(scope="module")
def io() -> dict:
    return torch.load(FIX / "point_small_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def config(io) -> ImageBindConfig:
    c = dict(io["config"])
    kwargs = c.pop("ImageBindModel_kwargs")
    c["point_fps_start"] = c.pop("fps_start_index")
    return ImageBindConfig.from_dict({**kwargs, **c})


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return read_state_dict(FIX / "point_small.pth")


@pytest.fixture(scope="module")
def model(config, state) -> ImageBind:
    return ImageBind(config).load_official(state)


@pytest.mark.parametrize("case", ["clouds_airplane_car", "random_3000"])
def test_point_embeddings_match_official(model, io, case):
    with torch.no_grad():
        out = model({"point": io["inputs"][case]})["point"]
    torch.testing.assert_close(out, io["outputs"][case], atol=1e-4, rtol=1e-4)


def test_trunk_output_matches_official(model, io):
    with torch.no_grad():
        out = model.towers["point"].trunk(io["inputs"]["clouds_airplane_car"])
    torch.testing.assert_close(out, io["outputs"]["trunk_airplane_car"], atol=1e-4, rtol=1e-4)


def test_point_and_image_modalities_together(model):
    torch.manual_seed(0)
    out = model({"point": torch.randn(1, 256, 3), "depth": torch.randn(1, 1, 224, 224)})
    assert out["point"].shape == out["depth"].shape == (1, model.config.out_embed_dim)
    torch.testing.assert_close(out["point"].norm(dim=-1), torch.ones(1))  # point scale is 1


def test_batch_of_one_equals_batch(model, io):
    x = io["inputs"]["clouds_airplane_car"]
    with torch.no_grad():
        full = model({"point": x})["point"]
        singles = torch.cat([model({"point": x[i : i + 1]})["point"] for i in range(2)])
    torch.testing.assert_close(singles, full, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32(config, state, io):
    model = ImageBind(config).load_official(state, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model({"point": io["inputs"]["clouds_airplane_car"].double()})["point"]  # float64 input is cast
    assert F.cosine_similarity(out, io["outputs"]["clouds_airplane_car"], dim=-1).min() > 0.999


def test_fewer_points_than_groups_raises(model):
    with pytest.raises(ValueError, match=r"point: got shape \[1, 63, 3\].*N >= 64"):
        model({"point": torch.randn(1, 63, 3)})
    with pytest.raises(ValueError, match=r"point: got shape \[2, 100, 4\]"):
        model({"point": torch.randn(2, 100, 4)})
    with pytest.raises(ValueError, match="point: input contains NaN"):
        model({"point": torch.full((1, 100, 3), float("nan"))})


def test_fps_hand_example():
    # On a line, starting at 0: the farthest point is 10, then the one farthest from {0, 10} is 4.
    xyz = torch.tensor([[0.0, 1, 4, 6.5, 10]]).T.mul(torch.tensor([1.0, 0, 0])).unsqueeze(0)
    assert farthest_point_sample(xyz, 3).tolist() == [[0, 4, 2]]
    assert farthest_point_sample(xyz, 3, start=4).tolist() == [[4, 0, 2]]


def test_fps_random_start_is_reproducible_with_generator():
    xyz = torch.randn(2, 500, 3, generator=torch.Generator().manual_seed(1))
    a = farthest_point_sample(xyz, 16, start=None, generator=torch.Generator().manual_seed(7))
    b = farthest_point_sample(xyz, 16, start=None, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.unique(dim=1).shape[1] == 16  # no point picked twice


def test_random_start_option_changes_embedding(config, state, io):
    from dataclasses import replace

    model = ImageBind(replace(config, point_fps_start=None)).load_official(state)
    x = io["inputs"]["random_3000"]
    with torch.no_grad():
        outs = [model({"point": x}, generator=torch.Generator().manual_seed(s))["point"] for s in (1, 1, 2)]
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    assert not torch.allclose(outs[0], io["outputs"]["random_3000"])


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    xyz, centres = torch.randn(2, 300, 3, generator=g), torch.randn(2, 10, 3, generator=g)
    idx = knn_group(xyz, centres, 8)
    ref = torch.cdist(centres, xyz).argsort(dim=-1)[..., :8]
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


def test_a_fresh_point_tower_trains(config, io):
    """Randomly initialised (as `train bind` starts a scratch tower), the branch gives different clouds
    different unit embeddings, and a contrastive loss sends a gradient into the projection. With a zero
    projection every cloud got the zero embedding and a scratch point tower never trained."""
    torch.manual_seed(0)
    model = ImageBind(config)
    clouds = io["inputs"]["clouds_airplane_car"]
    out = model({"point": clouds})["point"]
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(clouds)))
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    F.cross_entropy(out @ out.T * 10, torch.arange(len(clouds))).backward()
    grad = model.towers["point"].trunk.pc_projection.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
