"""DynamicPruner: per-sample scores, the fused training step, and epoch selection."""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from typing import Iterator

import torch

from . import distributed as _dist
from . import kernels as _k
from . import noise as _noise
from .kernels import common as K
from .embeddings import nonfinite_rows
from .evidence import Evidence
from .policies import POLICIES, Schedule
from .step_errors import StepErrors

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMB_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VALIDATE = ("async", "sync", "none")
_SYNC, _NEXT_EPOCH = 1, 2  # which collective sequence the ranks are in (checked to agree)
STATE_VERSION = 5  # 4: the step state's columns by name (kernels.FIELDS), CLIP's under "clip"; 5: the same format, the
# epochs after it shuffled by the sort-free bijection (a version-4 state resumes the same, later orders differ)
_UNSAVED = ("stamp",)  # step ids only tell one step's rows apart: cleared on load


def _check_real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    v = float(value) if ok_type else float("nan")
    ok = ok_type and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return v


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (
            hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


class EpochSampler(torch.utils.data.Sampler):
    """Yields the pruner's current epoch order; follows ``next_epoch()`` automatically."""

    def __init__(self, pruner: "DynamicPruner"):
        self.pruner = pruner

    def __iter__(self) -> Iterator[int]:
        return iter(self.pruner.epoch_indices.tolist())

    def __len__(self) -> int:
        return int(self.pruner.epoch_indices.numel())


class DynamicPruner:
    """Keeps a score per sample and decides, each epoch, which samples to train on.

    Score: an EMA of each sample's cross-entropy, combined with its semantic
    consistency (cosine between its CLIP image embedding and its label's CLIP
    text embedding) when embeddings are given.  ``step()`` returns the batch
    loss (differentiable; the fused kernel computes loss and gradient in one
    pass and updates the scores on the device).  ``next_epoch()`` builds the
    next epoch's shuffled index list.  See the README's "How it works".

    Args:
        num_samples: dataset size N; ``indices`` passed to ``step`` are in [0, N).
        num_classes: C, the logits' width.
        epochs: planned number of epochs (for warm-up / annealing).
        keep_ratio: expected fraction of the dataset trained on in a pruned epoch, in (0, 1].
        policy: ``"infobatch"`` (random drop of below-mean samples, unbiased by re-weighting),
            ``"topk"``, ``"random"`` or ``"full"``.
        ema: weight of the old score in the EMA, in [0, 1).
        warmup: number of first epochs trained on the full (noise-filtered) set.
        anneal: fraction of final epochs trained on the full (noise-filtered) set.
        noise_ratio: the most of the dataset that one epoch's noise decisions may act on (0 turns them
            off).  Within it the amount is found per class from the evidence (see ``fastprune.noise``):
            likely mislabeled samples are left out where the evidence is strong and down-weighted
            where it is not (or relabeled, with ``noise_relabel``).
        noise_evidence: ``"auto"`` (the model's margin and CLIP's when embeddings are given, the
            model's alone otherwise), ``"model"``, ``"clip"`` or ``"both"``.
        noise_start: the first epoch whose selection uses the noise decisions (the model's margins
            mean something only after some training); default: a fifth of ``epochs``, at least 2.
        noise_relabel: relabel sure suspects whose model and CLIP agree on another class, instead of
            leaving them out (needs both sources of evidence; keeps 12 bytes a sample of their evidence
            from before, for their old class's mixture, from the first relabel on).
        image_emb: optional N x D table of CLIP image embeddings (fp16/bf16/fp32, on ``device``).
        text_emb: optional C x D table of CLIP class-text embeddings.  With ``text_emb`` but no
            ``image_emb``, pass per-batch image embeddings to ``step(image_emb=...)``.
        label_smoothing: label smoothing of the training loss (the score uses the plain CE).
        seed: seeds every random decision (drops and shuffles) through a counter-based
            generator; global RNGs are never touched.
        device: where the per-sample state lives; defaults to the embeddings' device, else
            CUDA when available, else the CPU.
        semantic_weight: gamma in p = s * sigmoid(gamma * standardised consistency); 0 (default) ignores
            it.  The consistency then acts through the noise decisions only: as a priority it makes the
            pruning drop atypical but correct samples first, which cost 1-2 points of accuracy on the
            noise benchmark (BENCHMARKS.md, "Label noise").
        max_drop: the largest infobatch drop probability (weights stay <= 1 / (1 - max_drop)).
        ignore_index: label value whose rows contribute nothing (as in ``F.cross_entropy``).
        inplace_grad: write the logits' gradient over the logits (saves a B x C buffer; the
            logits' version counter is bumped so autograd refuses any other use of them).
        initial_subset: indices of a static subset (e.g. from ``fastprune.static``); samples outside
            it are never trained and ``keep_ratio`` applies to the subset.
        validate: ``"async"`` (default) reports bad labels/indices from the device without
            stalling the step, raising a step or two later, and warns about non-finite rows;
            ``"sync"`` raises in the offending step (synchronises; for debugging);
            ``"none"`` checks only at ``next_epoch()``.
        process_group: under ``torch.distributed`` the pruner works on the default group when one
            is initialised (or on this group).  Each rank scores only the samples it trains, with no
            communication on the step; ``next_epoch()`` merges the ranks' updates with one all-reduce
            (and rank 0's per-class noise mixtures, O(C) numbers, in an epoch that decides), every rank
            computes the same global selection, and ``epoch_indices`` is this rank's shard
            (see ``fastprune.distributed`` for the pad rule).  Building the pruner, ``next_epoch()``,
            ``sync()`` and ``load_state_dict()`` are then collective: call them on every rank.
            ``False`` keeps the pruner local to this process.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        epochs: int,
        keep_ratio: float = 0.7,
        policy: str = "infobatch",
        ema: float = 0.9,
        warmup: int = 1,
        anneal: float = 0.125,
        noise_ratio: float = 0.0,
        noise_evidence: str = "auto",
        noise_start: int | None = None,
        noise_relabel: bool = False,
        image_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
        device: str | torch.device | None = None,
        semantic_weight: float = 0.0,
        max_drop: float = 0.9,
        ignore_index: int = -100,
        inplace_grad: bool = False,
        validate: str = "async",
        initial_subset=None,
        process_group=None,
    ):
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.num_classes = _check_int("num_classes", num_classes, 1, K.MAX_CLASSES)
        self.epochs = _check_int("epochs", epochs, 1)
        self.keep_ratio = _check_real("keep_ratio", keep_ratio, 0.0, 1.0, True, False)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.policy = policy
        self.ema = _check_real("ema", ema, 0.0, 1.0, False, True)
        self.warmup = _check_int("warmup", warmup, 0)
        self.anneal = _check_real("anneal", anneal, 0.0, 1.0, False, False)
        self.noise_ratio = _check_real("noise_ratio", noise_ratio, 0.0, 1.0, False, True)
        self.label_smoothing = _check_real("label_smoothing", label_smoothing, 0.0, 1.0, False, True)
        self.semantic_weight = _check_real("semantic_weight", semantic_weight, 0.0, math.inf, False, True)
        self.max_drop = _check_real("max_drop", max_drop, 0.0, 1.0, False, True)
        self.seed = _check_int("seed", seed, -(1 << 63), (1 << 64) - 1)
        self.ignore_index = _check_int("ignore_index", ignore_index, -(1 << 31), (1 << 31) - 1)
        self.inplace_grad = bool(inplace_grad)
        if validate not in _VALIDATE:
            raise ValueError(f"validate must be one of {', '.join(_VALIDATE)}; got {validate!r}")
        self.validate = validate
        self.schedule = Schedule(policy, self.epochs, self.warmup, self.anneal)

        if device is None:
            device = image_emb.device if image_emb is not None else (
                text_emb.device if text_emb is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self.device = torch.device("cpu")  # CPU tensors report no index: "cpu:0" (Accelerate's) is the same place
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='cpu'")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._group = _dist.resolve(process_group, self.device)
        self.image_emb, self.text_emb = self._check_embeddings(image_emb, text_emb)
        if noise_evidence not in _noise.EVIDENCE:
            raise ValueError(f"noise_evidence must be one of {', '.join(_noise.EVIDENCE)}; got {noise_evidence!r}")
        if noise_evidence in ("clip", "both") and self.text_emb is None:
            raise ValueError(f"noise_evidence={noise_evidence!r} needs CLIP embeddings (text_emb, and image_emb "
                             "or per-batch image embeddings); pass them or use noise_evidence='model'")
        self.noise_evidence = noise_evidence
        self.noise_relabel = bool(noise_relabel)
        if self.noise_relabel and (self.text_emb is None or noise_evidence not in ("auto", "both")):
            raise ValueError("noise_relabel=True needs both sources of evidence (CLIP embeddings and "
                             "noise_evidence 'auto' or 'both'): a class is given only where the model and CLIP agree")
        if noise_start is None:
            noise_start = max(2, round(self.epochs / 5))
        self.noise_start = _check_int("noise_start", noise_start, 1)

        n, dev = self.num_samples, self.device
        self._state = _k.SampleState.empty(n, dev)  # what the step reads and writes, per sample
        self._noisy = torch.zeros(n, dtype=torch.bool, device=dev)  # left out by the noise decisions
        self._action = torch.zeros(n, dtype=torch.int8, device=dev)  # fastprune.noise action codes
        self._belief = torch.zeros(n, dtype=torch.float32, device=dev)  # P(label wrong)
        self._relabel = torch.full((n,), -1, dtype=torch.int32, device=dev)  # class trained with instead
        # The latest selection's priorities and noise decision's beliefs (for reports; None where not known).
        # The selection writes into buffers held from one epoch to the next, so that it allocates only a few
        # bytes a sample beside them.
        self._priority_buffer = torch.zeros(n, dtype=torch.float32, device=dev)
        self._belief_buffer: torch.Tensor | None = None  # allocated at the first decision
        self._selection_priority: torch.Tensor | None = None
        self._decision_belief: torch.Tensor | None = None
        self._any_relabel = False
        self._excluded, self._population = self._check_subset(initial_subset)
        self._evidence = Evidence(self._state)
        self._errors = StepErrors(self._state.errors, num_samples=n, num_classes=self.num_classes,
                                  ignore_index=self.ignore_index, validate=self.validate)
        self._has_batch_consistency = False
        self._step_count = 0
        self._merged_step = 0  # steps before this one are in the merged (global) state
        self.epoch = 0
        self._global_indices = torch.empty(0, dtype=torch.int64)  # host copy of the current selection
        self._epoch_indices = self._global_indices  # this rank's shard of it
        self.history: list[dict] = []
        self.last_step: _k.StepOutput | None = None
        self.last_sync: dict | None = None
        if self._group is not None:
            emb_shapes = [None if t is None else tuple(t.shape) for t in (self.image_emb, self.text_emb)]
            _dist.check_same(self._group, "the pruner's configuration", _dist.fingerprint(
                self.num_samples, self.num_classes, self.epochs, self.keep_ratio, self.policy, self.ema,
                self.warmup, self.anneal, self.noise_ratio, self.noise_evidence, self.noise_start, self.noise_relabel,
                self.label_smoothing, self.semantic_weight,
                self.max_drop, self.seed, self.ignore_index, self._population, emb_shapes), self.device)
        self._adopt(0, "full", self._select(0, "full"))  # epoch 0: every sample, shuffled

    # ------------------------------------------------------------------ inputs

    def _check_subset(self, subset):
        """(excluded mask on the device or None, number of samples that can be trained)."""
        if subset is None:
            return None, self.num_samples
        subset = torch.as_tensor(subset)
        if subset.dim() != 1 or subset.dtype not in (torch.int64, torch.int32) or subset.numel() == 0:
            raise ValueError(f"initial_subset must be a non-empty 1-D integer tensor of sample indices, got "
                             f"{subset.dtype} of shape {tuple(subset.shape)}")
        if int(subset.min()) < 0 or int(subset.max()) >= self.num_samples:
            raise IndexError(f"initial_subset: indices must be in [0, num_samples={self.num_samples}); got "
                             f"{int(subset.min())}..{int(subset.max())}")
        excluded = torch.ones(self.num_samples, dtype=torch.bool)
        excluded[subset.to(torch.int64)] = False
        return excluded.to(self.device), int(torch.count_nonzero(~excluded))

    def _check_embeddings(self, image_emb, text_emb):
        for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor, got {type(t).__name__}"
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
            if t.dtype not in _EMB_DTYPES:
                raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the pruner's device is {self.device}; "
                                 f"move it with .to('{self.device}')")
        if image_emb is not None and text_emb is None:
            raise ValueError("image_emb needs text_emb (the C x D class-text embeddings) to score consistency")
        if text_emb is not None and text_emb.shape[0] != self.num_classes:
            raise ValueError(f"text_emb must have num_classes={self.num_classes} rows, got {text_emb.shape[0]}")
        if image_emb is not None:
            if image_emb.shape[0] != self.num_samples:
                raise ValueError(f"image_emb must have num_samples={self.num_samples} rows, "
                                 f"got {image_emb.shape[0]}")
            if image_emb.shape[1] != text_emb.shape[1]:
                raise ValueError(f"image_emb width {image_emb.shape[1]} differs from text_emb width "
                                 f"{text_emb.shape[1]}")
            if image_emb.stride(1) != 1:
                raise ValueError("image_emb must have unit stride along its last dimension")
            text_emb = text_emb.to(image_emb.dtype)
        if text_emb is not None:
            text_emb = text_emb.contiguous()
        for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
            if t is not None and t.device.type != "meta":
                count, first = nonfinite_rows(t)
                if count:  # a NaN cosine would silently switch the noise decisions off
                    raise ValueError(f"{name}: {count} of {t.shape[0]} rows hold NaN or inf (first: row {first}); "
                                     "compute the embeddings again")
        return image_emb, text_emb

    def _check_batch(self, logits, labels, indices, image_emb):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a 2-D (batch x classes) tensor, got shape {shape}")
        B, C = logits.shape
        if C != self.num_classes:
            raise ValueError(f"logits has {C} columns but num_classes={self.num_classes}")
        if B == 0:
            raise ValueError("logits has an empty batch (0 rows)")
        if logits.dtype not in _LOGIT_DTYPES:
            raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        for name, t in (("logits", logits), ("labels", labels), ("indices", indices)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the pruner's device is {self.device}")
        for name, t in (("labels", labels), ("indices", indices)):
            if t.dim() != 1 or t.shape[0] != B:
                raise ValueError(f"{name} must have shape ({B},) to match logits, got {tuple(t.shape)}")
            if t.dtype != torch.int64:
                raise ValueError(f"{name} must be int64, got {t.dtype} (use .long())")
        if image_emb is not None:
            if self.image_emb is not None:
                raise ValueError("image_emb: this pruner already has a fixed image-embedding table; "
                                 "per-batch embeddings are for pruners built with text_emb only")
            if self.text_emb is None:
                raise ValueError("image_emb: per-batch embeddings need text_emb at construction")
            if not isinstance(image_emb, torch.Tensor) or image_emb.dim() != 2 or image_emb.shape[0] != B:
                shape = tuple(image_emb.shape) if isinstance(image_emb, torch.Tensor) else type(image_emb).__name__
                raise ValueError(f"image_emb must have shape ({B}, {self.text_emb.shape[1]}), got {shape}")
            if image_emb.shape[1] != self.text_emb.shape[1]:
                raise ValueError(f"image_emb width {image_emb.shape[1]} differs from text_emb width "
                                 f"{self.text_emb.shape[1]}")
            if image_emb.device != self.device:
                raise ValueError(f"image_emb is on {image_emb.device} but the pruner's device is {self.device}")
            if image_emb.dtype not in _EMB_DTYPES:
                raise ValueError(f"image_emb must be float16, bfloat16 or float32, got {image_emb.dtype}")

    # -------------------------------------------------------------------- step

    def step(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             image_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted batch loss ``sum_i w[idx_i] * ce_i / B`` and the state update, in one pass.

        Differentiable w.r.t. ``logits``; never synchronises with the host (except
        with ``validate="sync"``).  ``image_emb`` (B x D) gives per-batch CLIP image
        embeddings for pruners built with ``text_emb`` only.  Per-sample results
        of the last call (loss, correctness, the model's margin ``z_y - max_{c != y} z_c``
        and predicted class) are in ``self.last_step``.
        """
        self._check_batch(logits, labels, indices, image_emb)
        self._errors.poll()
        if image_emb is not None and image_emb.stride(1) != 1:
            image_emb = image_emb.contiguous()
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        if image_emb is not None and self.text_emb.dtype != image_emb.dtype:
            image_emb = image_emb.to(self.text_emb.dtype)
        if self._any_relabel:
            labels = self._relabeled(labels, indices)
        needs_grad = torch.is_grad_enabled() and logits.requires_grad
        raw = logits.detach()
        grad = None
        if needs_grad:
            grad = raw if self.inplace_grad else torch.empty_like(raw)
        if self.image_emb is not None:
            mode, emb = K.EMB_TABLE, self.image_emb
        elif image_emb is not None:
            mode, emb = K.EMB_BATCH, image_emb
            self._has_batch_consistency = True
        else:
            mode, emb = K.EMB_NONE, None
        out = _k.fused_step(
            raw, labels, indices, state=self._state, step_id=self._step_count % (K.MAX_STEP_ID + 1), ema=self.ema,
            scale=1.0 / logits.shape[0], label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            emb_mode=mode, emb=emb, text=self.text_emb if mode != K.EMB_NONE else None, grad=grad)
        self._step_count += 1
        if mode == K.EMB_BATCH:
            self._evidence.record_clip_batch(emb, self.text_emb, labels, indices, out.pred >= 0)
        # without the gradient: a second reference to it would make autograd copy it into .grad
        self.last_step = dataclasses.replace(out, grad=None)
        if self.device.type == "cpu" or self.validate == "sync":
            self._errors.check()
        if not needs_grad:
            return out.contrib.sum()
        if self.inplace_grad:
            torch.autograd.graph.increment_version(logits)
        return _k.FusedLoss.apply(logits, out.contrib, grad)

    def _relabeled(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The classes the batch trains with: a relabeled sample's new class, else its given label."""
        idx = indices.to(torch.int64)
        inside = (idx >= 0) & (idx < self.num_samples)  # bad indices are the kernel's to report
        new = self._relabel[idx.clamp(0, self.num_samples - 1)]
        use = inside & (new >= 0) & (labels >= 0) & (labels < self.num_classes)  # bad labels: the kernel reports
        return torch.where(use, new.to(labels.dtype), labels)

    def check_errors(self):
        """Synchronise and report anything the device recorded since the last report (``fastprune.step_errors``)."""
        self._errors.check()

    # -------------------------------------------------------------- selection

    def _decide(self, epoch: int) -> _noise.NoiseDecision | None:
        """The noise decisions for ``epoch`` (None before ``noise_start`` or with noise handling off)."""
        if self.noise_ratio == 0 or epoch < self.noise_start:
            return None
        ev = self._evidence
        clip_known = self.image_emb is not None or self._has_batch_consistency
        use_clip = self.noise_evidence in ("clip", "both") or (self.noise_evidence == "auto" and clip_known)
        use_model = self.noise_evidence != "clip"  # a CLIP table was completed by next_epoch() on every rank
        model_margin = ev.model_margin() if use_model else None
        clip_margin = ev.clip_margin if use_clip else None
        settled = self._relabel >= 0 if self._any_relabel else None
        if self._belief_buffer is None:
            self._belief_buffer = torch.empty(self.num_samples, dtype=torch.float32, device=self.device)
        # Written into the held buffers (the actions into the current ones: _apply merges them with the
        # relabels that stand); nothing can fail from here on (the step's errors were reported first).
        belief = _noise.beliefs(ev.label, model_margin, clip_margin, self.num_classes, settled,
                                share=self._from_rank0 if self._group is not None else None, out=self._belief_buffer,
                                before=ev.before)
        return _noise.act(belief, ev.label, model_margin, ev.pred if use_model else None, clip_margin,
                          ev.clip_pred if use_clip else None, max_fraction=self.noise_ratio,
                          relabel=self.noise_relabel, settled=settled, out=self._action)

    def _from_rank0(self, mixtures: torch.Tensor) -> torch.Tensor:
        """Rank 0's per-class mixtures on every rank (O(C) bytes, counted in ``last_sync``): fitted the same
        way on every rank of one kind of device, but sums may differ in their last bits between kinds; every
        belief and action then follows elementwise from them."""
        buf = mixtures.clone() if self.rank == 0 else torch.full_like(mixtures, float("-inf"))
        self._group.all_max(buf)
        self.last_sync["bytes"] += buf.numel() * buf.element_size()
        self.last_sync["decision_bytes"] = buf.numel() * buf.element_size()
        return buf

    def _select(self, epoch: int, policy: str, decision: _noise.NoiseDecision | None = None) -> _k.Selection:
        use_cons = self.image_emb is not None or self._has_batch_consistency
        actions = self._action if decision is None else decision.action  # earlier decisions stand until new ones
        if self.noise_ratio > 0:
            noisy = torch.eq(actions, _noise.EXCLUDE, out=self._noisy)
        else:
            noisy = self._noisy.zero_()
        # The outputs go into the pruner's own buffers (the weights into the step state's).
        out = {"noisy": self._noisy, "priority": self._priority_buffer, "weights": self._state.weights}
        return _k.select_epoch(
            self._state.scores, self._state.visits, self._state.consistency, use_consistency=use_cons,
            policy=policy, keep_ratio=self.keep_ratio, noise_ratio=0.0, noisy=noisy, out=out,
            semantic_weight=self.semantic_weight, max_drop=self.max_drop, seed=self.seed, epoch=epoch,
            exclude=self._excluded, population=self._population)

    def _adopt(self, epoch: int, policy: str, sel: _k.Selection,
               decision: _noise.NoiseDecision | None = None) -> torch.Tensor:
        # One small int64 transfer brings the counts and the drop probability's bits (exact: counts never pass
        # through a float); then the index list.
        drop_bits = sel.drop_prob.to(torch.float64).reshape(1).view(torch.int64)
        actions = _noise.action_counts(decision.action if decision is not None else self._action)
        n_noisy = torch.count_nonzero(sel.noisy).reshape(1)
        counts = torch.cat([sel.n_keep.to(torch.int64).reshape(1), n_noisy, drop_bits, actions]).tolist()
        n_keep, n_noisy = counts[0], counts[1]
        drop = torch.tensor(counts[2], dtype=torch.int64).view(torch.float64).item()
        order = sel.order[:n_keep].cpu()
        if sel.weights is not self._state.weights:
            self._state.weights.copy_(sel.weights)
        self._selection_priority = sel.priority
        if decision is not None:
            self._apply(decision, counts[3 + _noise.RELABEL] > 0)
            self._decision_belief = decision.belief
        weights = self._state.weights
        for lo, hi in _k.reference.passes(self.num_samples, self.device):
            down = self._action[lo:hi] == _noise.DOWNWEIGHT
            weights[lo:hi].mul_(torch.where(down, 1.0 - self._belief[lo:hi], 1.0))
        if sel.noisy is not self._noisy:
            self._noisy.copy_(sel.noisy)
        self._set_order(order)
        self.epoch = epoch
        record = {"epoch": epoch, "policy": policy, "kept": n_keep, "noisy": n_noisy, "drop_prob": drop,
                  "num_samples": self.num_samples, "relabeled": counts[3 + _noise.RELABEL],
                  "excluded": counts[3 + _noise.EXCLUDE], "down_weighted": counts[3 + _noise.DOWNWEIGHT]}
        if self._group is not None:
            record["world_size"] = self.world_size
            record["sync_bytes"] = self.last_sync["bytes"] if self.last_sync else 0
        self.history.append(record)
        return self._epoch_indices

    def _apply(self, d: _noise.NoiseDecision, any_relabel: bool) -> None:
        """Adopt new decisions.  A relabel stands (the sample's evidence restarts against its new class and
        later decisions leave it out, see ``noise.decide``); every other action is decided afresh."""
        if any_relabel:
            fresh = d.action == _noise.RELABEL
            self._evidence.restart(fresh, d.new_label)
            self._any_relabel = True
        for lo, hi in _k.reference.passes(self.num_samples, self.device):
            action, relabel = d.action[lo:hi], self._relabel[lo:hi]  # (a pass at a time: temporaries bounded)
            acted = action != _noise.KEEP
            before = relabel >= 0
            self._belief[lo:hi] = torch.where(acted, d.belief[lo:hi], torch.where(before, self._belief[lo:hi], 0.0))
            if any_relabel:
                relabel.copy_(torch.where(action == _noise.RELABEL, d.new_label[lo:hi], relabel))
            self._action[lo:hi] = torch.where(acted, action, torch.where(before, _noise.RELABEL, _noise.KEEP))

    def _set_order(self, order: torch.Tensor):
        self._global_indices = order
        self._epoch_indices = _dist.shard(order, self.rank, self.world_size)

    def next_epoch(self) -> torch.Tensor:
        """Build and adopt the next epoch's shuffled selection; return this rank's part of it (CPU LongTensor).

        Errors the device recorded during the epoch are raised here at the latest, before anything changes.
        Under ``torch.distributed`` this is collective: the ranks' updates are merged first
        (see ``sync()``), and every rank adopts the same global selection.
        """
        epoch = self.epoch + 1
        policy = self.schedule.policy_for(epoch)
        if self._group is not None:
            self._merge(_NEXT_EPOCH)
        self._errors.check()  # (a sync on CUDA: one small transfer an epoch)
        if self.image_emb is not None:  # on every rank, so that the ranks' states stay equal
            self._complete_clip_table()
        decision = self._decide(epoch)
        order = self._adopt(epoch, policy, self._select(epoch, policy, decision), decision)
        # A stamp only tells this step's rows apart and marks what changed since the last merge (just done):
        # clearing them every epoch means a stale stamp never equals a step id that wrapped around.
        self._state.stamp.fill_(-1)
        return order

    # ------------------------------------------------------------ distributed

    @property
    def rank(self) -> int:
        """This process's rank in the pruner's process group (0 without one)."""
        return 0 if self._group is None else self._group.rank

    @property
    def world_size(self) -> int:
        """Number of ranks sharing the pruner's selection (1 without a process group)."""
        return 1 if self._group is None else self._group.world_size

    def sync(self) -> int:
        """Merge the per-sample updates every rank made since the last merge (collective; no-op alone).

        ``next_epoch()`` does this itself; call it before a mid-epoch ``state_dict()`` so the saved
        state holds every rank's updates.  Returns the bytes this rank handed to the all-reduce.
        """
        if self._group is None:
            return 0
        return self._merge(_SYNC)

    def _merge(self, kind: int) -> int:
        """Agree on the epoch and on errors, then merge the touched samples' state over ranks."""
        t0 = time.perf_counter()
        g = self._group
        errs = self._errors.counters.tolist()  # a sync, at an epoch end
        fatal = self._errors.new_fatal(errs)
        flags = [0] * g.world_size
        flags[g.rank] = int(fatal)
        # One small collective: the ranks must be in the same call at the same epoch; the rest is maxima.
        head = g.agree([kind, self.epoch], [int(self._has_batch_consistency), self._step_count, *flags], self.device)
        sent = head_bytes = head.bytes
        if not head.same:
            raise _dist.RankFailure(
                "fastprune: the ranks are out of step (one called next_epoch() while another called sync(), "
                "or they are at different epochs); every rank must make the same pruner calls")
        batch_consistency, step_count, *failed = head.maxima
        bad = [r for r, f in enumerate(failed) if f]
        if bad:
            if fatal:
                self._errors.check(errs)  # raises the detailed error
            raise _dist.RankFailure(
                f"fastprune: rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} reported bad labels or "
                f"indices during epoch {self.epoch} (see {'their' if len(bad) > 1 else 'its'} error); every rank "
                "stops here so that none waits for the others")
        self._has_batch_consistency = bool(batch_consistency)
        touched = self._state.stamp >= self._merged_step
        st = self._state
        floats, counters, classes = self._evidence.merge_columns(batch_clip=self._has_batch_consistency)
        if self.image_emb is not None or self._has_batch_consistency:
            floats = [st.consistency] + floats
        sent += _dist.merge([st.scores] + floats, st.visits, counters, classes, self.num_classes, touched, g)
        self._step_count = step_count
        self._merged_step = self._step_count
        self.last_sync = {"bytes": sent, "header_bytes": head_bytes, "seconds": time.perf_counter() - t0}
        return sent

    # ----------------------------------------------------------------- queries

    @property
    def step_count(self) -> int:
        """The ``step()`` calls made so far on this rank (kept in ``state_dict()``): the run's progress in batches,
        which ``fastprune.schedule.ProgressScheduler`` measures against ``total_steps()``."""
        return self._step_count

    @property
    def epoch_indices(self) -> torch.Tensor:
        """The current epoch's sample order for this rank (CPU LongTensor; all of it in one process)."""
        return self._epoch_indices

    @property
    def global_indices(self) -> torch.Tensor:
        """The current epoch's whole selection, every rank's shard together (CPU LongTensor)."""
        return self._global_indices

    def shard(self, start: int = 0) -> torch.Tensor:
        """This rank's part of the selection's remainder ``global_indices[start:]`` (the pad rule of
        ``fastprune.distributed``); loaders use it to resume an epoch under another world size."""
        if start == 0:
            return self._epoch_indices
        return _dist.shard(self._global_indices[start:], self.rank, self.world_size)

    @property
    def scores(self) -> torch.Tensor:
        """EMA of each sample's cross-entropy (0 for unseen samples). Treat as read-only."""
        return self._state.scores

    @property
    def consistency(self) -> torch.Tensor:
        """Cosine of each sample's image embedding with its label's text embedding. Read-only."""
        return self._state.consistency

    @property
    def visits(self) -> torch.Tensor:
        """How many steps have scored each sample. Read-only."""
        return self._state.visits

    @property
    def weights(self) -> torch.Tensor:
        """This epoch's per-sample loss weights (unbiasing weights of infobatch). Read-only."""
        return self._state.weights

    @property
    def model_margin(self) -> torch.Tensor:
        """Each sample's area under the margin: its mean ``z_y - max_{c != y} z_c`` over the steps that
        scored it (NaN where none did; +inf with one class). Negative: the model prefers another class."""
        return self._evidence.model_margin()

    @property
    def model_pred(self) -> torch.Tensor:
        """The class the model predicted at each sample's latest scored visit (-1: never scored)."""
        return self._evidence.pred

    @property
    def given_labels(self) -> torch.Tensor:
        """Each sample's label as the steps saw it (-1: never scored)."""
        return self._evidence.label

    @property
    def clip_margin(self) -> torch.Tensor:
        """``cos(e, t_y) - max_{c != y} cos(e, t_c)`` per sample (NaN where unknown: no embeddings, or a
        sample never scored). With a fixed table it is computed once per sample, on the device."""
        self._complete_clip_table()
        return self._evidence.clip_margin

    @property
    def clip_pred(self) -> torch.Tensor:
        """The class whose text embedding is closest to each sample's image embedding (-1: unknown)."""
        self._complete_clip_table()
        return self._evidence.clip_pred

    def _complete_clip_table(self):
        if self.image_emb is not None:
            self._evidence.complete_clip_table(self.image_emb, self.text_emb)

    def suspected_noisy(self) -> torch.Tensor:
        """Indices of the samples the noise decisions act on: relabeled, left out or down-weighted
        (CPU LongTensor; ``noise_actions`` says which)."""
        return torch.nonzero(self._action != _noise.KEEP)[:, 0].cpu()

    @property
    def noise_actions(self) -> torch.Tensor:
        """Per sample, the noise decisions' action (``fastprune.noise`` codes: 0 keep, 1 down-weight,
        2 exclude, 3 relabel). Read-only."""
        return self._action

    @property
    def noise_belief(self) -> torch.Tensor:
        """Per sample, the belief that its label is wrong, where an action was taken (else 0). Read-only."""
        return self._belief

    @property
    def selection_priority(self) -> torch.Tensor | None:
        """Each sample's priority at the latest selection: what ``infobatch`` compares with the mean over the
        eligible samples and ``topk`` ranks (the score, times the consistency's factor with embeddings).  For
        reports; None after ``load_state_dict`` until the next selection.  Read-only."""
        return self._selection_priority

    @property
    def decision_belief(self) -> torch.Tensor | None:
        """Every sample's belief that its label is wrong at the latest noise decision (``noise_belief`` keeps
        it only where an action was taken): above 0.5 is suspected, though ``noise_ratio`` may cap how many are
        acted on.  For reports; None before the first decision and after ``load_state_dict``.  Read-only."""
        return self._decision_belief

    @property
    def relabeled(self) -> torch.Tensor:
        """Per sample, the class it trains with instead of its given label (-1: its own). Read-only."""
        return self._relabel

    def sampler(self) -> EpochSampler:
        """A ``Sampler`` over the current epoch's order for a plain ``DataLoader``."""
        return EpochSampler(self)

    def steps_per_epoch(self, batch_size: int, drop_last: bool = False, epoch: int | None = None) -> int:
        """This rank's optimizer steps in ``epoch`` (default: the current one; future epochs are
        expected values)."""
        batch_size = _check_int("batch_size", batch_size, 1)
        if epoch is None or epoch == self.epoch:
            n = self.epoch_indices.numel()
        elif epoch < self.epoch and epoch < len(self.history):
            n = _dist.shard_len(self.history[epoch]["kept"], self.world_size)
        else:
            noisy = self.history[-1]["noisy"] if self.history else 0
            n = max(0, self.schedule.expected_kept(epoch, self._population, self.keep_ratio) - noisy)
            n = _dist.shard_len(n, self.world_size)
        return n // batch_size if drop_last else -(-n // batch_size)

    def total_steps(self, batch_size: int, drop_last: bool = False) -> int:
        """Expected optimizer steps over all ``epochs`` (exact for epochs already selected)."""
        return sum(self.steps_per_epoch(batch_size, drop_last, e) for e in range(self.epochs))

    @property
    def visits_saved(self) -> float:
        """Fraction of sample visits saved so far versus training every epoch on everything.

        Counts the epochs selected so far, the current one included, except a selection made past
        the planned ``epochs`` that has not started (the usual ``next_epoch()`` after the last epoch).
        """
        counted = [h for h in self.history if h["epoch"] < self.epochs or h["epoch"] < self.epoch]
        counted = counted or self.history[:1]
        return 1.0 - sum(h["kept"] for h in counted) / (len(counted) * self.num_samples)

    # ------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """Everything needed to continue bitwise identically (random draws derive from seed and epoch).

        Under ``torch.distributed`` it is the same on every rank after ``next_epoch()`` or ``sync()``
        (save it from rank 0), and it does not depend on the world size: a run can resume on more
        or fewer ranks and makes the same global selections.
        """
        if self._group is not None and self._step_count != self._merged_step:
            warnings.warn("state_dict(): this rank has stepped since the last merge, so the state holds only "
                          "its own updates since then; call pruner.sync() on every rank first", RuntimeWarning,
                          stacklevel=2)
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "epoch": self.epoch,
            "step_count": self._step_count,
            **{name: col.clone() for name, col in self._state.columns().items() if name not in _UNSAVED},
            "noisy": self._noisy.clone(),
            "excluded": None if self._excluded is None else self._excluded.clone(),
            "global_indices": self._global_indices.clone(),
            "has_batch_consistency": self._has_batch_consistency,
            "clip": self._evidence.state_dict(),
            "relabeled_from": self._evidence.before_state_dict(),
            "noise": {"action": self._action.clone(), "belief": self._belief.clone(),
                      "relabel": self._relabel.clone()},
            "history": [dict(h) for h in self.history],
        }

    def _load_columns(self, sd: dict) -> None:
        """The step state's columns; one a state lacks (saved before it existed) starts empty.  Version 3
        kept the model's evidence beside CLIP's; the stamps only tell one step's rows apart."""
        saved = dict(sd)
        if sd["version"] == 3:
            saved.update({k: v for k, v in sd["evidence"].items() if not k.startswith("clip_")})
        for f in _k.FIELDS:
            col = getattr(self._state, f.name)
            if f.name in saved and f.name not in _UNSAVED:
                col.copy_(saved[f.name])
            else:
                col.fill_(f.empty)

    def _check_state(self, sd: dict) -> None:
        """Raise ``ValueError`` naming the first entry of ``sd`` that this pruner cannot load: everything is
        checked before anything is applied, so a bad state leaves the pruner as it was."""
        if not isinstance(sd, dict):
            raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
        for key in ("num_samples", "num_classes"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(f"state_dict is for {key}={sd.get(key)!r}, but this pruner has "
                                 f"{key}={getattr(self, key)!r}")
        version = sd.get("version")
        if version not in range(1, STATE_VERSION + 1):
            raise ValueError(f"state_dict version {version!r} is not supported (expected 1 to {STATE_VERSION})")
        order_key = "global_indices" if version >= 2 else "epoch_indices"
        needed = ["seed", "epoch", "step_count", "noisy", order_key, "has_batch_consistency", "history", "scores",
                  "visits"] + (["noise"] if version >= 3 else []) + (["clip"] if version >= 4 else [])
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(map(repr, missing))}: not a complete pruner state")
        n, c = self.num_samples, self.num_classes

        def column(name, value, lo=None, hi=None, finite=False, dtype_kind=None):
            if not isinstance(value, torch.Tensor) or value.shape != (n,):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state_dict[{name!r}] must be a tensor of shape ({n},), got {shape}")
            if dtype_kind == "bool" and value.dtype != torch.bool:
                raise ValueError(f"state_dict[{name!r}] must be a bool tensor, got {value.dtype}")
            if dtype_kind == "int" and value.dtype.is_floating_point:
                raise ValueError(f"state_dict[{name!r}] must be an integer tensor, got {value.dtype}")
            v = value.detach()
            if finite and not bool(torch.isfinite(v).all()):
                raise ValueError(f"state_dict[{name!r}] holds non-finite values")
            if lo is not None and v.numel() and bool((v < lo).any()):
                raise ValueError(f"state_dict[{name!r}] holds values below {lo} (smallest {v.min().item()})")
            if hi is not None and v.numel() and bool((v > hi).any()):
                raise ValueError(f"state_dict[{name!r}] holds values above {hi} (largest {v.max().item()})")

        saved = dict(sd)
        if version == 3:
            saved.update({k: v for k, v in (sd.get("evidence") or {}).items() if not k.startswith("clip_")})
        rules = {"scores": dict(finite=True), "visits": dict(lo=0, dtype_kind="int"),
                 "consistency": dict(finite=True), "weights": dict(lo=0.0, finite=True),
                 "margin_sum": dict(finite=True), "margin_count": dict(lo=0, dtype_kind="int"),
                 "pred": dict(lo=-1, hi=c - 1, dtype_kind="int"), "label": dict(lo=-1, hi=c - 1, dtype_kind="int")}
        for f in _k.FIELDS:
            if f.name in saved and f.name not in _UNSAVED:
                column(f.name, saved[f.name], **rules.get(f.name, {}))
        column("noisy", sd["noisy"], dtype_kind="bool")
        for key in ("epoch", "step_count"):
            if isinstance(sd[key], bool) or not isinstance(sd[key], int) or sd[key] < 0:
                raise ValueError(f"state_dict[{key!r}] must be an integer >= 0, got {sd[key]!r}")
        order = sd[order_key]
        if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype.is_floating_point \
                or order.numel() > n:
            raise ValueError(f"state_dict[{order_key!r}] must be a 1-D integer tensor of at most {n} indices")
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n
                              or torch.unique(order).numel() != order.numel()):
            raise ValueError(f"state_dict[{order_key!r}] must hold distinct sample indices in [0, {n})")
        if not isinstance(sd["history"], list) or not all(isinstance(h, dict) for h in sd["history"]):
            raise ValueError("state_dict['history'] must be a list of dicts")
        if version >= 3:
            noise = sd["noise"]
            if not isinstance(noise, dict) or any(k not in noise for k in ("action", "belief", "relabel")):
                raise ValueError("state_dict['noise'] must hold 'action', 'belief' and 'relabel'")
            column("noise.action", noise["action"], lo=0, hi=3, dtype_kind="int")
            column("noise.belief", noise["belief"], lo=0.0, hi=1.0, finite=True)
            column("noise.relabel", noise["relabel"], lo=-1, hi=c - 1, dtype_kind="int")
        clip = sd.get("clip") if version >= 4 else None
        if clip is not None:
            if not isinstance(clip, dict) or any(k not in clip for k in ("clip_margin", "clip_pred")):
                raise ValueError("state_dict['clip'] must hold 'clip_margin' and 'clip_pred'")
            column("clip.clip_margin", clip["clip_margin"])
            column("clip.clip_pred", clip["clip_pred"], lo=-1, hi=c - 1, dtype_kind="int")
        before = sd.get("relabeled_from")  # (optional: states saved before it was kept have none)
        if before is not None:
            if not isinstance(before, dict) or any(k not in before for k in ("label", "model_margin", "clip_margin")):
                raise ValueError("state_dict['relabeled_from'] must hold 'label', 'model_margin' and 'clip_margin'")
            column("relabeled_from.label", before["label"], lo=-1, hi=c - 1, dtype_kind="int")
            column("relabeled_from.model_margin", before["model_margin"])
            column("relabeled_from.clip_margin", before["clip_margin"])

    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict``; sizes must match this pruner's.  Every entry is checked first (shapes,
        types, ranges, finite values, distinct indices in range): a bad state raises ``ValueError`` and
        changes nothing."""
        self._check_state(sd)
        if sd["seed"] != self.seed:
            warnings.warn(f"state_dict was made with seed={sd['seed']}, this pruner has seed={self.seed}; "
                          "selections from here on follow this pruner's seed", RuntimeWarning, stacklevel=2)
        if (sd.get("excluded") is None) != (self._excluded is None) or (
                self._excluded is not None and not torch.equal(sd["excluded"].to(self.device), self._excluded)):
            raise ValueError("state_dict was made with a different initial_subset than this pruner's")
        self._load_columns(sd)
        self._noisy.copy_(sd["noisy"])
        self._errors.reset()
        self.epoch = int(sd["epoch"])
        self._step_count = int(sd["step_count"])
        self._merged_step = self._step_count
        order = sd["global_indices"] if sd["version"] >= 2 else sd["epoch_indices"]  # v1: single process
        self._set_order(order.to("cpu", torch.int64).clone())
        self._has_batch_consistency = bool(sd["has_batch_consistency"])
        self._evidence.load_state_dict(sd["clip"] if sd["version"] >= 4 else sd.get("evidence"),  # v1, v2: none
                                       sd.get("relabeled_from"))
        if sd["version"] >= 3:
            for name in ("action", "belief", "relabel"):
                getattr(self, "_" + name).copy_(sd["noise"][name])
        else:  # the old rule's set applies to the loaded epoch (its order and weights); new decisions follow
            self._action.zero_()
            self._belief.zero_()
            self._relabel.fill_(-1)
        self._any_relabel = bool((self._relabel >= 0).any())
        self.history = [dict(h) for h in sd["history"]]
        self._selection_priority = self._decision_belief = None  # not saved: known again at the next selection
        if self._group is not None:
            _dist.check_same(self._group, "the loaded pruner state (epoch, step count, selection)",
                             _dist.fingerprint(self.epoch, self._step_count, self._global_indices.numel(),
                                               int(self._global_indices[:64].sum())), self.device)

    def __repr__(self) -> str:
        emb = "none" if self.text_emb is None else ("table" if self.image_emb is not None else "per-batch")
        return (f"DynamicPruner(N={self.num_samples}, C={self.num_classes}, epochs={self.epochs}, "
                f"policy={self.policy!r}, keep_ratio={self.keep_ratio}, epoch={self.epoch}, embeddings={emb}, "
                f"device={self.device}" + (f", rank={self.rank}/{self.world_size})" if self._group else ")"))
