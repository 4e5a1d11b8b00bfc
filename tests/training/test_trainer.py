from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import small_config
from worker.engine.config import BagelConfig
from worker.engine.pipeline import Echo4oPipeline
from worker.training.data import MULTI_REFERENCE, TEXT_TO_IMAGE, write_test_dataset
from worker.training.trainer import (
    EMA,
    GIB,
    Trainer,
    TrainingError,
    latest_checkpoint,
    memory_estimate,
    released_7b_config,
    warmup_factor,
)

REPO = Path(__file__).resolve().parents[2]


def test_warmup_by_hand():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_ema_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA({"p": p}, decay=0.9)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["p"], torch.tensor([1.1]))  # 0.9 * 1 + 0.1 * 2
    ema.swap()
    assert torch.allclose(p, torch.tensor([1.1]))


def test_full_mode_of_the_7b_mot_is_refused_on_one_80gb_card_with_the_numbers():
    config = released_7b_config()
    full = memory_estimate(config, "full")
    assert 14e9 < full.params < 15e9  # two experts of the 7B LLM plus the ViT
    assert full.training_bytes == 20 * full.params
    with pytest.raises(TrainingError, match=r"does not fit a 80 GiB GPU.*full.*at least \d+ GPUs with FSDP"):
        full.check(80 * GIB)
    lora = memory_estimate(config, "lora")
    assert lora.weights_bytes == 2 * (lora.params + lora.vae_params)
    lora.check(80 * GIB)
    assert memory_estimate(config, "full", shards=8).training_bytes == full.training_bytes // 8


def test_full_mode_of_the_7b_mot_fits_80gb_cards_once_fsdp_shards_it_four_ways():
    config = released_7b_config()
    with pytest.raises(TrainingError, match=r"e9 x 20 B / 3 shards\) 90.7 GiB .* = 95.1 GiB per GPU over 3 shard"):
        memory_estimate(config, "full", shards=3).check(80 * GIB)
    four = memory_estimate(config, "full", shards=4)
    four.check(80 * GIB)  # 272.1 / 4 = 68.0 GiB + 0.2 (VAE, bf16) + 4.3 (activations) = 72.5 GiB
    assert round(four.total_bytes / GIB, 1) == 72.5
    memory_estimate(config, "full", shards=8).check(80 * GIB)


def test_lora_parameter_count_by_hand(tiny_model):
    config = BagelConfig.from_dir(tiny_model)
    est = memory_estimate(config, "lora", lora_rank=2)
    # tiny: hidden 64, q 64, kv 2*16 = 32, mlp 128; per layer r*((64+64)*2 + (64+32)*2 + 3*(64+128)); 2 layers
    assert est.trainable == 2 * 2 * (256 + 192 + 576)


def _train(tiny_model, tmp_path, layout, mode, steps, **kw):
    data = write_test_dataset(tmp_path / "data", layout, num_rows=1)
    seen = []
    config = small_config(tiny_model, data, tmp_path / "out", mode=mode, total_steps=steps, **kw)
    manifest = Trainer(config, callback=seen.append).train()
    return config, manifest, seen


def test_text_to_image_lora_loss_halves_and_the_version_loads_generates_and_differs(tiny_model, tmp_path):
    config, manifest, seen = _train(tiny_model, tmp_path, TEXT_TO_IMAGE, "lora", 60)
    assert manifest["steps"] == 60 and [p.step for p in seen] == list(range(1, 61))
    assert seen[-1].loss <= 0.5 * seen[0].loss, (seen[0].loss, seen[-1].loss)
    assert seen[-1].eta_s == 0 and seen[0].samples_per_s > 0
    assert manifest["data"]["used"] >= 60 and manifest["hyperparameters"]["mode"] == "lora"
    assert list((Path(config.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    base = Echo4oPipeline.from_pretrained(str(tiny_model), device="cpu", dtype="float32")
    tuned = Echo4oPipeline.from_pretrained(config.output_dir, device="cpu", dtype="float32")
    a = base("a red square", height=32, width=32, num_steps=3, seed=1, output_type="latent").images[0]
    b = tuned("a red square", height=32, width=32, num_steps=3, seed=1, output_type="latent").images[0]
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    changed = [k for k, v in load_file(Path(config.output_dir) / "ema.safetensors").items()
               if not torch.equal(v, load_file(tiny_model / "ema.safetensors")[k])]
    assert changed and all("_moe_gen" in k for k in changed)  # LoRA touches the generation expert only


def test_multi_reference_full_loss_halves(tiny_model, tmp_path):
    _, manifest, seen = _train(tiny_model, tmp_path, MULTI_REFERENCE, "full", 40, lr=5e-4)
    assert seen[-1].loss <= 0.5 * seen[0].loss, (seen[0].loss, seen[-1].loss)
    assert manifest["steps"] == 40


_KILLED_RUN = """
import os, signal, sys
from tests.training.conftest import small_config
from worker.training.trainer import Trainer
config = small_config(*sys.argv[1:4], total_steps=6, save_every=2, mode="lora")
def die(progress):
    if progress.step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(config, callback=die).train()
"""


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_at_the_same_step(tiny_model, tmp_path):
    data = write_test_dataset(tmp_path / "data", TEXT_TO_IMAGE, num_rows=2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tiny_model), str(data), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_checkpoint(out).name == "step-00000002"
    resumed = Trainer(small_config(tiny_model, data, out, total_steps=6, save_every=2, mode="lora")).train()
    straight = Trainer(small_config(tiny_model, data, tmp_path / "ref", total_steps=6, save_every=2,
                                    mode="lora")).train()
    assert resumed["steps"] == straight["steps"] == 6
    a, b = load_file(out / "ema.safetensors"), load_file(tmp_path / "ref" / "ema.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_gloo_processes_equal_one_process_on_the_same_data(tiny_model, tmp_path):
    data = write_test_dataset(tmp_path / "data", MULTI_REFERENCE, num_rows=2)
    results = {}
    for procs in (1, 2):
        config = small_config(tiny_model, data, tmp_path / f"out{procs}", mode="full", total_steps=2,
                              expected_tokens=400, text_dropout=0.5, vit_dropout=0.5, vae_dropout=0.5)
        cfg_file = tmp_path / f"config{procs}.json"
        cfg_file.write_text(config.model_dump_json(), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        proc = subprocess.run([*launch, "-m", "worker.training.distributed", str(cfg_file)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[procs] = load_file(tmp_path / f"out{procs}" / "ema.safetensors")
        manifest = json.loads((tmp_path / f"out{procs}" / "manifest.json").read_text())
        assert manifest["world_size"] == procs and manifest["steps"] == 2
    base = load_file(tiny_model / "ema.safetensors")
    assert any(not torch.equal(results[1][k], base[k]) for k in base)
    # the ViT's key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so AdamW turns
    # float rounding noise into full-size steps there: it is the one tensor where summation order shows
    compared = [k for k in results[1] if not (k.startswith("vit_model.") and k.endswith("k_proj.bias"))]
    for k in compared:
        assert torch.allclose(results[1][k], results[2][k], atol=1e-5), k


def test_fsdp_over_two_gloo_processes_equals_one_process_and_resumes_from_its_gathered_checkpoint(tiny_model,
                                                                                                    tmp_path):
    """FSDP2 ``fully_shard`` runs on the CPU with gloo: two sharded processes (one step, a checkpoint gathered on
    rank 0, then a resumed second step) give the weights one process computes in two steps."""
    data = write_test_dataset(tmp_path / "data", MULTI_REFERENCE, num_rows=2)
    common = dict(mode="full", expected_tokens=400, text_dropout=0.5, vit_dropout=0.5, vae_dropout=0.5,
                  ema_decay=0.5, save_every=1)
    one = Trainer(small_config(tiny_model, data, tmp_path / "one", total_steps=2, **common)).train()
    out = tmp_path / "fsdp"
    for steps in (1, 2):
        config = small_config(tiny_model, data, out, total_steps=steps, sharding="fsdp", **common)
        cfg_file = tmp_path / f"fsdp{steps}.json"
        cfg_file.write_text(config.model_dump_json(), encoding="utf-8")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        proc = subprocess.run([*launch, "-m", "worker.training.distributed", str(cfg_file)], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["steps"] == one["steps"] == 2
    assert manifest["hyperparameters"]["sharding"] == manifest["sharding"] == "fsdp"
    state = torch.load(latest_checkpoint(out) / "trainer_state.pt", weights_only=False)
    base = load_file(tiny_model / "ema.safetensors")
    assert all(state["params"][k].shape == base[k].shape for k in state["params"])  # gathered, not shards
    Echo4oPipeline.from_pretrained(str(latest_checkpoint(out)), device="cpu", dtype="float32")  # released layout
    a, b = load_file(tmp_path / "one" / "ema.safetensors"), load_file(out / "ema.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], base[k]) for k in base)
    # same tolerance rule as the DDP test above (the ViT key bias's gradient is exactly zero)
    for k in (k for k in a if not (k.startswith("vit_model.") and k.endswith("k_proj.bias"))):
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_sharding_fsdp_is_for_full_mode():
    with pytest.raises(ValueError, match="sharding=fsdp is for mode=full"):
        small_config(Path("m"), Path("d"), Path("o"), mode="lora", sharding="fsdp")
