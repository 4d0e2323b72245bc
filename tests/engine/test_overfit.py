"""End to end on the CPU: a tiny SiT with REPA overfits one fixed batch (fixed noise and times)."""
import pytest
import torch

import kernels
from engine.transport import Transport, TransportConfig
from tests.engine.common import tiny_model


@pytest.fixture
def one_thread():
    # Tiny matmuls run fastest (and steadiest on a shared machine) on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_overfits_a_fixed_batch(one_thread):
    torch.manual_seed(0)
    model = tiny_model(hidden_size=64, depth=2, num_heads=2, z_dims=[16], projector_dim=64).train()
    transport = Transport(TransportConfig(path="linear"))
    x, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    t, y = torch.rand(8), torch.arange(8)
    z = torch.randn(8, 16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    with kernels.use_backend("torch"):
        for step in range(300):
            losses = transport.training_losses(model, x, y, [z], noise=noise, t=t)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["velocity"] < first["velocity"] / 5, (first, last)
    assert last["alignment"] < first["alignment"] - 0.5, (first, last)  # -cos falls towards -1
