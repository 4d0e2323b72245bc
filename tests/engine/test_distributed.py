"""engine.distributed: the process facts shared by the trainer, the sampler and preprocessing."""
import pytest
import torch

from engine.distributed import local_cuda_device, share_cpu_cores


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert local_cuda_device(0) == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\).*--num_gpus 1"):
        local_cuda_device(1)


def test_cpu_ranks_share_the_cores(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        share_cpu_cores(2)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        share_cpu_cores(2)  # the user's setting wins
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
