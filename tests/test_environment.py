"""Environment files: defaults, aliases, every error at once, round trip through TOML."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

from runbook import environment as envmod
from runbook.environment import ReloadMethod, Slot
from runbook.errors import ConfigError, ExitCode


def test_production_defaults_match_the_contract() -> None:
    env = envmod.load("production")
    assert env.name == "production"
    assert env.state_file == Path("/opt/togather/src/deploy/config/deployment-state.json")
    assert env.lock_path == Path("/tmp/togather-deploy-production.lock")
    assert env.slot(Slot.BLUE).container == "togather-server-blue"
    assert (env.slot("blue").port, env.slot("green").port) == (8081, 8082)
    assert env.slot("green").service == "togather-green"
    assert env.caddy.caddyfile == Path("/etc/caddy/Caddyfile")
    assert env.caddy.reload is ReloadMethod.ADMIN_API
    assert env.caddy.admin_url == "http://localhost:2019"
    assert env.compose.project == "togather-production"
    assert env.database.snapshot_dir == Path("/var/lib/togather/db-snapshots")
    assert env.database.retention_days == 7
    assert env.lock_stale_after == 1800
    assert env.drain_timeout == 10.0  # as long as `docker stop` waits for a graceful exit
    assert not env.allows_faults


def test_prod_is_an_alias_of_production() -> None:
    assert envmod.load("prod") == envmod.load("production")
    assert envmod.load("staging").name == "staging"


def test_unknown_name_is_a_usage_error() -> None:
    with pytest.raises(ConfigError) as err:
        envmod.load("qa")
    assert err.value.exit_code == ExitCode.USAGE
    assert "unknown environment 'qa'" in str(err.value)


def test_every_problem_is_reported_at_once_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "qa"\nsurprise = 1\n[slots.blue]\nport = 70000\n'
                   'container = "blue"\nservice = "s"\n[caddy]\nreload = "restart"\n'
                   "[health]\ntimeout_seconds = -1\ntimout_seconds = 5\n"
                   "[rollback]\ndrain_timeout_seconds = 0\n")
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    text = str(err.value)
    for key in ("name", "slots.blue.port", "slots.green.port", "caddy.reload",
                "health.timeout_seconds", "rollback.drain_timeout_seconds"):
        assert f"{bad}: {key}:" in text, key
    # an unknown key is named after the words (never `key: unknown`, which the redactor
    # masks as a secret's value when the key's name is secret-like: test_secrets_output)
    for key in ("surprise", "health.timout_seconds"):
        assert f"{bad}: unknown key {key} (known: " in text, key


@pytest.mark.parametrize(("toml", "key", "words"), [
    # the review's cases: either would make an act on the standby an act on the serving slot
    ('[slots.blue]\ncontainer = "app"\nport = 8081\n'
     '[slots.green]\ncontainer = "app"\nport = 8082\n', "slots",
     "different containers (both are 'app')"),
    ('[slots.blue]\ncontainer = "blue"\nservice = "togather-blue"\nport = 8081\n'
     '[slots.green]\ncontainer = "green"\nservice = "togather-blue"\nport = 8082\n', "slots",
     "different compose services"),
    ('[health]\npath = "health"\n', "health.path", "must start with '/'"),
    ('[caddy]\nverify_path = "version"\n', "caddy.verify_path", "must start with '/'"),
    # found by review: a slot naming the database's container: every stop of the old slot
    # (and a deploy's recreate, a restore's stop) hit Postgres
    ('[slots.blue]\ncontainer = "togather-db"\nport = 8081\n'
     '[slots.green]\ncontainer = "green"\nport = 8082\n', "",
     "slots.blue names the database's container 'togather-db'"),
    # an unset variable (sudo, cron) was a folder literally named "$SNAPSHOT_DIR" beside the
    # environment file, where every dump went and no guard looked
    ('[database]\nsnapshot_dir = "$RUNBOOK_TEST_UNSET_DIR/snaps"\n', "database.snapshot_dir",
     "names an environment variable that is not set here"),
    # too large to be meant: 1e12 s overflowed the lock's dates (exit 5, a lock left behind)
    ('[lock]\nstale_after_seconds = 1e12\n', "lock.stale_after_seconds", "over a week"),
    ('[database]\nretention_days = 3000000\n', "database.retention_days", "over 3650"),
    # accepted, they failed mid-run ("Caddy is not running", InvalidURL after the start)
    ('[caddy]\nadmin_url = "localhost:2019"\n', "caddy.admin_url",
     "is not an http(s) URL with a host"),
    ('[caddy]\nproxy_url = "http://localhost/app"\n', "caddy.proxy_url", "has a path"),
    ('[caddy]\nadmin_url = "http://ops:s3cr3t-adm@localhost:2019"\n', "caddy.admin_url",
     "holds a user and password, which the runbook never sends: give the address only"),
    ('[health]\npath = "/health "\n', "health.path", "space or control character"),
    # found by review: the site's address given as the admin API's (or the same port twice)
    ('[caddy]\nadmin_url = "http://127.0.0.1:2019"\nproxy_url = "http://127.0.0.1:2019/"\n',
     "caddy", "admin_url and proxy_url are the same address"),
    ('[caddy]\nadmin_url = "http://LOCALHOST"\nproxy_url = "http://localhost:80"\n',
     "caddy", "admin_url and proxy_url are the same address"),
    ('[slots.blue]\ncontainer = "blue"\nport = 2019\n[slots.green]\ncontainer = "green"\n'
     'port = 8082\n', "",
     "slots.blue port 2019 is Caddy's own (caddy.admin_url http://localhost:2019)"),
    ('[caddy]\nadmin_url = "http://localhost:2019"\nproxy_url = "http://[::1]:2019"\n',
     "caddy", "admin_url and proxy_url are the same address"),
    ('[caddy]\nproxy_url = "http://127.0.0.1:8080"\n[slots.blue]\ncontainer = "blue"\n'
     'port = 8081\n[slots.green]\ncontainer = "green"\nport = 8080\n', "",
     "slots.green port 8080 is Caddy's own (caddy.proxy_url"),
    # found by review: a NUL in a path was a bare ValueError (exit 5) naming no key; an empty
    # name passed, and status then named the wrong problem (or compose chose a project)
    ('[state]\nfile = "/tmp/st\\u0000ate.json"\n', "state.file", "holds a NUL character"),
    ('[slots.blue]\ncontainer = ""\nport = 8081\n[slots.green]\ncontainer = "green"\n'
     'port = 8082\n', "slots.blue.container", "is empty"),
    ('[database]\ncontainer = " "\n', "database.container", "is empty"),
    ('[compose]\nproject = ""\n', "compose.project", "is empty"),
    ('[compose]\nimage_repository = ""\n', "compose.image_repository", "is empty"),
    ('[caddy]\nsystemd_unit = ""\n', "caddy.systemd_unit", "is empty"),
    # found by review: the name as `docker inspect` prints it failed every engine call
    ('[slots.blue]\ncontainer = "/togather-server-blue"\nport = 8081\n[slots.green]\n'
     'container = "green"\nport = 8082\n', "slots.blue.container",
     "starts with '/' (as `docker inspect` prints .Name): write 'togather-server-blue'"),
    ('[database]\ncontainer = "/togather-db"\n', "database.container", "write 'togather-db'"),
    # found by review: a command reaching another engine than the one the runbook inspects
    ('[caddy]\ncommand = ["docker", "-H", "unix:///run/other.sock", "exec", "caddy", '
     '"caddy"]\n', "caddy.command", "names its own Docker engine (-H)"),
    ('[compose]\ncommand = ["docker", "--context=rootless", "compose"]\n', "compose.command",
     "names its own Docker engine (--context)"),
    ('[caddy]\ncommand = ["docker", "-Htcp://x:2375", "exec", "caddy", "caddy"]\n',
     "caddy.command", "names its own Docker engine (-H)"),
    ('[caddy]\ncommand = ["docker", "--log-level", "error", "-H", "tcp://x", "exec", "c", '
     '"caddy"]\n', "caddy.command", "names its own Docker engine (-H)"),
    ('[compose]\ncommand = ["docker", "--config", "/home/other/.docker", "compose"]\n',
     "compose.command", "names its own Docker engine (--config)"),
    ('[caddy]\ncommand = ["env", "DOCKER_HOST=tcp://x", "docker", "exec", "c", "caddy"]\n',
     "caddy.command", "sets DOCKER_HOST for the command"),
    ('[caddy]\ncommand = ["sudo", "docker", "-H", "tcp://x", "exec", "c", "caddy"]\n',
     "caddy.command", "names its own Docker engine (-H)"),
    # Compose v1's binary, read as `docker compose` (found by review): its engine options
    # too, also past its own valued ones (-p NAME)
    ('[caddy]\ncommand = ["docker-compose", "-p", "edge", "-H", "tcp://x", "exec", "caddy", '
     '"caddy"]\n', "caddy.command", "names its own Docker engine (-H)"),
    ('[caddy]\ncommand = ["sudo", "docker-compose", "--context=rootless", "exec", "caddy", '
     '"caddy"]\n', "caddy.command", "names its own Docker engine (--context)"),
])
def test_slots_that_share_a_container_and_paths_without_a_slash_are_refused(
        tmp_path: Path, toml: str, key: str, words: str) -> None:
    bad = tmp_path / "production.toml"
    bad.write_text('name = "production"\n' + toml)
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    assert (f"{bad}: {key}" if key else f"{bad}: ") in str(err.value), str(err.value)
    assert words in str(err.value), str(err.value)
    assert "s3cr3t" not in str(err.value)
    assert err.value.exit_code == ExitCode.USAGE


ROOTLESS = "unix:///run/user/1000/docker.sock"
SUDO_CADDY = '[caddy]\ncommand = ["sudo", "docker", "exec", "caddy", "caddy"]\n'


@pytest.mark.parametrize(("engine", "toml", "key"), [
    ("DOCKER_HOST", SUDO_CADDY, "caddy.command"),
    ("DOCKER_HOST", '[compose]\ncommand = ["sudo", "docker", "compose"]\n', "compose.command"),
    ("DOCKER_HOST", '[caddy]\ncommand = ["sudo", "-u", "root", "docker", "exec", "caddy", '
                    '"caddy"]\n', "caddy.command"),
    ("DOCKER_HOST", '[caddy]\ncommand = ["sudo", "--preserve-env=HOME", "docker", "exec", '
                    '"caddy", "caddy"]\n', "caddy.command"),
    ("DOCKER_HOST", '[caddy]\ncommand = ["sudo", "docker-compose", "exec", "caddy", '
                    '"caddy"]\n', "caddy.command"),
    ("context", SUDO_CADDY, "caddy.command"),
    ("context", '[caddy]\ncommand = ["sudo", "--preserve-env=DOCKER_HOST", "docker", "exec", '
                '"caddy", "caddy"]\n', "caddy.command"),
])
def test_a_sudo_command_that_drops_the_runbooks_engine_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, toml: str,
        key: str) -> None:
    """Found by review: sudo resets the environment, so `sudo docker ...` reaches the default
    socket whatever DOCKER_HOST (or the user's docker context) says, while the runbook's own
    client follows it: the checks looked at one engine and the command acted on another.
    Refused at load (exit 2), one line, with the fix."""
    from tests.drill_checks import docker_context

    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    if engine == "DOCKER_HOST":
        monkeypatch.setenv("DOCKER_HOST", ROOTLESS)
    else:
        monkeypatch.delenv("DOCKER_HOST", raising=False)
        docker_context(tmp_path / "docker", "rootless", ROOTLESS)
    bad = tmp_path / "production.toml"
    bad.write_text(NO_COMPOSE + toml)
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    message = str(err.value)
    assert err.value.exit_code == ExitCode.USAGE
    assert f"{bad}: {key}" in message and "sudo" in message and ROOTLESS in message, message
    assert "--preserve-env=DOCKER_HOST" in message and "drop sudo" in message, message
    assert "\n" not in message.split("\n  ", 1)[1], message  # the problem: one line


@pytest.mark.parametrize("wrapper", [
    ["env", "-u", "DOCKER_HOST"], ["env", "--unset=DOCKER_HOST"], ["env", "-uDOCKER_HOST"],
    ["env", "-i"], ["env", "-C", "/tmp", "-u", "DOCKER_HOST"],
])
def test_an_env_command_that_drops_the_runbooks_engine_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrapper: list[str]) -> None:
    """Found by review: `env -u DOCKER_HOST docker ...` (or `env -i`) reached the default
    socket while the runbook inspected DOCKER_HOST's engine, and `env`'s valued options hid
    the docker after them from every engine check."""
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("DOCKER_HOST", ROOTLESS)
    bad = tmp_path / "production.toml"
    words = ", ".join(f'"{w}"' for w in [*wrapper, "docker", "exec", "caddy", "caddy"])
    bad.write_text(NO_COMPOSE + f"[caddy]\ncommand = [{words}]\n")
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    message = str(err.value)
    assert err.value.exit_code == ExitCode.USAGE
    assert f"{bad}: caddy.command" in message and ROOTLESS in message, message
    assert "default Docker socket" in message, message
    with pytest.raises(ConfigError, match="names its own Docker engine"):  # seen past -C dir
        bad.write_text(NO_COMPOSE + '[caddy]\ncommand = ["env", "-C", "/tmp", "docker", '
                       '"-H", "tcp://x", "exec", "c", "caddy"]\n')
        envmod.load(str(bad))


@pytest.mark.parametrize(("docker_host", "command"), [
    (None, ["sudo", "docker", "exec", "caddy", "caddy"]),  # the default socket either way
    ("unix:///var/run/docker.sock", ["sudo", "docker", "exec", "caddy", "caddy"]),
    (ROOTLESS, ["sudo", "--preserve-env=DOCKER_HOST", "docker", "exec", "caddy", "caddy"]),
    (ROOTLESS, ["sudo", "--preserve-env=PATH,DOCKER_HOST", "docker", "exec", "caddy",
                "caddy"]),
    (ROOTLESS, ["sudo", "-E", "docker", "exec", "caddy", "caddy"]),
    (ROOTLESS, ["sudo", "caddy"]),  # system Caddy: no engine involved
    (ROOTLESS, ["docker", "exec", "caddy", "caddy"]),
    (ROOTLESS, ["env", "-u", "LANG", "docker", "exec", "caddy", "caddy"]),
])
def test_a_sudo_command_that_keeps_the_runbooks_engine_is_fine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_host: str | None,
        command: list[str]) -> None:
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # no context: the default
    if docker_host is None:
        monkeypatch.delenv("DOCKER_HOST", raising=False)
    else:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
    path = tmp_path / "production.toml"
    words = ", ".join(f'"{w}"' for w in command)
    path.write_text(NO_COMPOSE + f"[caddy]\ncommand = [{words}]\n")
    assert envmod.load(str(path)).caddy.command == tuple(command)


def test_a_slot_on_another_machine_may_use_caddys_port_number(tmp_path: Path) -> None:
    """Only a slot on this machine's loopback collides with Caddy's own port."""
    path = tmp_path / "production.toml"
    path.write_text('name = "production"\n[slots.blue]\ncontainer = "blue"\nport = 80\n'
                    'host = "10.0.0.11"\n[slots.green]\ncontainer = "green"\nport = 8082\n')
    assert envmod.load(str(path)).slot(Slot.BLUE).port == 80


def test_the_environment_argument_and_config_must_agree(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case: `runbook rollback prodution --config staging.toml` planned a
    staging rollback; a file passed as ENV was silently replaced by RUNBOOK_CONFIG's."""
    staging = tmp_path / "staging.toml"
    staging.write_text(envmod.to_toml(envmod.load("staging")))
    other = tmp_path / "other.toml"
    other.write_text(envmod.to_toml(envmod.load("production")))
    with pytest.raises(ConfigError, match="unknown environment 'prodution'"):
        envmod.load("prodution", config=str(staging))
    monkeypatch.setenv("RUNBOOK_CONFIG", str(staging))
    with pytest.raises(ConfigError, match="they disagree") as err:
        envmod.load(str(other))
    assert err.value.exit_code == ExitCode.USAGE
    assert envmod.load(str(staging)).name == "staging"  # the same file: fine
    assert envmod.load("staging").name == "staging"


def test_files_that_cannot_be_read_are_config_errors(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "production"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        envmod.load(str(latin))
    with pytest.raises(ConfigError, match="is not a file"):
        envmod.load(str(tmp_path))
    host = tmp_path / "etc"
    (host / "production.toml").mkdir(parents=True)  # the host's override, broken
    monkeypatch.setattr(envmod, "SYSTEM_DIR", host)
    with pytest.raises(ConfigError, match="is not a readable file"):
        envmod.load("production")  # never the packaged defaults instead
    secret = tmp_path / "secret.toml"
    secret.write_text('name = "production"\n[database]\n'
                      'url_variable = "postgresql://togather:S3cretPW@db/togather"\n'
                      'env_file = {DATABASE_URL = "postgresql://u:An0therPW@db/x"}\n')
    with pytest.raises(ConfigError) as err:
        envmod.load(str(secret))
    assert "url_variable" in str(err.value) and "env_file" in str(err.value)
    assert "S3cretPW" not in str(err.value) and "An0therPW" not in str(err.value)


def test_a_non_utf8_env_file_is_a_config_error(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"DATABASE_URL=postgresql://u:p\xe9ss@db/x\n")
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        envmod.read_env_file(env_file)
    assert "p\xe9ss" not in str(err.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        envmod.load(str(bad))


def test_round_trip_through_toml(tmp_path: Path) -> None:
    env = envmod.load("production").with_(allows_faults=True, label="somewhere",
                                          drain_timeout=2.5)
    path = tmp_path / "env.toml"
    path.write_text(envmod.to_toml(env))
    assert envmod.load(str(path)) == env.with_(source=path)


def test_config_option_must_describe_the_named_environment(tmp_path: Path) -> None:
    path = tmp_path / "staging.toml"
    path.write_text(envmod.to_toml(envmod.load("staging")))
    with pytest.raises(ConfigError, match="not 'production'"):
        envmod.load("production", config=str(path))


def test_database_url_comes_from_the_env_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    env_file = tmp_path / ".env.production"
    env_file.write_text("# comment\nDATABASE_URL='postgresql://u:p%40ss@127.0.0.1:5433/db'\n")
    env = envmod.load("production")
    db = env.database.__class__(env_file=env_file)
    assert db.url() == "postgresql://u:p%40ss@127.0.0.1:5433/db"
    empty = tmp_path / ".env.empty"
    empty.write_text("OTHER=1\n")
    with pytest.raises(ConfigError, match="DATABASE_URL is missing"):
        env.database.__class__(env_file=empty).url()


NO_COMPOSE = '''name = "production"
[slots.blue]
container = "togather-server-blue"
port = 8081
[slots.green]
container = "togather-server-green"
port = 8082
'''


def test_a_host_without_compose_needs_no_compose_keys(tmp_path: Path) -> None:
    """Slots started with `docker run`: no [compose], no service, and no invented file path."""
    path = tmp_path / "docker-run.toml"
    path.write_text(NO_COMPOSE)
    env = envmod.load(str(path))
    assert env.slot("blue").service is None and env.slot("green").service is None
    assert not envmod.STANDARD_COMPOSE_FILE.exists()  # this machine is not a Togather host
    assert env.compose.file is None
    assert env.compose.image_repository == "togather-server"
    again = tmp_path / "again.toml"
    again.write_text(envmod.to_toml(env))
    written = tomllib.loads(again.read_text())
    assert "service" not in written["slots"]["blue"] and "file" not in written["compose"]
    assert envmod.load(str(again)) == env.with_(source=again)


def test_compose_file_given_is_kept_even_when_missing(tmp_path: Path) -> None:
    """Loading does not judge the file: only a plan that recreates needs it (pre-flight)."""
    path = tmp_path / "env.toml"
    path.write_text(NO_COMPOSE + '[compose]\nfile = "compose.yml"\n')
    assert envmod.load(str(path)).compose.file == tmp_path / "compose.yml"


def test_empty_service_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text(NO_COMPOSE.replace('port = 8081', 'port = 8081\nservice = " "'))
    with pytest.raises(ConfigError) as err:
        envmod.load(str(path))
    assert f"{path}: slots.blue.service: is empty" in str(err.value)
    assert err.value.exit_code == ExitCode.USAGE


def test_the_format_knows_exactly_the_documented_keys() -> None:
    """The pydantic model is the one list of keys: it must be the format's list, no more, no
    less (written out here, as the README documents it, not read from the model)."""
    tables, keys = envmod.KNOWN_TABLES, envmod.KNOWN_KEYS
    assert tables == {"name", "label", "state", "lock", "logs", "slots", "caddy", "compose",
                      "health", "database", "rollback", "deploy", "drill"}
    assert keys == {
        "state": {"file"},
        "lock": {"dir", "stale_after_seconds"},
        "logs": {"dir", "runs_dir"},
        "slots": {"blue", "green"},
        "slots.blue": {"container", "service", "port", "host"},
        "slots.green": {"container", "service", "port", "host"},
        "caddy": {"caddyfile", "reload", "admin_url", "proxy_url", "command", "systemd_unit",
                  "verify_path", "container_path", "site", "ca_file"},
        "compose": {"file", "project", "env_file", "image_repository", "command"},
        "health": {"path", "timeout_seconds", "interval_seconds", "max_interval_seconds",
                   "request_timeout_seconds"},
        "database": {"env_file", "url_variable", "container", "snapshot_dir", "retention_days",
                     "access"},
        "rollback": {"stop_old_slot", "drain_timeout_seconds"},
        "deploy": {"migrate_command"},
        "drill": {"allows_faults"},
    }


def test_types_are_checked_as_written_and_reported_with_the_key(tmp_path: Path) -> None:
    """TOML types as written (no "8081" for a port, no true for a number), each error on its
    own line with file and key, all at once; the file changes nothing (exit 2)."""
    bad = tmp_path / "types.toml"
    bad.write_text(NO_COMPOSE.replace("port = 8081", 'port = "8081"')
                   + "[health]\ntimeout_seconds = true\n[caddy]\ncommand = []\n"
                   + 'container_path = "etc/caddy"\nsite = "https://togather.example.org"\n'
                   + '[database]\naccess = "docker"\n')
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    assert err.value.exit_code == ExitCode.USAGE
    lines = err.value.message.splitlines()
    assert lines[0] == f"6 problem(s) in {bad}:"
    assert f"  {bad}: slots.blue.port: expected int, got '8081'" in lines
    assert f"  {bad}: health.timeout_seconds: expected float, got True" in lines
    assert f"  {bad}: caddy.command: expected a non-empty list of strings" in lines
    assert any(line.startswith(f"  {bad}: caddy.container_path: 'etc/caddy' is not an "
                               "absolute path") for line in lines)
    assert f"  {bad}: database.access: 'docker' is not one of auto, host, container" in lines
    assert any(line.startswith(f"  {bad}: caddy.site: 'https://togather.example.org' is not a "
                               "host name") for line in lines)


def test_the_written_file_leaves_out_what_it_does_not_set(tmp_path: Path) -> None:
    env = envmod.load("production").with_(migrate_command=())
    written = tomllib.loads(envmod.to_toml(env))
    assert "deploy" not in written and "drill" not in written
    assert written["rollback"] == {"stop_old_slot": True, "drain_timeout_seconds": 10.0}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_a_drain_timeout_that_is_no_duration_is_a_config_error(tmp_path: Path,
                                                                 value: str) -> None:
    """TOML has nan and inf, and `nan <= 0` is False: neither (nor a negative) may become the
    drain's timeout. The command refuses before doing anything (exit 2), with the problem on
    one line naming the file and the key, and no traceback."""
    import subprocess
    import sys

    path = tmp_path / "env.toml"
    path.write_text(NO_COMPOSE + f"[rollback]\ndrain_timeout_seconds = {value}\n")
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "status", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.USAGE, (done.returncode, done.stdout, done.stderr)
    problems = [line for line in done.stderr.splitlines()
                if f"{path}: rollback.drain_timeout_seconds:" in line]
    assert len(problems) == 1 and "greater than 0" in problems[0], done.stderr
    assert "Traceback" not in done.stderr


def production_with(env_file: Path) -> str:
    """The packaged production environment, its host env file at `env_file`."""
    text = envmod.to_toml(envmod.load("production"))
    assert '"/opt/togather/.env.production"' in text
    return text.replace('"/opt/togather/.env.production"', f'"{env_file}"')


def refused_at_load(env_file: Path) -> tuple[Path, ConfigError]:
    """The packaged production environment with its host env file at `env_file`, loaded:
    refused as configuration (exit 2). Returns the TOML written and the error."""
    toml = env_file.parent / "production.toml"
    toml.write_text(production_with(env_file))
    with pytest.raises(ConfigError) as err:
        envmod.load(str(toml))
    assert err.value.exit_code == ExitCode.USAGE
    return toml, err.value


@pytest.mark.parametrize(("line", "key", "fix"), [
    ("SNAPSHOT_DIR=/srv/togather/snapshots", "[database] snapshot_dir",
     'set snapshot_dir = "/srv/togather/snapshots" under [database]'),
    ("COMPOSE_PROJECT_NAME=togather", "[compose] project",
     'set project = "togather" under [compose]'),
    ("HEALTH_CHECK_PATH=/healthz", "[health] path", 'set path = "/healthz" under [health]'),
    # found by review: without its slash the fix offered `path = "healthz"`, which is refused
    ("HEALTH_CHECK_PATH=healthz", "[health] path", 'set path = "/healthz" under [health]'),
    # found by review: a URL there was offered back as `path = "/http://localhost:8080/..."`
    ("HEALTH_CHECK_PATH=http://localhost:8080/healthz", "[health] path",
     'set path = "/healthz" under [health]'),
])
def test_a_host_env_file_that_disagrees_with_the_environment_is_refused(
        tmp_path: Path, line: str, key: str, fix: str) -> None:
    """The host's own tooling reads these from its env file (CONTRACTS): a runbook looking
    elsewhere would miss the deploy's snapshots, or recreate under another project."""
    env_file = tmp_path / ".env.production"
    env_file.write_text(f"DATABASE_URL=postgresql://u:S3cretPW@db/x\n{line}\n")
    env_file.chmod(0o600)
    toml, error = refused_at_load(env_file)
    message = str(error)
    assert f"{env_file} sets {line}" in message and key in message and "\n" not in message
    assert error.fix is not None and fix in error.fix and str(toml) in error.fix
    assert "S3cretPW" not in message + error.fix


def test_the_host_env_files_snapshot_retention_days_is_the_retention_or_the_longer(
        tmp_path: Path) -> None:
    """Found by review: SNAPSHOT_RETENTION_DAYS was never read: our snapshots expired after
    7 days and `snapshot cleanup` deleted what the host keeps 30. It is the retention when
    the TOML sets none (the packaged files set none); when both say, the longer, never a
    refusal (a rollback must not stop on it); a value that is no number of days is not
    taken."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("DATABASE_URL=postgresql://u:S3cretPW@db/x\nSNAPSHOT_RETENTION_DAYS=30\n")
    env_file.chmod(0o600)
    toml = tmp_path / "production.toml"
    source = envmod.load("production").source
    assert source is not None
    packaged = source.read_text().replace('"/opt/togather/.env.production"', f'"{env_file}"')
    assert "\nretention_days" not in packaged  # the packaged file leaves it to the host
    toml.write_text(packaged)
    assert envmod.load(str(toml)).database.retention_days == 30
    toml.write_text(packaged.replace("[database]\n", "[database]\nretention_days = 30\n"))
    assert envmod.load(str(toml)).database.retention_days == 30  # both set, agreeing
    toml.write_text(packaged.replace("[database]\n", "[database]\nretention_days = 7\n"))
    assert envmod.load(str(toml)).database.retention_days == 30  # the longer
    toml.write_text(packaged.replace("[database]\n", "[database]\nretention_days = 60\n"))
    assert envmod.load(str(toml)).database.retention_days == 60
    toml.write_text(packaged)
    for bad in ("thirty", "0", "-5", "99999", "9" * 5000):
        env_file.write_text(f"SNAPSHOT_RETENTION_DAYS={bad}\n")
        assert envmod.load(str(toml)).database.retention_days == 7, bad  # not taken
    env_file.write_text("SNAPSHOT_RETENTION_DAYS=${KEEP_DAYS:-30}\n")  # the tooling's to expand
    assert envmod.load(str(toml)).database.retention_days == 7


def test_a_host_env_file_that_agrees_or_cannot_be_read_is_fine(tmp_path: Path) -> None:
    env_file = tmp_path / ".env.production"
    env_file.write_text("COMPOSE_PROJECT_NAME=togather-production # prod\n"
                        "HEALTH_CHECK_PATH='/health' # the full check\n"
                        "SNAPSHOT_DIR=/var/lib/togather/db-snapshots/\n# SNAPSHOT_DIR=/x\n")
    toml = tmp_path / "production.toml"
    toml.write_text(production_with(env_file))
    assert envmod.load(str(toml)).compose.env_file == env_file
    for unjudged in ("SNAPSHOT_DIR=${SNAPSHOT_ROOT:-/srv}/snapshots", "SNAPSHOT_DIR=$DATA/s",
                     "SNAPSHOT_DIR=./backups", "HEALTH_CHECK_PATH=${HEALTH_PATH}"):
        env_file.write_text(unjudged + "\n")  # the host's tooling expands or places these
        assert envmod.load(str(toml)).compose.env_file == env_file, unjudged
    env_file.unlink()  # the database URL's reader reports a missing file when it is needed
    assert envmod.load(str(toml)).compose.env_file == env_file
    # a host without compose (`docker run` slots) has no project to agree on
    env_file.write_text("COMPOSE_PROJECT_NAME=togather\n")
    text = toml.read_text()
    compose_file = 'file = "/opt/togather/src/deploy/docker/docker-compose.blue-green.yml"\n'
    assert compose_file in text
    toml.write_text(text.replace(compose_file, ""))
    assert envmod.load(str(toml)).compose.file is None


@pytest.mark.parametrize("written", ["~/snaps", "$HOME/snaps", "${HOME}/snaps", "~/snaps/", "~"])
def test_a_home_relative_snapshot_dir_in_the_env_file_is_not_judged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str) -> None:
    """Found by review: SNAPSHOT_DIR=$HOME/snaps (or ~/snaps) was judged against the home of
    the user running the runbook, so `sudo runbook rollback` (HOME=/root) refused every
    command, status too, and offered `snapshot_dir = "/root/snaps"`: a folder without the
    deploy's snapshots. It is the home of whoever runs the host's tooling: not judged."""
    monkeypatch.setenv("HOME", str(tmp_path / "root"))  # sudo: not the deploy user's home
    env_file = tmp_path / ".env.production"
    env_file.write_text(f"SNAPSHOT_DIR={written}\n")
    toml = tmp_path / "production.toml"
    text = production_with(env_file)
    default = 'snapshot_dir = "/var/lib/togather/db-snapshots"\n'
    assert default in text
    toml.write_text(text.replace(default, 'snapshot_dir = "/home/deploy/snaps"\n'))
    assert envmod.load(str(toml)).database.snapshot_dir == Path("/home/deploy/snaps")


def test_env_file_values_are_read_as_compose_reads_them(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("A=plain # a comment\nB='quoted # not a comment' # one\n"
                        'C="x#y"\nD=url#fragment\nexport E=e\nF=\nG="unclosed\n')
    assert envmod.read_env_file(env_file) == {
        "A": "plain", "B": "quoted # not a comment", "C": "x#y", "D": "url#fragment",
        "E": "e", "F": "", "G": '"unclosed'}


def test_an_exported_database_url_unlike_the_apps_env_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DATABASE_URL left in on-call's shell (another database) never silently replaces the
    env file's, the one the app reads: the guard and a restore would act on the wrong one."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("DATABASE_URL=postgresql://togather:Pr0dPW@togather-db:5432/togather\n")
    db = envmod.load("production").database.__class__(env_file=env_file)
    monkeypatch.setenv("DATABASE_URL", "postgresql://dev:D3vPW@localhost:5432/togather_dev")
    with pytest.raises(ConfigError) as refused:
        db.url()
    said = f"{refused.value} {refused.value.fix}"
    assert "differs from the one in" in said and str(env_file) in said, said
    assert "Pr0dPW" not in said and "D3vPW" not in said and "localhost" not in said, said
    # the same database in both places, however written, or an env file without it: the
    # exported one is used
    monkeypatch.setenv("DATABASE_URL", "postgresql://togather:Pr0dPW@togather-db:5432/togather")
    assert db.url() == "postgresql://togather:Pr0dPW@togather-db:5432/togather"
    same = "postgres://togather:Pr0d%50W@togather-db/togather?sslmode=disable"
    monkeypatch.setenv("DATABASE_URL", same)
    assert db.url() == same
    other = tmp_path / ".env.other"
    other.write_text("OTHER=1\n")
    monkeypatch.setenv("DATABASE_URL", "postgresql://dev:D3vPW@localhost:5432/togather_dev")
    assert db.__class__(env_file=other).url().endswith("/togather_dev")


@pytest.mark.parametrize("table,key,value,said", [
    ("database", "snapshot_dir", "", "is empty"),
    ("state", "file", "   ", "is empty"),
    ("caddy", "caddyfile", "", "is empty"),
    ("database", "snapshot_dir", "~nosuchuser-xyz/snaps", "does not have"),
    ("state", "file", "~nosuchuser-xyz/state.json", "does not have"),
])
def test_a_path_key_that_names_no_usable_path_is_refused_at_load(
        tmp_path: Path, table: str, key: str, value: str, said: str) -> None:
    """Found by review: `""` became the config file's own folder (pre-deploy dumps of the
    whole database written into /etc/togather-runbook/, or a state "file" that is a folder,
    refused only mid-run), and `~someone` of a user this machine lacks was a bare
    RuntimeError, exit 5. Both are the file's error: one line naming the key, exit 2."""
    path = tmp_path / "host.toml"
    path.write_text(NO_COMPOSE + f'[{table}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as err:
        envmod.load(str(path))
    assert err.value.exit_code == ExitCode.USAGE
    text = str(err.value)
    assert f"{table}.{key}: " in text and said in text, text  # the loader's list of problems


def test_an_ipv6_slot_host_makes_a_url_that_works(tmp_path: Path) -> None:
    """`host = "::1"` passed the loader, then every probe of that slot failed ("Port could
    not be cast to integer value"): a deploy learnt it only after recreating the standby."""
    path = tmp_path / "host.toml"
    path.write_text(NO_COMPOSE.replace('port = 8082\n', 'port = 8082\nhost = "::1"\n'))
    env = envmod.load(str(path))
    assert env.slot(Slot.GREEN).base_url == "http://[::1]:8082"
    import httpx

    assert httpx.URL(env.slot(Slot.GREEN).base_url + "/health").port == 8082


@pytest.mark.parametrize(("host", "bare", "port"), [
    ("127.0.0.1:18081", "127.0.0.1", 18081), ("[::1]:8081", "::1", 8081),
    ("localhost:8081", "localhost", 8081), ("togather-blue:8080", "togather-blue", 8080)])
def test_a_slot_host_holding_a_port_is_refused_at_load(tmp_path: Path, host: str, bare: str,
                                                       port: int) -> None:
    """Found by review: `host = "127.0.0.1:18081"` passed, base_url became
    http://[127.0.0.1:18081]:18081 and every probe failed for the whole gate, whose advice
    then pointed at `docker logs`. The port belongs in `port`."""
    path = tmp_path / "host.toml"
    path.write_text(NO_COMPOSE.replace("port = 8081\n", f'port = 8081\nhost = "{host}"\n'))
    with pytest.raises(ConfigError) as err:
        envmod.load(str(path))
    assert err.value.exit_code == ExitCode.USAGE
    problem = [line for line in str(err.value).splitlines() if "slots.blue.host" in line]
    assert len(problem) == 1, str(err.value)
    assert f'host = "{bare}"' in problem[0] and f"port = {port}" in problem[0], problem[0]


@pytest.mark.parametrize("host", ["::1", "[::1]", "fe80::1", "127.0.0.1", "localhost",
                                  "togather-blue"])
def test_a_slot_host_without_a_port_is_taken(tmp_path: Path, host: str) -> None:
    path = tmp_path / "host.toml"
    path.write_text(NO_COMPOSE.replace("port = 8081\n", f'port = 8081\nhost = "{host}"\n'))
    assert envmod.load(str(path)).slot(Slot.BLUE).host == host


def test_a_host_env_file_that_is_not_utf8_is_still_judged_never_refused(tmp_path: Path) -> None:
    """Found by review: a non-UTF-8 env file silently turned the agreement checks off, so
    the runbook probed /health where the host's tooling asks /healthz; refusing it instead
    stopped every command, the rollback's too (Compose reads such a file). It is judged on
    what it says: a disagreement is refused as any other, an agreeing file loads."""
    env_file = tmp_path / ".env.production"
    env_file.write_bytes(b"DATABASE_URL=postgresql://u:p\xe9ss@db/x\nHEALTH_CHECK_PATH=/healthz\n")
    _, error = refused_at_load(env_file)
    message = str(error)
    assert "HEALTH_CHECK_PATH=/healthz" in message and "'/health'" in message, message
    assert "p\xe9ss" not in message and "\n" not in message
    env_file.write_bytes(b"DATABASE_URL=postgresql://u:p\xe9ss@db/x\nHEALTH_CHECK_PATH=/health\n")
    assert envmod.load(str(tmp_path / "production.toml")).health.path == "/health"


def test_the_host_env_files_health_wait_timeout_is_the_gates_or_the_longer(
        tmp_path: Path) -> None:
    """Found by review: HEALTH_WAIT_TIMEOUT was never read, so a slot the host's tooling
    (deploy.sh waits ${HEALTH_WAIT_TIMEOUT:-60} s) gives 180 s was failed at 60 s and its
    start undone. It is the gate's timeout when [health] sets none; when both say, the longer
    (a gate that waits longer never makes an outage worse: traffic stays where it is)."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("DATABASE_URL=postgresql://u:S3cretPW@db/x\nHEALTH_WAIT_TIMEOUT=180\n")
    env_file.chmod(0o600)
    toml = tmp_path / "production.toml"
    packaged = production_with(env_file)
    assert "timeout_seconds = 60.0\n" in packaged
    toml.write_text(packaged)
    assert envmod.load(str(toml)).health.timeout == 180  # the longer
    toml.write_text(packaged.replace("timeout_seconds = 60.0\n", "timeout_seconds = 300\n"))
    assert envmod.load(str(toml)).health.timeout == 300  # the longer: ours
    toml.write_text(packaged.replace("timeout_seconds = 60.0\n", ""))
    env_file.write_text("HEALTH_WAIT_TIMEOUT=30 # the host's\n")
    assert envmod.load(str(toml)).health.timeout == 30  # unset here: the host's
    env_file.write_text("HEALTH_WAIT_TIMEOUT=${SLOW_HOST:-90}\n")  # the tooling's to expand
    assert envmod.load(str(toml)).health.timeout == 60  # the default
    env_file.write_text("HEALTH_WAIT_TIMEOUT=\n")  # `${X:-60}` reads empty as unset
    assert envmod.load(str(toml)).health.timeout == 60


@pytest.mark.parametrize("value", ["sixty", "0", "-5", "nan", "inf", "60s", "9" * 5000,
                                   "1000000", "3min"])
def test_a_health_wait_timeout_that_is_no_duration_is_not_taken_and_said(
        tmp_path: Path, value: str) -> None:
    """A host's HEALTH_WAIT_TIMEOUT the gate cannot read (`60s`, `3min`: what its tooling
    may accept) is not taken, and the plan's gate step says so: it only ever lengthens the
    gate, so refusing it at load (found by review) stopped every command, the rollback's
    too, over a gate that would have waited its own timeout anyway."""
    env_file = tmp_path / ".env.production"
    env_file.write_text(f"DATABASE_URL=postgresql://u:S3cretPW@db/x\nHEALTH_WAIT_TIMEOUT={value}\n")
    toml = tmp_path / "production.toml"
    toml.write_text(production_with(env_file))
    health = envmod.load(str(toml)).health
    assert health.timeout == 60, health
    said = health.timeout_source
    assert "HEALTH_WAIT_TIMEOUT" in said and str(env_file) in said and "not taken" in said, said
    assert "\n" not in said and "9" * 30 not in said and "S3cretPW" not in said, said


def test_a_health_check_path_given_as_a_url_is_judged_by_its_path(tmp_path: Path) -> None:
    """A URL in HEALTH_CHECK_PATH names its path: the same path as [health] path agrees;
    another is refused with the fix naming that path (never `/http://...`, which passed
    validation and broke every probe), and saying the variable holds a path."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("HEALTH_CHECK_PATH=http://localhost:8080/health\n")
    toml = tmp_path / "production.toml"
    toml.write_text(production_with(env_file))
    assert envmod.load(str(toml)).health.path == "/health"
    env_file.write_text("HEALTH_CHECK_PATH=http://localhost:8080/health/full?deep=1\n")
    with pytest.raises(ConfigError) as err:
        envmod.load(str(toml))
    said = f"{err.value} {err.value.fix}"
    assert 'path = "/health/full?deep=1"' in said and "/http:" not in said, said
    assert "a URL" in said, said


def test_command_arg_names_the_file_that_was_read_as_one_shell_word(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A printed fix names the environment the way that loads this very file: the bare name
    only where the name finds it; else the file, absolute (on-call may run it from another
    directory) and quoted (a space is one word). The oracle: the word, split as a shell
    splits it and loaded from elsewhere, reads the same file."""
    host = tmp_path / "etc"
    host.mkdir()
    monkeypatch.setattr(envmod, "SYSTEM_DIR", host)

    def loads_the_same(env: envmod.Environment) -> str:
        arg = envmod.command_arg(env)
        [word] = shlex.split(arg)
        loaded = envmod.load(word)
        assert env.source is not None and loaded.source is not None
        assert loaded.source.resolve() == env.source.resolve(), arg
        return arg

    assert loads_the_same(envmod.load("production")) == "production"  # the packaged file
    packaged = envmod.find_config("production")
    (host / "production.toml").write_text(packaged.read_text())  # the host's own now
    assert loads_the_same(envmod.load("prod")) == "production"
    # the packaged file by --config: the bare name now loads the host's, not this one
    assert loads_the_same(envmod.load("production", config=str(packaged))) == str(packaged)
    beside = host / "production-old.toml"  # a default place, another file
    beside.write_text(packaged.read_text())
    assert loads_the_same(envmod.load("production", config=str(beside))) == str(beside)
    spaced = tmp_path / "on call" / "prod's env.toml"
    spaced.parent.mkdir()
    spaced.write_text(packaged.read_text())
    monkeypatch.chdir(spaced.parent)
    env = envmod.load("production", config=spaced.name)  # relative, as typed
    monkeypatch.chdir(tmp_path)
    assert loads_the_same(env) == shlex.quote(str(spaced))


def _slots(blue: str = "togather-server-blue", green: str = "togather-server-green") -> str:
    return (f'[slots.blue]\ncontainer = "{blue}"\nport = 8081\n'
            f'[slots.green]\ncontainer = "{green}"\nport = 8082\n')


LONG = "x" * 300  # a file name longer than any Linux filesystem's NAME_MAX (255 bytes)


@pytest.mark.parametrize(("toml", "key", "words"), [
    # found by review: each passed, then the engine answered 301 (its router cleans `..`
    # and `.` out of /containers/../x/json) and the run said "docker failed ...: no detail",
    # exit 1; a newline was "is it a Docker engine?", exit 4
    (_slots(green="../x"), "slots.green.container", "'../x' is not a container name Docker"),
    (_slots(blue="."), "slots.blue.container", "is not a container name Docker takes"),
    (_slots(blue="x\\ny"), "slots.blue.container", "'x\\ny' is not a container name Docker"),
    (_slots(blue="a/b"), "slots.blue.container", "is not a container name Docker takes"),
    # found by review: one character passed and was then asked of Docker, whose engine
    # refuses it ("Invalid container name (b)": `docker create --name b` on 20.10)
    (_slots(blue="b"), "slots.blue.container", "'b' is not a container name Docker takes"),
    (_slots(green="9"), "slots.green.container", "at least 2 characters"),
    (_slots() + '[database]\ncontainer = "d"\n', "database.container", "at least 2"),
    (_slots() + '[database]\ncontainer = "../db"\n', "database.container",
     "'../db' is not a container name Docker takes"),
    (_slots() + '[compose]\nimage_repository = "../x"\n', "compose.image_repository",
     "'../x' is not an image repository Docker takes"),
    (_slots() + '[compose]\nimage_repository = "Togather/server"\n',
     "compose.image_repository", "is not an image repository Docker takes"),
    (_slots() + '[compose]\nimage_repository = "togather-server:latest"\n',
     "compose.image_repository", "holds a tag or digest: give the repository alone"),
    (_slots() + '[compose]\nimage_repository = "togather-server@sha256:abc"\n',
     "compose.image_repository", "holds a tag or digest"),
    # found by review: a component past NAME_MAX was "unexpected failure ... (a bug in
    # runbook...): OSError: [Errno 36] File name too long" in status
    (_slots() + f'[lock]\ndir = "/tmp/{LONG}"\n', "lock.dir", "(300 bytes) is longer than"),
    (_slots() + f'[logs]\nruns_dir = "runs/{LONG}/x"\n', "logs.runs_dir", "is longer than"),
])
def test_names_docker_or_the_filesystem_cannot_take_are_refused_at_load(
        tmp_path: Path, toml: str, key: str, words: str) -> None:
    bad = tmp_path / "production.toml"
    bad.write_text('name = "production"\n' + toml)
    with pytest.raises(ConfigError) as err:
        envmod.load(str(bad))
    message = str(err.value)
    assert err.value.exit_code == ExitCode.USAGE
    assert f"{bad}: {key}: " in message and words in message, message
    assert LONG not in message  # a long name is shown shortened
    assert "\n" not in message.split("\n  ", 1)[1], message  # the problem: one line


@pytest.mark.parametrize("repository", [
    "togather-server", "togather_server", "togather__server", "togather.server",
    "org/togather-server", "registry.example.org/togather/server",
    "registry.example.org:5000/togather/server", "localhost:5000/togather-server",
    "Registry.Example.org/togather", "ghcr.io/org-x/togather-server",
    "[fd00::1]:5000/togather-server", "[fd00::1]/togather"])
def test_image_repositories_docker_takes_are_taken(tmp_path: Path, repository: str) -> None:
    """The reference grammar's valid names (distribution/reference: lowercase path
    components, an optional registry host whose name may hold capitals, and its port)."""
    path = tmp_path / "production.toml"
    path.write_text(f'name = "production"\n{_slots()}[compose]\n'
                    f'image_repository = "{repository}"\n')
    assert envmod.load(str(path)).compose.image_repository == repository


@pytest.mark.parametrize(("blue", "green"), [
    ("togather-server-blue", "togather-server-green"), ("app_1.blue", "App-2.green"),
    ("b1", "g2"), ("a..b", "0-9"),
    # what compose names a service's container, v1 and v2: <project>_<service>_1 and -1
    ("togather-production_blue_1", "togather-production-green-1"), ("p_s_1", "p-s-1")])
def test_container_names_docker_takes_are_taken(tmp_path: Path, blue: str,
                                                green: str) -> None:
    path = tmp_path / "production.toml"
    path.write_text(f'name = "production"\n{_slots(blue, green)}')
    env = envmod.load(str(path))
    assert (env.slot("blue").container, env.slot("green").container) == (blue, green)


def test_the_readmes_example_environment_file_loads(tmp_path: Path) -> None:
    """The README's example (its first TOML block, which shows [slots.blue] and says "and
    [slots.green]") loads: its container names and image repository are valid."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.findall(r"```toml\n(.*?)```", readme, re.S)[0]
    data = tomllib.loads(block)
    data["slots"]["green"] = {"container": "togather-server-green",
                              "service": "togather-green", "port": 8082}
    env = envmod.from_mapping(data, tmp_path / "production.toml")
    assert env.compose.image_repository == "togather-server"
    assert env.database.container == "togather-db"
