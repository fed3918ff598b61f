"""Host numbers copied to a device without waiting for it."""

import pytest
import torch

from chelsea.host import on_device


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_numbers_arrive_on_the_device_as_they_were(device):
    numbers = [[3, 1, 4], [1, 5, 9]]
    got = on_device(numbers, device)
    assert got.device.type == device and got.dtype == torch.long
    assert torch.equal(got.cpu(), torch.tensor(numbers))
    assert torch.equal(on_device([0.5, 2.0], device, torch.float32).cpu(), torch.tensor([0.5, 2.0]))
