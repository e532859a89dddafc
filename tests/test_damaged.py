"""Damaged and hostile files, and changed settings on resume (issue 30).

Every kind of file the library reads is damaged in every way that applies (truncated, empty, random
bytes, a wrong shape, a missing key) and every command that reads it is run: the command exits with
status 2 after one line on stderr that starts with ``error:`` and names the file, prints no traceback
and writes nothing. A checkpoint whose ``state.pt`` (or sharded metadata) holds a pickled payload is
refused without running it; a resume with a changed setting is refused, naming it with both values.

The commands run in this process through ``tnlib.__main__.main`` (an exception other than the
one-line exit would fail the test); one test runs the real command line in a subprocess.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tnlib.__main__ as cli
from tnlib.data import prepare_data
from tnlib.files import FileDamaged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "tests", "data", "official-tnl")
SETTINGS = ["--set", "seq_len=32", "batch_size=2", "max_steps=2", "warmup_steps=1", "eval_every=2", "eval_tokens=128",
            "ckpt_every=100", "progress=false", "--model", "n_layers=1", "d_model=64", "n_heads=2", "glu_dim=128"]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data") / "data")
    prepare_data(os.path.join(ROOT, "data/sample/gutenberg-sample.txt.xz"), out,
                 tokenizer=os.path.join(ROOT, "data/sample/tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 2-step run: checkpoint/ (single-file) and final/ (with the data's tokenizer)."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    cli.main(["train", "--data", data, "--out", out, *SETTINGS])
    return out


def _main(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``python -m tnlib argv`` run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _snapshot(*dirs):
    """Every folder and file under ``dirs``, files with size and modification time (nothing was written)."""
    snap = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            snap.update({os.path.join(root, s): "dir" for s in subdirs})
            for f in files:
                st = os.stat(os.path.join(root, f))
                snap[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return snap


def _refused(argv, capsys, damaged, watch):
    """Run ``argv``; assert the one-line error naming ``damaged`` and that nothing under ``watch`` changed."""
    before = _snapshot(*watch)
    code, out, err = _main(argv, capsys)
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(damaged) in err, (str(damaged), err)
    assert "Traceback" not in err and out == ""
    assert _snapshot(*watch) == before
    return err


# ------------------------------------------------------------------------------------------- damage
def truncated(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def empty(p):
    p.write_bytes(b"")


def random_bytes(p):
    p.write_bytes(np.random.default_rng(0).bytes(max(1001, p.stat().st_size // 3)))  # odd: no whole tokens


def _safetensors_edit(edit):
    def damage(p):
        from safetensors.torch import load_file, save_file

        sd = load_file(str(p))
        edit(sd)
        save_file(sd, str(p), metadata={"format": "pt"})
    damage.__name__ = edit.__name__
    return damage


def _first_matrix(sd):
    return next(k for k, v in sorted(sd.items()) if v.dim() == 2 and "layers" in k)  # not a (tied) head


def wrong_shape(sd):
    k = _first_matrix(sd)
    sd[k] = sd[k][:, :-1].contiguous()


def missing_key(sd):
    del sd[_first_matrix(sd)]


def _json_edit(edit):
    def damage(p):
        d = json.loads(p.read_text())
        edit(d)
        p.write_text(json.dumps(d))
    damage.__name__ = edit.__name__
    return damage


SAFETENSORS_DAMAGE = [truncated, empty, random_bytes, _safetensors_edit(wrong_shape), _safetensors_edit(missing_key)]
TEXT_DAMAGE = [truncated, empty, random_bytes]


def _ids(damages):
    return [d.__name__ for d in damages]


# ------------------------------------------------------------------------------------------- saved models
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE, ids=_ids(SAFETENSORS_DAMAGE))
def test_saved_model_weights(run, tmp_path, capsys, damage):
    final = _copy(os.path.join(run, "final"), tmp_path / "final")
    damage(final / "model.safetensors")
    _refused(["generate", "--checkpoint", str(final), "--prompt", "It was"], capsys, final / "model.safetensors",
             [tmp_path])
    _refused(["convert", "--to-official", str(final), "--out", str(tmp_path / "off")], capsys,
             final / "model.safetensors", [tmp_path])
    assert not (tmp_path / "off").exists()


def no_shape(d):
    del d["d_model"]


def bad_value(d):
    d["gate"] = "maybe"


CONFIG_DAMAGE = TEXT_DAMAGE + [_json_edit(no_shape), _json_edit(bad_value)]


@pytest.mark.parametrize("damage", CONFIG_DAMAGE, ids=_ids(CONFIG_DAMAGE))
def test_saved_model_config(run, tmp_path, capsys, damage):
    final = _copy(os.path.join(run, "final"), tmp_path / "final")
    damage(final / "config.json")
    _refused(["generate", "--checkpoint", str(final), "--prompt", "It was"], capsys, final / "config.json", [tmp_path])
    _refused(["convert", "--to-official", str(final), "--out", str(tmp_path / "off")], capsys, final / "config.json",
             [tmp_path])


@pytest.mark.parametrize("damage", TEXT_DAMAGE, ids=_ids(TEXT_DAMAGE))
def test_saved_model_tokenizer(run, tmp_path, capsys, damage):
    final = _copy(os.path.join(run, "final"), tmp_path / "final")
    damage(final / "tokenizer.json")
    _refused(["generate", "--checkpoint", str(final), "--prompt", "It was"], capsys, final / "tokenizer.json",
             [tmp_path])


# ------------------------------------------------------------------------------------------- official checkpoints
def _official(name, tmp_path):
    """A copy of an official test checkpoint with a word-level tokenizer of its 512 ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    d = _copy(os.path.join(OFFICIAL, name), tmp_path / name)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(512)}, unk_token="w3"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    return d


def _official_commands(d, tmp_path):
    return [["convert", "--from-official", str(d), "--out", str(tmp_path / "tn")],
            ["generate", "--checkpoint", str(d), "--prompt", "w1 w2", "--max-new-tokens", "2"]]


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE, ids=_ids(SAFETENSORS_DAMAGE))
def test_official_safetensors(tmp_path, capsys, damage):
    d = _official("A", tmp_path)
    damage(d / "model.safetensors")
    for argv in _official_commands(d, tmp_path):
        _refused(argv, capsys, d / "model.safetensors", [tmp_path])
    assert not (tmp_path / "tn").exists()


def _bin_edit(edit):
    def damage(p):
        sd = torch.load(p, weights_only=True)
        edit(sd)
        torch.save(sd, p)
    damage.__name__ = edit.__name__
    return damage


BIN_DAMAGE = [truncated, empty, random_bytes, _bin_edit(wrong_shape), _bin_edit(missing_key)]


@pytest.mark.parametrize("damage", BIN_DAMAGE, ids=_ids(BIN_DAMAGE))
def test_official_bin_shard(tmp_path, capsys, damage):
    d = _official("B", tmp_path)
    shard = d / "pytorch_model-00002-of-00002.bin"
    damage(shard)
    # a key missing from its shard is named by the index entry that places it there
    for argv in _official_commands(d, tmp_path):
        _refused(argv, capsys, shard, [tmp_path])


def no_weight_map(d):
    del d["weight_map"]


def shard_elsewhere(d):
    k = next(iter(d["weight_map"]))
    d["weight_map"][k] = "../../" + d["weight_map"][k]


INDEX_DAMAGE = TEXT_DAMAGE + [_json_edit(no_weight_map), _json_edit(shard_elsewhere)]


@pytest.mark.parametrize("damage", INDEX_DAMAGE, ids=_ids(INDEX_DAMAGE))
def test_official_index(tmp_path, capsys, damage):
    d = _official("B", tmp_path)
    damage(d / "pytorch_model.bin.index.json")
    for argv in _official_commands(d, tmp_path):
        _refused(argv, capsys, d / "pytorch_model.bin.index.json", [tmp_path])


@pytest.mark.parametrize("damage", TEXT_DAMAGE, ids=_ids(TEXT_DAMAGE))
def test_official_config(tmp_path, capsys, damage):
    d = _official("A", tmp_path)
    damage(d / "config.json")
    for argv in _official_commands(d, tmp_path):
        _refused(argv, capsys, d / "config.json", [tmp_path])


# ------------------------------------------------------------------------------------------- training checkpoints
def _resume(run_dir, data):
    return ["train", "--data", data, "--out", str(run_dir), "--resume", *SETTINGS]


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE, ids=_ids(SAFETENSORS_DAMAGE))
def test_checkpoint_weights(run, data, tmp_path, capsys, damage):
    r = _copy(run, tmp_path / "run")
    damage(r / "checkpoint" / "model.safetensors")
    _refused(_resume(r, data), capsys, r / "checkpoint" / "model.safetensors", [tmp_path, data])


def _state_edit(edit):
    def damage(p):
        state = torch.load(p, weights_only=True)
        edit(state)
        torch.save(state, p)
    damage.__name__ = edit.__name__
    return damage


def no_step(state):
    del state["step"]


def moment_shape(state):
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = moments["exp_avg"].flatten()[:-1]


STATE_DAMAGE = [truncated, empty, random_bytes, _state_edit(no_step), _state_edit(moment_shape)]


@pytest.mark.parametrize("damage", STATE_DAMAGE, ids=_ids(STATE_DAMAGE))
def test_checkpoint_state(run, data, tmp_path, capsys, damage):
    r = _copy(run, tmp_path / "run")
    damage(r / "checkpoint" / "state.pt")
    _refused(_resume(r, data), capsys, r / "checkpoint" / "state.pt", [tmp_path, data])


def no_train(d):
    del d["train"]


@pytest.mark.parametrize("damage", TEXT_DAMAGE + [_json_edit(no_train)], ids=_ids(TEXT_DAMAGE) + ["no_train"])
def test_checkpoint_config(run, data, tmp_path, capsys, damage):
    r = _copy(run, tmp_path / "run")
    damage(r / "checkpoint" / "config.json")
    _refused(_resume(r, data), capsys, r / "checkpoint" / "config.json", [tmp_path, data])


class Payload:
    """Unpickling this creates the file ``path``: what a hostile checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_payload_in_state_is_never_run(run, data, tmp_path):
    r = _copy(run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    state = torch.load(r / "checkpoint" / "state.pt", weights_only=True)
    state["extra"] = Payload(str(marker))
    torch.save(state, r / "checkpoint" / "state.pt")
    assert not marker.exists()
    before = _snapshot(tmp_path, data)
    # the real command line: one line, status 2, no traceback
    p = subprocess.run([sys.executable, "-m", "tnlib", *_resume(r, data)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert str(r / "checkpoint" / "state.pt") in p.stderr and "could run code" in p.stderr, p.stderr
    assert not marker.exists() and _snapshot(tmp_path, data) == before


def test_sharded_checkpoint_payloads_and_truncation(data, tmp_path, capsys):
    """A sharded checkpoint (parallel=fsdp, one process): a payload planted in its metadata (which
    torch.distributed.checkpoint unpickles with plain pickle) or in one of its non-tensor values (which it
    unpickles with weights_only=False) is refused unread; a truncated shard is named."""
    import dataclasses
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    r = tmp_path / "run"
    sharded = ["--set", "parallel=fsdp", *SETTINGS[1:]]
    cli.main(["train", "--data", data, "--out", str(r), *sharded])
    meta_path = r / "checkpoint" / "sharded" / ".metadata"
    good = meta_path.read_bytes()
    md = pickle.loads(good)  # written by this test: trusted
    marker = tmp_path / "payload-ran"
    md.planted = Payload(str(marker))
    meta_path.write_bytes(pickle.dumps(md))
    argv = ["train", "--data", data, "--out", str(r), "--resume", *sharded]
    err = _refused(argv, capsys, meta_path, [tmp_path, data])
    assert "could run code" in err and not marker.exists()
    # a value stored as bytes (an optimizer setting) replaced by the payload: appended, and the metadata
    # pointed at it, as torch.distributed.checkpoint would have written it
    md = pickle.loads(good)
    key, info = next((k, v) for k, v in md.storage_data.items()
                     if isinstance(md.state_dict_metadata[k.fqn], BytesStorageMetadata))
    blob = io.BytesIO()
    torch.save(Payload(str(marker)), blob)
    shard = r / "checkpoint" / "sharded" / info.relative_path
    intact = shard.read_bytes()
    shard.write_bytes(intact + blob.getvalue())
    md.storage_data[key] = dataclasses.replace(info, offset=len(intact), length=len(blob.getvalue()))
    meta_path.write_bytes(pickle.dumps(md))
    err = _refused(argv, capsys, shard, [tmp_path, data])
    assert "could run code" in err and not marker.exists()
    shard.write_bytes(intact)
    meta_path.write_bytes(good)
    truncated(shard)
    _refused(argv, capsys, shard, [tmp_path, data])
    _refused(["consolidate", "--checkpoint", str(r / "checkpoint"), "--out", str(tmp_path / "one")], capsys, shard,
             [tmp_path])


# ------------------------------------------------------------------------------------------- data files
def _train(data, out):
    return ["train", "--data", str(data), "--out", str(out), *SETTINGS]


def no_splits(d):
    del d["splits"]


def more_tokens(d):
    d["splits"]["train"]["tokens"] += 10


META_DAMAGE = TEXT_DAMAGE + [_json_edit(no_splits)]


@pytest.mark.parametrize("damage", META_DAMAGE, ids=_ids(META_DAMAGE))
def test_data_meta(data, tmp_path, capsys, damage):
    d = _copy(data, tmp_path / "data")
    damage(d / "meta.json")
    _refused(_train(d, tmp_path / "out"), capsys, d / "meta.json", [tmp_path])
    assert not (tmp_path / "out").exists()


def same_size_random(p):
    p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))  # right size, ids beyond the vocabulary


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("damage", TEXT_DAMAGE + [same_size_random], ids=_ids(TEXT_DAMAGE) + ["same_size_random"])
def test_data_token_files(data, tmp_path, capsys, damage, split):
    d = _copy(data, tmp_path / "data")
    damage(d / f"{split}.bin")
    err = _refused(_train(d, tmp_path / "out"), capsys, d / f"{split}.bin", [tmp_path])
    assert not (tmp_path / "out").exists() and ("meta.json" in err or "vocabulary" in err)


def test_data_meta_counts_more_tokens_than_the_file(data, tmp_path, capsys):
    d = _copy(data, tmp_path / "data")
    _json_edit(more_tokens)(d / "meta.json")
    err = _refused(_train(d, tmp_path / "out"), capsys, d / "train.bin", [tmp_path])
    assert "truncated" in err


@pytest.mark.parametrize("damage", TEXT_DAMAGE, ids=_ids(TEXT_DAMAGE))
def test_data_tokenizer(data, tmp_path, capsys, damage):
    d = _copy(data, tmp_path / "data")
    damage(d / "tokenizer.json")
    _refused(_train(d, tmp_path / "out"), capsys, d / "tokenizer.json", [tmp_path])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i}, a few words.\n<|endoftext|>\n" for i in range(20)))
    _refused(["prepare", "--corpus", str(corpus), "--out", str(tmp_path / "prep"), "--tokenizer",
              str(d / "tokenizer.json")], capsys, d / "tokenizer.json", [tmp_path])
    assert not (tmp_path / "out").exists() and not (tmp_path / "prep").exists()


# ------------------------------------------------------------------------------------------- resume settings
def test_resume_refuses_changed_settings_and_names_them(run, data, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    argv = _resume(r, data)
    changed = argv[:argv.index("--model")] + ["eval_tokens=256", "lr=5e-4"] + argv[argv.index("--model"):]
    err = _refused(changed, capsys, r / "checkpoint" / "config.json", [tmp_path, data])
    assert "eval_tokens 256 here, 128 in the checkpoint" in err and "lr 0.0005 here, 0.001 in the checkpoint" in err
    assert "--set lr=0.001 eval_tokens=128;" in err and "max_steps" in err  # how to resume; what may change
    model = argv[:-1] + ["glu_dim=96"]
    err = _refused(model, capsys, r / "checkpoint" / "config.json", [tmp_path, data])
    assert "model glu_dim 96 here, 128 in the checkpoint" in err
    batch = [a if a != "batch_size=2" else "batch_size=4" for a in argv]
    err = _refused(batch, capsys, r / "checkpoint" / "config.json", [tmp_path, data])
    assert "global batch" in err and "'4 x 1' here, '2 x 1' in the checkpoint" in err


def test_resume_compares_the_data_not_its_folder(run, data, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    moved = _copy(data, tmp_path / "moved")  # the same tokens elsewhere: accepted (checked below)
    cfg_path = r / "checkpoint" / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["run"]["data"]["tokens"]["train"] += 1  # as if prepared from another corpus
    cfg_path.write_text(json.dumps(saved))
    err = _refused(_resume(r, str(moved)), capsys, cfg_path, [tmp_path, data])
    assert "data train tokens 838893 here, 838894 in the checkpoint" in err


def test_resume_accepts_the_listed_changes_and_old_checkpoints(run, data, tmp_path, capsys):
    """max_steps (a longer run), eval_every, progress and the run folder may change; a checkpoint written
    before the resume facts were recorded (no "run" in its config.json) resumes too."""
    from tnlib.train import RESUME_MAY_CHANGE

    assert {"max_steps", "max_tokens", "max_minutes", "progress", "out", "eval_every"} <= set(RESUME_MAY_CHANGE)
    r = _copy(run, tmp_path / "moved-run")
    cfg_path = r / "checkpoint" / "config.json"
    saved = json.loads(cfg_path.read_text())
    del saved["run"]
    cfg_path.write_text(json.dumps(saved))
    argv = [a.replace("max_steps=2", "max_steps=3").replace("eval_every=2", "eval_every=1") for a in _resume(r, data)]
    cli.main(argv)
    steps = [json.loads(line).get("step") for line in open(r / "metrics.jsonl") if '"loss"' in line]
    assert steps[-1] == 3 and steps.count(3) == 1


def test_checkpoints_that_recorded_implementation_fields_still_load_and_resume(run, data, tmp_path, capsys):
    """Before issue 27, ``packed_attention``, ``decode_gemv`` and ``checkpointing`` were ModelConfig fields,
    so every ``config.json`` recorded them. Such a final model still loads (and generates, and consolidates),
    and such a training checkpoint still resumes, whatever values it recorded; nothing written now records
    them."""
    import tnlib
    from tnlib.models import Implementation

    former = {"checkpointing": True, "packed_attention": False, "decode_gemv": False}
    r = _copy(run, tmp_path / "old-run")
    for name in ("final/config.json", "checkpoint/config.json"):
        assert not set(former) & set(json.loads(open(os.path.join(run, name)).read()).get("model", {}))
    final_cfg = r / "final" / "config.json"
    cfg = json.loads(final_cfg.read_text())
    assert not set(former) & set(cfg)
    final_cfg.write_text(json.dumps({**cfg, **former}, indent=2))
    old = tnlib.load_model(str(r / "final"))
    assert old.impl == Implementation()  # the recorded values are dropped: how to compute is the loader's choice
    new = tnlib.load_model(os.path.join(run, "final"))
    assert old.config == new.config and all(torch.equal(a, b) for a, b in zip(old.state_dict().values(),
                                                                               new.state_dict().values()))
    cli.main(["generate", "--checkpoint", str(r / "final"), "--prompt", "It was", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("It was")
    ckpt_cfg = r / "checkpoint" / "config.json"
    saved = json.loads(ckpt_cfg.read_text())
    saved["model"].update(former)
    ckpt_cfg.write_text(json.dumps(saved))
    cli.main(["consolidate", "--checkpoint", str(r / "checkpoint"), "--out", str(tmp_path / "one")])
    assert tnlib.load_model(str(tmp_path / "one")).config == new.config
    cli.main([a.replace("max_steps=2", "max_steps=3") for a in _resume(r, data)])
    steps = [json.loads(line).get("step") for line in open(r / "metrics.jsonl") if '"loss"' in line]
    assert steps[-1] == 3
    assert not set(former) & set(json.loads(ckpt_cfg.read_text())["model"])  # rewritten by the resumed run


# ------------------------------------------------------------------------------------------- the rest of issue 30
def test_final_model_generates_alone_and_the_error_points_to_a_tokenizer(run, data, tmp_path, capsys):
    final = os.path.join(run, "final")
    cli.main(["generate", "--checkpoint", final, "--prompt", "It was", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.startswith("It was")
    bare = _copy(final, tmp_path / "final")
    os.remove(bare / "tokenizer.json")
    (tmp_path / "checkpoint").mkdir()  # the run's checkpoint beside it names the data it trained on
    shutil.copyfile(os.path.join(run, "checkpoint", "config.json"), tmp_path / "checkpoint" / "config.json")
    err = _refused(["generate", "--checkpoint", str(bare), "--prompt", "It was"], capsys, bare, [tmp_path])
    assert f"--tokenizer {os.path.normpath(os.path.join(data, 'tokenizer.json'))}" in err


def test_written_files_share_one_mode(run, tmp_path):
    import stat

    from tnlib.official import load_official, save_official

    out = save_official(load_official(os.path.join(OFFICIAL, "A")), str(tmp_path / "off"), max_shard_size="1MB")
    for d in (os.path.join(run, "final"), os.path.join(run, "checkpoint"), out):
        modes = {f: stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for f in os.listdir(d)}
        assert len(set(modes.values())) == 1, modes


def test_file_damaged_is_exported_and_a_value_error():
    import tnlib

    assert tnlib.FileDamaged is FileDamaged and issubclass(FileDamaged, ValueError)
    e = FileDamaged("x/model.safetensors", "is truncated\nmore", "restore it")
    assert str(e) == "x/model.safetensors: is truncated (restore it)" and e.path == "x/model.safetensors"


def test_no_command_lists_the_commands(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert "train" in out and "generate" in out and "convert" in out


def test_train_help_lists_presets_and_what_may_change_on_resume():
    from tnlib.models import PRESETS

    sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and a.choices)
    text = " ".join(sub.choices["train"].format_help().split())
    assert all(p in text for p in PRESETS) and "max_steps" in text and "max_minutes" in text


def test_consolidate_single_file_checkpoint(run, tmp_path):
    """A single-file training checkpoint consolidates too (its config.json holds the train and model
    configs, not a model's), with the run's tokenizer."""
    import tnlib

    cli.main(["consolidate", "--checkpoint", os.path.join(run, "checkpoint"), "--out", str(tmp_path / "one")])
    one, final = tnlib.load_model(str(tmp_path / "one")), tnlib.load_model(os.path.join(run, "final"))
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), final.state_dict().values()))
    assert (tmp_path / "one" / "tokenizer.json").is_file()
