"""Config fields are type-checked at the boundary (Python and command line), and the command line
rejects bad arguments before any data is read, any model is built or anything is printed."""
import argparse
import dataclasses
import json
import os
import typing

import pytest

import tnlib.__main__ as cli
from tnlib.models import ModelConfig, create_model, get_config
from tnlib.train import TrainConfig

# ---------------------------------------------------------------- ModelConfig / TrainConfig fields


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("TRUE", True), ("fAlSe", False),
                                         ("1", True), ("0", False), (1, True), (0, False), (True, True)])
def test_bool_fields_parse(text, value):
    assert get_config("tnl-tiny", gate=text).gate is value
    assert TrainConfig(compile=text).compile is value


@pytest.mark.parametrize("bad", ["maybe", "yes", "", 2, 0.5, "2"])
def test_bool_fields_reject(bad):
    with pytest.raises(ValueError, match=r"ModelConfig\.gate=.*expected a boolean: true or false"):
        get_config("tnl-tiny", gate=bad)


def test_create_model_string_false_turns_the_gate_off():
    # "False" is a non-empty string: it used to be stored as is, and was truthy
    assert create_model("tnl-tiny", gate="False").config.gate is False
    with pytest.raises(ValueError, match=r"ModelConfig\.gate='maybe'"):
        create_model("tnl-tiny", gate="maybe")


def test_int_and_float_fields():
    cfg = get_config("tnl-tiny", d_model="256", n_heads=4.0, norm_eps="1e-5", rope_theta=500000)
    assert (cfg.d_model, cfg.n_heads, cfg.norm_eps, cfg.rope_theta) == (256, 4, 1e-5, 500000.0)
    assert type(cfg.n_heads) is int and type(cfg.rope_theta) is float
    for field, bad, what in (("d_model", "abc", "an integer"), ("d_model", 1.5, "an integer"),
                             ("d_model", True, "an integer"), ("norm_eps", "abc", "a number"),
                             ("norm_eps", False, "a number")):
        with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={bad!r}: expected {what}"):
            get_config("tnl-tiny", **{field: bad})


def test_choices():
    with pytest.raises(ValueError, match=r"ModelConfig\.norm='batch': expected one of \('srms', 'rms', 'layer'\)"):
        get_config("tnl-tiny", norm="batch")
    with pytest.raises(ValueError, match=r"TrainConfig\.dtype='fp8': expected one of \('auto', 'bf16', 'fp16', 'fp32'\)"):
        TrainConfig(dtype="fp8")


def test_train_config_parses_strings():
    cfg = TrainConfig(lr="6e-4", max_steps="1e3", max_tokens="none", max_minutes="1.5", fused_loss="NULL",
                      eval_sets="val,eval-heldout", compile="true", model_overrides={"gate": "false"})
    assert (cfg.lr, cfg.max_steps, cfg.max_tokens, cfg.max_minutes, cfg.fused_loss) == (6e-4, 1000, None, 1.5, None)
    assert cfg.eval_sets == ("val", "eval-heldout") and cfg.compile is True
    assert cfg.model_overrides == {"gate": False}  # parsed as the model config parses it
    with pytest.raises(ValueError, match=r"TrainConfig\.lr='abc': expected a number"):
        TrainConfig(lr="abc")
    with pytest.raises(ValueError, match=r"TrainConfig\.max_steps=0: expected an integer >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"ModelConfig\.positional='rope'"):
        TrainConfig(model_overrides={"positional": "rope"})
    with pytest.raises(ValueError, match="unknown config overrides"):
        TrainConfig(model_overrides={"gated": True})


_WRONG = {bool: "maybe", int: "abc", float: "abc", str: 123, dict: "x", tuple: 5}


def _wrong_values(cls):
    """One wrong value per field of ``cls``, by its declared type: every field, new ones included."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args else (typing.get_origin(tp) or tp)
        yield pytest.param(f.name, _WRONG[base], id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("field, bad", list(_wrong_values(ModelConfig)))
def test_every_model_field_is_checked(field, bad):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        get_config("tnl-tiny", **{field: bad})


@pytest.mark.parametrize("field, bad", list(_wrong_values(TrainConfig)))
def test_every_train_field_is_checked(field, bad):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**{field: bad})


def test_saved_configs_still_load():
    cfg = get_config("tnl-tiny")
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ---------------------------------------------------------------- the command line


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything reads data, builds or loads a model, or trains."""
    import tnlib.data
    import tnlib.models
    import tnlib.train

    def forbidden(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for mod, name in ((tnlib.train, "train"), (tnlib.data.TokenFile, "open"), (tnlib.data, "load_tokenizer"),
                      (tnlib.models, "load_model"), (tnlib.models, "build_model"), (tnlib.train, "build_model")):
        monkeypatch.setattr(mod, name, forbidden)


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--model", "gate=maybe"], r"ModelConfig\.gate='maybe': expected a boolean"),
    (["--model", "norm=batch"], r"ModelConfig\.norm='batch': expected one of"),
    (["--model", "d_model=big"], r"ModelConfig\.d_model='big': expected an integer"),
    (["--set", "lr=abc"], r"TrainConfig\.lr='abc': expected a number"),
    (["--set", "compile=maybe"], r"TrainConfig\.compile='maybe': expected a boolean"),
    (["--set", "dtype=fp8"], r"TrainConfig\.dtype='fp8': expected one of"),
    (["--set", "max_steps=0"], r"TrainConfig\.max_steps=0: expected an integer >= 1"),
    (["--set", "lr"], "expected key=value"),
    (["--set", "learning_rate=1"], "unknown training options"),
])
def test_train_rejects_bad_values_before_any_work(extra, message, no_work, capsys, tmp_path):
    code, out, err = _run(["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (err, code)
    import re

    assert re.search(message, err), (err, code)
    assert out == "" and not (tmp_path / "run").exists()


def test_train_cli_parses_values(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("tnlib.train.train", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and {})
    cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--model", "gate=False",
              "--set", "lr=3e-4", "compile=TRUE", "eval_sets=val,eval-heldout", "max_minutes=none"])
    cfg = seen["cfg"]
    assert cfg.model_overrides == {"gate": False} and cfg.lr == 3e-4 and cfg.compile is True
    assert cfg.eval_sets == ("val", "eval-heldout") and cfg.max_minutes is None


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--top-p", "2"], ["--top-p", "0"], ["--top-k", "0"],
                                  ["--max-new-tokens", "0"], ["--temperature", "hot"]])
def test_generate_rejects_bad_sampling_before_loading(args, no_work, capsys, tmp_path):
    code, out, err = _run(["generate", "--checkpoint", str(tmp_path), "--tokenizer", "t.json", "--prompt",
                           "It was", *args], capsys)
    assert code == 2 and args[0] in err and out == ""  # argparse's usage error; the prompt was not printed


def test_generate_suggests_final(no_work, capsys, tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    code, out, err = _run(["generate", "--checkpoint", str(tmp_path), "--tokenizer", "t.json", "--prompt", "x"], capsys)
    assert code == 2 and err.startswith("error: ") and f"did you mean {tmp_path / 'final'}" in err and out == ""


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        text = " ".join(sub.format_help().split())  # unwrapped
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"`{name} {action.option_strings}` has no help text"
            d = action.default
            if action.required or d is None or d is False or (isinstance(d, (str, list)) and not d):
                continue  # nothing to show: the help text says what happens
            assert " ".join(f"(default: {d})".split()) in text, f"`{name} {action.option_strings}` hides its default"


def test_quickstart_writes_under_runs_by_default():
    a = cli.build_parser().parse_args(["quickstart"])
    assert a.out.startswith("runs/") and a.work.startswith("runs/") and a.threads == 2


def test_make_help_lists_every_target():
    import os
    import re
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    makefile = open(os.path.join(root, "Makefile")).read()
    phony = " ".join(re.findall(r"^\.PHONY:(.*)$", makefile, re.M)).split()
    out = subprocess.run(["make", "-s", "help"], cwd=root, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ")}
    assert not set(phony) - listed, f"make help does not list {sorted(set(phony) - listed)}"


def test_progress_bars_are_text_unless_a_live_notebook(monkeypatch):
    import sys

    import tqdm.auto
    import tqdm.std

    from tnlib import progress

    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    bar = progress.tqdm(total=1, disable=True)
    assert type(bar) is tqdm.std.tqdm  # headless (nbconvert, nbval, scripts): text, never a widget
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/01.ipynb")
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel", object()))
    assert progress.interactive_notebook()
    assert progress.tqdm.__module__ == "tnlib.progress" and tqdm.auto.tqdm is not None


def test_importing_tnlib_leaves_the_environment_unchanged():
    """No environment variable is set at import (the kernels request fp fusion at each launch instead:
    tests/test_gpus.py::test_every_launch_requests_fp_fusion_and_absent_tensors_are_none)."""
    import subprocess
    import sys

    # torch._dynamo sets TORCHINDUCTOR_CACHE_DIR when imported: torch's own, imported before the snapshot
    code = ("import os, json, torch, torch._dynamo, triton; before = dict(os.environ); "
            "import tnlib, tnlib.ops, tnlib.ops.lightning.kernels, "
            "tnlib.gpucheck, tnlib.train, tnlib.generation; after = dict(os.environ); "
            "print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after) "
            "if before.get(k) != after.get(k)}))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_DEFAULT_FP_FUSION", "TORCHINDUCTOR_CACHE_DIR")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "{}", r.stdout
