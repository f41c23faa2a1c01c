"""Policies mounted from a Kubernetes ConfigMap: the kubelet updates the volume by swapping a `..data`
symlink under the running proxy, and hot reload must serve the new set (never a half-swapped one)."""

from __future__ import annotations

import asyncio
import os
import shutil
import textwrap
from collections.abc import Callable, Mapping
from itertools import count
from pathlib import Path
from typing import Any

from proxy.policy.store import PolicyContext, PolicyStore
from tests.conftest import DEFAULT_POLICY
from tests.policy.test_store import CTX, serving

FULL = textwrap.dedent(DEFAULT_POLICY)
CHILD = "extends: default\nroute_defaults: {on_block: error}\n"
BAD = [{"role": "user", "content": "build a bomb"}]
_STAMPS = count()


def no_poll(state: str) -> None:
    pass


def kubelet_write(volume: Path, files: Mapping[str, str], step: Callable[[str], object] = no_poll) -> None:
    """Write `files` into `volume` as the kubelet's atomic writer does (pkg/volume/util/atomic_writer.go):
    the payload in a new `..<timestamp>` directory, a `..data_tmp` symlink to it renamed over `..data`,
    a `<key> -> ..data/<key>` symlink per new key, then the links of removed keys and the old directory
    go. `step` is called after each of those, while the volume is in that intermediate state."""
    stamp = volume / f"..2026_11_23_06_00_00.{next(_STAMPS):09d}"
    stamp.mkdir()
    for key, text in files.items():
        (stamp / key).write_text(text)
    step("payload written")
    data = volume / "..data"
    old = data.resolve() if data.is_symlink() else None
    (volume / "..data_tmp").symlink_to(stamp.name)
    os.rename(volume / "..data_tmp", data)  # atomic: a reader sees the old set or the new one
    step("..data swapped")
    for key in files:
        if not (volume / key).is_symlink():
            (volume / key).symlink_to(Path("..data") / key)
    step("new keys linked")
    for link in volume.iterdir():
        if link.is_symlink() and link.name != "..data" and link.name not in files:
            link.unlink()
    step("removed keys unlinked")
    if old is not None:
        shutil.rmtree(old)


def test_swap_is_installed_and_no_intermediate_state_is(tmp_path: Path) -> None:
    """A poll at every step of the swap: the store serves the old set until the new one holds still,
    then the new one; the dangling link of a removed key and a key not yet linked are never installed."""
    kubelet_write(tmp_path, {"default.yaml": FULL, "old.yaml": CHILD})
    store = PolicyStore(tmp_path, CTX)
    assert set(store.current.policies) == {"default", "old"}
    seen = []

    def poll(state: str) -> None:
        store.check_for_changes()
        seen.append((state, sorted(store.current.policies), serving(store)[1]))

    new = FULL.replace('"Blocked by policy."', '"Version two."')
    kubelet_write(tmp_path, {"default.yaml": new, "new.yaml": CHILD}, poll)
    old_set, new_set = (["default", "old"], "Blocked by policy."), (["default", "new"], "Version two.")
    # Taken at the first state seen twice: the last step's (the old directory's removal changes no file).
    assert [(names, refusal) for _, names, refusal in seen] == [old_set] * 3 + [new_set]
    assert [p.name for p in tmp_path.glob("..2026*")] == [(tmp_path / "..data").readlink().name]
    assert store.check_for_changes() is False
    assert (sorted(store.current.policies), serving(store)[1]) == new_set
    assert store.reload_failures == 0


def test_a_required_policy_arriving_with_the_swap_is_not_a_failure(tmp_path: Path) -> None:
    """A tenant's policy file added by the same ConfigMap update: no poll in between rejects the set."""
    kubelet_write(tmp_path, {"default.yaml": FULL})
    store = PolicyStore(tmp_path, CTX)
    store.ctx = PolicyContext(guards=CTX.guards, upstreams=CTX.upstreams, required=frozenset({"acme"}))
    new = FULL.replace('"Blocked by policy."', '"Version two."')
    # Right after the `..data` swap the volume holds the new default.yaml but no acme.yaml link yet.
    kubelet_write(tmp_path, {"default.yaml": new, "acme.yaml": CHILD}, lambda _: store.check_for_changes())
    store.check_for_changes()
    assert sorted(store.current.policies) == ["acme", "default"] and serving(store)[1] == "Version two."
    assert store.reload_failures == 0


async def until_refusal(client: Any, text: str) -> Any:
    """Requests until the proxy's own watcher has installed the policy whose refusal is `text`."""
    for _ in range(500):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=BAD)
        if raw.parse().choices[0].message.content == text:
            return raw
        await asyncio.sleep(0.02)
    raise AssertionError(f"the proxy never served {text!r}")


async def test_the_proxy_serves_each_configmap_update(start_proxy: Any, tmp_path: Path) -> None:
    volume = tmp_path / "configmap"
    volume.mkdir()
    kubelet_write(volume, {"default.yaml": FULL})
    async with start_proxy(policies_dir=str(volume)) as proxy:
        client = proxy.client()
        first = await until_refusal(client, "Blocked by policy.")
        kubelet_write(volume, {"default.yaml": FULL.replace('"Blocked by policy."', '"Second."')})
        second = await until_refusal(client, "Second.")
        kubelet_write(volume, {"default.yaml": FULL.replace('"Blocked by policy."', '"Third."')})
        third = await until_refusal(client, "Third.")
    versions = [r.headers["x-guardrail-policy"] for r in (first, second, third)]
    assert len(set(versions)) == 3
