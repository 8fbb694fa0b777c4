"""packaging/kubernetes/: every manifest parses, the objects fit together (selectors, ports,
grace), and every probe asks a path and port the processes really serve -- the bridge's routes
as its app is built, the balancer routes (sandboxd.fleet.routes) the MCP server mounts too."""

from __future__ import annotations

import glob
import os
from typing import Any

import pytest
import yaml

from sandboxd.fleet import routes as fleet_routes
from sandboxd.http.app import build
from sandboxd.http.keys import Keys
from sandboxd.http.metrics import Metrics
from sandboxd.http.service import Bridge
from sandboxd.http.settings import Settings, listen_address
from sandboxd.http.upstream import Upstream

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFESTS = os.path.join(HERE, "..", "..", "packaging", "kubernetes")


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            docs += [d for d in yaml.safe_load_all(f) if d is not None]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def bridge_paths() -> set[str]:
    """The GET paths of sandboxd-http's app, built as main.serve builds it."""
    settings = Settings(no_auth=True)
    metrics = Metrics()
    app = build(settings, Bridge(settings, Upstream("/nonexistent.sock", 1), metrics), metrics, Keys(settings))
    return {str(getattr(r, "path", "")) for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or ()}


def test_every_manifest_parses_and_the_kinds_are_there() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["DaemonSet", "PodDisruptionBudget", "Service", "Service"]
    assert all(d["apiVersion"] and d["metadata"]["name"] for d in documents())


def test_selectors_match_the_pods() -> None:
    (ds,) = of_kind("DaemonSet")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (pdb,) = of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["maxUnavailable"] == 1
    for svc in of_kind("Service"):
        assert svc["spec"]["selector"].items() <= labels.items()


def containers() -> dict[str, dict[str, Any]]:
    (ds,) = of_kind("DaemonSet")
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("name", ["sandboxd-http", "sandboxd-mcp"])
def test_probes_ask_paths_and_ports_the_process_serves(name: str) -> None:
    c = containers()[name]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    served = bridge_paths() if name == "sandboxd-http" else set(fleet_routes.PATHS)
    probes = [c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")]
    assert [p["path"] for p in probes] == [fleet_routes.LIVE, fleet_routes.READY]
    for probe in probes:
        assert probe["path"] in served, (probe, sorted(served))
        assert probe["port"] in ports
    env = env_of(c)
    if name == "sandboxd-http":  # the ports it is told to listen on are the ones named
        assert listen_address(env["SANDBOXD_HTTP_LISTEN"])[1] == ports["dify"]
        assert listen_address(env["SANDBOXD_HTTP_AGENT_LISTEN"])[1] == ports["dify-agent"]
    else:
        assert int(c["command"][c["command"].index("--http") + 1].rsplit(":", 1)[1]) == ports["mcp"]
        assert listen_address(env["SANDBOXD_MCP_AGENT_LISTEN"])[1] == ports["mcp-agent"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_services_point_at_named_container_ports() -> None:
    named = {p["name"] for c in containers().values() for p in c.get("ports") or ()}
    for svc in of_kind("Service"):
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named


def test_the_grace_covers_the_drain_and_the_daemon_is_the_only_privileged_one() -> None:
    (ds,) = of_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > Settings().drain_grace
    privileged = [n for n, c in containers().items() if (c.get("securityContext") or {}).get("privileged")]
    assert privileged == ["sandboxd"]
    mounts = {m["mountPath"] for m in containers()["sandboxd"]["volumeMounts"]}
    assert {"/run/sandboxd", "/var/lib/sandboxd"} <= mounts
    host = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {"/var/lib/sandboxd"}
