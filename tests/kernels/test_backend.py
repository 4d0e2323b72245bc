"""kernels._backend.resolve: which implementation an op runs, and the reason logged when it is not ours."""
import logging
import uuid

import pytest
import torch

from kernels import _backend


@pytest.fixture
def triton_backend():
    with _backend.use_backend("triton"):
        yield


def _op():
    return f"test_op_{uuid.uuid4().hex[:8]}"  # a fresh op name: each reason is logged once per (op, reason)


def test_supported_inputs_run_triton(triton_backend, monkeypatch):
    monkeypatch.setattr(_backend, "interpreting", lambda: True)
    tensors = [torch.randn(3, 4), None, torch.randn(2, dtype=torch.bfloat16)]
    assert _backend.resolve(_op(), tensors) == "triton"
    assert _backend.resolve(_op(), []) == "triton"


@pytest.mark.parametrize("case", ["dtype", "device", "no interpreter", "torch backend"])
def test_unsupported_inputs_run_the_reference_and_say_why(case, triton_backend, monkeypatch, caplog):
    monkeypatch.setattr(_backend, "interpreting", lambda: case != "no interpreter")
    good = torch.randn(3, 4)
    bad = {"dtype": torch.arange(4), "device": torch.empty(4, device="meta"), "no interpreter": good,
           "torch backend": good}[case]
    reason = {"dtype": "dtype torch.int64 is not supported by the Triton kernel",
              "device": "device meta needs CUDA or TRITON_INTERPRET=1",
              "no interpreter": "device cpu needs CUDA or TRITON_INTERPRET=1", "torch backend": None}[case]
    op = _op()
    with caplog.at_level(logging.WARNING, logger="kernels"):
        if case == "torch backend":
            with _backend.use_backend("torch"):
                assert _backend.resolve(op, [good, None, bad]) == "torch"
        else:
            assert _backend.resolve(op, [good, None, bad]) == "torch"
            assert _backend.resolve(op, [good, None, bad]) == "torch"  # logged once
    logged = [r.getMessage() for r in caplog.records if op in r.getMessage()]
    assert logged == ([] if reason is None else [f"kernels.{op}: using the PyTorch reference ({reason})"])
