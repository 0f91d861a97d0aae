"""Training with Hugging Face Accelerate and fastprune: three changed lines (marked ``# fastprune``).

    python examples/accelerate_loop.py /data/imagenet/train --epochs 90            # one process
    accelerate launch examples/accelerate_loop.py /data/imagenet/train --epochs 90   # as `accelerate config` says
    torchrun --nproc_per_node=8 examples/accelerate_loop.py /data/imagenet/train     # GPUs: Accelerate reads torchrun

``accelerator.prepare`` shards the loader across processes by itself, so the loader draws from the pruner's whole
selection (``selection_sampler``), not from ``pruner.sampler()``, which is already this process's shard.  The
learning rate follows the shrinking epochs (``ProgressScheduler``, see the README).
"""

import argparse

import torch
import torchvision
from accelerate import Accelerator
from torchvision import transforms as T

import fastprune
from fastprune.integrations.accelerate import selection_sampler
from fastprune.schedule import ProgressScheduler

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("--epochs", type=int, default=90)
ap.add_argument("--batch-size", type=int, default=256, help="per process")
ap.add_argument("--image-size", type=int, default=224)
ap.add_argument("--arch", default="resnet50")
ap.add_argument("--workers", type=int, default=8)
args = ap.parse_args()

accelerator = Accelerator()  # joins the processes (if any): build the pruner after it
tf = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
ds = torchvision.datasets.ImageFolder(args.data, tf)
model = torchvision.models.get_model(args.arch, num_classes=len(ds.classes))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)

pruner = fastprune.DynamicPruner(len(ds), len(ds.classes), epochs=args.epochs, device=accelerator.device)  # fastprune
loader = torch.utils.data.DataLoader(fastprune.data.IndexedDataset(ds), batch_size=args.batch_size,  # fastprune
                                     sampler=selection_sampler(pruner), num_workers=args.workers)
cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=pruner.total_steps(args.batch_size))
sched = ProgressScheduler(cycle, pruner, args.batch_size)  # ends with the run, however long the epochs turn out
model, opt, loader = accelerator.prepare(model, opt, loader)

for epoch in range(args.epochs):
    model.train()
    for x, y, idx in loader:  # on accelerator.device already
        loss = pruner.step(model(x), y, idx)  # fastprune: instead of F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
    pruner.next_epoch()  # collective: every process calls it
    accelerator.print(f"epoch {epoch}: trained {pruner.history[-2]['kept']} samples on {accelerator.num_processes} "
                      f"process(es), visits saved {pruner.visits_saved:.1%}, lr {sched.get_last_lr()[0]:.2e}")
    accelerator.save({"model": accelerator.unwrap_model(model).state_dict(), "pruner": pruner.state_dict()},
                     "checkpoint.pt")  # written by the main process
accelerator.end_training()
