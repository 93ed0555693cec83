"""Train a noise-conditional classifier for classifier guidance:
``python -m train.classifier --out checkpoints/mnist-noisy-classifier [--steps N --seed S]``.

The classifier learns p(y | x_t, t) on the ``mnist`` train split noised by the VP process of the diffusion model
it will guide (linear β schedule, 1000 steps, as ``checkpoints/mnist-vp``): x_t = ᾱ_t x0 + β̄_t ε with t uniform
(Dhariwal & Nichol 2021, §4.1), digits padded to 32×32 and randomly shifted by up to 2 pixels. Runs on accelerate
(one device, or ``accelerate launch`` for data parallelism). At the end it reports held-out accuracy per noise
level — at high noise no classifier can beat chance, which is what the guidance gradient then honestly says — at
32×32 and at MNIST's native 28×28 (the network is fully convolutional with a global mean pool, so it takes either;
the 28×28 models guide it at 28×28), and writes the model (safetensors) plus a README.md with the command, the
accuracy table, the training time and the hardware.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import load_dataset
from models.classifier import NoisyClassifier
from schedulers.process import expand_to
from train.judge import MAX_SHIFT, hardware_description, random_shift
from train.run import launch_command, make_accelerator, run_steps

REPORT_TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
REPORT_SIZES = (32, 28)  # the training size, and MNIST's native size that the 28×28 diffusion models sample at


def noised(classifier: NoisyClassifier, x0: torch.Tensor, timesteps: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    """x_t = ᾱ_t x0 + β̄_t ε under the classifier's β schedule."""
    alpha, beta = classifier.schedule.coefficients(timesteps)
    noise = torch.randn(x0.shape, generator=generator)
    return expand_to(alpha.float(), x0) * x0 + expand_to(beta.float(), x0) * noise


def train_classifier(steps: int, batch_size: int, learning_rate: float, seed: int, cpu: bool) -> NoisyClassifier:
    """A classifier trained from scratch with AdamW and a one-cycle schedule (``train.run``'s accelerator and step
    loop; each process draws its own batches); eval mode, on the CPU."""
    accelerator = make_accelerator(cpu, mixed_precision="no")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    images, labels = load_dataset("mnist", image_size=32, split="train").tensors()
    classifier = NoisyClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    classifier, optimizer, schedule = accelerator.prepare(classifier, optimizer, schedule)
    model = accelerator.unwrap_model(classifier)

    def step(index: int) -> dict[str, float]:
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        timesteps = torch.randint(model.config.num_train_timesteps, (batch_size,), generator=generator)
        x_t = noised(model, random_shift(images[batch], MAX_SHIFT, generator), timesteps, generator)
        loss = F.cross_entropy(classifier(x_t.to(accelerator.device), timesteps.to(accelerator.device)),
                               labels[batch].to(accelerator.device))
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    run_steps(step, 0, steps, "training the noisy classifier", show=accelerator.is_main_process)
    return model.eval().cpu()


@torch.no_grad()
def accuracy_per_noise_level(classifier: NoisyClassifier, images: torch.Tensor, labels: torch.Tensor,
                             timesteps=REPORT_TIMESTEPS, seed: int = 0) -> dict[int, float]:
    """Held-out accuracy at each timestep, the same noise draw for every model (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for t in timesteps:
        x_t = noised(classifier, images, torch.full((len(images),), t), generator)
        result[t] = (classifier(x_t, t).argmax(1) == labels).float().mean().item()
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m train.classifier", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/mnist-noisy-classifier"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        parser.error("--steps and --batch-size must be positive integers, --learning-rate a positive number")

    started = time.perf_counter()
    classifier = train_classifier(args.steps, args.batch_size, args.learning_rate, args.seed, args.cpu)
    seconds = time.perf_counter() - started
    accuracy = {size: accuracy_per_noise_level(classifier, *load_dataset("mnist", image_size=size,
                                                                          split="heldout").tensors())
                for size in REPORT_SIZES}
    table = "\n".join(f"| {t} | {float(classifier.schedule.sigma(torch.tensor(t))):.3g} | "
                      + " | ".join(f"{accuracy[size][t]:.1%}" for size in REPORT_SIZES) + " |"
                      for t in REPORT_TIMESTEPS)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    classifier.save_pretrained(args.out, safe_serialization=True)
    command = launch_command(argv, 1, "train.classifier")
    parameters = sum(p.numel() for p in classifier.parameters())
    (args.out / "README.md").write_text(f"""# mnist-noisy-classifier

A {parameters:,}-parameter noise-conditional classifier (`models.classifier.NoisyClassifier`) of x_t under the VP
process of `checkpoints/mnist-vp` (linear β, 1000 steps), for classifier and similarity guidance
(`DiffusionImagePipeline(..., classifier=...)`, `guidance_mode="classifier"`).

- command: `{command}`
- training time: {seconds:.0f} s; hardware: {hardware_description()}

Held-out accuracy (500 digits) per timestep t and its noise level σ = β̄/ᾱ, at the training size and at MNIST's
native 28×28 (the network is fully convolutional with a global mean pool, so it classifies either):

| t | σ | {" | ".join(f"accuracy at {size}×{size}" for size in REPORT_SIZES)} |
|---|---|{"---|" * len(REPORT_SIZES)}
{table}
""")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
