"""Data-parallel training with fastprune under torchrun: the same three changed lines (``# fastprune``).

    torchrun --nproc_per_node=8 examples/ddp_torchrun.py /data/imagenet/train --epochs 90

Each process trains its shard of every epoch's selection; ``next_epoch()`` merges the ranks' scores with one
all-reduce and hands every rank its next shard.  Nothing is exchanged on the training step.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms as T

import fastprune

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("--epochs", type=int, default=90)
ap.add_argument("--batch-size", type=int, default=256, help="per process")
ap.add_argument("--image-size", type=int, default=224)
ap.add_argument("--arch", default="resnet50")
ap.add_argument("--workers", type=int, default=8)
args = ap.parse_args()

cuda = torch.cuda.is_available()
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()

tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = torchvision.datasets.ImageFolder(args.data, tf)
model = torchvision.models.get_model(args.arch, num_classes=len(ds.classes)).to(device)
model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)

# Built on every rank; it finds the process group and shards each epoch's selection by rank.
pruner = fastprune.DynamicPruner(len(ds), len(ds.classes), epochs=args.epochs, device=device)  # fastprune
loader = torch.utils.data.DataLoader(fastprune.data.IndexedDataset(ds), batch_size=args.batch_size,  # fastprune
                                     sampler=pruner.sampler(), num_workers=args.workers, pin_memory=cuda)

for epoch in range(args.epochs):
    model.train()
    for x, y, idx in loader:
        x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
        loss = pruner.step(model(x), y, idx)  # fastprune: instead of F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pruner.next_epoch()  # collective: every rank calls it
    if rank == 0:
        kept = pruner.history[-2]["kept"]
        print(f"epoch {epoch}: trained {kept} samples on {pruner.world_size} ranks, "
              f"visits saved {pruner.visits_saved:.1%}")
        torch.save({"model": model.module.state_dict(), "pruner": pruner.state_dict()}, "checkpoint.pt")

dist.barrier()  # everyone done (rank 0 saved) before the group goes away
dist.destroy_process_group()
