"""Stage-2 step time: the official structure against tuning only the injected layers, in the same run.

* ``official``: LoRA, biases and norms in every decoder layer, and the LM head at every position (the loss
  of the official ``main_finetune.py``, computed on the full ``[B, S, V]`` logits).
* ``head``: the same structure, the LM head only at the positions that predict a label (what `TrainStep`
  does; the same loss).
* ``lora_layers=N``: also LoRA, biases and norms only in the last ``N`` layers, the ones that receive the
  visual term (``--set model.inject_layers=N --set model.lora_layers=N``): the backward pass stops there.

Each variant runs the recipe's optimiser step (`train_step`, AdamW with the official groups) on the same
synthetic batch; steps alternate between the variants so that load drift hits all alike; median step time.
Batches: ``yes/no`` (a 58-token prompt and a 2-token answer, the demo's one-turn questions) and ``caption``
(a 40-token prompt and a 56-token answer).

    python bench/finetune.py                       # SmolLM2-135M (the embedded base), batch 8, inject 8
    python bench/finetune.py --contend 1           # with a busy neighbour process
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import contend

from imagebind_llm.model import ModelSpec, create_model
from imagebind_llm.train.loop import TrainStep, lm_loss, train_step
from imagebind_llm.train.optim import build_optimizer

SHAPES = {"yes/no": (58, 2), "caption": (40, 56)}  # (prompt tokens, answer tokens)


class OfficialStep(TrainStep):
    """The loss on the full ``[B, S, V]`` logits, as the official engine computes it."""

    def forward(self, tokens, labels, has_media=None, images=None, features=None):
        visual = self.visual(len(tokens), torch.ones(len(tokens), dtype=torch.bool), images, features)
        return lm_loss(self.model(tokens, visual), labels)


def batch(vocab: int, size: int, prompt: int, answer: int, feature_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (size, prompt + answer), generator=g)
    labels = tokens.clone()
    labels[:, :prompt] = 0
    features = torch.nn.functional.normalize(torch.randn(size, feature_dim, generator=g), dim=-1)
    return {"tokens": tokens, "labels": labels, "features": features}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="injected (and, in the last variant, tuned) layers")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--contend", type=int, default=0, help="busy neighbour processes during the run")
    args = p.parse_args()
    spec = ModelSpec(name="tiny-random", with_encoder=False, feature_dim=256, inject_layers=args.layers,
                     bind_hidden_dim=576, quantized=False)
    steps = {}
    for name, lora_layers, step in (("official", None, OfficialStep), ("head", None, TrainStep),
                                    (f"lora_layers={args.layers}", args.layers, TrainStep)):
        torch.manual_seed(0)
        module = step(create_model(spec, lora_layers=lora_layers, phase="finetune")).train()
        steps[name] = (module, build_optimizer(module, 1e-4, 0.05))
    vocab = steps["official"][0].model.llm.config.vocab_size
    print(f"stage 2 step, SmolLM2-135M, batch {args.batch}, {args.layers} injected layers, "
          f"{torch.get_num_threads()} threads, {args.contend} busy neighbours")
    print(f"{'batch':8} {'variant':16} {'step ms':>9} {'samples/s':>10} {'vs official':>12}")
    neighbours = contend(args.contend)
    try:
        for kind, (prompt, answer) in SHAPES.items():
            inputs = batch(vocab, args.batch, prompt, answer, 256)
            times: dict[str, list[float]] = {name: [] for name in steps}
            for i in range(args.steps + 1):
                for name, (module, optimizer) in steps.items():
                    t0 = time.perf_counter()
                    train_step(module, optimizer, [inputs])
                    if i:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["official"])
            for name, samples in times.items():
                seconds = statistics.median(samples)
                print(f"{kind:8} {name:16} {seconds * 1e3:9.0f} {args.batch / seconds:10.2f} {base / seconds:11.2f}x")
    finally:
        for n in neighbours:
            n.kill()


if __name__ == "__main__":
    main()
