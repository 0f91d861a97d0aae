"""The ``fastprune`` command: argument parsing only; each sub-command calls the library."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _demo(args) -> int:
    from .synthetic import demo

    demo(epochs=args.epochs, num_samples=args.samples, device=args.device)
    return 0


def _embed(args) -> int:
    from .data import ImageFolderIndex
    from .embeddings import Embeddings

    if args.model_config:
        import open_clip

        if not os.path.exists(args.model_config):
            raise FileNotFoundError(f"--model-config {args.model_config!r} does not exist")
        open_clip.add_model_config(args.model_config)
    index = ImageFolderIndex(args.data)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    emb = Embeddings.compute(index, model=args.model, pretrained=pretrained, device=args.device,
                             batch_size=args.batch_size, templates=args.templates, classnames=args.classnames,
                             out=args.out, resume=args.resume, loader=args.loader, num_workers=args.workers)
    print(f"wrote {args.out}: image {tuple(emb.image.shape)}, text {tuple(emb.text.shape)} "
          f"({emb.meta['model']}, pretrained={emb.meta['pretrained']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastprune", description="Dynamic dataset pruning with fused Triton kernels.")
    ap.add_argument("--version", action="version", version=f"fastprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train with and without pruning on a built-in noisy-label task")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--samples", type=int, default=20_000)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=_demo)

    e = sub.add_parser("embed", help="compute CLIP image and class-text embedding tables for a dataset")
    e.add_argument("data", help="ImageNet-style folder root/<class>/<image>, or a path,label CSV list")
    e.add_argument("--out", required=True, help="directory for image.npy, text.npy and meta.json")
    e.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    e.add_argument("--pretrained", default="openai",
                   help="open_clip tag (downloads where there is network) or a local checkpoint file; "
                        "'none' for random weights")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--templates", default="openai", help="'openai' (80 prompts), 'simple' (7) or a file")
    e.add_argument("--classnames", default=None, help="file mapping class folder -> readable name (TSV/CSV/JSON)")
    e.add_argument("--loader", default="auto", choices=["auto", "dali", "torch"])
    e.add_argument("--workers", type=int, default=None, help="decoding threads/processes")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    e.add_argument("--model-config", default=None, help="extra open_clip model config (JSON file or folder)")
    e.set_defaults(func=_embed)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, IndexError, FileNotFoundError, FileExistsError, ConnectionError, ImportError) as e:
        # user errors: one line, no traceback
        print(f"fastprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
