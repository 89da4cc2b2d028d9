"""Checkpoints in S3-compatible object storage: the same model from ``s3://`` as from disk, and clear errors."""

from __future__ import annotations

import re

import pytest
import s3fs
import torch
from conftest import FIXTURE_DIR

from irg.model import load_pretrained, save_pretrained

pytestmark = pytest.mark.integration  # the SeaweedFS S3 server

SAMPLE_TEXT = "<|im_start|>user\nDraw a red cube.<|im_end|><|vision_start|><|vision_end|>"


def upload(server, prefix: str, exclude: tuple[str, ...] = ()) -> str:
    """Copy the tiny fixture (without ``golden/``) to ``s3://<bucket>/<prefix>/``; returns the URI."""
    fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint_url,
                           client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)
    files = [p for p in sorted(FIXTURE_DIR.iterdir()) if p.is_file() and p.name not in exclude]
    uri = f"s3://{server.bucket}/{prefix}"
    fs.put([str(p) for p in files], [f"{uri}/{p.name}" for p in files])
    assert sorted(fs.ls(uri, detail=False)) == sorted(f"{server.bucket}/{prefix}/{p.name}" for p in files)
    return uri


@pytest.fixture(scope="module")
def s3_checkpoint(s3_server) -> str:
    return upload(s3_server, "ckpt")


@pytest.fixture(scope="module")
def local():
    return load_pretrained(FIXTURE_DIR)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert sa[name].device == sb[name].device, name
        assert torch.equal(sa[name], sb[name]), name


def assert_same_tokenizer(a, b) -> None:
    assert a.get_vocab() == b.get_vocab()
    assert a(SAMPLE_TEXT)["input_ids"] == b(SAMPLE_TEXT)["input_ids"]
    special = ["<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
    assert a.convert_tokens_to_ids(special) == b.convert_tokens_to_ids(special)


def assert_same_pretrained(a, b) -> None:
    assert a.config == b.config
    assert_same_state(a.model, b.model)
    assert_same_state(a.autoencoder, b.autoencoder)
    assert_same_tokenizer(a.tokenizer, b.tokenizer)


def test_load_from_s3_matches_local(s3_env, s3_checkpoint, local):
    assert_same_pretrained(load_pretrained(s3_checkpoint), local)


def test_save_to_s3_and_load_back(s3_env, local):
    uri = f"s3://{s3_env.bucket}/saved"
    save_pretrained(uri, local.model, local.autoencoder, local.tokenizer)
    assert_same_pretrained(load_pretrained(uri), local)


def wrong_secret_error(s3_env, s3_checkpoint, monkeypatch) -> PermissionError:
    # No cache clearing here: storage must not reuse a client built with the old (valid) secret.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError) as info:
        load_pretrained(s3_checkpoint)
    return info.value


def test_wrong_secret_key_error_names_uri_and_credentials(s3_env, s3_checkpoint, monkeypatch):
    error = wrong_secret_error(s3_env, s3_checkpoint, monkeypatch)
    assert isinstance(error, PermissionError)
    message = str(error)
    assert s3_checkpoint.removeprefix("s3://") in message
    assert "Forbidden" in message and "AWS_SECRET_ACCESS_KEY" in message, message


def test_missing_checkpoint_is_named(s3_env):
    uri = f"s3://{s3_env.bucket}/no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {uri!r} has no llm_config.json")):
        load_pretrained(uri)


def test_missing_file_in_s3_checkpoint_is_named(s3_env):
    uri = upload(s3_env, "partial", exclude=("ae.safetensors",))
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {uri!r} has no ae.safetensors")):
        load_pretrained(uri)
