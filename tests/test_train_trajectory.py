"""The recipe's optimiser, schedule and step against the official training trajectory (tests/fixtures/adapter)."""

from pathlib import Path

import pytest
import torch

from imagebind_llm.model.convert import official_names
from imagebind_llm.train import load_config
from imagebind_llm.train.loop import TrainStep, enable_activation_checkpointing, lm_loss, train_step
from imagebind_llm.train.optim import build_optimizer, decays
from imagebind_llm.train.schedule import WarmupCosine
from test_model import INPUTS, IO, official_model, small_encoder

TRAJECTORY = torch.load(Path(__file__).parent / "fixtures" / "adapter" / "train_trajectory.pt", weights_only=True)


@pytest.fixture(scope="module")
def encoder():
    return small_encoder()


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_eight_steps_reproduce_the_official_trajectory(phase, encoder):
    hyper, ref = TRAJECTORY["hyper"], TRAJECTORY["results"][phase]
    config = load_config(1 if phase == "pretrain" else 2, None, [  # the recipe configured like the official run
        f"optim.lr={hyper['lr']}", f"optim.weight_decay={hyper['weight_decay']}", f"optim.min_lr={hyper['min_lr']}",
        f"optim.warmup_epochs={hyper['warmup_epochs']}", f"train.epochs={hyper['epochs']}"])
    optim = config.optim
    assert optim.betas == hyper["betas"] and optim.clip_grad is hyper["grad_clip"]
    model = official_model(phase, encoder).train()
    module = TrainStep(model)
    optimizer = build_optimizer(module, optim.lr, optim.weight_decay, optim.betas, optim.eps)
    schedule = WarmupCosine(optim.lr, optim.min_lr, optim.warmup_epochs, config.train.epochs)
    per_epoch = hyper["steps_per_epoch"]
    losses, lrs = [], []
    for epoch in range(hyper["epochs"]):
        for i, batch in enumerate(ref["batches"]):
            lrs.append(schedule.apply(optimizer, epoch + i / per_epoch))
            losses.append(train_step(module, optimizer, [batch]))
    torch.testing.assert_close(torch.tensor(lrs, dtype=ref["lrs"].dtype), ref["lrs"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(losses, dtype=ref["losses"].dtype), ref["losses"], rtol=1e-5, atol=0)
    names = official_names(model)
    trained = {names[n]: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(ref["final_trainable"])
    for name, expected in ref["final_trainable"].items():
        torch.testing.assert_close(trained[name].reshape(expected.shape), expected, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_step_loss_and_gradients_equal_the_official_ones(phase, encoder):
    ref = IO["results"][phase]
    model = official_model(phase, encoder).train()
    loss = TrainStep(model)(ref["train_tokens"], ref["train_labels"], images=INPUTS["vision_batch"])
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=0)
    loss.backward()
    names = official_names(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = ref["grads"][names[name]]
            torch.testing.assert_close(param.grad.reshape(expected.shape), expected, atol=1e-4, rtol=1e-4, msg=name)


def test_weight_decay_groups_follow_the_official_shapes(encoder):
    model = official_model("pretrain", encoder)
    names = official_names(model)
    for name, param in model.named_parameters():
        official_shape = param.shape if not name.startswith("gates.") else (1, param.numel(), 1, 1)
        expected = len(official_shape) > 1 and not names[name].endswith(".bias")
        assert decays(name, param) == expected, name


def test_schedule_is_linear_then_half_cosine():
    schedule = WarmupCosine(lr=2.0, min_lr=0.5, warmup_epochs=1.0, epochs=3.0)
    assert schedule(0.0) == 0.0 and schedule(0.5) == pytest.approx(1.0)
    assert schedule(1.0) == pytest.approx(2.0) and schedule(2.0) == pytest.approx(1.25)
    assert schedule(3.0) == pytest.approx(0.5)


def test_loss_without_labels_is_a_connected_zero():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    loss = lm_loss(logits, torch.zeros(2, 5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_activation_checkpointing_keeps_loss_and_gradients(encoder):
    ref = IO["results"]["finetune"]
    grads = []
    for checkpointing in (False, True):
        model = official_model("finetune", encoder).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        loss = TrainStep(model)(ref["train_tokens"], ref["train_labels"], images=INPUTS["vision_batch"])
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert set(dict(model.named_parameters())) == set(dict(official_model("finetune", encoder).named_parameters()))


def test_gradient_clipping_bounds_the_update(encoder):
    ref = TRAJECTORY["results"]["pretrain"]
    model = official_model("pretrain", encoder).train()
    module = TrainStep(model)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    train_step(module, optimizer, [ref["batches"][0]], clip_grad=1e-3)
    after = [p.detach() for p in module.parameters() if p.requires_grad]
    step_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(after, before)]))
    assert step_norm == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the update is the clipped gradient
