"""The EMA teacher: weight averaging with a ramp, and BatchNorm statistics of its own."""
import torch
from torch import nn

from semifer.engine.ema import ModelEMA


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def test_weights_follow_the_ramped_decay():
    student = net()
    ema = ModelEMA(student, decay=0.999)
    before = student[0].weight.detach().clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.update(student, step=0)  # decay min(0.999, 1/10) = 0.1 -> 90% of the way
    assert torch.allclose(ema.module[0].weight, before + 0.9)


def test_teacher_keeps_its_own_batchnorm_statistics():
    student = net()
    ema = ModelEMA(student, decay=0.5)
    x = torch.randn(8, 1, 4, 4) * 3 + 5
    student.train()
    student(torch.randn(8, 1, 4, 4))  # the student's statistics come from other data
    ema.update(student, step=100, fallback=x)
    ref = net()
    ref.load_state_dict(ema.module.state_dict())
    # The teacher's statistics after one labeling pass on x equal one train-mode pass of its weights on x
    expected_mean = 0.9 * 0 + 0.1 * (ema.module[0](x)).mean(dim=(0, 2, 3))
    assert torch.allclose(ema.module[1].running_mean, expected_mean, atol=1e-5)
    assert not torch.allclose(ema.module[1].running_mean, student[1].running_mean)
    assert not ema.module.training  # predictions outside labeling use running statistics


def test_labeling_forward_uses_batch_statistics():
    student = net()
    ema = ModelEMA(student)
    x = torch.randn(16, 1, 4, 4) * 4 + 10  # far from the initial running stats (0, 1)
    out = ema(x)
    assert abs(out.mean().item() - ema.module[1].bias.mean().item()) < 1e-4  # batch-normalised
    eval_out = ema.module(x)
    assert (eval_out - out).abs().max() > 1.0
