"""Llama Guard 4 images: tile planning, token layout, pixels, and the image path through a tiny
random Llama 4 vision model (the path is real; the tiny model's verdicts on images are not)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

from proxy.guards.guard import GuardError, Image, Taxonomy, Turn
from proxy.guards.llama4_images import best_canvas, canvases, prepare
from proxy.guards.runner import GuardRunner
from proxy.server.state import METRICS
from tests.conftest import make_settings, write_policies
from tests.fakes.upstream import FakeUpstream
from tests.guards.conftest import load_llama_guard
from tests.guards.model_fixtures import TinyModels, build_llama4_vision
from tests.guards.test_e2e_models import real_proxy_from


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> Image:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), colour).save(buf, format="PNG")
    return Image(buf.getvalue())


def test_canvases_cover_every_tile_layout_up_to_16() -> None:
    layouts = {(h // 336, w // 336) for h, w in canvases()}
    assert (1, 1) in layouts and (4, 4) in layouts and (1, 16) in layouts and (16, 1) in layouts
    assert all(r * c <= 16 for r, c in layouts)


@pytest.mark.parametrize(
    ("height", "width", "canvas"),
    [
        (200, 300, (336, 336)),  # small: one tile, never upscaled past it
        (336, 336, (336, 336)),
        (336, 700, (336, 1008)),  # two tiles across would shrink it: three, padded
        (400, 700, (672, 1008)),  # 2 x 3: the smallest upscale (1.44x) that holds it
        (2000, 2000, (1344, 1344)),  # large: 4 x 4, downscaled as little as possible
    ],
)
def test_best_canvas(height: int, width: int, canvas: tuple[int, int]) -> None:
    assert best_canvas(height, width) == canvas


def test_single_tile_image_is_147_tokens_and_one_tile() -> None:
    prepared = prepare(png(300, 200))
    tokens = prepared.tokens()
    assert len(tokens) == 147
    assert tokens[:2] == ["<|image_start|>", "<|image|>"] and tokens[-1] == "<|image_end|>"
    assert prepared.pixels.shape == (1, 3, 336, 336)
    # Padding is black (-1 after normalisation); the image itself keeps its colour.
    assert prepared.pixels[0, 0, 0, 0] == pytest.approx((200 / 255 - 0.5) / 0.5, abs=1e-6)
    assert prepared.pixels[0, 0, -1, -1] == pytest.approx(-1.0)


def test_sixteen_tile_image_is_2467_tokens_with_a_global_tile() -> None:
    prepared = prepare(png(2000, 2000))
    tokens = prepared.tokens()
    assert (prepared.rows, prepared.cols) == (4, 4)
    assert len(tokens) == 2467
    assert tokens.count("<|tile_x_separator|>") == 12 and tokens.count("<|tile_y_separator|>") == 4
    assert prepared.pixels.shape == (17, 3, 336, 336)
    assert np.isfinite(prepared.pixels).all()


def test_undecodable_image_is_a_guard_error() -> None:
    with pytest.raises(GuardError, match="could not be decoded"):
        prepare(Image(b"not an image"))


@pytest.fixture(scope="session")
def lg4_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama4_vision(tmp_path_factory.mktemp("lg4-vision"))


async def test_image_path_runs_through_the_vision_model(lg4_vision: Path, runner: GuardRunner) -> None:
    guard = await load_llama_guard(lg4_vision, runner, family="llama-guard-4", min_mass=0.0)
    turns = [Turn("User", "What is in this picture?", images=(png(300, 200), png(800, 400)))]
    pixels: list[object] = []
    ids = guard.encode(turns, Taxonomy(), pixels)
    tok = guard._model.tokenizer  # type: ignore[union-attr]
    patch = tok.convert_tokens_to_ids("<|patch|>")
    tiles = sum(p.shape[0] for p in pixels)  # type: ignore[attr-defined]
    assert ids.count(patch) == tiles * 144
    assert ids.count(tok.convert_tokens_to_ids("<|image_start|>")) == 2
    first = await guard.score_conversation(turns, Taxonomy(), categories_from=1.1)
    other = await guard.score_conversation(
        [Turn("User", "What is in this picture?", images=(png(300, 200, (0, 0, 255)), png(800, 400)))],
        Taxonomy(),
        categories_from=1.1,
    )
    assert 0.0 <= first.score <= 1.0
    assert first.score != other.score  # the pixels reached the model


async def test_inline_image_reaches_llama_guard_4_through_the_proxy(
    lg4_vision: Path, tiny: TinyModels, tmp_path: Path, upstream: FakeUpstream
) -> None:
    policy = """
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    input:
      - {guard: llama_guard, threshold: 1.0}
"""
    write_policies(tmp_path, {"default": policy})
    settings = make_settings(
        tmp_path,
        upstream,
        guards={
            "prompt_guard": {"family": "prompt-guard-2", "model": str(tiny.pg2)},
            "llama_guard": {"family": "llama-guard-4", "model": str(lg4_vision), "min_mass": 0.0},
        },
    )
    data = base64.b64encode(png(300, 200).data).decode()
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            ],
        }
    ]
    async with real_proxy_from(settings, upstream) as proxy:
        await proxy.client().chat.completions.create(model="m", messages=messages)
        errors = proxy.app[METRICS].registry.get_sample_value("guardrail_guard_errors_total", {"guard": "llama_guard"})
        checks = proxy.app[METRICS].registry.get_sample_value(
            "guardrail_guard_latency_seconds_count", {"guard": "llama_guard", "side": "input"}
        )
    assert errors is None
    assert checks == 1.0
    assert upstream.chat_requests[0].json["messages"] == messages
