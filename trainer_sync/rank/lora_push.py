"""LoRA pushes on the trainer (issue 27): rank 0's choice of what a PEFT LoRA model's push carries.

Every trainer rank offers all of a LoraSource's tensors (sources/lora.py); trainer rank 0 picks the ones that travel
(plan/lora.py) from what the receivers said when they joined (their ``LoraSupport`` and ``Expected``), refuses a
push an engine could not take before any byte moves, and tells every rank and receiver what the push is
(``PlanOffer.lora``). The base weights of a merged push travel on the first push of each bridging group (a new
epoch: new or restarted engines, or a failed push before), then only the adapted modules.
"""
from __future__ import annotations

from ..config import SyncConfig
from ..plan import lora as plan
from ..plan.buckets import LocalPiece
from ..protocol import wire
from ..protocol.lora import LoraOffer, LoraSupport, lora_key
from ..protocol.messages import Expected
from ..sources import LoraSource, Source
from ..sources.peft import saved_name


def lora_source(source: Source) -> LoraSource | None:
    """The LoraSource under ``source`` (an Fp8Source may wrap it), or None for a dense model."""
    while source is not None and not isinstance(source, LoraSource):
        source = getattr(source, "inner", None)
    return source


class LoraPushes:
    def __init__(self, config: SyncConfig, source: Source):
        self.config = config
        self.source = lora_source(source)
        self.base_sent = False  # every receiver of this epoch acknowledged a merged push with the base

    @property
    def active(self) -> bool:
        return self.source is not None

    def connected(self) -> None:
        self.base_sent = False

    def state(self) -> tuple:
        """What the choice depends on beyond the pieces (a cached plan is reused only while it is the same)."""
        return (self.base_sent,)

    @staticmethod
    def read_support(bridge, receiver: int) -> LoraSupport | None:
        """What receiver ``receiver`` said about LoRA when it joined (None: nothing, not a LoRA-aware engine)."""
        return wire.read_if(bridge.store, lora_key(receiver), LoraSupport, stage="handshake")

    def choose(self, pieces: list[LocalPiece], expected: list[Expected], supports: list[LoraSupport | None]
               ) -> tuple[list[LocalPiece], LoraOffer | None, list[str], list[int]]:
        """Rank 0: ``(pieces that travel, the offer, refusals, refusing receivers)`` of this push."""
        src = self.source
        mode, why = plan.choose_mode(self.config.lora, supports)
        kinds = {n: src.kind[n] for n in dict.fromkeys(p.name for p in pieces) if n in src.kind}
        if mode == plan.ADAPTER:
            shapes = {p.name: p.shape for p in pieces}
            modules = {}
            for m in src.adapter.modules:
                a = shapes.get(saved_name(m.module, "lora_A"))
                b = shapes.get(saved_name(m.module, "lora_B"))
                if a is not None and b is not None:
                    modules[m.module] = (int(a[0]), int(a[1]), int(b[0]))
            errors, refused = [], []
            for j, sup in enumerate(supports):
                found = plan.adapter_refusals(modules, sup, expected[j].tensors if j < len(expected) else None,
                                              f"receiver {j}")
                errors += found
                refused += [j] if found else []
            if errors:
                return [], None, errors, refused
            names = set(plan.select(mode, kinds, src.adapter.saved_modules))
            offer = LoraOffer(plan.ADAPTER, self.config.lora_name, self.config.lora_int_id, dict(src.adapter.config),
                              why=why)
        else:
            packing: dict[str, list[str]] = {}
            for sup in supports:
                packing.update((sup.packing if sup is not None else {}) or {})
            partial = self.base_sent
            names = set(plan.select(mode, kinds, src.adapter.saved_modules, packing, with_base=not partial))
            offer = LoraOffer(plan.MERGED, partial=partial, why=why)
        return [p for p in pieces if p.name in names], offer, [], []

    def adapter_names(self, pieces: list[LocalPiece]) -> frozenset[str]:
        """The adapter tensors among ``pieces`` (checked against the engines' LoraSupport, not their checkpoint)."""
        return frozenset(p.name for p in pieces if self.source.kind.get(p.name) == plan.ADAPTER)

    def wire_expected(self, pieces: list[LocalPiece], supports: list[LoraSupport | None]) -> list[Expected]:
        """For ``wire_dtype="auto"``: the adapter tensors in the dtype the engines keep adapters in (one dtype
        only; else the trainer's)."""
        dtypes = {s.dtype for s in supports if s is not None and s.enabled and s.dtype}
        if len(dtypes) != 1:
            return []
        dtype = dtypes.pop()
        names = self.adapter_names(pieces)
        return [Expected({p.name: (tuple(p.shape), dtype) for p in pieces if p.name in names})]

    def acknowledged(self, offer: LoraOffer | None) -> None:
        """Every receiver took the push: a merged one with the base leaves it in every engine of this epoch."""
        if offer is not None and offer.mode == plan.MERGED and not offer.partial:
            self.base_sent = True

    @staticmethod
    def report(offer: LoraOffer | None) -> dict:
        if offer is None:
            return {}
        how = offer.mode + ("-partial" if offer.mode == plan.MERGED and offer.partial else "")
        return {"lora": how, "lora_reason": offer.why}

