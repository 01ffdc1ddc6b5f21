"""The fast apply path: copy each checkpoint tensor straight into its place in the live vLLM model.

Why: vLLM's layerwise reload (the general path, worker.py) moves every layer to meta, buffers its tensors,
re-materializes the layer, runs its loaders and its post-load processing, and copies the result back into the
original storages: 103-119 ms for a Qwen3-8B-shaped model on an H200, where moving the 16.38 GB takes 8 ms. When no
layer transforms its weights after loading (unquantized layers on CUDA: their ``process_weights_after_loading`` is a
no-op there), a checkpoint tensor's bytes end up verbatim in one slice of one parameter (q/k/v in ``qkv_proj``,
gate/up in ``gate_up_proj``, a TP shard of either), so a push can be one ``copy_`` per tensor into that slice.

Where each slice is gets learned once, from the model's own ``load_weights``: it runs on meta tensors of the
checkpoint's shapes with every write intercepted (``copy_`` and other in-place ops; nothing is written). Anything
but plain copies of (a view of) a checkpoint tensor into a parameter makes the model ineligible, and it keeps the
layerwise path. The placement is then *proven* on one push through the layerwise path: the checksum of every
received tensor must equal the checksum of its slice after vLLM's own reload and processing. Only then does the
fast path take over; a model it cannot prove keeps the layerwise path for good.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from ...codec.delta.checksums import checksum_parts

logger = logging.getLogger(__name__)

# Quantization methods whose post-load processing leaves the loaded bytes where the kernels read them, on CUDA
# (vLLM's linear.py / vocab_parallel_embedding.py repack only on CPU; the unquantized fused-MoE method's Triton
# kernel reads w13_weight / w2_weight as loaded, and a backend that shuffles them into another layout is caught by
# the proof below: its slices no longer hold what was received). Any other method (fp8, ...) may transform weights.
PLAIN_METHODS = frozenset({"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod", "UnquantizedFusedMoEMethod"})


@dataclass(frozen=True)
class Slot:
    """One copy the loader makes: ``dst`` (a view of a parameter) <- ``t.as_strided(size, stride, offset + ...)``."""

    param: str
    dst: torch.Tensor  # a live view of the parameter's storage
    size: tuple[int, ...]  # the source view, relative to the received (contiguous) tensor
    stride: tuple[int, ...]
    offset: int

    def source(self, t: torch.Tensor) -> torch.Tensor:
        if self.offset == 0 and tuple(t.shape) == self.size and t.stride() == self.stride:
            return t
        return t.as_strided(self.size, self.stride, t.storage_offset() + self.offset)


def ineligible_reason(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why this model must keep the layerwise path (None: its layers do nothing after loading)."""
    if device.type != "cuda":
        return f"the model is on {device.type} (vLLM repacks weights after loading there)"
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in PLAIN_METHODS:
            return f"{name or 'model'} uses {type(method).__name__}, which may process weights after loading"
        if type(module).__name__ == "MLAAttention":
            return f"{name} is MLA attention (derives its kernels from kv_b_proj after loading)"
    return None


class _Capture(TorchFunctionMode):
    """Records where ``load_weights`` copies each probe tensor, and writes nothing."""

    def __init__(self, probes: dict[int, str], params: dict[int, str]):
        super().__init__()
        self.probes, self.params = probes, params
        self.slots: dict[str, list[Slot]] = {}
        self.problems: list[str] = []

    def _probe(self, t) -> tuple[str, torch.Tensor] | None:
        if not isinstance(t, torch.Tensor):
            return None
        for cand in (t, t._base):
            if cand is not None and id(cand) in self.probes:
                return self.probes[id(cand)], cand
        return None

    def _param(self, t) -> str | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        return self.params.get(t.untyped_storage().data_ptr())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        writes = fname == "__setitem__" or (fname.endswith("_") and not fname.startswith("_"))
        if not writes:
            return func(*args, **kwargs)
        dst = args[0] if args else None
        param = self._param(dst)
        if fname == "copy_" and len(args) >= 2 and (hit := self._probe(args[1])) is not None:
            name, probe = hit
            src = args[1]
            if param is None:
                self.problems.append(f"{name} is copied into a tensor that is no parameter")
            elif not dst.is_contiguous() or dst.dtype != src.dtype or tuple(dst.shape) != tuple(src.shape):
                self.problems.append(f"{name} -> {param}: not a plain contiguous copy")
            else:
                self.slots.setdefault(name, []).append(
                    Slot(param, dst, tuple(src.shape), src.stride(), src.storage_offset() - probe.storage_offset()))
            return dst
        if param is not None:
            if dst.numel() == 0 or fname in ("fill_", "zero_"):
                return dst  # padding set once at load (a constant): nothing a push must repeat
            self.problems.append(f"{param}: written by {fname} during loading")
            return dst
        return func(*args, **kwargs)


def learn(model: torch.nn.Module, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
          ) -> tuple[dict[str, list[Slot]] | None, str]:
    """Run ``model.load_weights`` on meta tensors of ``shapes`` (checkpoint name -> (shape, dtype)) with every write
    intercepted. Returns (slots per name, "") or (None, why not)."""
    params = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters() if p.device.type != "meta"}
    probes = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in shapes.items()}
    capture = _Capture({id(t): n for n, t in probes.items()}, params)
    try:
        with torch.no_grad(), capture:
            model.load_weights(list(probes.items()))
    except Exception as e:  # noqa: BLE001 - a loader that cannot run on meta tensors: no fast path
        return None, f"load_weights on meta tensors failed: {type(e).__name__}: {e}"
    if capture.problems:
        return None, "; ".join(capture.problems[:3])
    covered: dict[str, list[tuple[int, int]]] = {}
    for slots in capture.slots.values():
        for s in slots:
            lo = s.dst.storage_offset() * s.dst.element_size()
            covered.setdefault(s.param, []).append((lo, lo + s.dst.numel() * s.dst.element_size()))
    for param, ranges in covered.items():
        ranges.sort()
        if any(b[0] < a[1] for a, b in zip(ranges, ranges[1:])):
            return None, f"two checkpoint tensors overlap in {param}"
    return capture.slots, ""


def is_same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same elements of the same memory (copying one into the other does nothing)."""
    return (a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and tuple(a.shape) == tuple(b.shape) and a.stride() == b.stride())


def whole_targets(slots: dict[str, list[Slot]], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The places of the fast path that a delta push can write into directly: checkpoint tensors whose bytes land
    verbatim, all of them and in order, in exactly one contiguous slice of a parameter. Returns (name -> that
    slice, shaped as the checkpoint tensor) and (name -> why not) for the others.

    Why only those: a delta addresses elements of the trainer's tensor, so its destination must be that tensor's
    elements one to one. A TP shard (part of the tensor), a tensor loaded into several places, or a strided source
    view is no such destination; an engine with one of them takes full pushes (pure function of the learned slots).
    """
    targets, why_not = {}, {}
    for name, places in slots.items():
        if name not in shapes:
            why_not[name] = "not in the served checkpoint's tensors"
            continue
        shape = tuple(shapes[name][0])
        if len(places) != 1:
            why_not[name] = f"loaded into {len(places)} places"
            continue
        s = places[0]
        whole = s.offset == 0 and s.size == shape and s.stride == torch.empty(shape, device="meta").stride()
        if not whole or not s.dst.is_contiguous() or tuple(s.dst.shape) != shape:
            why_not[name] = f"only part of it (a shard or a strided view) lands in {s.param}"
            continue
        targets[name] = s.dst
    return targets, why_not


def checksum(t: torch.Tensor) -> torch.Tensor:
    """The package's one checksum (codec/delta/checksums.py, the one a delta's base is checked with) of a tensor's
    bits in element order, as a device tensor of its three sums: nothing is synchronized."""
    return checksum_parts(t)


class DirectApply:
    """The fast path of one vLLM worker: learn (once), prove (on one layerwise push), then copy into place."""

    DISABLED = "the trainer asked for vLLM's layerwise reload (SyncConfig.engine_apply)"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.slots: dict[str, list[Slot]] | None = None
        self.armed = False  # proven: pushes go straight into place
        self.why_not: str | None = None  # set once the model is found ineligible: never retried
        self._proof: list[tuple[Slot, torch.Tensor]] | None = None
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # what the slots were learned from
        self._targets: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # whole_targets, once armed

    def enable(self, on: bool) -> None:
        """The trainer's choice, at every join (what was learned and proven is kept for a later "auto")."""
        if not on:
            self.armed, self.why_not = False, self.why_not or self.DISABLED
        elif self.why_not == self.DISABLED:
            self.why_not = None

    def prepare(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None) -> None:
        """Before a push: learn the placement the first time (model and checkpoint shapes permitting)."""
        if self.armed:
            if not self._storages_unchanged():
                self.armed, self.slots = False, None  # vLLM re-allocated a weight (sleep level 2, say): relearn
                logger.info("trainer_sync: the model's weights moved; learning their places again")
            else:
                return
        if self.slots is not None or self.why_not is not None:
            return
        self.shapes, self._targets = dict(shapes or {}), None
        if not shapes:
            self.why_not = "the served checkpoint's tensors are unknown"
            return
        self.why_not = ineligible_reason(self.model, self.device)
        if self.why_not is None:
            self.slots, why = learn(self.model, shapes)
            self.why_not = why or None
        if self.why_not:
            logger.info("trainer_sync: applying pushes through vLLM's layerwise reload: %s", self.why_not)

    def _storages_unchanged(self) -> bool:
        now = {n: p.untyped_storage().data_ptr() for n, p in self.model.named_parameters()}
        return all(now.get(s.param) == s.dst.untyped_storage().data_ptr()
                   for slots in self.slots.values() for s in slots)

    # --- proof, on a push through the layerwise path --------------------------------------------------------
    def observe(self, batch) -> None:
        """Layerwise push: remember each received tensor's checksum (taken before vLLM touches anything)."""
        if self.slots is None or self.armed or self.why_not is not None:
            return
        if self._proof is None:
            self._proof = []
        for name, t in batch:
            for s in self.slots.get(name, ()):
                if s.dst.dtype == t.dtype:
                    self._proof.append((s, checksum(s.source(t))))

    def verify(self) -> None:
        """After vLLM's layerwise reload finished: arm the fast path if every slice holds what was received."""
        proof, self._proof = self._proof, None
        if self.slots is None or self.armed or self.why_not is not None or not proof:
            return
        expected = sum(len(v) for v in self.slots.values())
        if len(proof) != expected:
            return  # a partial push (or one with other dtypes) proves nothing; try on the next one
        got = torch.stack([checksum(s.dst) for s, _ in proof])
        # The received tensors' checksums live where the receive buffers were (host memory when the bytes came over
        # gloo), the slices' on the model's device: compare them on one device, or a gloo push never proves anything.
        want = torch.stack([c.to(got.device) for _, c in proof])
        if torch.equal(got, want):
            self.armed = True
            logger.info("trainer_sync: %d tensors proven in place; pushes now copy straight into the model", expected)
        else:
            bad = [s.param for (s, _), ok in zip(proof, (got == want).all(1).tolist()) if not ok]
            self.slots, self.why_not = None, f"after layerwise reload {bad[:3]} differ from what was received"
            logger.info("trainer_sync: keeping vLLM's layerwise reload: %s", self.why_not)

    def delta_targets(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The armed fast path's whole slices, for a receiver to take delta pushes straight into (the same dict
        while the placement stands, so adopting it again is recognized as no change), or (None, why not)."""
        if not self.armed:
            return None, f"its fast apply path is not armed ({self.why_not or 'not proven yet'})"
        if self._targets is None:
            self._targets = whole_targets(self.slots, self.shapes)
        targets, why_not = self._targets
        if why_not:
            name, why = next(iter(sorted(why_not.items())))
            return None, f"{len(why_not)} tensors are no whole slice of a parameter ({name}: {why})"
        return targets, ""

    # --- the fast path ------------------------------------------------------------------------------------------
    def apply(self, batch) -> None:
        """Copy one batch of received tensors into place (one batched launch; no clone, no layerwise state)."""
        dsts, srcs = [], []
        seen = set()
        for name, t in batch:
            for s in self.slots.get(name, ()):
                if id(s.dst) in seen:  # a tied alias: the same place
                    continue
                seen.add(id(s.dst))
                src = s.source(t)
                if is_same_view(src, s.dst):  # the receiver wrote straight into the slice (delta targets)
                    continue
                dsts.append(s.dst)
                srcs.append(src)
        if dsts:
            torch._foreach_copy_(dsts, srcs)
