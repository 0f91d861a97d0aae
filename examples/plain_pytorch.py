"""A plain PyTorch training loop with fastprune: three changed lines (marked ``# fastprune``).

    python examples/plain_pytorch.py /data/imagenet/train --epochs 90
"""

import argparse
import math

import torch
import torchvision
from torchvision import transforms as T

import fastprune

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("--epochs", type=int, default=90)
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--image-size", type=int, default=224)
ap.add_argument("--arch", default="resnet50")
ap.add_argument("--workers", type=int, default=8)
args = ap.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"

tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = torchvision.datasets.ImageFolder(args.data, tf)
model = torchvision.models.get_model(args.arch, num_classes=len(ds.classes)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)

pruner = fastprune.DynamicPruner(len(ds), len(ds.classes), epochs=args.epochs, device=device)  # fastprune
loader = torch.utils.data.DataLoader(fastprune.data.IndexedDataset(ds), batch_size=args.batch_size,  # fastprune
                                     sampler=pruner.sampler(), num_workers=args.workers)
# The LR schedule follows the shrinking epochs: count the steps the pruner will take.
total = pruner.total_steps(args.batch_size)  # expected; clamp so a few extra steps are harmless
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))

for epoch in range(args.epochs):
    model.train()
    for x, y, idx in loader:
        x, y, idx = x.to(device), y.to(device), idx.to(device)
        loss = pruner.step(model(x), y, idx)  # fastprune: instead of F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    pruner.next_epoch()
    print(f"epoch {epoch}: trained {pruner.history[-2]['kept']} samples, visits saved {pruner.visits_saved:.1%}")
