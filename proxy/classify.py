"""`guardrail-proxy classify`: the policy author's tool. Scores a text (or JSONL conversations) with
the configured guards under a policy's route and prints each check's score, the verdict and the
categories, exactly as the proxy would decide."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from proxy.guards.loading import GuardSet
from proxy.policy.models import RouteSettings
from proxy.policy.store import PolicyContext, load_policies
from proxy.protocol import ChatRequest
from proxy.screening.collect import Reply, message_text
from proxy.screening.pipeline import Verdict, screen
from proxy.settings import load_settings
from proxy.yaml_source import ConfigError


def conversations(args: argparse.Namespace) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    if args.text is not None:
        yield "text", [{"role": "user", "content": args.text}]
    if args.file is not None:
        for number, line in enumerate(Path(args.file).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ConfigError([f"{args.file}:{number}: not JSON: {exc}"]) from exc
            messages = item.get("messages") if isinstance(item, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ConfigError([f'{args.file}:{number}: expected {{"messages": [...]}}'])
            yield f"{args.file}:{number}", messages


async def score_one(route: RouteSettings, guards: dict[str, Any], messages: list[dict[str, Any]]) -> Verdict:
    """Messages ending with an assistant turn are an output check of that reply; otherwise an input check."""
    if messages[-1].get("role") == "assistant" and route.output:
        request = ChatRequest.model_validate({"model": "classify", "messages": messages[:-1] or messages})
        reply_msg = ChatRequest.model_validate({"model": "classify", "messages": messages[-1:]}).messages[0]
        return await screen(route, guards, request, Reply(0, message_text(reply_msg)))
    request = ChatRequest.model_validate({"model": "classify", "messages": messages})
    return await screen(route, guards, request)


def print_verdict(label: str, verdict: Verdict, out: TextIO) -> None:
    print(
        f"{label}: {verdict.decision.upper()}"
        + (f" categories={','.join(verdict.categories)}" if verdict.categories else ""),
        file=out,
    )
    for r in verdict.results:
        if r.skipped:
            status = "skipped (nothing to screen)"
        elif r.error:
            status = f"error: {r.error}"
        else:
            status = (
                f"score={r.score:.4f} threshold={r.threshold:g} {'HIT' if r.hit else 'pass'}"
                + (f" categories={','.join(r.categories)}" if r.categories else "")
                + ("" if r.enforced else " (monitor)")
                + (f" windows={r.windows}" if r.windows else "")
            )
        print(f"  {r.side:6} {r.guard:20} {status}  [{r.latency_ms:.0f} ms]", file=out)


async def classify(args: argparse.Namespace, out: TextIO) -> int:
    if args.text is None and args.file is None:
        raise ConfigError(["give a TEXT to score or --file with JSONL conversations"])
    settings, _ = load_settings(args.config)
    guard_set = GuardSet(settings)
    kinds = {n: ("text" if g.is_prompt_guard else "conversation") for n, g in settings.guards.items()}
    policies = load_policies(
        settings.policies_dir,
        PolicyContext(
            guards=kinds,  # type: ignore[arg-type]
            upstreams=frozenset(settings.upstreams),
        ),
    )
    if args.policy not in policies.policies:
        raise ConfigError([f"no policy named {args.policy!r} in {settings.policies_dir}"])
    policy = policies.get(args.policy)
    route = (
        next((r for r in policy.routes if r.name == args.route), None)
        if args.route
        else policy.resolve("/v1/chat/completions", args.model)
    )
    if route is None:
        raise ConfigError([f"policy {args.policy!r} has no matching route"])
    try:
        guards = await guard_set.load()
        print(f"policy {policy.tag}, route {route.name}", file=out)
        worst = 0
        for label, messages in conversations(args):
            verdict = await score_one(route, guards, messages)
            print_verdict(label, verdict, out)
            worst = max(worst, {"allow": 0, "flag": 0, "block": 2}[verdict.decision])
        return worst
    finally:
        await guard_set.stop()
