"""Every manifest and config in cluster/: it parses, its entrypoints are real CLI commands with valid options,
and every Ray version / image / torch pin agrees with pyproject.toml and the Ray these tests run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement

from distributed_anomaly.cli import build_parser
from distributed_anomaly.serve.settings import AppConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
RUNTIME_ENV_KEYS = {
    "working_dir",
    "py_modules",
    "excludes",
    "env_vars",
    "pip",
    "uv",
    "conda",
    "container",
    "image_uri",
    "config",
    "nsight",
    "py_executable",
}


def _requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def _k8s(kind: str) -> dict:
    docs = [
        d for f in YAMLS for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict) and d.get("kind") == kind
    ]
    assert len(docs) == 1, f"expected one {kind} manifest in cluster/, found {len(docs)}"
    return docs[0]


def _cli_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `distributed-anomaly`) for every entrypoint in cluster/: the RayJob's and every command
    line of cluster/README.md's code blocks (continuation lines joined)."""
    found = [("kuberay RayJob entrypoint", _k8s("RayJob")["spec"]["entrypoint"])]
    text = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "distributed-anomaly " in line:
                found.append(("cluster/README.md", line.split("#")[0]))
    text = (CLUSTER / "ray-cluster.yaml").read_text()  # the usage in its header comment
    joined = re.sub(r"\\\n#\s*", " ", text)
    found += [
        ("cluster/ray-cluster.yaml", line.lstrip("# "))
        for line in joined.splitlines()
        if "distributed-anomaly pipeline" in line
    ]
    out = []
    for where, line in found:
        words = shlex.split(line)
        i = words.index("distributed-anomaly")
        out.append((where, words[i + 1 :]))
    return out


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_entrypoints_are_real_commands_with_valid_options(capsys) -> None:
    commands = _cli_commands()
    assert any(argv[0] == "pipeline" for _, argv in commands), "no pipeline entrypoint found"
    parser = build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(
                f"{where}: `distributed-anomaly {' '.join(argv)}` does not parse "
                f"({capsys.readouterr().err.strip()[-300:]}; exit {exc.code})"
            )
        with pytest.raises(SystemExit) as exc_info:  # and the command's own --help works
            parser.parse_args([argv[0], "--help"])
        assert exc_info.value.code == 0
    capsys.readouterr()


def test_ray_versions_and_images_agree_with_pyproject() -> None:
    ray_req = _requirement("ray")
    texts = {p: p.read_text() for p in [*YAMLS, CLUSTER / "Dockerfile", CLUSTER / "README.md"]}
    image_versions = {v for t in texts.values() for v in re.findall(r"rayproject/ray:([0-9.]+)", t)}
    ray_versions = {str(v) for p in YAMLS for v in re.findall(r'rayVersion:\s*"?([0-9.]+)', texts[p])}
    from_line = re.search(r"^FROM rayproject/ray:([0-9.]+)-(py\d+)", texts[CLUSTER / "Dockerfile"], flags=re.M)
    assert from_line, "cluster/Dockerfile must build FROM a rayproject/ray image"
    assert ray_versions and image_versions == ray_versions == {from_line.group(1)} == {ray.__version__}, (
        f"images {image_versions}, rayVersion {ray_versions}, Dockerfile {from_line.group(1)}, tested {ray.__version__}"
    )
    assert ray_req.specifier.contains(ray.__version__), f"pyproject's {ray_req} excludes Ray {ray.__version__}"
    for name in ("torch", "torchvision"):
        pins = re.findall(rf'"{name}==([0-9.]+)"', texts[CLUSTER / "Dockerfile"])
        assert pins and all(_requirement(name).specifier.contains(v) for v in pins), (name, pins)
    # the custom images are the Dockerfile's, one tag everywhere
    custom = {v for t in texts.values() for v in re.findall(r"image:\s*(REGISTRY/distributed-anomaly\S*)", t)}
    assert custom <= {"REGISTRY/distributed-anomaly:0.1.0", "REGISTRY/distributed-anomaly-gpu:0.1.0"}, custom


def test_runtime_env_ships_code_not_dependencies() -> None:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS, set(env) - RUNTIME_ENV_KEYS
    assert "pip" not in env and "conda" not in env  # dependencies are in the image (see the file's comment)
    assert {".venv/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values


def test_serve_configs_build_our_application() -> None:
    import importlib

    serve_cfg = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    service_cfg = yaml.safe_load(_k8s("RayService")["spec"]["serveConfigV2"])
    for cfg in (serve_cfg, service_cfg):
        (app,) = cfg["applications"]
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        parsed = AppConfig.from_args(app["args"])  # unknown keys or bad numbers raise
        assert parsed.models and parsed.replicas >= 1
    assert service_cfg["applications"][0]["import_path"] == serve_cfg["applications"][0]["import_path"]
    assert set(service_cfg["applications"][0]["args"]) <= set(serve_cfg["applications"][0]["args"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _ray_containers(spec: dict) -> list[tuple[str, dict]]:
    """(where, container) of every Ray node of a RayCluster spec: the head and each worker group."""
    found = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in spec.get("workerGroupSpecs") or []:
        found += [(f"worker group {group['groupName']}", c) for c in group["template"]["spec"]["containers"]]
    return found


def _cluster_specs() -> list[tuple[str, dict]]:
    return [
        ("RayCluster", _k8s("RayCluster")["spec"]),
        ("RayJob", _k8s("RayJob")["spec"]["rayClusterSpec"]),
        ("RayService", _k8s("RayService")["spec"]["rayClusterConfig"]),
    ]


def _has_token_auth(where: str, container: dict) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") == "distributed-anomaly-ray-token" and not ref.get("optional"), (
        f"{where}: RAY_AUTH_TOKEN must come from the secret distributed-anomaly-ray-token"
    )


def test_every_kuberay_client_and_node_gets_token_auth() -> None:
    """cluster/README.md: every Ray node and every client (the RayJob's `ray job submit` pod) needs
    RAY_AUTH_MODE=token as well as the token, else the client answers "Missing authentication token"."""
    for kind, spec in _cluster_specs():
        for where, container in _ray_containers(spec):
            _has_token_auth(f"{kind} {where} ({container['name']})", container)
    for container in _k8s("RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        _has_token_auth(f"RayJob submitter ({container['name']})", container)


def test_every_command_line_that_sets_the_token_sets_the_auth_mode() -> None:
    """The usage lines of cluster/ (README and manifest comments) that hand a client the token also set the mode."""
    texts = {p: p.read_text() for p in [*YAMLS, CLUSTER / "README.md"]}
    lines = [(p, line) for p, t in texts.items() for line in t.splitlines() if "RAY_AUTH_TOKEN=" in line]
    assert lines
    for path, line in lines:
        assert "RAY_AUTH_MODE=token" in line, f"{path.relative_to(ROOT)}: {line.strip()}"


def _serves_on_all_interfaces() -> list[str]:
    found = []
    argv = shlex.split(_k8s("RayJob")["spec"]["entrypoint"])
    if "--serve" in argv and argv[argv.index("--host") + 1] == "0.0.0.0":
        found.append("RayJob")
    service = yaml.safe_load(_k8s("RayService")["spec"]["serveConfigV2"])
    if service.get("http_options", {}).get("host") == "0.0.0.0":
        found.append("RayService")
    ports = [
        p["containerPort"]
        for c in _k8s("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    ]
    if 8000 in ports:
        found.append("RayCluster")
    return found


def test_endpoints_on_all_interfaces_take_their_api_key_from_a_secret() -> None:
    """A Serve endpoint reachable from outside its pod needs a key: every Ray container of such a manifest reads
    serve.settings.API_KEY_ENV (the ingress and the pipeline's driver read it) from a required secret, and no
    key is written into the manifest itself."""
    from distributed_anomaly.serve.settings import API_KEY_ENV

    exposed = _serves_on_all_interfaces()
    assert {"RayJob", "RayService"} <= set(exposed)
    specs = dict(_cluster_specs())
    for kind in exposed:
        for where, container in _ray_containers(specs[kind]):
            entry = _env(container).get(API_KEY_ENV)
            assert entry, f"{kind} {where}: no {API_KEY_ENV}; its endpoint on 0.0.0.0 would take any request"
            ref = entry.get("valueFrom", {}).get("secretKeyRef", {})
            assert "value" not in entry and ref.get("name") and ref.get("key"), f"{kind} {where}: key not from a secret"
            assert not ref.get("optional"), f"{kind} {where}: the key's secret is optional, so the endpoint may be open"
    service_args = yaml.safe_load(_k8s("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "api_key" not in service_args  # from the secret, not in the manifest
