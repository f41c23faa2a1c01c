"""deploy/kubernetes: the kustomize base and the gpu-guards overlay, rendered and checked as a cluster
would take them (Kubernetes JSON schemas of a pinned version) and as the proxy would read them.

CI machines have no kubectl, so a small renderer here applies exactly the kustomize features the
manifests use (resources, configMapGenerator with its name hash, strategic-merge patches); where
kubectl is installed, its output must equal the renderer's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.cli import main as cli_main
from proxy.server.shutdown import CUT_WAIT_S
from proxy.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
LAYOUTS = {"base": DEPLOY / "base", "gpu-guards": DEPLOY / "overlays" / "gpu-guards"}
KUBERNETES_VERSION = "1.32"  # the oldest minor the manifests promise to apply on
EXIT_MARGIN_S = 3  # after the cut: closing the guards and the upstream session, exiting

Obj = dict[str, Any]

# Strategic-merge keys of the lists the patches touch; any other list is replaced, as kustomize does.
MERGE_KEYS = {"containers": "name", "volumes": "name", "env": "name", "volumeMounts": "mountPath"}


def _accumulate(directory: Path, hashed: set[str]) -> list[Obj]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}
    assert not unknown, f"{directory}: tests/test_deploy.py cannot render {sorted(unknown)} yet"
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs = _accumulate(path, hashed) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
        objects += [d for d in docs if d]
    for gen in spec.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        behavior = gen.get("behavior", "create")
        found = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]]
        assert len(found) == (0 if behavior == "create" else 1), f"{directory}: configMapGenerator {gen['name']}"
        if behavior == "create":
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
        else:
            found[0]["data"] = {**found[0]["data"], **data} if behavior == "merge" else data
        hashed.discard(gen["name"])
        if not gen.get("options", {}).get("disableNameSuffixHash", False):
            hashed.add(gen["name"])
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only file patches (strategic merge) are rendered"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        key = (patch["kind"], patch["metadata"]["name"])
        index = next(i for i, o in enumerate(objects) if (o["kind"], o["metadata"]["name"]) == key)
        objects[index] = _merge(objects[index], patch)
    return objects


def _merge(base: Any, patch: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif key in out and key in MERGE_KEYS and isinstance(value, list):
            # kustomize's order: the patch's items (merged with their originals), then the untouched rest
            originals = {item[MERGE_KEYS[key]]: item for item in out[key]}
            patched = [_merge(originals.pop(item[MERGE_KEYS[key]], {}), item) for item in value]
            out[key] = patched + list(originals.values())
        else:
            out[key] = _merge(out[key], value) if key in out else value
    return out


def kustomize_hash(configmap: Obj) -> str:
    """kustomize's name suffix: sha256 of {data, kind, name} as Go's json.Marshal writes it (kustomize 5
    hashes before the name is set: always ""), 10 hex digits with 0, 1, 3, a, e made letters."""
    doc = {"data": configmap.get("data", {}), "kind": "ConfigMap", "name": ""}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return hashlib.sha256(text.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def render(directory: Path) -> list[Obj]:
    hashed: set[str] = set()
    objects = _accumulate(directory, hashed)
    renamed = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] in hashed:
            name = obj["metadata"]["name"]
            renamed[name] = obj["metadata"]["name"] = f"{name}-{kustomize_hash(obj)}"
    for pod in (o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"):
        for ref in (v["configMap"] for v in pod.get("volumes", []) if "configMap" in v):
            ref["name"] = renamed.get(ref["name"], ref["name"])
        for container in pod["containers"]:  # references the renderer would not rename
            assert "envFrom" not in container and "configMapKeyRef" not in json.dumps(container.get("env"))
    return objects


@dataclass
class Rendered:
    layout: str
    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.layout}: {kind} {name}: {len(found)} objects"
        return found[0]

    def pods(self) -> Iterator[tuple[str, Obj]]:
        for deployment in self.all("Deployment"):
            yield deployment["metadata"]["name"], deployment["spec"]["template"]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param, render(LAYOUTS[request.param]))


def proxy_container(rendered: Rendered) -> tuple[Obj, Obj]:
    pod = rendered.get("Deployment", "guardrail-proxy")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "proxy")


def test_every_object_matches_the_kubernetes_schema(rendered: Rendered) -> None:
    problems = []
    for obj in rendered.objects:
        try:
            assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")
    assert problems == []


def test_the_layouts_hold_what_the_readme_lists(rendered: Rendered) -> None:
    kinds = {(o["kind"], o["metadata"]["name"].split("-config-")[0]) for o in rendered.objects}
    base = {
        ("Deployment", "guardrail-proxy"), ("Service", "guardrail-proxy"), ("Secret", "guardrail-proxy-keys"),
        ("HorizontalPodAutoscaler", "guardrail-proxy"), ("PodDisruptionBudget", "guardrail-proxy"),
        ("ConfigMap", "guardrail-proxy"), ("ConfigMap", "guardrail-proxy-policies"),
    }  # fmt: skip
    guards = {
        ("Deployment", "llama-guard-vllm"), ("Service", "llama-guard-vllm"), ("Deployment", "prompt-guard-tei"),
        ("Service", "prompt-guard-tei"), ("NetworkPolicy", "guard-servers"),
    }  # fmt: skip
    assert kinds == (base if rendered.layout == "base" else base | guards)


def test_every_pod_is_hardened_probed_and_sized(rendered: Rendered) -> None:
    for name, template in rendered.pods():
        pod = template["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"] for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"], name
            ports = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in ports, (name, probe)
            assert {m["name"] for m in c["volumeMounts"]} <= volumes, name
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}: read-only root needs /tmp"


def test_references_resolve(rendered: Rendered) -> None:
    """Mounted ConfigMap keys, Secret keys, Service targets, autoscaler, budget and network policy
    selectors all exist."""
    for deployment in rendered.all("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for name, template in rendered.pods():
        for volume in template["spec"]["volumes"]:
            if "configMap" in volume:
                data = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
                assert {i["key"] for i in volume["configMap"].get("items", [])} <= set(data), name
        for c in template["spec"]["containers"]:
            for ref in (e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e):
                assert ref["key"] in rendered.get("Secret", ref["name"])["stringData"], (name, ref)
    for service in rendered.all("Service"):
        selector = service["spec"]["selector"]
        targets = [t for _, t in rendered.pods() if selector.items() <= t["metadata"]["labels"].items()]
        assert len(targets) == 1, service["metadata"]["name"]
        ports = [p for c in targets[0]["spec"]["containers"] for p in c["ports"]]
        for port in service["spec"]["ports"]:
            assert any(port["targetPort"] in (p["name"], p["containerPort"]) for p in ports), port
    hpa = rendered.get("HorizontalPodAutoscaler", "guardrail-proxy")["spec"]
    deployment = rendered.get("Deployment", hpa["scaleTargetRef"]["name"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = rendered.get("PodDisruptionBudget", "guardrail-proxy")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["minReplicas"] > pdb["maxUnavailable"]  # a node drain never takes the last replica
    for policy in rendered.all("NetworkPolicy"):
        guarded = [t for _, t in rendered.pods() if matches(policy["spec"]["podSelector"], t)]
        guarded_ports = {p["containerPort"] for t in guarded for c in t["spec"]["containers"] for p in c["ports"]}
        for rule in policy["spec"]["ingress"]:
            assert all(any(matches(f["podSelector"], t) for _, t in rendered.pods()) for f in rule["from"])
            assert {p["port"] for p in rule["ports"]} == guarded_ports


def matches(selector: Obj, template: Obj) -> bool:
    return bool(selector["matchLabels"].items() <= template["metadata"]["labels"].items())


def mounted_config(rendered: Rendered, tmp_path: Path) -> tuple[Path, Path, Settings]:
    """config.yaml as the proxy container reads it: (file on disk here, policies mount path, settings)."""
    pod, container = proxy_container(rendered)
    assert container["args"][:2] == ["serve", "--config"] and len(container["args"]) == 3
    config_path = Path(container["args"][2])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    path = tmp_path / config_path.name
    path.write_text(rendered.get("ConfigMap", volume["configMap"]["name"])["data"][config_path.name])
    settings, _ = load_settings(path)
    return path, settings.policies_dir, settings


def test_guardrail_proxy_check_passes_on_the_mounted_config(
    rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ConfigMaps and the Secret, laid out as the pod sees them, pass `guardrail-proxy check`."""
    pod, container = proxy_container(rendered)
    config, policies_dir, settings = mounted_config(rendered, tmp_path)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(policies_dir))
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates (no hot reload)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    policies = rendered.get("ConfigMap", volume["configMap"]["name"])
    assert "items" not in volume["configMap"]  # every policy file in the ConfigMap reaches the pod
    local = tmp_path / "policies"
    local.mkdir()
    for key, text in policies["data"].items():
        (local / key).write_text(text)
    config.write_text(config.read_text().replace(f"policies_dir: {policies_dir}", f"policies_dir: {local}"))
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    for env, ref in secrets.items():  # the keys exactly as the Secret supplies them (placeholders)
        monkeypatch.setenv(env, rendered.get("Secret", ref["name"])["stringData"][ref["key"]])
    named = [k for t in settings.tenants.values() for k in t.keys]
    named += [u.api_key or "" for u in settings.upstreams.values()]
    named += [g.api_key or "" for g in settings.guards.values()]
    assert {k[4:] for k in named if k.startswith("env:")} <= set(secrets)
    assert cli_main(["check", "--config", str(config)]) == 0, capsys.readouterr().err
    assert settings.tenants, "a pod serves on 0.0.0.0: never open mode"
    http = next(p for p in container["ports"] if p["name"] == "http")
    assert settings.server.port == http["containerPort"] and settings.server.host == "0.0.0.0"


def test_termination_grace_covers_the_drain(rendered: Rendered, tmp_path: Path) -> None:
    pod, container = proxy_container(rendered)
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    server = mounted_config(rendered, tmp_path)[2].server
    needed = int(sleep[1]) + server.shutdown_grace_s + server.drain_timeout_s + CUT_WAIT_S + EXIT_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_gpu_guards_are_served_where_the_proxy_looks(tmp_path: Path) -> None:
    """Each remote guard's base_url names a Service of the overlay, whose pods serve that model on a GPU."""
    rendered = Rendered("gpu-guards", render(LAYOUTS["gpu-guards"]))
    guards = mounted_config(rendered, tmp_path)[2].guards
    assert {g.backend for g in guards.values()} == {"tei", "openai"}
    for name, guard in guards.items():
        url = urllib.parse.urlsplit(guard.base_url or "")
        service = rendered.get("Service", url.hostname or "")
        assert url.port in [p["port"] for p in service["spec"]["ports"]], name
        pods = [t for _, t in rendered.pods() if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        (server,) = pods[0]["spec"]["containers"]
        flags = dict(a.removeprefix("--").partition("=")[::2] for a in server["args"][1:])
        if guard.backend == "openai":  # vLLM: the served model name, and room for the longest check
            assert server["args"][0] == guard.model, name
            assert int(flags["max-model-len"]) >= guard.token_limit + guard.max_new_tokens, name
        else:
            assert server["args"][0] == f"--model-id={guard.model}", name
            assert int(flags["max-client-batch-size"]) >= guard.max_client_batch_size, name
        assert int(server["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name


def test_deployed_default_policy_is_the_repositorys() -> None:
    """kustomize reads files under its directory only, so the policy is a copy: it must not drift."""
    copy = DEPLOY / "base" / "policies" / "default.yaml"
    fix = "cp policies/default.yaml deploy/kubernetes/base/policies/"
    assert copy.read_bytes() == (ROOT / "policies" / "default.yaml").read_bytes(), fix


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (CI machines have none)")
def test_renderer_matches_kubectl_kustomize(rendered: Rendered) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(LAYOUTS[rendered.layout])], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}
    assert ours == theirs
