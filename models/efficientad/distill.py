"""Distil EfficientAD's teacher PDN from a backbone's features:

    python -m models.efficientad.distill --arch wide_resnet50_2 --images DIR [--pretrained imagenet]
        [--size s|m] [--steps 60000] [--out output/teachers/pdn_s_wide_resnet50_2.npz] [--resume]

Targets (as in the paper's pretraining): the backbone's layer2 and its layer3 resized to layer2's
grid, concatenated, averaged over 3 x 3 neighbourhoods (zero padding counted), averaged over
groups of adjacent channels down to 384 and resized bilinearly to the PDN's grid; then normalised
per channel with the mean and standard deviation of up to ``--norm_images`` images (stored in the
teacher file). The PDN is
trained to regress them (mean squared error, Adam 1e-4, weight decay 1e-5, ``--batch_size`` images
drawn from (seed, step), so a resumed run draws the same batches).

The teacher file is described in models.efficientad.teacher (an npz, no pickle). While it trains,
``<out>.fitstate.npz`` holds the weights and the Adam state every ``--save_every`` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import paddle
from paddle import nn
from tqdm import tqdm

from core.device import select_device, set_cpu_threads
from core.errors import CheckpointError, ConfigError, InputError
from core.runtime import CPU_THREADS
from core.script import non_negative_int, positive_int, run_main
from models.checkpoint import read_npz, write_npz
from models.components.backbone import ARCHS, build_trunk, check_arch
from models.components.layers import bilinear_resize
from models.components.trained import optimizer_arrays, restore_optimizer
from models.efficientad.images import ImageFolder
from models.efficientad.networks import CHANNELS, check_size, pdn, pdn_grid
from models.efficientad.teacher import (
    KIND,
    ChannelMoments,
    load_weights,
    make_adam,
    target_stats,
    teacher_arrays,
)


class TargetFeatures(nn.Layer):
    """Images (N, 3, S, S) -> distillation targets (N, 384, g, g) from a trunk's layer2 + layer3."""

    def __init__(self, trunk: nn.Layer, side: int) -> None:
        super().__init__()
        self.trunk = trunk
        c2, c3 = trunk.channels
        if (c2 + c3) % CHANNELS:
            raise ConfigError(f"--arch {trunk.arch}: layer2 + layer3 have {c2 + c3} channels, "
                              f"not a multiple of {CHANNELS}")
        self.group = (c2 + c3) // CHANNELS
        g2, g3 = side // 8, side // 16
        self.up = bilinear_resize((g3, g3), (g2, g2))
        self.down = bilinear_resize((g2, g2), (pdn_grid(side),) * 2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        layer2, layer3 = self.trunk(x)
        features = paddle.concat([layer2, self.up(layer3)], axis=1)
        features = nn.functional.avg_pool2d(features, 3, stride=1, padding=1, exclusive=False)
        n, c, h, w = features.shape
        features = paddle.reshape(features, [n, CHANNELS, self.group, h, w]).mean(axis=2)
        return self.down(features)


def channel_stats(extractor: TargetFeatures, images: ImageFolder, count: int, seed: int,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (384,) of the targets over ``count`` images drawn without
    replacement from (seed) (0 or more than there are: all), every grid position counted."""
    order = np.random.default_rng([seed, 1]).permutation(len(images))
    order = order[:count] if 0 < count < len(order) else order
    moments = ChannelMoments()
    with paddle.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="target statistics", unit="batch",
                          file=sys.stderr, leave=False):
            moments.add(extractor(paddle.to_tensor(images.batch(order[start:start + batch_size]))))
    return moments.result()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.efficientad.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="folder of images (sub-folders too), e.g. ImageNet train")
    parser.add_argument("--arch", default="wide_resnet50_2",
                        help=f"{', '.join(ARCHS)} (default wide_resnet50_2)")
    parser.add_argument("--pretrained", default="imagenet", help="imagenet, PATH.pdparams or none")
    parser.add_argument("--size", default="s", help="PDN size: s or m (default s)")
    parser.add_argument("--steps", type=positive_int, default=60000, help="optimizer steps (default 60000)")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="images per step (default 16)")
    parser.add_argument("--image_size", type=positive_int, default=256, help="input side (default 256)")
    parser.add_argument("--norm_images", type=non_negative_int, default=1000,
                        help="images for the target mean/std, 0 = all (default 1000)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of weights and batches")
    parser.add_argument("--save_every", type=non_negative_int, default=1000,
                        help="save the resumable state every N steps, 0 = never (default 1000)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.fitstate.npz")
    parser.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N (default cpu)")
    parser.add_argument("--cpu_threads", type=positive_int, default=CPU_THREADS,
                        help="CPU threads (default: the cores, at most 8)")
    parser.add_argument("--out", default=None,
                        help="teacher file (default output/teachers/pdn_<size>_<arch>.npz)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_arch(args.arch)
    check_size(args.size)
    if args.image_size < 64 or args.image_size % 16:
        raise ConfigError(f"--image_size {args.image_size}: use a multiple of 16, at least 64")
    if select_device(args.device) == "cpu":
        set_cpu_threads(args.cpu_threads)
    out = Path(args.out or f"output/teachers/pdn_{args.size}_{args.arch}.npz")
    state_path = out.with_name(out.stem + ".fitstate.npz")
    images = ImageFolder(args.images, args.image_size, "--images")
    digest = hashlib.sha256("\n".join(str(p) for p in images.paths).encode()).hexdigest()
    identity = {"kind": KIND, "size": args.size, "arch": args.arch, "pretrained": args.pretrained,
                "image_size": args.image_size, "seed": args.seed, "batch_size": args.batch_size,
                "images_sha256": digest}
    extractor = TargetFeatures(build_trunk(args.arch, ("layer2", "layer3"), args.pretrained, args.seed),
                               args.image_size)
    paddle.seed(args.seed)
    network = pdn(args.size)
    optimizer = make_adam(network.parameters(), 1e-4)
    losses: list[float] = []
    if args.resume and state_path.is_file():
        meta, arrays = read_npz(str(state_path))
        changed = [key for key, value in identity.items() if meta.get(key) != value]
        if changed:
            raise CheckpointError(f"{state_path}: made with other {', '.join(changed)}; pass the same "
                                  "arguments to resume, or delete it to start over")
        load_weights(network, arrays, str(state_path))
        restart = "delete it to start over"
        mean, std = target_stats(arrays, str(state_path), restart)
        losses_array = arrays.get("losses")
        if losses_array is None or losses_array.ndim != 1 or not np.isfinite(losses_array).all():
            raise CheckpointError(f"{state_path}: no finite step losses (the file was changed); {restart}")
        try:
            restore_optimizer(optimizer, network, arrays)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{state_path}: the optimizer state does not fit the network ({exc}); "
                                  f"{restart}") from exc
        losses = losses_array.tolist()
        print(f"resuming after step {len(losses)} from {state_path}", file=sys.stderr)
    else:
        if args.resume:
            print(f"no distillation state at {state_path}; starting from the beginning", file=sys.stderr)
        mean, std = channel_stats(extractor, images, args.norm_images, args.seed, args.batch_size)
    targets_mean = paddle.to_tensor(mean.reshape(1, -1, 1, 1))
    targets_std = paddle.to_tensor(std.reshape(1, -1, 1, 1))

    def save(path: Path, stage: str) -> None:
        arrays = teacher_arrays(network, mean, std)
        arrays["losses"] = np.asarray(losses, dtype=np.float64)
        if stage == "fit":
            arrays.update(optimizer_arrays(optimizer, network))
        write_npz(str(path), {**identity, "stage": stage, "steps": len(losses)}, arrays)

    network.train()
    with tqdm(total=args.steps, initial=len(losses), desc="distil", unit="step", file=sys.stderr) as bar:
        for step in range(len(losses), args.steps):
            batch = images.draw(np.random.default_rng([args.seed, step]), args.batch_size)
            x = paddle.to_tensor(batch)
            with paddle.no_grad():
                target = (extractor(x) - targets_mean) / targets_std
            loss = paddle.mean((network(x) - target) ** 2)
            value = float(loss.numpy())
            if not np.isfinite(value):
                raise InputError(f"distillation loss became {value} at step {step + 1}; check --images")
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            bar.update(1)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(state_path, "fit")
    network.eval()
    save(out, "final")
    state_path.unlink(missing_ok=True)
    print(f"teacher PDN-{args.size.upper()} distilled from {args.arch} ({args.pretrained}) in {len(losses)} "
          f"steps, last loss {losses[-1]:.4f}: {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
