"""Commands: `serve` runs the proxy, `check` validates config and policies, `classify` scores text
with the configured guards, `demo` shows the whole product offline with tiny demo guards."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.guards.guard import GuardError
from proxy.yaml_source import ConfigError

if TYPE_CHECKING:
    from proxy.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="serving processes sharing the port (default: server.workers)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # how --workers starts each one
    p = sub.add_parser("check", help="validate the config and every policy file it references")
    p.add_argument("--config", type=Path, required=True)
    p = sub.add_parser("classify", help="score text with the configured guards under a policy")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--policy", default="default")
    p.add_argument("--route", default=None, help="route name (default: the chat route for --model)")
    p.add_argument("--model", default="*", help="model name used to pick the route")
    p.add_argument("--file", type=Path, help='JSONL: one {"messages": [...]} conversation per line')
    p.add_argument("text", nargs="?", help="a user message to score")
    # exit status: 0 every conversation allowed or flagged, 2 one was blocked, 1 configuration error
    p = sub.add_parser("demo", help="run the whole flow offline with tiny trigger-word demo guards")
    p.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "classify":
            from proxy.classify import classify

            with asyncio.Runner() as runner:  # the command line is the one place a loop is started
                return runner.run(classify(args, sys.stdout))
        from proxy.demo.run import demo

        with asyncio.Runner() as runner:
            return runner.run(demo(args.cache_dir, sys.stdout))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except GuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import serve, serve_workers
    from proxy.observability import setup_logging
    from proxy.settings import load_settings

    settings, _ = load_settings(args.config)
    setup_logging(settings.server.log_level, secrets=configured_secrets(settings))
    workers = args.workers if args.workers is not None else settings.server.workers
    if workers < 1:
        raise ConfigError(["--workers must be at least 1"])
    with asyncio.Runner() as runner:  # the command line is the one place a loop is started
        if workers > 1 and not args.worker:
            return runner.run(serve_workers(settings, str(args.config), workers, args.host, args.port))
        return runner.run(serve(settings, args.host, args.port, worker=args.worker))


def configured_secrets(settings: Settings) -> list[str]:
    """Every key the config names (tenants, upstreams, remote guards): the logs redact them."""
    from proxy.settings import resolve_secret

    values = [key for tenant in settings.tenants.values() for key in tenant.keys]
    values += [u.api_key for u in settings.upstreams.values() if u.api_key]
    values += [g.api_key for g in settings.guards.values() if g.api_key]
    return [resolve_secret(v) for v in values]


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.app import check_open_mode, guard_kinds
    from proxy.policy.store import PolicyContext, load_policies
    from proxy.server.auth import Tenants
    from proxy.settings import load_settings

    settings, _ = load_settings(args.config)
    check_open_mode(settings, settings.server.host)
    tenants = Tenants(settings.tenants)
    ctx = PolicyContext(
        guards=guard_kinds(settings, None), upstreams=frozenset(settings.upstreams), required=tenants.policies
    )
    policies = load_policies(settings.policies_dir, ctx)
    assignments = {name: t.policy for name, t in settings.tenants.items()} or {"(open mode)": "default"}
    for tenant, policy_name in assignments.items():
        policy = policies.get(policy_name)
        for route in policy.routes:
            print(f"tenant {tenant}: policy {policy.tag} route {route.name}: {describe_route(route)}")
    print(f"ok: {len(settings.guards)} guards, {len(settings.upstreams)} upstreams, {len(policies.policies)} policies")
    return 0


def describe_route(route: object) -> str:
    from proxy.policy.models import RouteSettings

    assert isinstance(route, RouteSettings)
    where = f"{','.join(route.match.paths())} model {route.match.model}"
    if route.passthrough:
        return f"{where} -> passthrough to {route.upstream} (unscreened)"
    checks = " ".join(
        f"{side}:" + ",".join(f"{c.guard}>={c.threshold:g}" for c in getattr(route, side))
        for side in ("input", "output")
        if getattr(route, side)
    )
    stream = "" if route.stream == "buffer" else f", stream=incremental(release_tokens={route.release_tokens})"
    return (
        f"{where} -> {route.upstream}, {route.mode}, on_block={route.on_block}, "
        f"on_guard_error={route.on_guard_error}{stream}, {checks or 'no checks'}"
    )
