"""Configuration: precedence, every error class (library and CLI), config init/show/validate, README reference."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tagwriter import config as config_mod
from tagwriter.cli.app import app
from tagwriter.cli.config_cmd import commented_toml
from tagwriter.config import Config, load
from tagwriter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TAGWRITER_* from the outside, and a folder without ./tagwriter.toml."""
    import os

    for name in list(os.environ):
        if name.startswith("TAGWRITER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- precedence ----------------------------------------------------------------


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[writer]\nbatch_size = 100\nflush_interval = 2.0\n[buffer]\ncapacity = 5000\n")
    env = {"TAGWRITER_WRITER__BATCH_SIZE": "200", "TAGWRITER_WRITER__FLUSH_INTERVAL": "3"}
    c = load(path, env=env, overrides={"writer.batch_size": 300})
    assert c.writer.batch_size == 300  # flag beats env
    assert c.writer.flush_interval == 3.0  # env beats file
    assert c.buffer.capacity == 5000  # file beats default
    assert c.writer.shutdown_timeout == 10.0  # default


def test_default_path_is_used_when_present(tmp_path: Path) -> None:
    assert load(env={}).writer.batch_size == 500
    write(tmp_path, "[writer]\nbatch_size = 42\n", "tagwriter.toml")
    assert load(env={}).writer.batch_size == 42


def test_env_list_and_bool_values(tmp_path: Path) -> None:
    c = load(None, env={"TAGWRITER_WRITER__RETRY_DELAYS": "0.5, 1,2", "TAGWRITER_BACKUP__AUTO_REPLAY": "off"})
    assert c.writer.retry_delays == [0.5, 1.0, 2.0]
    assert c.backup.auto_replay is False


# -- every error class, at the library -----------------------------------------


ERRORS = [
    ("[writr]\nx = 1\n", {}, r"c\.toml: unknown section \[writr\] \(did you mean 'writer'\?\)"),
    ("[writer]\nbatchsize = 1\n", {}, r"unknown key writer\.batchsize \(did you mean 'batch_size'\?\)"),
    ('[writer]\nbatch_size = "ten"\n', {}, r'writer\.batch_size = "ten": must be an integer'),
    ("[writer]\nbatch_size = 0\n", {}, r"writer\.batch_size = 0: must be between 1 and 10000"),
    ("[writer]\nretry_delays = [1, -2]\n", {}, r"writer\.retry_delays = \[1\.0, -2\.0\]: must be between 0 and 3600"),
    ('[buffer]\noverflow_policy = "drop-old"\n', {},
     r"buffer\.overflow_policy = \"drop-old\": must be one of drop-oldest, spill, block \(did you mean 'drop-oldest'"),
    ('[database]\ntable = "x; drop table y"\n', {}, r"database\.table = .*: not a valid SQL identifier"),
    ("[buffer]\ncapacity = 100\n[writer]\nbatch_size = 500\n", {},
     r"writer\.batch_size = 500: must not exceed buffer\.capacity = 100"),
    ('[database]\nurl = "mysql://x"\n', {}, r"database\.url = 'mysql://x': unknown database kind"),
    ("[writer]\nbatch_size = 10\nflush = [\n", {}, r"c\.toml:3: TOML syntax error"),
    ("[writer]\nbatch_size = = 1\n", {}, r"c\.toml:2: TOML syntax error"),
    ("", {"TAGWRITER_WRITER__BATCH_SIZE": "many"},
     r"environment TAGWRITER_WRITER__BATCH_SIZE = 'many': must be an integer"),
    ("", {"TAGWRITER_BACKUP__AUTO_REPLAY": "maybe"}, r"TAGWRITER_BACKUP__AUTO_REPLAY = 'maybe': must be true or false"),
    ("", {"TAGWRITER_METRICS__PORT": "tcp://10.96.0.12:9108"},
     r"environment TAGWRITER_METRICS__PORT = 'tcp://10\.96\.0\.12:9108': must be an integer"),
]


@pytest.mark.parametrize(("text", "env", "pattern"), ERRORS)
def test_error_names_the_key_and_what_is_allowed(tmp_path: Path, text: str, env: dict[str, str], pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env=env)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file") as info:
        load(tmp_path / "nope.toml", env={})
    assert "config init" in info.value.hint


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, "[database]\npassword = 12345\n"), env={})
    assert "12345" not in str(info.value)
    assert "database.password = ***: must be a string" in str(info.value)


# -- every error class, at the CLI: one line on stderr, exit 1, no traceback ------


@pytest.mark.parametrize(("text", "env", "pattern"), ERRORS)
def test_cli_reports_config_errors_in_one_line(tmp_path: Path, text: str, env: dict[str, str], pattern: str) -> None:
    path = write(tmp_path, text)
    for args in (["--config", str(path), "config", "validate"], ["--config", str(path), "run", "--duration", "1"]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 1, result.output
        first = result.stderr.splitlines()[0]
        assert first.startswith("error: ") and re.search(pattern, first), result.stderr
        assert "Traceback" not in result.output and "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) <= 2  # the error, and at most a hint


def test_cli_missing_config_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--config", str(tmp_path / "missing.toml"), "config", "show"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing.toml'}: no such config file",
                                          "hint: tagwriter config init writes one"]


def test_cli_config_from_env_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[writer]\nbatch_size = 77\n")
    result = runner.invoke(app, ["config", "show"], env={"TAGWRITER_CONFIG": str(path)})
    assert result.exit_code == 0
    assert tomllib.loads(result.stdout)["writer"]["batch_size"] == 77


# -- config init ---------------------------------------------------------------


def test_config_init_writes_every_key_with_comments_and_loads_back(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "init"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "tagwriter.toml").read_text()
    data = tomllib.loads(text)
    assert data == Config().to_dict(redact=False)
    for key, _default, help_text in config_mod.describe():
        section, name = key.split(".")
        assert name in data[section]
        assert f"# {help_text}" in text
    assert load(tmp_path / "tagwriter.toml", env={}) == Config()


def test_config_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = write(tmp_path, "# mine\n", "mine.toml")
    result = runner.invoke(app, ["config", "init", str(target)])
    assert result.exit_code == 1
    assert "already exists; not overwritten" in result.stderr and "--force" in result.stderr
    assert target.read_text() == "# mine\n"
    result = runner.invoke(app, ["config", "init", str(target), "--force"])
    assert result.exit_code == 0
    assert tomllib.loads(target.read_text())["writer"]["batch_size"] == 500


def test_config_init_into_a_missing_folder_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "init", str(tmp_path / "no" / "such" / "dir.toml")])
    assert result.exit_code == 1
    assert "cannot write" in result.stderr


def test_commented_toml_never_writes_secrets() -> None:
    secret = Config().replace(database=config_mod.DatabaseConfig(password="hunter2", wallet_password="w4llet"))
    text = commented_toml(secret)
    assert "hunter2" not in text and "w4llet" not in text


# -- config show ---------------------------------------------------------------


def test_config_show_prints_the_merged_config_with_secrets_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://app:filepass@db:5432/plant"\nwallet_password = "w4llet"\n'
                           "[writer]\nbatch_size = 250\n")
    result = runner.invoke(
        app, ["--config", str(path), "--log-level", "debug", "config", "show"],
        env={"TAGWRITER_DATABASE_PASSWORD": "envsecret", "TAGWRITER_BUFFER__CAPACITY": "9000"},
    )
    assert result.exit_code == 0, result.output
    for secret in ("filepass", "envsecret", "w4llet"):
        assert secret not in result.output
    data = tomllib.loads(result.stdout)
    assert data["database"]["url"] == "postgresql://app:***@db:5432/plant"
    assert data["database"]["password"] == "***"
    assert data["database"]["wallet_password"] == "***"
    assert data["writer"]["batch_size"] == 250  # file
    assert data["buffer"]["capacity"] == 9000  # env
    assert data["logging"]["level"] == "DEBUG"  # global flag
    assert data["writer"]["shutdown_timeout"] == 10.0  # default
    assert result.stdout.startswith(f"# effective config: {path} + environment TAGWRITER_BUFFER__CAPACITY, ")


def test_config_show_without_a_file_says_defaults() -> None:
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0
    assert result.stdout.startswith("# effective config: built-in defaults\n")
    assert tomllib.loads(result.stdout) == Config().to_dict()


# -- config validate -------------------------------------------------------------


def test_config_validate_ok_and_path_argument(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///x.db"\n')
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ok: {path} is valid (database sqlite:///x.db, source simulate)"
    bad = write(tmp_path, "[writer]\nbatch_size = -1\n", "bad.toml")
    # The argument wins over --config.
    result = runner.invoke(app, ["--config", str(path), "config", "validate", str(bad)])
    assert result.exit_code == 1
    assert "writer.batch_size = -1" in result.stderr


def test_config_validate_applies_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[buffer]\ncapacity = 1000\n")
    result = runner.invoke(app, ["config", "validate", str(path)], env={"TAGWRITER_WRITER__BATCH_SIZE": "5000"})
    assert result.exit_code == 1
    assert "writer.batch_size = 5000: must not exceed buffer.capacity = 1000" in result.stderr


# -- README ------------------------------------------------------------------------


def test_readme_reference_lists_every_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Configuration reference")
    table = readme[start:readme.index("\n## ", start + 1)]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", table, re.M)}
    missing = [key for key, _, _ in config_mod.describe() if key not in rows]
    assert not missing, f"README.md Configuration reference lacks {missing}; regenerate it from config.describe()"
    wrong = [key for key, default, _ in config_mod.describe() if rows[key] != default]
    assert not wrong, f"README.md shows other defaults for {wrong}"


# -- secrets in URLs and connect strings ------------------------------------------


@pytest.mark.parametrize(("url", "user", "password", "host", "name"), [
    ("oracle://a:p@ss@h/x", "a", "p@ss", "h", "x"),
    ("oracle://a:p/ss@h:1522/x", "a", "p/ss", "h", "x"),
    ("postgresql://app:p:w@d@db:5432/plant", "app", "p:w@d", "db", "plant"),
    ("postgresql://app@db/plant", "app", "", "db", "plant"),
    ("oracle://db:1521/svc", "", "", "db", "svc"),
])
def test_url_user_info_ends_at_the_last_at_sign(url: str, user: str, password: str, host: str, name: str) -> None:
    parsed = config_mod.parse_url(url)
    assert (parsed.user, parsed.password, parsed.host, parsed.name) == (user, password, host, name)
    shown = config_mod.redact_url(url)
    assert shown == url.replace(f":{password}@", ":***@") if password else shown == url
    if password:
        assert password not in shown


@pytest.mark.parametrize(("url", "secret"), [
    ("oracle://a:p/ss@h:99999/x", "p/ss"),
    ("oracle://a:p@ss@h:port/x", "p@ss"),
    ("postgresql://u:s3cr3t@h:0x/x?password=s3cr3t", "s3cr3t"),
])
def test_url_errors_show_the_url_redacted(url: str, secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.parse_url(url)
    assert "bad port" in str(info.value)
    assert secret not in str(info.value)
    assert "***" in str(info.value)


def test_dsn_and_password_query_parameters_are_redacted() -> None:
    c = load(None, env={}, overrides={
        "database.url": "postgresql://app@db:5432/plant?sslmode=require&password=qp4ss&x=1",
        "database.dsn": "scott/t1ger@dbhost:1521/orclpdb?wallet_password=wp4ss",
    })
    shown = c.to_dict()["database"]
    assert shown["url"] == "postgresql://app@db:5432/plant?sslmode=require&password=***&x=1"
    assert shown["dsn"] == "scott/***@dbhost:1521/orclpdb?wallet_password=***"
    assert c.to_dict(redact=False)["database"]["dsn"] == "scott/t1ger@dbhost:1521/orclpdb?wallet_password=wp4ss"
    assert config_mod.redact_dsn("orclpdb_high") == "orclpdb_high"  # a TNS alias has no secret


SECRET_CONFIG = """[database]
url = "oracle://scott:p@ss/w0rd@dbhost:1521/orclpdb?password=qp4ss"
dsn = "scott/dsn@pw@dbhost/orclpdb"
"""


def test_config_show_and_validate_never_print_url_or_dsn_passwords(tmp_path: Path) -> None:
    path = write(tmp_path, SECRET_CONFIG)
    for args in (["config", "show"], ["config", "validate"], ["run", "--duration", "0.1"]):
        result = runner.invoke(app, ["--config", str(path), *args], env={"TAGWRITER_WRITER__BATCH_SIZE": "0"})
        assert result.exit_code == 1  # the env error: the URL and dsn are parsed (and shown) first
        for secret in ("p@ss", "w0rd", "qp4ss", "dsn@pw", "pw@"):
            assert secret not in result.output, (args, result.output)
    shown = runner.invoke(app, ["--config", str(path), "config", "show"])
    assert shown.exit_code == 0, shown.output
    data = tomllib.loads(shown.stdout.split("\n", 1)[1])
    assert data["database"]["url"] == "oracle://scott:***@dbhost:1521/orclpdb?password=***"
    assert data["database"]["dsn"] == "scott/***@dbhost/orclpdb"
    ok = runner.invoke(app, ["--config", str(path), "config", "validate"])
    assert ok.exit_code == 0 and "oracle://scott:***@dbhost:1521/orclpdb?password=***" in ok.stdout
    for secret in ("p@ss", "w0rd", "qp4ss", "dsn@pw"):
        assert secret not in shown.output + ok.output


def test_bad_url_error_at_the_cli_is_redacted(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "oracle://a:p/ss@h:99999/x"\n')
    result = runner.invoke(app, ["--config", str(path), "config", "validate"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == "error: database.url = 'oracle://a:***@h:99999/x': bad port"
    assert "p/ss" not in result.output


# -- where a bad value came from ----------------------------------------------------


def test_a_bad_value_names_its_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '# comment\n[buffer]\ncapacity = 10\n\n[writer]\nflush_interval = 1\n"batch_size" = 0\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:7: writer\.batch_size = 0: must be between"):
        load(path, env={})


def test_a_bad_value_in_an_inline_table_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "writer = { batch_size = 0 }\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: writer\.batch_size = 0: must be between"):
        load(path, env={})


def test_a_bad_value_names_its_environment_variable(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigValueError) as info:
        load(None, env={"TAGWRITER_WRITER__BATCH_SIZE": "0"})
    assert str(info.value) == ("environment TAGWRITER_WRITER__BATCH_SIZE: "
                               "writer.batch_size = 0: must be between 1 and 10000")
    assert (info.value.key, info.value.origin) == ("writer.batch_size", "env")


def test_a_bad_override_names_its_origin(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigValueError) as info:
        load(None, env={}, overrides={"writer.batch_size": 0}, origins={"writer.batch_size": "--batch-size"})
    assert str(info.value) == "--batch-size: writer.batch_size = 0: must be between 1 and 10000"
    assert info.value.origin == "flag"


# -- the environment scheme: TAGWRITER_<SECTION>__<KEY> -------------------------------

# What Kubernetes injects into every pod of a namespace with Services `tagwriter` and `tagwriter-metrics`,
# plus an unrelated variable of the same prefix.
KUBERNETES_ENV = {
    "TAGWRITER_PORT": "tcp://10.96.0.12:9108",
    "TAGWRITER_PORT_9108_TCP": "tcp://10.96.0.12:9108",
    "TAGWRITER_PORT_9108_TCP_PROTO": "tcp",
    "TAGWRITER_PORT_9108_TCP_PORT": "9108",
    "TAGWRITER_PORT_9108_TCP_ADDR": "10.96.0.12",
    "TAGWRITER_SERVICE_HOST": "10.96.0.12",
    "TAGWRITER_SERVICE_PORT": "9108",
    "TAGWRITER_METRICS_PORT": "tcp://10.96.0.13:9108",
    "TAGWRITER_METRICS_PORT_9108_TCP": "tcp://10.96.0.13:9108",
    "TAGWRITER_METRICS_SERVICE_HOST": "10.96.0.13",
    "TAGWRITER_METRICS_SERVICE_PORT": "9108",
    "TAGWRITER_HOME": "/x",
}


def test_kubernetes_service_links_are_not_config() -> None:
    heard: list[str] = []
    assert load(None, env=KUBERNETES_ENV, warn=heard.append) == Config()
    assert heard == []


def test_kubernetes_service_links_do_not_stop_the_commands(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "sqlite:///x.db"\n')
    env = {**KUBERNETES_ENV, "TAGWRITER_WRITER__BATCH_SIZE": "250"}
    result = runner.invoke(app, ["config", "validate", str(path)], env=env)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout.startswith(f"ok: {path}") and "is valid (database sqlite:///x.db" in result.stdout
    shown = runner.invoke(app, ["config", "show", str(path)], env=env)
    assert (shown.exit_code, shown.stderr) == (0, ""), shown.output
    data = tomllib.loads(shown.stdout)
    assert data["writer"]["batch_size"] == 250 and data["metrics"]["port"] == 0
    ran = runner.invoke(app, ["--config", str(path), "run", "--duration", "0.2", "--no-panel"], env=env)
    assert ran.exit_code == 0, ran.output
    assert "TAGWRITER_" not in ran.stderr


def test_a_name_that_is_no_key_warns_with_did_you_mean_and_goes_on(tmp_path: Path) -> None:
    heard: list[str] = []
    env = {"TAGWRITER_WRITER__BATCHSIZE": "5", "TAGWRITER_WRITR__BATCH_SIZE": "5", "TAGWRITER_NOPE__X": "5"}
    assert load(None, env=env, warn=heard.append) == Config()
    suggestion = "(did you mean TAGWRITER_WRITER__BATCH_SIZE?); ignored"
    assert heard == [
        "environment TAGWRITER_NOPE__X: not a config key (names are TAGWRITER_<SECTION>__<KEY>); ignored",
        f"environment TAGWRITER_WRITER__BATCHSIZE: not a config key {suggestion}",
        f"environment TAGWRITER_WRITR__BATCH_SIZE: not a config key {suggestion}",
    ]
    result = runner.invoke(app, ["config", "validate"], env={"TAGWRITER_WRITER__BATCHSIZE": "5"})
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: environment TAGWRITER_WRITER__BATCHSIZE: not a config key "
                             "(did you mean TAGWRITER_WRITER__BATCH_SIZE?); ignored\n")


def test_a_key_in_the_old_single_underscore_scheme_warns_with_its_new_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="tagwriter.config"):
        c = load(None, env={"TAGWRITER_DATABASE_URL": "sqlite:///old.db", "TAGWRITER_METRICS_PORT": "9464"})
    assert c == Config()  # never read as config: TAGWRITER_METRICS_PORT is also what a Service link is named
    assert [r.getMessage() for r in caplog.records] == [
        "environment TAGWRITER_DATABASE_URL: ignored: config variables are named TAGWRITER_<SECTION>__<KEY> now; "
        "set TAGWRITER_DATABASE__URL for database.url",
        "environment TAGWRITER_METRICS_PORT: ignored: config variables are named TAGWRITER_<SECTION>__<KEY> now; "
        "set TAGWRITER_METRICS__PORT for metrics.port",
    ]


def _env_text(value: object, annotation: str) -> str | None:
    """A default as an environment variable would give it; None for a table (set in the file only)."""
    if annotation.startswith(("dict", "list[dict")):
        return None
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def test_every_key_has_a_double_underscore_name() -> None:
    defaults = Config()
    env = {}
    for key, _, _ in config_mod.describe():
        section, _, name = key.partition(".")
        annotation = next(str(f.type) for f in dataclasses.fields(getattr(defaults, section)) if f.name == name)
        text = _env_text(getattr(getattr(defaults, section), name), annotation)
        if text is not None:
            env[config_mod.env_name(section, name)] = text
    assert "TAGWRITER_BACKUP__QUARANTINE_DIRECTORY" in env and "TAGWRITER_MQTT__TOPICS" in env
    heard: list[str] = []
    assert load(None, env=env, warn=heard.append) == Config() and heard == []
    assert load(None, env={"TAGWRITER_METRICS__PORT": "9464"}).metrics.port == 9464


def test_password_variables_keep_their_names() -> None:
    env = {"TAGWRITER_DATABASE_PASSWORD": "pw", "TAGWRITER_DATABASE_WALLET_PASSWORD": "wpw"}
    c = load(None, env=env)
    assert (c.database.password, c.database.wallet_password) == ("pw", "wpw")
    both = load(None, env={**env, "TAGWRITER_DATABASE__PASSWORD": "pw2"})
    assert both.database.password == "pw2"  # the scheme's own name wins


def test_test_and_cli_variables_are_never_config() -> None:
    heard: list[str] = []
    env = {"TAGWRITER_TEST_ORACLE_URL": "oracle://u:p@h/s", "TAGWRITER_TEST_ORACLE_PASSWORD": "p",
           "TAGWRITER_TEST_PG_ADMIN": "host=x", "TAGWRITER_TEST__WRITER": "1", "TAGWRITER_CONFIG": "elsewhere.toml"}
    assert load(None, env=env, warn=heard.append) == Config() and heard == []


# -- files that cannot be used ---------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes("[writer]\nbatch_size = 10 # d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: not UTF-8 \(byte 0xe9 at column 20\)$"):
        load(path, env={})
    result = runner.invoke(app, ["--config", str(path), "config", "validate"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {path}:2: not UTF-8 (byte 0xe9 at column 20)",
                                          "hint: save the file as UTF-8"]


def test_a_log_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    from tagwriter.logs import configure_logging

    afile = write(tmp_path, "x", "afile")
    for bad in (tmp_path, afile / "x.log"):
        with pytest.raises(ConfigError, match=rf"^logging\.file = '{re.escape(str(bad))}': cannot open: "):
            configure_logging("INFO", bad)
        for args in (["--log-file", str(bad), "run", "--duration", "0.1"],
                     ["config", "show"]):
            env = {"TAGWRITER_LOGGING__FILE": str(bad)} if args[0] == "config" else {}
            result = runner.invoke(app, args, env=env)
            if args[0] == "config":
                assert result.exit_code == 0  # config show opens no log
                continue
            assert result.exit_code == 1, result.output
            assert result.stderr.startswith(f"error: logging.file = '{bad}': cannot open: "), result.stderr
            assert "Traceback" not in result.output


def test_a_table_from_the_environment_is_refused_with_where_to_set_it() -> None:
    with pytest.raises(ConfigError, match="TAGWRITER_MODBUS__REGISTERS: a table is set in the config file"):
        load(None, env={"TAGWRITER_MODBUS__REGISTERS": "x"})
