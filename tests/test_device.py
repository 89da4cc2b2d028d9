"""The device and dtype policy every front end shares (irg.device)."""

import pytest
import torch

from irg.device import DTYPE_CHOICES, dtype_name, resolve_device, resolve_dtype


def test_auto_device_is_cuda_where_there_is_one_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spellings, dtype", [
    (("fp32", "float32", "FP32", torch.float32), torch.float32),
    (("bf16", "bfloat16", "BF16", torch.bfloat16), torch.bfloat16),
    (("fp16", "float16", "half", torch.float16), torch.float16),
])
def test_every_spelling_of_a_dtype_means_the_same(spellings, dtype):
    for name in spellings:
        assert resolve_dtype(name, "cpu") is dtype
        assert dtype_name(name) == str(dtype).removeprefix("torch.")


def test_auto_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16  # the rule, not the machine: no CUDA needed
    assert dtype_name("auto") == "auto" and "auto" in DTYPE_CHOICES and "bf16" in DTYPE_CHOICES


@pytest.mark.parametrize("call, message", [
    (lambda: resolve_device("quantum"), r"^device: unknown device 'quantum'"),
    (lambda: resolve_device("meta", argument="--device"), r"^--device: unsupported device 'meta'"),
    (lambda: resolve_dtype("fp64"), r"^dtype: unknown dtype 'fp64'; use one of auto, bf16"),
    (lambda: resolve_dtype(torch.int8, argument="model.dtype"), r"^model.dtype: unknown dtype torch.int8"),
    (lambda: resolve_dtype(3), r"^dtype: unknown dtype 3"),
])
def test_a_bad_name_is_a_value_error_that_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message) as raised:
        call()
    assert type(raised.value) is ValueError  # not the pipeline's InvalidRequestError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA")
def test_cuda_where_there_is_none_says_so():
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
