"""What the vLLM backend expects from a checkpoint: read from safetensors headers (no vLLM needed)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from trainer_sync.engines.checkpoint import expected_tensors, find_checkpoint_dir, read_header


def test_header_names_shapes_dtypes(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"a.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "b.scale": torch.zeros(2, dtype=torch.float32),
               "c.codes": torch.zeros(2, 2, dtype=torch.float8_e4m3fn), "d.ids": torch.zeros(5, dtype=torch.int64)},
              path, metadata={"format": "pt"})
    assert read_header(path) == {"a.weight": ((3, 4), "bfloat16"), "b.scale": ((2,), "float32"),
                                 "c.codes": ((2, 2), "float8_e4m3fn"), "d.ids": ((5,), "int64")}
    # Served in bf16: float weights are expected in bf16 (the trainer casts while packing); fp8 codes and integer
    # tensors keep their own dtype.
    assert expected_tensors(str(tmp_path), torch.bfloat16) == {
        "a.weight": ((3, 4), "bfloat16"), "b.scale": ((2,), "bfloat16"), "c.codes": ((2, 2), "float8_e4m3fn"),
        "d.ids": ((5,), "int64")}
    assert expected_tensors(str(tmp_path), None)["b.scale"] == ((2,), "float32")


def test_shards_follow_the_index_and_other_files_are_ignored(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"x": torch.zeros(2), "y": torch.zeros(3), "stale": torch.zeros(1)},
              str(tmp_path / "consolidated.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    assert expected_tensors(str(tmp_path), "float32") == {"x": ((2,), "float32"), "y": ((3,), "float32")}


def test_no_safetensors_means_no_expectations(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert expected_tensors(str(tmp_path), torch.float32) is None
    assert expected_tensors(None, torch.float32) is None
    assert find_checkpoint_dir(str(tmp_path)) == str(tmp_path)
    assert find_checkpoint_dir("no-such-org/no-such-model-trainer-sync-test") is None  # cache only, no download
