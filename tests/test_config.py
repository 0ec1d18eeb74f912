"""One configuration for the aggregator: each setting is declared once in fl_plugins/config.py, and the
`fl-plugins server` flags and the recipe keys are derived from it (one default, one check); an error names the key
as the user wrote it; a flag wins over the recipe, a setting neither gives takes its default. No server starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import fl_plugins.config
from fl_plugins.cli import _parser, main, server_config
from fl_plugins.cli.server import given_flags
from fl_plugins.config import SETTINGS, AggregatorConfig
from fl_plugins.errors import ConfigError
from fl_plugins.recipe import load_recipe


def _recipe(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "train.py").write_text("print('hi')\n")
    p = tmp_path / "job.yaml"
    p.write_text(f"script: train.py\nsites: 2\nrounds: 3\n{extra}")
    return p


def _server_config(argv: list[str]) -> AggregatorConfig:
    """The AggregatorConfig `fl-plugins server ARGV` would start with."""
    args = _parser().parse_args(["server", *argv])
    return server_config(given_flags(args), None if args.recipe is None else load_recipe(args.recipe))


# -- an error names the key the user wrote -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("aggregation: {min_updates: 0}\n", "`aggregation.min_updates` must be an integer in 1..2 (got 0)"),
        ("aggregation: {max_attempts: 0}\n", "`aggregation.max_attempts` must be an integer >= 1 (got 0)"),
        ("aggregation: {site_timeout: .nan}\n", "`aggregation.site_timeout` must be a number > 0 (got nan)"),
        ("aggregation: {on_attempts_exhausted: retry}\n", "`aggregation.on_attempts_exhausted` must be 'fail' or"),
        ("transfer: {idle_timeout: .inf}\n", "`transfer.idle_timeout` must be a number > 0 (got inf)"),
        ("transfer: {chunk_mib: 0.1}\n", "`transfer.chunk_mib` must be a number of MiB that is a multiple of 8"),
        ("transfer: {chunk_mib: 128}\n", "`transfer.chunk_mib` must be a number of MiB that is a multiple of 8"),
        ("round_deadline: .inf\n", "`round_deadline` must be a number > 0, or null (got inf)"),
        ("min_sites: 0\n", "`min_sites` must be an integer in 1..2 (got 0)"),
    ],
)
def test_a_recipe_error_names_the_file_and_the_key(tmp_path, extra, expected):
    p = _recipe(tmp_path, extra)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: ") and expected in str(e.value)
    assert "--" not in str(e.value)  # no flag: the user wrote a recipe


def test_fl_plugins_server_reports_a_recipe_error_by_its_key(tmp_path, capsys):
    p = _recipe(tmp_path, "transfer: {idle_timeout: 0}\n")
    assert main(["server", str(p), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{p}: `transfer.idle_timeout` must be a number > 0 (got 0)" in err and "--idle-timeout" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--min-updates", "0", "`min_updates` (--min-updates) must be an integer >= 1 (got 0)"),
        ("--round-deadline", "0", "`round_deadline` (--round-deadline) must be a number > 0 (got 0.0)"),
        ("--site-timeout", "nan", "`site_timeout` (--site-timeout) must be a number > 0 (got nan)"),
        ("--chunk-bytes", "100", "`chunk_bytes` (--chunk-bytes) must be a multiple of 8 bytes in 64 KiB..64 MiB"),
        ("--chunk-bytes", "0", "`chunk_bytes` (--chunk-bytes) must be a multiple of 8 bytes"),
        ("--job-id", "x" * 129, "`job_id` (--job-id) must be a string of at most 128 characters"),
    ],
)
def test_a_flag_error_names_the_flag_with_or_without_a_recipe(tmp_path, capsys, flag, value, expected):
    p = _recipe(tmp_path)
    for argv in (["--rounds", "1"], [str(p)]):
        assert main(["server", *argv, "--run-dir", str(tmp_path / "run"), flag, value]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(p) not in err
    assert not (tmp_path / "run").exists()


def test_without_a_recipe_rounds_and_run_dir_are_required():
    with pytest.raises(ConfigError, match="fl-plugins server needs --rounds and --run-dir, or a recipe"):
        server_config({}, None)
    with pytest.raises(ConfigError, match="needs --run-dir, or a recipe"):
        server_config({"rounds": 2}, None)


# -- flags win over the recipe, which wins over the defaults ---------------------------------------------------
def test_a_flag_wins_over_the_recipe_and_a_flag_left_out_takes_the_recipe_value(tmp_path):
    p = _recipe(tmp_path, "aggregation: {min_updates: 2, site_timeout: 20, reject_nonfinite: true}\n")
    config = _server_config([str(p), "--min-updates", "1", "--rounds", "7", "--allow-nonfinite"])
    assert (config.min_updates, config.rounds, config.reject_nonfinite) == (1, 7, False)  # the flags'
    assert (config.site_timeout, config.min_sites) == (20.0, 2)  # the recipe's (min_sites: all its sites)
    assert config.run_dir == Path("runs") / "job" and config.recipe == load_recipe(p).identity()
    default = AggregatorConfig(run_dir=tmp_path, rounds=1)
    assert (config.idle_timeout, config.max_attempts) == (default.idle_timeout, default.max_attempts)
    assert _server_config([str(p), "--run-dir", str(tmp_path / "r")]).run_dir == tmp_path / "r"
    off = _recipe(tmp_path, "aggregation: {reject_nonfinite: false}\n")
    assert _server_config([str(off)]).reject_nonfinite is False  # the switch left out: the recipe's value


def test_a_recipe_null_is_a_key_left_out(tmp_path):
    p = _recipe(tmp_path, "round_deadline: null\naggregation: {min_updates: null}\ntransfer: {chunk_mib: null}\n")
    config = load_recipe(p).federation.aggregator_config(tmp_path)
    assert config == AggregatorConfig(run_dir=tmp_path, rounds=3, min_sites=2)


# -- one declaration: the flags, the recipe keys and the defaults come from config.py --------------------------
def test_every_default_is_the_fields_and_reaches_the_flags_and_the_recipe(tmp_path):
    fields = {f.name: f for f in dataclasses.fields(AggregatorConfig)}
    for name, s in SETTINGS.items():
        assert s.required or s.default == fields[name].default
    without_recipe = _server_config(["--run-dir", str(tmp_path), "--rounds", "3", "--min-sites", "2"])
    fed = load_recipe(_recipe(tmp_path)).federation
    from_recipe = fed.aggregator_config(tmp_path)
    assert without_recipe == from_recipe == AggregatorConfig(run_dir=tmp_path, rounds=3, min_sites=2)
    for name, s in SETTINGS.items():
        if s.key is not None and name not in ("rounds", "min_sites"):
            assert getattr(fed, name) == s.default  # the recipe left it out


def test_the_server_flags_are_the_settings_flags():
    server = next(a for a in _parser()._actions if a.dest == "command").choices["server"]
    by_flag = {o: a for a in server._actions for o in a.option_strings}
    assert {s.flag for s in SETTINGS.values() if s.flag} <= set(by_flag)
    others = {"-h", "--help", "--address", "--kit", "--insecure", "--tracking", "--log-level"}
    assert set(by_flag) - {s.flag for s in SETTINGS.values()} == others
    for s in SETTINGS.values():
        if s.flag is not None:
            action = by_flag[s.flag]
            assert action.dest == s.name and action.default is None  # left out: the recipe's value or the default
            if s.key is not None:
                assert f"recipe: {s.key}" in action.help


def test_the_help_shows_config_py_defaults(monkeypatch, capsys):
    monkeypatch.setitem(SETTINGS, "site_timeout", dataclasses.replace(SETTINGS["site_timeout"], default=42.0))
    with pytest.raises(SystemExit):
        main(["server", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 42; recipe: aggregation.site_timeout)" in out
    assert "(default: 4194304 = 4 MiB; recipe: transfer.chunk_mib, in MiB)" in out
    assert "(default: 3; recipe: aggregation.max_attempts)" in out


def test_the_module_docstring_table_lists_every_setting():
    lines = fl_plugins.config.__doc__.splitlines()
    rows = {words[0]: line for line in lines if (words := line.split()) and words[0] in SETTINGS}
    assert set(rows) == set(SETTINGS)
    for name, s in SETTINGS.items():
        assert s.flag is None or s.flag in rows[name]
        assert s.key is None or s.key in rows[name]


def test_the_config_is_frozen(tmp_path):
    config = AggregatorConfig(run_dir=str(tmp_path), rounds=1)
    assert config.run_dir == tmp_path  # a str becomes a Path
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 2  # type: ignore[misc]
