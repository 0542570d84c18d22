"""Train the bundled digits CNN deterministically on CPU and write `digits_cnn.pt`.

Run as `python -m deploy.examples.train_digits` (or `python examples/train_digits.py`);
it prints the held-out accuracy. About half a minute with 2 threads. The demo model:
`--width 64 --fp16 --out examples/digits_resnet64.pt` (about 4.5 minutes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

try:
    from deploy.examples.digits_cnn import (
        PIXEL_MEAN, PIXEL_STD, WEIGHTS_PATH, digits_cnn, load_digits_split,
    )
except ImportError:  # run as a plain script from a checkout
    from digits_cnn import PIXEL_MEAN, PIXEL_STD, WEIGHTS_PATH, digits_cnn, load_digits_split

BATCH_SIZE = 64
MAX_SHIFT = 2  # pixels at 32x32: light augmentation, training only


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to MAX_SHIFT pixels, filling with the background value."""
    s = MAX_SHIFT
    background = -PIXEL_MEAN / PIXEL_STD
    padded = nn.functional.pad(x, (s, s, s, s), value=background)
    offsets = torch.randint(0, 2 * s + 1, (x.shape[0], 2), generator=gen).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(epochs: int = 15, seed: int = 0, width: int = 16) -> tuple[nn.Module, float]:
    """Adam + one-cycle schedule; returns the eval-mode model and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    model = digits_cnn(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(train_x) + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            loss = loss_fn(model(random_shift(train_x[idx], gen)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "
              f"test acc {accuracy(model, test_x, test_y):.4f}", flush=True)
    return model.eval(), accuracy(model, test_x, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=16, help="first stage's channels (the demo model: 64)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--fp16", action="store_true",
                        help="store the weights in half precision (the demo model's file: 2.5 MB instead of 4.9)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model, acc = train(args.epochs, args.seed, args.width)
    state = model.state_dict()
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, args.out)
    print(f"held-out test accuracy {acc:.4f} ({time.perf_counter() - start:.1f}s); "
          f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
