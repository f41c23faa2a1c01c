"""Loading from the Hugging Face hub or a local directory, with one clear message on failure.

Runs only in a guard runner's worker thread (it is blocking I/O and torch work)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from proxy.guards.guard import GuardError


def load_kwargs(revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    token = os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token
    return kwargs


def explain(name: str, model: str, exc: BaseException) -> GuardError:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if Path(model).exists():
        cause, fix = "the local directory could not be loaded", "check that it holds config.json and weights"
    elif "gated" in low or "401" in low or "403" in low or "restricted" in low:
        cause = "the model is gated"
        fix = f"accept Meta's licence on https://huggingface.co/{model} and set HF_TOKEN"
    elif (
        "offline" in low
        or "connection" in low
        or "resolve" in low
        or "cannot find the requested files" in low
        or "couldn't connect" in low
        or "max retries" in low
        or "network" in low
        or "local_files_only" in low
    ):
        cause = "the Hugging Face hub is unreachable and the model is not in the cache (HF_HOME)"
        fix = "download it where the hub is reachable and set HF_HOME to that cache, or set model: to a local directory"
    elif "not a valid model identifier" in low or "404" in low or "repository not found" in low:
        cause, fix = "no such model on the hub", "check the model id and revision"
    else:
        cause, fix = "loading failed", "see the error above"
    return GuardError(
        f"guard {name!r} could not load model {model!r}: {cause} ({text.splitlines()[0][:300]}). Fix: {fix}."
    )


def pick_dtype(device: str, dtype: str) -> Any:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def quantize(model: Any, mode: str) -> Any:
    """`quantize: int8`: every nn.Linear becomes a dynamic int8 linear (weights int8 per tensor,
    activations quantized per call), about half the float32 time on CPU; other layers stay float.
    Applied once at load, in place of the float model."""
    if mode != "int8":
        return model
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao announces its move to torchao; the eager API is still the one that runs here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
