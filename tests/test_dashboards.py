"""The Grafana dashboard and the Prometheus alert rules under deploy/ name only metrics the proxy
really exports: every PromQL expression is tokenised, its metric names taken out, and each looked
up among the sample names of the app's own metrics registry (a renamed metric fails here)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.server.state import METRICS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/guardrail-proxy.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
# Series Prometheus writes itself for every scrape target (not in the proxy's /metrics).
SCRAPE_SERIES = frozenset({"up"})

# ---- the names the proxy exports ----

# Sample names of one metric family, by type, as the text exposition writes them (a counter
# `x` is exported as x_total and x_created; a histogram as x_bucket, x_count, x_sum, x_created).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's collectors export, with or without a child yet (a labelled
    metric has samples only once a label set was used)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


# ---- a small PromQL tokenizer ----

_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<variable>\$\{[^}]*\}|\$\w+)
      | (?P<number>\d[\w.]*|\.\d[\w.]*)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=!{}()\[\],@])""",
    re.VERBOSE,
)
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
     "quantile", "limitk", "limit_ratio"}
)
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}) | LABEL_LISTS


def tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        if kind != "skip":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _closing(toks: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    depth = 0
    for k in range(start, len(toks)):
        depth += (toks[k][1] == opening) - (toks[k][1] == closing)
        if depth == 0:
            return k
    raise ValueError(f"unbalanced {opening}{closing}")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers used as selectors (bare, before `{` or
    `[`), and `{__name__="..."}` matchers. Functions (an identifier before `(`), aggregations,
    keywords, label lists (`by (...)`), label matchers, durations and strings are not names."""
    toks = tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "{":
            end = _closing(toks, i, "{", "}")
            inner = toks[i + 1 : end]
            for k in range(len(inner) - 2):
                if inner[k][1] == "__name__" and inner[k + 1][1] == "=" and inner[k + 2][0] == "string":
                    names.add(inner[k + 2][1][1:-1])
            i = end + 1
        elif text == "[":
            i = _closing(toks, i, "[", "]") + 1
        elif kind != "ident":
            i += 1
        elif text.lower() in LABEL_LISTS and following == "(":
            i = _closing(toks, i + 1, "(", ")") + 1
        elif text.lower() in KEYWORDS or following == "(" or (text in AGGREGATIONS and following in LABEL_LISTS):
            i += 1
        else:
            names.add(text)
            i += 1
    return names


def template_query_names(query: str) -> set[str]:
    """Grafana's `label_values(selector, label)`: the selector's names (the label is not a metric)."""
    match = re.fullmatch(r"\s*label_values\((.*?)(?:,\s*[A-Za-z_]\w*)?\s*\)\s*", query, re.DOTALL)
    if match is None:
        return metric_names(query)
    selector = match.group(1)
    return metric_names(selector) if "," in query else set()


# ---- the files ----


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def panel_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from panel_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from panel_exprs(item)


def all_expressions() -> list[tuple[str, set[str]]]:
    """(where, names) for every expression of both files."""
    board = dashboard()
    out = [(f"dashboard: {expr}", metric_names(expr)) for expr in panel_exprs(board["panels"])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            out.append((f"dashboard variable {variable['name']}: {text}", template_query_names(text)))
    out += [(f"alert {rule['alert']}: {rule['expr']}", metric_names(rule["expr"])) for rule in alert_rules()]
    return out


# ---- tests ----

TOKENIZER_CASES = [
    ('sum by (tenant) (rate(guardrail_requests_total{decision="block", route=~"$route"}[5m]))',
     {"guardrail_requests_total"}),
    ("histogram_quantile(0.99, sum by (le, guard) (rate(x_seconds_bucket[$__rate_interval])))", {"x_seconds_bucket"}),
    ("sum without (kind) (a_total) / ignoring (kind) group_left (x) b_total > bool 0.5", {"a_total", "b_total"}),
    ('{__name__="by_name_total", job="j"} offset 5m', {"by_name_total"}),
    ("max_over_time(gauge_x[1h:5m]) and on (instance) up == 0", {"gauge_x", "up"}),
    ("topk(3, count by (route) (c_total)) unless absent(d) # a comment naming e_total", {"c_total", "d"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)") @ end()', {"m"}),
    ("sum(rate(x[5m])) by (tenant)", {"x"}),
]


@pytest.mark.parametrize(("expr", "names"), TOKENIZER_CASES)
def test_tokenizer_finds_the_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_template_queries() -> None:
    assert template_query_names("label_values(guardrail_requests_total, tenant)") == {"guardrail_requests_total"}
    assert template_query_names('label_values(foo{tenant=~"$tenant"}, route)') == {"foo"}
    assert template_query_names("label_values(tenant)") == set()


def test_a_renamed_metric_is_caught() -> None:
    registry = CollectorRegistry()
    from prometheus_client import Counter, Histogram

    Counter("guardrail_requests", "r", ["tenant"], registry=registry)
    Histogram("guardrail_guard_latency_seconds", "l", registry=registry)
    exported = exported_names(registry)
    assert {"guardrail_requests_total", "guardrail_guard_latency_seconds_bucket"} <= exported
    for wrong in ("guardrail_request_total", "guardrail_requests", "guardrail_requests_count",
                  "guardrail_guard_latency_seconds_total", "guardrail_guard_latency_bucket"):
        assert not metric_names(f"rate({wrong}[5m])") <= exported


async def test_every_expression_names_an_exported_metric(start_proxy: Any) -> None:
    async with start_proxy() as proxy:
        exported = exported_names(proxy.app[METRICS].registry)
        # The type rules above agree with what /metrics really writes after some traffic.
        await proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as resp:
            scraped = {s.name for f in text_string_to_metric_families(await resp.text()) for s in f.samples}
    assert scraped <= exported
    expressions = all_expressions()
    assert len(expressions) >= 30
    unknown = {where: sorted(names - exported - SCRAPE_SERIES) for where, names in expressions}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert all(names for where, names in expressions if not where.startswith("dashboard variable"))


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*(names for _, names in all_expressions()))
    for name in (
        "guardrail_requests_total",  # decisions by tenant/route
        "guardrail_blocks_total",  # by category
        "guardrail_guard_latency_seconds_bucket",
        "guardrail_guard_queue_depth",
        "guardrail_fail_open_total",
        "guardrail_upstream_errors_total",
        "guardrail_held_reply_bytes_bucket",
        "guardrail_verdict_cache_lookups_total",
        "guardrail_prefix_cache_tokens_total",
    ):
        assert name in used, name
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert board["uid"] == "guardrail-proxy"


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules) >= 8
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
