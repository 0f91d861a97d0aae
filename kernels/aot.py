"""Ahead-of-time compilation of every kernel specialisation fastprune launches.

``python -m fastprune.kernels.aot --arch 80 90 --out report.json`` builds real
cubins for each NVIDIA architecture without a GPU (Triton compiles for a
``GPUTarget``) and reports, per specialisation: registers, spills (from
``ptxas -v``) and whether the hot loads are 16-byte vector loads.  CI runs it
so that a kernel that only works in the interpreter cannot pass.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

_TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOGIT_DTYPES = ("float32", "bfloat16", "float16")
EMB_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class Spec:
    """One kernel specialisation: kernel name, argument types, constexprs and launch options."""

    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    label: str
    expect_vector_loads: bool = False
    aligned: tuple = field(default_factory=tuple)  # pointer args known 16-byte aligned


def _pointer(dtype) -> str:
    return "*" + {"float32": "fp32", "int32": "i32", "int64": "i64", "int8": "i8"}[str(dtype).removeprefix("torch.")]


def step_specs() -> list[Spec]:
    """Every specialisation ``launch_step`` can choose (pointers 16-byte aligned)."""
    import torch

    from . import common as K
    from .state import FIELDS
    from .step import SETTLE_BLOCK, SETTLE_WARPS, TILES, step_config, vector_width

    state_sig = {f"{f.name}_ptr": _pointer(f.dtype) for f in FIELDS}

    specs = []
    emb_variants = [(K.EMB_NONE, "float32")] + [(m, d) for m in (K.EMB_TABLE, K.EMB_BATCH) for d in EMB_DTYPES]
    tile_cs = [max_c if max_c is not None else 65536 for max_c, *_ in TILES]
    for ldt in LOGIT_DTYPES:
        lt = _TRITON_DTYPES[ldt]
        for c in tile_cs:
            cfg = step_config(c)
            for vec in sorted({1, vector_width(getattr(torch, ldt))}):
                for mode, edt in emb_variants:
                    et = _TRITON_DTYPES[edt]
                    sig = {
                        "logits_ptr": f"*{lt}", "grad_ptr": f"*{lt}", "labels_ptr": "*i64", "indices_ptr": "*i64",
                        "emb_ptr": f"*{et}", "text_ptr": f"*{et}", **state_sig, "err_ptr": "*i64",
                        "ce_ptr": "*fp32", "contrib_ptr": "*fp32", "correct_ptr": "*i8",
                        "row_margin_ptr": "*fp32", "row_pred_ptr": "*i32",
                        "scratch_i_ptr": "*i32", "scratch_f_ptr": "*fp32", "dups_ptr": "*i32",
                        "B": "i32", "C": "i32", "N": "i32", "D": "i32",
                        "stride_l": "i32", "stride_g": "i32", "stride_e": "i32", "stride_t": "i32",
                        "step_id": "i32", "write_grad": "i32", "ignore_index": "i32",
                        "ema": "fp32", "scale": "fp32", "smoothing": "fp32",
                    }
                    const = dict(BLOCK_B=cfg.BLOCK_B, BLOCK_C=cfg.BLOCK_C, BLOCK_D=cfg.BLOCK_D, SINGLE=cfg.SINGLE,
                                 VEC=vec, EMB_MODE=mode)
                    for k in const:
                        sig[k] = "constexpr"
                    label = (f"fused_step[{ldt},BLOCK_B={cfg.BLOCK_B},BLOCK_C={cfg.BLOCK_C},"
                             f"{'single' if cfg.SINGLE else 'chunked'},VEC={vec},emb={mode}:{edt}]")
                    aligned = tuple(k for k, v in sig.items() if v.startswith("*"))
                    specs.append(Spec("fused_step_kernel", sig, const, cfg.num_warps, label,
                                      expect_vector_loads=vec > 1, aligned=aligned))
    for mode in (K.EMB_NONE, K.EMB_TABLE, K.EMB_BATCH):
        sig = {"indices_ptr": "*i64", "labels_ptr": "*i64", "row_margin_ptr": "*fp32", "row_pred_ptr": "*i32",
               **{k: state_sig[k] for k in ("scores_ptr", "consistency_ptr", "stamp_ptr", "margin_sum_ptr",
                                            "pred_ptr", "label_ptr")},
               "scratch_i_ptr": "*i32", "scratch_f_ptr": "*fp32", "dups_ptr": "*i32", "B": "i32", "step_id": "i32",
               "ema": "fp32", "EMB_MODE": "constexpr", "FIX": "constexpr"}
        specs.append(Spec("settle_kernel", sig, {"EMB_MODE": mode, "FIX": SETTLE_BLOCK}, SETTLE_WARPS,
                          f"settle[emb={mode}]", aligned=tuple(k for k in sig if k.endswith("_ptr"))))
    for ldt in LOGIT_DTYPES:
        lt = _TRITON_DTYPES[ldt]
        sig = {"grad_ptr": f"*{lt}", "go_ptr": "*fp32", "B": "i32", "C": "i32", "stride_g": "i32",
               "BLOCK": "constexpr"}
        from .step import SCALE_BLOCK

        specs.append(Spec("scale_grad_kernel", sig, {"BLOCK": SCALE_BLOCK}, 4, f"scale_grad[{ldt}]",
                          aligned=("grad_ptr", "go_ptr")))
    return specs


def select_specs() -> list[Spec]:
    """Every specialisation of the selection kernels."""
    from . import common as K
    from .select import BLOCK

    specs = []
    for use_cons in (False, True):
        sig = {"scores_ptr": "*fp32", "visits_ptr": "*i32", "cons_ptr": "*fp32", "noisy_ptr": "*i8",
               "mu_ptr": "*fp32", "sd_ptr": "*fp32", "cls_ptr": "*i8", "prio_ptr": "*fp32", "N": "i32",
               "semantic_weight": "fp32", "USE_CONS": "constexpr", "BLOCK": "constexpr"}
        specs.append(Spec("priority_kernel", sig, {"USE_CONS": use_cons, "BLOCK": BLOCK}, 4,
                          f"priority[use_consistency={use_cons}]", aligned=tuple(k for k in sig if k.endswith("_ptr"))))
    for policy in (K.POLICY_FULL, K.POLICY_INFOBATCH, K.POLICY_RANKED):
        sig = {"cls_ptr": "*i8", "prio_ptr": "*fp32", "chosen_ptr": "*i8", "mean_ptr": "*fp32",
               "drop_ptr": "*fp32", "upw_ptr": "*fp32", "keep_ptr": "*i8", "w_ptr": "*fp32",
               "N": "i32", "k0": "i32", "k1": "i32", "epoch": "i32", "POLICY": "constexpr", "BLOCK": "constexpr"}
        specs.append(Spec("finalize_kernel", sig, {"POLICY": policy, "BLOCK": BLOCK}, 4, f"finalize[policy={policy}]",
                          aligned=tuple(k for k in sig if k.endswith("_ptr"))))
    for n_type in ("i32", "i64"):  # N beyond 2**31 - 1 arrives as a 64-bit integer
        sig = {"keep_ptr": "*i8", "keys_ptr": "*i32", "slot_ptr": "*i64", "N": n_type, "BITS": "i32", "flip": "i32",
               "ROUNDS": "constexpr", "BLOCK": "constexpr"}
        specs.append(Spec("shuffle_kernel", sig, {"ROUNDS": K.SHUFFLE_ROUNDS, "BLOCK": BLOCK}, 4,
                          f"shuffle[N:{n_type}]", aligned=tuple(k for k in sig if k.endswith("_ptr"))))
        for csum in ("i32", "i64"):
            if n_type == "i64" and csum == "i32":
                continue  # the count is int64 from 2**31 samples on
            sig = {"slot_ptr": "*i64", "csum_ptr": f"*{csum}", "order_ptr": "*i64", "N": n_type, "BLOCK": "constexpr"}
            specs.append(Spec("compact_kernel", sig, {"BLOCK": BLOCK}, 4, f"compact[N:{n_type}, count:{csum}]",
                              aligned=tuple(k for k in sig if k.endswith("_ptr"))))
    return specs


def mixture_specs() -> list[Spec]:
    """The noise decisions' EM kernel (the histograms' ``BINS``)."""
    from fastprune.noise import BINS

    sig = {"centres_ptr": "*fp64", "w_ptr": "*fp64", "n1_ptr": "*fp64", "out_ptr": "*fp64", "ROWS": "i32",
           "ITERATIONS": "i32", "BINS": "constexpr"}
    return [Spec("em_kernel", sig, {"BINS": BINS}, 4, f"em[bins={BINS}]", aligned=("centres_ptr", "w_ptr"))]


def all_specs() -> list[Spec]:
    return step_specs() + select_specs() + mixture_specs()


def _kernel(name: str):
    from . import mixture, select, step

    return getattr(step, name, None) or getattr(select, name, None) or getattr(mixture, name)


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the compiled PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older Triton: no architecture argument
        ptxas = get_ptxas().path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0)}


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile one specialisation for ``sm_<arch>``; returns a report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(spec.kernel)
    names = list(spec.signature)
    if names != list(fn.arg_names):  # the attrs below and the arguments are matched by position
        raise ValueError(f"{spec.label}: the signature's arguments {names} are not the kernel's {fn.arg_names}")
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in spec.aligned}
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    seconds = time.perf_counter() - t0
    ptx = compiled.asm["ptx"]
    loads = sorted(set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)))
    row = {"label": spec.label, "kernel": spec.kernel, "arch": arch, "num_warps": spec.num_warps,
           "cubin_bytes": len(compiled.asm["cubin"]), "compile_s": round(seconds, 3), "global_loads": loads,
           "vector_loads": any(".v4" in x or ".v2" in x for x in loads),
           "expect_vector_loads": spec.expect_vector_loads}
    row.update(_ptxas_stats(ptx, arch))
    return row


def _job(args):
    spec_dict, arch = args
    return compile_spec(Spec(**spec_dict), arch)


def compile_all(archs=(80, 90), workers: int | None = None, specs: list[Spec] | None = None) -> list[dict]:
    """Compile every specialisation for every architecture (in parallel processes)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the interpreter replaces "
                           "kernels by Python functions)")
    specs = all_specs() if specs is None else specs
    jobs = [(asdict(s), a) for a in archs for s in specs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers == 1:
        return [_job(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_job, jobs, chunksize=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastprune.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="one specialisation per kernel (smoke test)")
    args = ap.parse_args(argv)
    specs = all_specs()
    if args.quick:
        seen, quick = set(), []
        for s in specs:
            if s.kernel not in seen:
                seen.add(s.kernel)
                quick.append(s)
        specs = quick
    t0 = time.perf_counter()
    rows = compile_all(tuple(args.arch), args.workers, specs)
    report = {"archs": args.arch, "count": len(rows), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    spills = [r for r in rows if r["spill_bytes"]]
    print(f"compiled {len(rows)} kernel specialisations for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {report['seconds']} s; max registers {max(r['registers'] or 0 for r in rows)}; "
          f"{len(spills)} with spills")
    for r in spills:
        print(f"  spills: {r['label']} sm_{r['arch']}: {r['spill_bytes']} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
