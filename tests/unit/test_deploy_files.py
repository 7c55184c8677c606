"""The operator-facing files parse and agree with the code: example configs load, manifests are
valid YAML with the probes on the metrics port."""

from __future__ import annotations

from pathlib import Path

import yaml

from config import load_consumer_config, parse_consumer_config
from config.loader import parse_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_example_configs_load() -> None:
    for name in ("local.yaml", "remote-example.yaml", "rubin-example.yaml"):
        cfg = load_consumer_config(ROOT / "config" / name, env={})
        assert cfg.kafka.output_topic
    rubin = load_consumer_config(ROOT / "config" / "rubin-example.yaml", env={"STAMPSTREAM_SCHEMA_REGISTRY_URL": "https://r.example"})
    assert rubin.kafka.input_topics == ("^lsst-alerts-v.*",) and rubin.kafka.security.sasl_mechanism == "SCRAM-SHA-512"
    assert rubin.rubin.schema_registry.url == "https://r.example" and (ROOT / rubin.rubin.bundle_path).is_file()
    cfg = load_consumer_config(ROOT / "deploy" / "compose" / "consumer.yaml", env={})
    assert cfg.metrics.log_format == "json"


def test_k8s_configmap_holds_a_valid_config_and_probes_use_the_metrics_port() -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    cfg = parse_consumer_config(parse_yaml(cm["data"]["config.yaml"]))  # a key given twice fails here
    assert cfg.metrics.host == "0.0.0.0", "the probes reach the pod's address"
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"][0]["containerPort"] == cfg.metrics.port
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    envs = {e["name"] for e in c["env"]}
    assert {"STAMPSTREAM_KAFKA_SASL_PASSWORD", "STAMPSTREAM_REDIS_PASSWORD"} <= envs
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "compose.yaml").read_text())
    assert {"kafka", "redis", "consumer"} <= set(compose["services"])


def test_the_image_holds_every_package_and_the_pod_is_locked_down() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    for p in packages:
        assert f"COPY {p} {p}" in docker, f"the image lacks the package {p}"
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
