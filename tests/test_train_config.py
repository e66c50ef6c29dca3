"""Training config, models, schedule, checkpoints and MLflow tracking: fast, in-process, no Ray."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.metrics import ThroughputMeter
from pipeline.train.checkpoint import load_meta, load_model, load_state, save_checkpoint, unwrap
from pipeline.train.config import bundled_configs, load_config
from pipeline.train.loop import WarmupCosine, augment, build_optimizer, param_groups
from pipeline.train.models import MODEL_NAMES, build_model, load_backbone, replace_head
from pipeline.train.tracking import resolve_tracking_uri


@pytest.mark.parametrize("name", ["fashion_mnist", "fashion_mnist_resnet", "cifar10", "imagenet_resnet50"])
def test_bundled_configs_validate(name):
    assert name in bundled_configs()
    cfg = load_config(name)
    assert cfg.run.name.startswith(name + "-")  # generated: two plain runs never resume each other
    assert cfg.train.batch_size > 0 and cfg.scaling.num_workers >= 1


def test_stable_keys_and_overrides():
    cfg = load_config("fashion_mnist", ["train.epochs=7", "train.batch_size=32", "scaling.num_workers=3",
                                        "scaling.use_gpu=false", "run.name=my-job", "tracking.experiment=exp",
                                        "data.shards=/data/fm", "optim.lr=1e-3"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.scaling.num_workers) == (7, 32, 3)
    assert (cfg.run.name, cfg.tracking.experiment, str(cfg.data.shards)) == ("my-job", "exp", "/data/fm")
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string; still a number here
    assert str(load_config("fashion_mnist").data.shards) == "shards/fashion_mnist"  # what `make demo` shards


@pytest.mark.parametrize("override, needle", [
    (["optim.name=rmsprop"], "optim.name; allowed values: sgd, adam, adamw"),
    (["train.precison=bf16"], "unknown key 'train.precison'"),
    (["train.precision=fp8"], "allowed values: auto, fp32, bf16, fp16"),
    (["train.epochs=0"], "epochs must be >= 1"),
    (["train.batch_size=big"], "train.batch_size; expected an integer"),
    (["train.precision=fp16"], "fp16 needs scaling.use_gpu"),
    (["model.name=vgg"], "allowed values: seed_cnn, cifar_cnn, fmnist_resnet, resnet18, resnet50"),
    (["run.name=a b"], "run: name 'a b'"),
    (["scaling.group_start_timeout_s=0"], "group_start_timeout_s must be > 0 or null"),
    (["train.val_every_epochs=-1"], "val_every_epochs must be >= 0"),
    (["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5"], "gpus_per_worker must be >= 1 with use_gpu"),
    (["scaling.use_gpu=true", "data.device=cpu"], "scaling.use_gpu is true but data.device is cpu"),
    (["data.device=gpu"], "data.device is gpu but scaling.use_gpu is false"),
    (["optim.lr=.nan"], "invalid value nan for optim.lr; expected a finite number"),
    (["tracking.experiment="], "experiment must be a non-empty name"),
    (["optim.name=adam", "optim.betas=[0.9,1.999]"], "betas must each be in [0, 1), got [0.9, 1.999]"),
    (["scaling.torch_threads=-2"], "torch_threads must be >= 1 or null"),
])
def test_bad_values_are_one_clear_error(override, needle):
    with pytest.raises(UserError, match=None) as exc:
        load_config("fashion_mnist", override)
    assert needle in str(exc.value)


@pytest.mark.parametrize("every, validated", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (3, [3, 5]), (0, [5]),
                                              (9, [5])])
def test_validation_runs_every_n_epochs_and_after_the_last(every, validated):
    train = load_config("fashion_mnist", ["train.epochs=5", f"train.val_every_epochs={every}"]).train
    assert [e for e in range(1, 6) if train.validates_after(e)] == validated


def test_the_best_checkpoint_is_chosen_among_validated_epochs():
    from torch import nn

    from pipeline.train.state import RunState

    state = RunState(nn.Linear(1, 1), None, None, rank=0, world_size=1, keep_best_by="val_top1")
    assert state.end_epoch({"val_top1": 0.5}) and state.best["epoch"] == 1
    assert not state.end_epoch({"train_loss": 0.1})  # no validation this epoch: counted, never the best
    assert state.epoch == 2 and state.best["epoch"] == 1
    assert state.end_epoch({"val_top1": 0.6}) and state.best == {"metric": "val_top1", "value": 0.6, "epoch": 3}


def test_cli_bad_config_is_one_line_exit_2(capsys, tmp_path):
    assert main(["train", "--config", "fashion_mnist", "--set", "optim.name=rmsprop"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed values: sgd, adam, adamw" in err[0]
    assert main(["train", "--config", "no_such_config"]) == 2
    assert "bundled configs: " in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_print_config_resolves_cli_flags(capsys):
    assert main(["train", "--config", "fashion_mnist", "--precision", "bf16", "--init-from", "runs:/abc/model",
                 "--freeze-backbone-epochs", "1", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "precision: bf16" in out and "init_from: runs:/abc/model" in out and "freeze_backbone_epochs: 1" in out


@pytest.mark.parametrize("name, channels, size", [
    ("seed_cnn", 1, 28), ("fmnist_resnet", 1, 28), ("cifar_cnn", 3, 32), ("resnet18", 1, 28), ("resnet18", 3, 64),
])
def test_models_produce_logits(name, channels, size):
    assert name in MODEL_NAMES
    model = build_model(name, 7, channels, size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_seed_cnn_is_the_reference_architecture():
    m = build_model("seed_cnn", 10, 1, 28)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    linears = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert [(l.in_features, l.out_features) for l in linears] == [(64 * 5 * 5, 128), (128, 10)]


def test_residual_net_width_is_a_setting_its_checkpoint_remembers(tmp_path):
    from pipeline.train.models import width_of

    model = build_model("fmnist_resnet", 10, 1, 28, width=40)
    assert model.features[0].out_channels == 40 and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert width_of("fmnist_resnet", model.state_dict()) == 40  # how an MLflow copy is rebuilt
    assert width_of("fmnist_resnet", build_model("fmnist_resnet", 10, 1, 28).state_dict()) == 32
    meta = {"model": "fmnist_resnet", "num_classes": 10, "in_channels": 1, "image_size": 28, "width": 40}
    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict()}, meta)
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.features[0].out_channels == 40
    with pytest.raises(UserError, match="fmnist_resnet only"):
        build_model("seed_cnn", 10, 1, 28, width=40)
    assert load_config("fashion_mnist_resnet", ["model.width=40"]).model.width == 40
    with pytest.raises(UserError, match="width applies to fmnist_resnet only"):
        load_config("fashion_mnist", ["model.width=40"])


def test_backbone_transfer_replaces_only_the_head():
    src = build_model("seed_cnn", 10, 1, 28)
    dst = build_model("seed_cnn", 3, 1, 28)
    skipped = load_backbone(dst, src.state_dict())
    assert sorted(skipped) == ["head.bias", "head.weight"]
    assert torch.equal(dst.features[0].weight, src.features[0].weight)
    with pytest.raises(UserError, match="do not fit"):
        load_backbone(build_model("fmnist_resnet", 3, 1, 28), src.state_dict())
    replace_head(src, 4)
    assert src.head.out_features == 4


def test_no_weight_decay_on_norms_and_biases():
    model = build_model("fmnist_resnet", 10, 1, 28)
    decay, no_decay = param_groups(model, 5e-4)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert id(bn.weight) in ids(no_decay["params"]) and id(model.head.bias) in ids(no_decay["params"])
    assert id(model.head.weight) in ids(decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total


def test_warmup_then_cosine_per_step():
    cfg = load_config("fashion_mnist", ["optim.lr=1.0", "optim.warmup_epochs=1", "optim.warmup_start=0.0"]).optim
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = WarmupCosine(opt, cfg, total_steps=30, steps_per_epoch=10)
    lrs = [sched.step() for _ in range(30)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert opt.param_groups[0]["lr"] == lrs[-1]
    resumed = WarmupCosine(opt, cfg, total_steps=30, steps_per_epoch=10)
    resumed.load_state_dict({"step_num": 20})
    assert resumed.step() == pytest.approx(lrs[20])


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    flipped = augment(x, "flip")
    for i in range(2):  # each image is itself or its mirror
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    assert augment(x, "flip_shift").shape == x.shape
    assert augment(x, "none") is x


def test_checkpoint_roundtrip_weights_only(tmp_path):
    model = build_model("seed_cnn", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "schedule": {"step_num": 3}, "epoch": 2, "global_step": 3,
             "best": {"metric": "val_top1", "value": 0.5, "epoch": 2}}
    meta = {"model": "seed_cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "classes": list("abcdefghij")}
    save_checkpoint(tmp_path / "ckpt", state, meta)
    loaded = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)  # plain tensors and dicts only
    assert loaded["epoch"] == 2 and load_state(tmp_path / "ckpt")["global_step"] == 3
    assert load_meta(tmp_path / "ckpt")["classes"] == meta["classes"]
    rebuilt, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(rebuilt.head.weight, model.head.weight)
    # unwrap finds the plain module inside a real DDP wrapper (one-process gloo group) and a compiled one.
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap(ddp) is model and unwrap(torch.compile(ddp)) is model and unwrap(model) is model
    finally:
        dist.destroy_process_group()
    with pytest.raises(UserError, match="no checkpoint"):
        load_state(tmp_path / "missing")


def test_throughput_meter_splits_wait_and_compute():
    meter = ThroughputMeter()
    clock = iter([0.0, 0.0, 1.0, 4.0, 5.0, 8.0])  # reset, start, ready, done, ready, done
    meter._clock = lambda: next(clock)
    meter.reset()
    meter.start()
    meter.data_ready()
    meter.step_done(10)
    meter.data_ready()
    meter.step_done(10)
    t = meter.total()
    assert (t.data_s, t.compute_s, t.images) == (2.0, 6.0, 20)
    assert t.data_wait_frac == pytest.approx(0.25) and t.images_per_s == pytest.approx(2.5)
    assert t.step_time_s == pytest.approx(4.0)


def test_tracking_uri_is_pinned_to_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"


def test_evaluate_uses_the_preset_the_checkpoint_recorded(tmp_path):
    """A model trained with ``data.preset`` overridden (mnist on 3-class RGB shards) is evaluated through it."""
    from conftest import make_label_folder
    from pipeline.cli import main
    from pipeline.train.evaluate import evaluate_model

    src = make_label_folder(tmp_path / "src", ["dark", "light", "mid"], 4)
    assert main(["shard", str(src), str(tmp_path / "shards"), "--val-fraction", "0.5", "--no-progress"]) == 0
    model = build_model("seed_cnn", 3, 1, 28)
    meta = {"model": "seed_cnn", "num_classes": 3, "in_channels": 1, "image_size": 28,
            "classes": ["dark", "light", "mid"], "preset": "mnist", "precision": "bf16"}
    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "epoch": 1}, meta)
    res = evaluate_model(str(tmp_path / "ckpt"), tmp_path / "shards", "val", batch_size=4, backend="torch",
                         device="cpu")
    assert res.samples == 6 and res.classes == ["dark", "light", "mid"] and 0.0 <= res.top1 <= 1.0
    assert res.precision == "bf16"  # the precision it was trained in, also recorded
    forced = evaluate_model(str(tmp_path / "ckpt"), tmp_path / "shards", "val", batch_size=4, backend="torch",
                            device="cpu", precision="fp32")
    assert forced.precision == "fp32" and "(fp32)" in forced.format().splitlines()[0]


@pytest.mark.parametrize("trained, device, expected", [
    ("bf16", "cpu", "bf16"), ("fp32", "cuda", "fp32"), ("fp16", "cuda", "fp16"), ("fp16", "cpu", "fp32"),
    (None, "cpu", "fp32"), ("auto", "cpu", "fp32"),
])
def test_evaluate_defaults_to_the_precision_the_model_was_trained_in(trained, device, expected):
    from pipeline.train.evaluate import default_precision

    assert default_precision(trained, torch.device(device)) == expected


def test_an_empty_config_name_is_an_error_not_the_defaults():
    with pytest.raises(UserError, match="--config is empty"):
        load_config("")


@pytest.mark.parametrize("argv, needle", [
    (["train", "--precision", "fp17"], "argument --precision: invalid choice: 'fp17'"),
    (["shard", "src", "out", "--workers", "abc"], "argument --workers: invalid int value: 'abc'"),
    (["bench", "bogus"], "argument stage: invalid choice: 'bogus'"),
])
def test_a_bad_argument_is_one_line_not_the_usage_block(argv, needle, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"pipeline {argv[0]}: error: {needle}") and err[0].endswith("--help)")
