"""TRL's GRPOTrainer with ``callbacks=[sync.callback()]``: a push into a vLLM engine after every optimizer step.

    .venv/bin/python examples/trl_callback.py     # CPU, ~1 min

The policy is a tiny Qwen3 with a word-level tokenizer made in code (token i is the word "t<i>"), the reward the
fraction of completion tokens equal to one target token. GRPOTrainer samples with transformers here (the recipe
``recipes/grpo_trl.py`` samples from the engine instead, through TRL's ``rollout_func``); the callback keeps the
engine serving the step's weights, versioned by the global step. At the end the engine's greedy tokens must equal
transformers' on the trained policy.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (one trainer process)

import torch
from datasets import Dataset
from tiny import BACKEND, CPU_ENGINE, VOCAB, check, hf_greedy, llm_greedy, tiny_policy
from trl import GRPOConfig, GRPOTrainer
from vllm import LLM

from trainer_sync import SyncConfig, WeightSync

TARGET, STEPS = 7, 3


def word_tokenizer():
    """GRPOTrainer needs a processing_class (to decode, pad, find EOS); any PreTrainedTokenizerFast made offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {({0: "<s>", 1: "</s>", 2: "<pad>"}.get(i, f"t{i}")): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
    fast.padding_side = "left"  # TRL left-pads prompts
    return fast


def reward(completions, completion_ids, **kwargs):
    """A verifiable reward: the fraction of completion tokens equal to TARGET (a stand-in for "correct")."""
    return [sum(t == TARGET for t in ids) / max(1, len(ids)) for ids in completion_ids]


def main() -> None:
    work = tempfile.mkdtemp(prefix="trl-example-")
    model = tiny_policy(os.path.join(work, "policy"))
    llm = LLM(model=os.path.join(work, "policy"), weight_transfer_config=BACKEND, **CPU_ENGINE)
    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"t{i}" for i in torch.randint(3, VOCAB, (4,), generator=gen).tolist()) for _ in range(8)]

    sync = WeightSync(model, engines=[llm], config=SyncConfig())
    # transformers.Trainer and TRL trainers (GRPOTrainer, ...): a TrainerCallback, at global_step % k == 0
    trainer = GRPOTrainer(
        model=model, processing_class=word_tokenizer(), reward_funcs=reward,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        args=GRPOConfig(output_dir=os.path.join(work, "out"), max_steps=STEPS, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8, beta=0.0, learning_rate=1e-2,
                        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=1),
        callbacks=[sync.callback(every=1)])
    trainer.train()
    versions = sync.weight_versions()
    sync.close()
    check("trl_callback", llm_greedy(llm), hf_greedy(trainer.model), steps=STEPS, versions=versions)


if __name__ == "__main__":
    main()
