"""TrainStep: the one training step the worker loop and the benchmarks share (no Ray)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.config import from_dict
from pipeline.train.config import TrainConfig
from pipeline.train.models import build_model, head_name
from pipeline.train import step as step_module
from pipeline.train.step import (TrainStep, WarmupCosine, augment, build_optimizer, precision_context,
                                 resolve_precision, setup_torch)


def _cfg(**sections) -> TrainConfig:
    raw = {"model": {"name": "seed_cnn"}, "optim": {"lr": 0.05}, "train": {"batch_size": 8, "seed": 3},
           "scaling": {"torch_threads": 1}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return from_dict(TrainConfig, raw)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("seed_cnn", 10, 1, 28)


def test_step_matches_a_hand_written_sgd_step():
    cfg = _cfg(optim={"grad_clip": 1.0, "label_smoothing": 0.1})
    model, ref = _model(), _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    ref_opt = build_optimizer(ref, cfg.optim)
    for i in range(3):
        x, y = _batch(seed=i)
        loss = step(x, y)
        ref_loss = nn.CrossEntropyLoss(label_smoothing=0.1)(ref(x), y)
        ref_loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert not loss.requires_grad and loss.shape == ()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert p.grad is None  # zero_grad(set_to_none=True)


def test_padding_labels_are_ignored():
    cfg = _cfg()
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    x, y = _batch()
    y[4:] = -1
    expected = nn.CrossEntropyLoss()(copy.deepcopy(model)(x[:4]), y[:4])
    torch.testing.assert_close(step(x, y), expected.detach())


def test_schedule_steps_once_per_call_and_sets_the_lr():
    cfg = _cfg(optim={"warmup_epochs": 1.0, "schedule": "cosine"})
    model = _model()
    opt = build_optimizer(model, cfg.optim)
    sched = WarmupCosine(opt, cfg.optim, total_steps=20, steps_per_epoch=4)
    step = TrainStep.from_config(model, opt, cfg, "cpu", schedule=sched)
    for i in range(3):
        step(*_batch(seed=i))
        assert sched.step_num == i + 1
        assert step.lr == pytest.approx(sched.lr_at(i))
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(i))


def test_frozen_backbone_keeps_still_while_the_head_trains():
    cfg = _cfg(optim={"momentum": 0.9})
    model = _model()
    head = head_name(model) + "."
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu", frozen_params=backbone)
    assert step.frozen
    step(*_batch())
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith(head), n
    step.frozen = False
    step(*_batch(seed=1))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.ndim > 1)


def test_channels_last_moves_model_and_batches():
    cfg = _cfg(model={"channels_last": True})
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    assert step.memory_format is torch.channels_last
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, y = step.to_device(*_batch())
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    assert torch.isfinite(step(*_batch()))


def test_bf16_autocast_on_cpu():
    autocast, scaler, in_dtype = precision_context("bf16", torch.device("cpu"))
    assert in_dtype is None and not scaler.is_enabled()
    cfg = _cfg(train={"precision": "bf16"})
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    with step.autocast:
        assert model(_batch()[0]).dtype == torch.bfloat16
    loss = step(*_batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("flags, expected", [({"avx512f", "amx_tile", "amx_bf16"}, "bf16"),
                                             ({"avx2", "avx512f", "avx512_bf16"}, "fp32"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_on_cpus_with_amx(monkeypatch, flags, expected):
    monkeypatch.setattr(step_module, "_cpu_flags", lambda: flags)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_auto_precision_on_this_cpu_follows_its_flags_into_the_step():
    with open("/proc/cpuinfo") as f:
        amx = any(line.startswith("flags") and " amx_bf16" in line for line in f)
    cfg = _cfg(train={"precision": "auto"})
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    assert step.precision == ("bf16" if amx else "fp32")
    with step.autocast:
        assert model(_batch()[0]).dtype == (torch.bfloat16 if amx else torch.float32)
    # The same reader gives the benchmarks' processor name; a field the CPU does not report is None.
    assert step_module.cpu_info("model name") and step_module.cpu_info("no such field") is None
    assert torch.isfinite(step(*_batch()))


@pytest.mark.parametrize("mode", ["flip_shift", "flip_erase"])
def test_augmentation_follows_its_own_generator(mode):
    cfg = _cfg(train={"augment": mode})
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    saved = step.generator.get_state()
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4).repeat(16, 1, 1, 1) + 1
    torch.manual_seed(0)
    first = augment(x, mode, step.generator)
    torch.manual_seed(1)  # the global RNG plays no part
    step.generator.set_state(saved)
    torch.testing.assert_close(augment(x, mode, step.generator), first, rtol=0, atol=0)
    assert not torch.equal(augment(x, mode, step.generator), first)


def test_random_erasing_blanks_one_rectangle_in_about_half_the_images():
    n, h, w = 4000, 28, 28
    x = torch.ones(n, 1, h, w).to(memory_format=torch.channels_last)
    out = augment(x, "flip_erase", torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    erased = out[:, 0] == 0
    hit = erased.flatten(1).any(1)
    assert 0.45 < hit.float().mean().item() < 0.55
    share = erased.flatten(1).float().mean(1)[hit]
    # Areas are drawn from 2-25 % of the image (rounded to whole pixels) and stay inside it.
    assert share.min().item() >= 0.01 and share.max().item() <= 0.3
    for img in erased[hit][:200]:  # the erased pixels form one full rectangle
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        assert img.sum().item() == len(rows) * len(cols)
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
    assert torch.equal(out[:, 0][~erased], x[:, 0][~erased])  # nothing else changes: the images are flip-symmetric


def test_setup_torch_threads_and_seeds():
    import random

    import numpy as np

    threads = torch.get_num_threads()
    try:
        setup_torch(_cfg(scaling={"torch_threads": 1}, train={"seed": 11}), torch.device("cpu"))
        assert torch.get_num_threads() == 1
        drawn = (torch.rand(1).item(), np.random.rand(), random.random())
        setup_torch(_cfg(scaling={"torch_threads": 1}, train={"seed": 11}), torch.device("cpu"))
        assert (torch.rand(1).item(), np.random.rand(), random.random()) == drawn
    finally:
        torch.set_num_threads(threads)


_MMAPPED_PROBE = """
import ctypes, torch
from pipeline.train.hostmem import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(64 << 20, dtype=torch.uint8)  # a 64 MB activation-sized block
print(kept, libc.mallinfo2().hblkhd - before >= 64 << 20)
"""


@pytest.mark.parametrize(("env", "expected"), [("1", "True False"), ("0", "False True")])
def test_cpu_training_processes_keep_large_blocks_off_mmap(env, expected):
    """With the setting, a 64 MB tensor comes from the heap (reused after free), not a fresh mmap per step."""
    out = subprocess.run([sys.executable, "-c", _MMAPPED_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PIPELINE_KEEP_FREED_MEMORY": env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected.split()


def test_weight_average_follows_the_decay_schedule_and_is_what_gets_evaluated():
    cfg = _cfg(model={"name": "fmnist_resnet"}, optim={"name": "adamw", "lr": 0.01}, train={"ema_decay": 0.5})
    torch.manual_seed(0)
    model = build_model("fmnist_resnet", 10, 1, 28)
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    assert step.eval_model is step.ema.module and step.eval_model is not model
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(12):
        step(*_batch(seed=i))
        d = min(0.5, (1 + i + 1) / (10 + i + 1))
        assert step.ema.decay_at(i + 1) == pytest.approx(d)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert step.ema.updates == 12 and step.ema.decay_at(12) == 0.5  # the warm-up has handed over to the decay
    averaged = step.ema.module.state_dict()
    for k, v in expected.items():  # BN running statistics are averaged too; the batch counter is copied
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged["fc.0.weight"], model.state_dict()["fc.0.weight"])
    assert not step.ema.module.training and not any(p.requires_grad for p in step.ema.module.parameters())


def test_no_weight_average_by_default():
    cfg = _cfg()
    model = _model()
    step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
    assert step.ema is None and step.eval_model is model


def test_weight_average_round_trips_through_the_checkpoint(tmp_path):
    from pipeline.train.checkpoint import load_model, result_weights
    from pipeline.train.state import RunState

    cfg = _cfg(optim={"name": "adamw", "lr": 0.01}, train={"ema_decay": 0.99})

    class _Loader:
        def state_dict(self):
            return {}

    def run(model):
        step = TrainStep.from_config(model, build_optimizer(model, cfg.optim), cfg, "cpu")
        return step, RunState(model, step, _Loader(), rank=0, world_size=1, keep_best_by="val_top1")

    model = _model()
    step, state = run(model)
    for i in range(5):
        step(*_batch(seed=i))
    state.save(tmp_path, {"model": "seed_cnn", "num_classes": 10, "in_channels": 1, "image_size": 28})
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["ema"]["updates"] == 5
    for k, v in step.ema.module.state_dict().items():
        assert torch.equal(result_weights(saved)[k], v)
    loaded, _ = load_model(tmp_path)  # pipeline evaluate and --init-from see the average
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, step.ema.module.state_dict()[k])

    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])  # as the worker loop does, before the step is built
    step2, state2 = run(resumed)
    state2.load_state_dict(saved)
    assert step2.ema.updates == 5
    for k, v in step.ema.module.state_dict().items():
        assert torch.equal(step2.ema.module.state_dict()[k], v)
    x, y = _batch(seed=9)
    step(x, y)
    step2(x, y)
    for k, v in step.ema.module.state_dict().items():
        torch.testing.assert_close(step2.ema.module.state_dict()[k], v, rtol=0, atol=0)
    del saved["ema"]
    assert result_weights(saved) is saved["model"]  # a run without an average offers its trained weights


def test_evaluate_counts_each_real_sample_once_in_the_confusion_matrix():
    from pipeline.train.loop import evaluate

    model = _model()
    batches = [_batch(8, seed) for seed in range(3)]
    batches[-1][1][5:] = -1  # the last batch's tail is padding, as a val loader marks it
    autocast, _, in_dtype = precision_context("fp32", torch.device("cpu"))
    out = evaluate(model, batches, torch.device("cpu"), autocast, 10, in_dtype, torch.contiguous_format)
    expected = torch.zeros(10, 10, dtype=torch.int64)
    hits = 0
    with torch.no_grad():
        for x, y in batches:
            pred = model(x).argmax(1)
            for t, p in zip(y.tolist(), pred.tolist()):
                if t >= 0:
                    expected[t, p] += 1
                    hits += t == p
    assert out["val_samples"] == 21 and int(out["confusion"].sum()) == 21
    assert torch.equal(out["confusion"], expected)
    assert out["val_top1"] == pytest.approx(hits / 21)


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", "cpu"), ("auto", "cuda", "gpu"), ("cpu", "cpu", "cpu"), ("gpu", "cuda", "gpu")])
def test_the_loader_runs_where_the_model_trains_unless_told(setting, device, expected):
    # A CPU job on a host with a GPU: Ray does not hide the GPU from a worker given none.
    assert step_module.loader_device(setting, torch.device(device)) == expected
