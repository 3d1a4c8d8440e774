"""compose.yaml and docker/*.Dockerfile agree with the code: real `strata` commands, variables that are read.

No Docker here: the files are parsed, and checked against the typer app (`service.cli.app`) and the settings
(`workers.settings.Settings`). Renaming a command, an option or a setting without updating the deployment
files fails here, and so does a variable that nothing reads.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import typer.main
import yaml
from pydantic import AliasChoices

from service.cli import app as cli_app
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))

# Variables a container may set that Strata's settings do not read, each with who reads it.
EXTERNAL_VARIABLES = {
    # huggingface_hub / transformers: never reach a model hub (`strata serve` and `strata worker` set it too).
    "HF_HUB_OFFLINE": "huggingface_hub",
    # The NVIDIA container runtime: which GPUs the container sees, and which driver libraries it gets.
    "NVIDIA_VISIBLE_DEVICES": "NVIDIA container runtime",
    "NVIDIA_DRIVER_CAPABILITIES": "NVIDIA container runtime",
    # CUDA (PyTorch in the worker): which of the visible GPUs it uses.
    "CUDA_VISIBLE_DEVICES": "CUDA",
}


def strata_commands() -> dict:
    # Typer (0.29) vendors its own click: its commands are not `click.Command`s, hence the duck typing here.
    return typer.main.get_command(cli_app).commands


def settings_variables() -> set[str]:
    """Every environment variable `Settings` reads: STRATA_<FIELD>, or the field's alias choices."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def cli_variables() -> set[str]:
    """Variables the CLI's options read (typer `envvar=`), e.g. STRATA_SERVER."""
    names = set()
    for command in strata_commands().values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return names


def allowed_variables() -> set[str]:
    return settings_variables() | cli_variables() | set(EXTERNAL_VARIABLES)


# -- parsing ------------------------------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def argv(value) -> list[str]:
    """A compose `command`/`entrypoint` (list, or string in shell syntax) as an argument list."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(item) for item in value]


def environment(service: dict) -> dict[str, str | None]:
    """A service's `environment:`, in its mapping or its list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with nothing set: the default, or a placeholder."""
    return INTERPOLATION.sub(lambda m: m["arg"] if m["op"] in ("-", ":-") else "placeholder", value)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def exec_or_shell_form(arguments: str) -> list[str]:
    if arguments.startswith("["):
        return [str(item) for item in json.loads(arguments)]
    return shlex.split(arguments)  # shell form: what `sh -c` would run


def dockerfile_command(path: Path) -> tuple[list[str], list[str]]:
    """The last ENTRYPOINT and CMD of a Dockerfile (the ones in force)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ENTRYPOINT":
            entrypoint = exec_or_shell_form(arguments)
        elif keyword == "CMD":
            cmd = exec_or_shell_form(arguments)
    return entrypoint, cmd


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(word.split("=", 1) for word in words)
    return env


# -- checks -------------------------------------------------------------------------------------------------


def command_problems(args: list[str]) -> list[str]:
    """Why `args` is not a valid `strata` invocation (empty when it is)."""
    if not args or Path(args[0]).name != "strata":
        return [f"{args!r} does not run `strata`"]
    commands = strata_commands()
    if len(args) < 2 or args[1] not in commands:
        name = args[1] if len(args) > 1 else ""
        hint = difflib.get_close_matches(name, commands, n=1)
        return [
            f"`strata {name}` is not a strata command (commands: {', '.join(sorted(commands))})"
            + (f"; did you mean `{hint[0]}`?" if hint else "")
        ]
    command = commands[args[1]]
    options = {
        opt
        for param in command.params
        if param.param_type_name == "option"
        for opt in (*param.opts, *param.secondary_opts)
    }
    problems = []
    for word in args[2:]:
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            if option not in options:
                hint = difflib.get_close_matches(option, options, n=1)
                problems.append(
                    f"`strata {args[1]}` has no option {option} (options: {', '.join(sorted(options))})"
                    + (f"; did you mean {hint[0]}?" if hint else "")
                )
    if not problems:
        try:  # values too: click converts them as it would at run time
            command.make_context(f"strata {args[1]}", list(args[2:]))
        except typer.TyperException as e:  # click's UsageError, BadParameter, ...
            problems.append(f"`{shlex.join(args)}`: {e.format_message()}")
    return problems


def environment_problems(env: dict[str, str | None], where: str) -> list[str]:
    allowed = allowed_variables()
    problems = []
    for name in env:
        if name not in allowed:
            hint = difflib.get_close_matches(name, allowed, n=1)
            problems.append(
                f"{where}: {name} is read by nothing: not a Settings field (STRATA_<field>, REDIS_URL), "
                "not a CLI option's envvar, not in EXTERNAL_VARIABLES"
                + (f"; did you mean {hint[0]}?" if hint else "")
            )
    return problems


# -- the compose file ---------------------------------------------------------------------------------------

COMPOSE = load_compose()
SERVICES = COMPOSE["services"]
BUILT_IMAGES = {svc["image"] for svc in SERVICES.values() if "build" in svc and "image" in svc}


def runs_strata(service: dict) -> bool:
    return (
        "build" in service
        or service.get("image") in BUILT_IMAGES
        or argv(service.get("command"))[:1] == ["strata"]
    )


def service_dockerfile(name: str) -> Path | None:
    service = SERVICES[name]
    build = service.get("build")
    if build is None:  # an image built by another service of this file
        builders = [s for s in SERVICES.values() if "build" in s and s.get("image") == service.get("image")]
        if not builders:
            return None
        build = builders[0]["build"]
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def effective_command(name: str) -> list[str]:
    """What the container runs: compose's entrypoint/command over the Dockerfile's ENTRYPOINT/CMD."""
    service = SERVICES[name]
    dockerfile = service_dockerfile(name)
    image_entrypoint, image_cmd = dockerfile_command(dockerfile) if dockerfile else ([], [])
    if "entrypoint" in service:  # overriding the entrypoint drops the image's CMD
        return argv(service["entrypoint"]) + argv(service.get("command"))
    command = argv(service["command"]) if "command" in service else image_cmd
    return image_entrypoint + command


STRATA_SERVICES = sorted(name for name, service in SERVICES.items() if runs_strata(service))


def test_compose_has_the_deployment():
    assert {"redis", "api", "worker", "cpu-worker"} <= set(SERVICES)
    redis = SERVICES["redis"]
    assert "--appendonly" in argv(redis["command"]) and "healthcheck" in redis and redis.get("volumes")
    for name in STRATA_SERVICES:
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert environment(SERVICES[name]).get("REDIS_URL", "").startswith("redis://redis:6379"), name
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert SERVICES["cpu-worker"]["profiles"] == ["cpu"]
    assert "8000:8000" in [str(p) for p in SERVICES["api"]["ports"]]


def test_strata_services_share_the_model_store():
    """Every strata container mounts one volume at its STRATA_HOME: the API serves what the workers write."""
    stores = set()
    for name in STRATA_SERVICES:
        home = environment(SERVICES[name]).get("STRATA_HOME")
        assert home, f"{name} sets no STRATA_HOME (the default, ~/.strata, is not on a shared volume)"
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in SERVICES[name].get("volumes", [])}
        assert home in mounts, f"{name}: nothing is mounted at STRATA_HOME={home}"
        stores.add(mounts[home])
    assert len(stores) == 1 and stores <= set(COMPOSE.get("volumes") or {}), stores


def test_dockerfiles_exist():
    assert DOCKERFILES, "no docker/*.Dockerfile"
    for name in STRATA_SERVICES:
        dockerfile = service_dockerfile(name)
        assert dockerfile is not None and dockerfile.is_file(), f"{name}: no Dockerfile at {dockerfile}"


@pytest.mark.parametrize("name", STRATA_SERVICES)
def test_service_runs_a_real_strata_command(name):
    problems = command_problems(effective_command(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_a_real_strata_command(dockerfile):
    entrypoint, cmd = dockerfile_command(dockerfile)
    problems = command_problems(entrypoint + cmd)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_sets_only_variables_that_are_read(name):
    problems = environment_problems(environment(SERVICES[name]), f"compose.yaml services.{name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_sets_only_strata_variables_that_are_read(dockerfile):
    """Dockerfiles also set PATH, PIP_*, PYTHON*; any STRATA_* among them must be a setting."""
    env = {k: v for k, v in dockerfile_env(dockerfile).items() if k.startswith("STRATA_") or k == "REDIS_URL"}
    problems = environment_problems(env, dockerfile.name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", STRATA_SERVICES)
def test_service_environment_is_valid_settings(name, monkeypatch):
    """The values parse as Settings would parse them in the container (e.g. STRATA_PORT is a number)."""
    for key in list(os.environ):
        if key.startswith("STRATA_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    dockerfile = service_dockerfile(name)
    env = {**(dockerfile_env(dockerfile) if dockerfile else {}), **environment(SERVICES[name])}
    for key, value in env.items():
        if key in settings_variables() and value is not None:
            monkeypatch.setenv(key, interpolate(value))
    settings = Settings()
    assert settings.redis_url and settings.home.is_absolute()


def test_api_is_reachable_only_with_keys():
    """`strata serve` falls back to 127.0.0.1 without API keys, so an API published on 0.0.0.0 needs them."""
    env = environment(SERVICES["api"])
    assert env.get("STRATA_HOST") == "0.0.0.0"
    assert env.get("STRATA_API_KEYS"), "the API container must get STRATA_API_KEYS"


def test_docker_compose_accepts_the_file():
    """`docker compose config`, where the Compose plugin is installed (it needs no Docker engine)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("no docker compose here")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "cpu", "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "STRATA_API_KEYS": "test-key"},
    )
    assert result.returncode == 0, result.stderr


# -- the checks catch what they should ----------------------------------------------------------------------


def test_a_bogus_variable_is_reported():
    problems = environment_problems(
        {"STRATA_WROKERS": "2", "REDIS_URL": "redis://x", "STRATA_HOME": "/d"}, "x"
    )
    assert len(problems) == 1 and "STRATA_WROKERS" in problems[0] and "STRATA_WORKERS" in problems[0]


def test_bogus_commands_are_reported():
    assert command_problems(["strata", "serve", "--workers", "0"]) == []
    assert "not a strata command" in command_problems(["strata", "srve"])[0]
    assert "--wrokers" in command_problems(["strata", "serve", "--wrokers", "0"])[0]
    assert "Invalid value for '--workers'" in command_problems(["strata", "serve", "--workers", "many"])[0]
    assert "does not run `strata`" in command_problems(["python", "-m", "service.cli", "serve"])[0]
