"""The ``fastprune`` command: argument parsing only; each sub-command calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from . import __version__

TRACEBACK_ENV = "FASTPRUNE_TRACEBACK"  # set to 1: errors the CLI reports in one line raise with their traceback


def _demo(args) -> int:
    from .demo import run

    fraction, _, kind = args.noise.partition(":")
    try:
        fraction = float(fraction)
    except ValueError:
        raise ValueError(f"--noise takes FRACTION[:KIND], e.g. 0.2 or 0.4:pair; got {args.noise!r}") from None
    run(epochs=args.epochs, out=args.out, clip=args.clip, device=args.device, workers=args.workers,
        noise=fraction, kind=kind or "symmetric", seeds=args.seeds)
    return 0


def _embed(args) -> int:
    from .data import ImageFolderIndex
    from .devices import resolve_device
    from .embeddings import Embeddings
    from .rundir import prepare_dir

    # checked here, before the data is scanned and the model loaded (the library checks some only later)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--workers", args.workers, 0)
    resolve_device(args.device, "--device")
    if not args.resume:  # resuming needs the folder as it is; the library says what is missing
        prepare_dir(args.out, "--out")
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


def _train(args) -> int:
    from .train import TrainConfig, train

    train(_config_from_args(TrainConfig, args), progress=not args.no_progress)
    return 0


def _report(args) -> int:
    from .report import make_report

    paths = make_report(args.run, out=args.out, count=args.count, data_root=args.data)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _compare(args) -> int:
    from .compare import compare

    compare(args.runs, out=args.out, names=args.names)
    return 0


def _bench(args) -> int:
    from .benchmarks.__main__ import main as bench_main

    return bench_main(args.bench_args)


def _prune_static(args) -> int:
    from .data import ImageFolderIndex
    from .devices import resolve_device
    from .rundir import prepare_file
    from .static.cli import prune_static

    # before the data is scanned (minutes for a large folder); prune_static checks them again for API callers
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--workers", args.workers, 0)
    _at_least("--image-size", args.image_size, 1)
    resolve_device(args.device, "--device")
    prepare_file(args.out, "--out", "subset.json")
    index = ImageFolderIndex(args.data)
    keep, meta = prune_static(index, method=args.method, prune_ratio=args.prune_ratio, epsilon=args.epsilon,
                              features=args.features, l2=args.l2, seed=args.seed, out=args.out, model=args.model,
                              arch=args.arch, device=args.device, batch_size=args.batch_size,
                              num_workers=args.workers, image_size=args.image_size, layer=args.layer,
                              save_features=args.save_features, progress=not args.no_progress,
                              bf16=False if args.fp32 else None)
    if args.save_features and args.model and args.method != "random":
        print(f"wrote {args.save_features}: the model's penultimate features")
    print(f"wrote {args.out}: kept {keep.numel()} of {len(index)} samples ({args.method})")
    return 0


def _at_least(flag: str, value, lo: int) -> None:
    """An integer argument (None: its default) below ``lo`` is a one-line error naming the flag."""
    if value is not None and value < lo:
        raise ValueError(f"{flag} must be an integer >= {lo}, got {value}")


def _user_errors() -> type:
    """Errors of a run the user can act on, beside the standard ones (one line, no traceback)."""
    from .train import NonFiniteLoss

    return NonFiniteLoss


# --out, --workers and --device: flags of several sub-commands, each declared here once

def _add_out(parser, help: str | None = None, default=None, required: bool = False) -> None:
    parser.add_argument("--out", default=default, required=required, help=help)


def _add_workers(parser, default, help: str = "decoding threads/processes") -> None:
    parser.add_argument("--workers", type=int, default=default, help=help)


def _add_device(parser, default=None, help: str = "cpu, cuda or cuda:N (default: cuda when available)") -> None:
    parser.add_argument("--device", default=default, help=help)


_SHARED = {"out": _add_out, "workers": _add_workers, "device": _add_device}  # for the fields of these names too


def _add_config_arguments(parser, config, groups: dict[str, str]) -> dict:
    """An argument for each field of the dataclass ``config`` that names a group in its metadata (see
    ``train._arg``), in argument groups titled by ``groups``: the flag is the field's name, its type and default
    the field's (a bool is a switch; none without a default: positional), its help and choices the metadata's.
    Returns the argument groups by key."""
    hints = typing.get_type_hints(config)
    made = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for f in dataclasses.fields(config):
        if "group" not in f.metadata:
            continue  # a library-only setting
        group, meta = made[f.metadata["group"]], f.metadata
        help_kw = {"help": meta["help"]} if meta["help"] else {}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            group.add_argument(f.name, **help_kw)
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        flag = "--" + f.name.replace("_", "-")
        if f.name in _SHARED:
            _SHARED[f.name](group, default=default, **help_kw)
        elif kind is bool:  # --flag, or --flag/--no-flag where the default is on or undecided (None)
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            group.add_argument(flag, action=action, default=default, **help_kw)
        else:
            group.add_argument(flag, type=None if kind is str else kind, default=default, choices=meta["choices"],
                               **help_kw)
    return made


def _config_from_args(config, args):
    """The ``config`` dataclass from the arguments ``_add_config_arguments`` made for it."""
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config) if "group" in f.metadata})


def build_parser() -> argparse.ArgumentParser:
    from .data.loader import LOADERS
    from .devices import default_workers
    from .static.cli import METHODS
    from .train import GROUPS as TRAIN_GROUPS
    from .train import TrainConfig

    ap = argparse.ArgumentParser(prog="fastprune", description="Dynamic dataset pruning with fused Triton kernels.",
                                 epilog=f"Errors in the input (a missing or damaged file, a bad value, an output "
                                        f"that cannot be written) are reported in one line with exit status 2; "
                                        f"set {TRACEBACK_ENV}=1 to get the full traceback instead.")
    ap.add_argument("--version", action="version", version=f"fastprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="full vs. pruned training on real digits with 20%% planted label noise")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--noise", default="0.2", help="planted label noise, FRACTION[:KIND] with KIND symmetric "
                                                  "(default) or pair, e.g. 0.4 or 0.2:pair (default 0.2)")
    d.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (mean ± sd; ~2 min each)")
    _add_out(d, "where to write the data and runs (default: a temp folder)")
    d.add_argument("--clip", default=None, help="embeddings from `fastprune embed` instead of the proxy")
    _add_workers(d, 2)
    _add_device(d)
    d.set_defaults(func=_demo)

    e = sub.add_parser("embed", help="compute CLIP image and class-text embedding tables for a dataset")
    e.add_argument("data", help="ImageNet-style folder root/<class>/<image>, or a path,label CSV list")
    _add_out(e, "directory for image.npy, text.npy and meta.json", required=True)
    e.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    e.add_argument("--pretrained", default="openai",
                   help="open_clip tag (downloads where there is network) or a local checkpoint file; "
                        "'none' for random weights")
    e.add_argument("--batch-size", type=int, default=256)
    _add_device(e)
    e.add_argument("--templates", default="openai", help="'openai' (80 prompts), 'simple' (7) or a file")
    e.add_argument("--classnames", default=None, help="file mapping class folder -> readable name (TSV/CSV/JSON)")
    e.add_argument("--loader", default="auto", choices=LOADERS)
    _add_workers(e, None)
    e.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    e.add_argument("--model-config", default=None, help="extra open_clip model config (JSON file or folder)")
    e.set_defaults(func=_embed)

    t = sub.add_parser("train", help="train an image classifier on an ImageNet-style folder with pruning")
    groups = _add_config_arguments(t, TrainConfig, TRAIN_GROUPS)
    groups["run"].add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    s = sub.add_parser("prune-static", help="choose a static subset (influence, el2n, forgetting or random)")
    s.add_argument("data", help="the training folder (labels and fingerprint come from it)")
    _add_out(s, "subset file to write (JSON)", required=True)
    s.add_argument("--method", default="influence", choices=METHODS)
    s.add_argument("--prune-ratio", type=float, default=None, help="fraction of samples to remove")
    s.add_argument("--epsilon", type=float, default=None, help="influence only: bound on the parameter change")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--features", default=None,
                     help="N x F features: a directory from `fastprune embed` (its image table) or a .npy/.pt file")
    src.add_argument("--model", default=None,
                     help="a `fastprune train` run directory or its checkpoint.pt: its penultimate features "
                          "(the final linear classifier's input) over the data are the features")
    m = s.add_argument_group("feature extraction (with --model)")
    m.add_argument("--arch", default=None, help="architecture (default: the one the checkpoint records)")
    m.add_argument("--layer", default=None, help="module whose input to take (default: the final nn.Linear)")
    m.add_argument("--image-size", type=int, default=None, help="default: the run's --image-size, else 224")
    m.add_argument("--batch-size", type=int, default=256)
    _add_workers(m, default_workers(), "decoding processes")
    _add_device(m)
    m.add_argument("--fp32", action="store_true", help="extract in fp32 on CUDA (default: bf16 autocast)")
    m.add_argument("--save-features", default=None, help="also write the extracted features (.npy or .pt)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--l2", type=float, default=1e-3, help="influence: L2 regularisation of the linear head")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_prune_static)

    r = sub.add_parser("report",
                       help="re-make a finished run's report (plots, mislabeled-sample gallery) from its folder")
    r.add_argument("run", help="a run folder of `fastprune train` (its --out)")
    _add_out(r, "where to write the figures (default: the run folder)")
    r.add_argument("--count", type=int, default=None, help="samples in the gallery (default 24)")
    r.add_argument("--data", default=None,
                   help="the training folder, if it has moved since the run (the gallery shows its images)")
    r.set_defaults(func=_report)

    c = sub.add_parser("compare", help="compare runs: accuracy against sample visits and time, and a table")
    c.add_argument("runs", nargs="+", help="run folders of `fastprune train`")
    _add_out(c, "where to write comparison.png, .csv and .md (default: here)", default=".")
    c.add_argument("--names", nargs="+", default=None, help="a name for each run (default: its folder's name)")
    c.set_defaults(func=_compare)

    b = sub.add_parser("bench", help="run the benchmarks (see BENCHMARKS.md); --smoke for a quick check",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: every flag, --help included, goes to the benchmarks
        command, func, args = "bench", _bench, argparse.Namespace(bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, func = args.command, args.func
    try:
        return func(args)
    except (ValueError, IndexError, OSError, ImportError, _user_errors()) as e:
        # user errors: one line, no traceback.  OSError covers missing files, folders that cannot be written, names
        # too long, a full disk: its message holds the reason and the file name.
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"fastprune {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
