"""The train step's non-finite skip: decided on the device (fused AdamW `found_inf`, EMA weight 0) it leaves the
student, the optimizer state and the teacher exactly as they were, as the host-side skip does; a finite step is the
same on both paths; `NonFiniteGuard` reads verdicts one step late and stops the run after too many."""

from __future__ import annotations

import copy

import pytest
import torch

from dinobridge.config import build_config
from dinobridge.data.collate import MultiCropCollator
from dinobridge.distributed.device import select_device
from dinobridge.distributed.setup import DistInfo
from dinobridge.errors import UserError
from dinobridge.train.ema import ema_lerp_, ema_pairs, ema_update
from dinobridge.train.step import NonFiniteGuard, StepResult, build_training, skips_on_device, train_step

B = 4
CFG = [
    "student.arch=vit_test", "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8",
    "crops.local_crops_number=2", "train.batch_size_per_gpu=4", "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=1", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "MODEL.DEVICE=cpu", "train.compile=false",
    "compute_precision.param_dtype=fp32", "student.drop_path_rate=0.0", "dino.koleo_loss_weight=0",
    "dino.koleo_cls_loss_weight=null",
]


def _batch(seed: int, poison: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(2)]} for _ in range(B)]
    batch = MultiCropCollator.for_crops(16, 4, seed=7)(samples, batch_index=seed)
    if poison:
        batch["local_crops"][0, 0, 0, 0] = float("nan")  # one pixel of one student-only view: the loss is NaN
    return batch


def _training():
    torch.manual_seed(0)
    cfg = build_config(None, CFG, config_name="train")
    return build_training(cfg, select_device("cpu"), DistInfo(0, 1, 0, 1, True, False))


def _snapshot(training) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in training.model.state_dict().items()}
    for i, (p, st) in enumerate(training.optimizer.state.items()):
        out.update({f"opt.{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def _step(training, batch: dict, it: int, device_skip: bool) -> StepResult:
    t = training
    return train_step(t.model, t.optimizer, batch, t.schedules.at(it), it, params=t.replicated,
                      device_skip=device_skip)


def test_fused_adamw_without_fsdp_skips_on_the_device():
    training = _training()
    assert training.optimizer.param_groups[0].get("fused") and skips_on_device(training.optimizer)
    assert training.device_skip
    p = torch.nn.Parameter(torch.zeros(2))
    assert not skips_on_device(torch.optim.AdamW([p], foreach=True))
    assert not skips_on_device(torch.optim.SGD([p], lr=0.1))


@pytest.mark.parametrize("device_skip", [True, False])
def test_non_finite_step_changes_nothing(device_skip):
    training = _training()
    _step(training, _batch(0), 0, device_skip)  # optimizer state exists
    before = _snapshot(training)
    res = _step(training, _batch(1, poison=True), 1, device_skip)
    assert not res.stepped and torch.is_tensor(res.ok) == device_skip
    after = _snapshot(training)
    assert after.keys() == before.keys()
    changed = [k for k in before if k.startswith(("model.student", "model.teacher", "opt."))
               and not torch.equal(before[k], after[k])]
    assert changed == []
    res = _step(training, _batch(2), 2, device_skip)  # and the run goes on
    assert res.stepped
    assert not torch.equal(before["model.student.backbone.blocks.0.attn.qkv.weight"],
                           training.model.student.backbone.blocks[0].attn.qkv.weight)


def test_finite_steps_are_the_same_on_both_paths():
    states = []
    for device_skip in (True, False):
        training = _training()
        losses = [_step(training, _batch(it), it, device_skip).loss.item() for it in range(3)]
        states.append((losses, training.model.state_dict()))
    (l1, s1), (l2, s2) = states
    assert l1 == l2
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0, msg=k)


def test_ema_update_apply_flag():
    teacher, student = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9, apply=torch.tensor(False))
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    reference = torch.nn.Linear(3, 3)
    reference.load_state_dict(t0)
    ema_update(reference, student, 0.9)
    ema_update(teacher, student, 0.9, apply=torch.tensor(True))
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, reference.state_dict()[k])


def test_guard_reads_verdicts_one_step_late_and_stops():
    lines: list[str] = []
    guard = NonFiniteGuard(2, lines.append, "CKPT")
    ok = StepResult(torch.tensor(1.0), {}, {}, ok=torch.tensor(True))
    bad = StepResult(torch.tensor(float("nan")), {}, {}, ok=torch.tensor(False))
    guard.push(0, bad)
    assert lines == []  # not read yet
    guard.push(1, ok)
    assert len(lines) == 1 and lines[0].startswith("iteration 0: non-finite loss")
    assert guard.settle() is True and guard.consecutive == 0
    guard.push(2, bad)
    assert guard.settle() is False and guard.consecutive == 1
    guard.push(3, bad)
    with pytest.raises(UserError, match="2 consecutive iterations .*CKPT is intact"):
        guard.settle()


def test_teacher_ema_pairs_are_cached_and_rebuilt_when_parameters_change():
    training = _training()
    model = training.model
    _step(training, _batch(0), 0, True)
    pairs = model._ema_pairs
    assert pairs is not None and pairs[0][0] is next(model.teacher.parameters())
    model.update_teacher(0.5)
    assert model._ema_pairs is pairs  # reused
    model.teacher = copy.deepcopy(model.teacher)  # new parameter objects (as FSDP2 sharding makes): paired again
    model.update_teacher(0.5)
    assert model._ema_pairs is not pairs and model._ema_pairs[0][0] is next(model.teacher.parameters())
    # the cached pairs give the same update as pairing by name
    teacher, student = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    other = torch.nn.Linear(3, 3)
    other.load_state_dict(teacher.state_dict())
    ema_lerp_(ema_pairs(teacher, student), 0.7)
    ema_update(other, student, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), other.parameters()))
