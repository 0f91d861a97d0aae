"""The same loop fed by DaliLoader: only the selected files are read and decoded each epoch.

    python examples/dali_loop.py /data/imagenet/train --epochs 90
"""

import argparse
import math

import torch
import torchvision

import fastprune
from fastprune.data import DaliLoader, ImageFolderIndex

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("--epochs", type=int, default=90)
ap.add_argument("--batch-size", type=int, default=256)
ap.add_argument("--image-size", type=int, default=224)
ap.add_argument("--arch", default="resnet50")
ap.add_argument("--embeddings", default=None, help="directory from `fastprune embed`")
args = ap.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

index = ImageFolderIndex(args.data)
emb = fastprune.Embeddings.load(args.embeddings, index=index, device=device) if args.embeddings else None
pruner = fastprune.DynamicPruner(len(index), index.num_classes, epochs=args.epochs, device=device,
                                 image_emb=emb.image if emb else None, text_emb=emb.text if emb else None,
                                 noise_ratio=0.05 if emb else 0.0)
loader = DaliLoader(index, pruner, batch_size=args.batch_size, image_size=args.image_size,
                    dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
model = torchvision.models.get_model(args.arch, num_classes=index.num_classes).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
total = pruner.total_steps(args.batch_size)  # expected; clamp so a few extra steps are harmless
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))

for epoch in range(args.epochs):
    model.train()
    for images, labels, idx in loader:  # already on the device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss = pruner.step(logits, labels, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    pruner.next_epoch()
    print(f"epoch {epoch}: trained {pruner.history[-2]['kept']} samples, visits saved {pruner.visits_saved:.1%}")
