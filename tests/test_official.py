"""tnlib.official: official TransNormerLLM checkpoints in and out, against the official code's outputs.

``tests/data/official-tnl/{A,B}`` are tiny checkpoints written by the official modeling code (A: one
``model.safetensors``; B: two ``.bin`` shards with an index, the 7B release's layout) with what that code
computes on them (``golden.json``, float32). Tolerances (the reference README's): logits within 1e-4 of
the golden array's max |logit| (tnlib shows <= 2.3e-5: the golden values carry their own fp32 error,
which grows with position), losses within 1e-5, and greedy tokens equal wherever the golden top-1
margin exceeds 1e-4. A wrong mapping shows up at O(1) (max_rel 0.6-1.7).

The ``triton`` tests run the same comparisons through the Triton kernels (the GPU, or the CPU with
``TRITON_INTERPRET=1``); the others run the PyTorch fallbacks on a CPU.
"""
import functools
import hashlib
import json
import os
import shutil

import pytest
import torch

import tnlib
from tnlib import official as O
from tnlib import generate
from tnlib.models import create_model, load_model

DATA = os.path.join(os.path.dirname(__file__), "data", "official-tnl")
LOGITS_REL, LOSS_ABS, MARGIN = 1e-4, 1e-5, 1e-4


@functools.lru_cache(maxsize=None)
def golden(name):
    with open(os.path.join(DATA, name, "golden.json")) as f:
        return json.load(f)


def max_rel(x, ref):
    x, ref = x.double(), torch.as_tensor(ref, dtype=torch.float64)
    return float((x - ref).abs().max() / ref.abs().max())


def compare_with_golden(model, name):
    """Every golden check on ``model``; returns the measured differences (asserting the tolerances)."""
    g = golden(name)
    measured = {}
    with torch.no_grad():
        for s in g["sequences"]:
            ids = torch.tensor([s["input_ids"]])
            logits = model(ids)[0]
            rel = max_rel(logits[s["logits_first_row"]:], s["logits"])
            assert rel <= LOGITS_REL, f"{name} {s['name']}: logits max_rel {rel:.2e}"
            sure = torch.tensor(s["row_top1_margin"]) > MARGIN
            assert torch.equal(logits.argmax(-1)[sure], torch.tensor(s["row_argmax"])[sure]), f"{name} {s['name']}"
            measured[s["name"]] = {"logits_max_rel": rel}
            if s["loss"] is not None:
                loss = float(model(ids[:, :-1], targets=ids[:, 1:]))
                assert abs(loss - s["loss"]) <= LOSS_ABS, f"{name} {s['name']}: loss {loss} vs {s['loss']}"
                measured[s["name"]]["loss_abs"] = abs(loss - s["loss"])
    # decoding: prefill + one recurrent step per golden token (teacher-forced, so rows align)
    gr = g["greedy"]
    prompt = torch.tensor([gr["prompt_ids"]])
    logits, cache = model.step(prompt, last_only=True)
    rows = [logits[0, -1]]
    for t in gr["tokens"][:-1]:
        logits, cache = model.step(torch.tensor([[t]]), cache)
        rows.append(logits[0, -1])
    rows = torch.stack(rows)
    rel = max_rel(rows, gr["step_logits"])
    assert rel <= LOGITS_REL, f"{name} greedy step logits max_rel {rel:.2e}"
    for i, (row, tok, margin) in enumerate(zip(rows, gr["tokens"], gr["step_top1_margin"])):
        if margin > MARGIN:
            assert int(row.argmax()) == tok, f"{name} greedy step {i}"
    measured["greedy_step_logits_max_rel"] = rel
    # free-running greedy generation, twice: every prompt starts at position 0 (the official eval path
    # would carry its LRPE offset into the second call)
    sure = next((i for i, m in enumerate(gr["step_top1_margin"]) if m <= MARGIN), len(gr["tokens"]))
    for _ in range(2):
        new = generate(model, prompt, len(gr["tokens"]))[0, prompt.shape[1]:].tolist()
        assert new[:sure] == gr["tokens"][:sure], f"{name}: greedy tokens {new} vs {gr['tokens']}"
    return measured


@pytest.mark.parametrize("name", ["A", "B"])
def test_golden_default_path(name):
    model = O.load_official(os.path.join(DATA, name))
    assert model.embed.weight.dtype == torch.float32 and model.lm_head is None  # tied
    print(name, "default path", compare_with_golden(model, name))


@pytest.mark.triton
@pytest.mark.parametrize("name", ["A", "B"])
def test_golden_triton_kernels(name, device):
    from tnlib.ops._triton import use_triton

    model = O.load_official(os.path.join(DATA, name), device=device)
    assert use_triton(model.embed.weight), "the kernels would not run"
    print(name, "kernels", compare_with_golden(model, name))


def test_test_data_is_the_official_files():
    for name in ("A", "B"):
        for fname, info in golden(name)["files"].items():
            with open(os.path.join(DATA, name, fname), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == info["sha256"], fname


def test_config_mapping():
    with open(os.path.join(DATA, "A", "config.json")) as f:
        raw = json.load(f)
    cfg = O.official_to_config(raw)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.glu_dim, cfg.vocab_size) == (128, 3, 4, 352, 512)
    assert cfg.positional == "mix" and cfg.scale_embedding and cfg.tie_embeddings and cfg.qk_act == "silu"
    assert cfg.norm == "srms" and cfg.norm_eps == 1e-6
    assert not O.official_to_config({**raw, "no_scale_embedding": True}).scale_embedding
    assert O.official_to_config({**raw, "linear_use_lrpe_list": [0, 0, 0]}).positional == "decay"
    assert O.official_to_config({**raw, "linear_use_lrpe_list": [1, 1, 1]}).positional == "lrpe-d"
    assert O.official_to_config({**raw, "linear_act_fun": "swish"}).qk_act == "silu"
    assert O.official_to_config({**raw, "glu_dim": -1}).glu_dim == 128
    ln = O.official_to_config({**raw, "norm_type": "layernorm"})
    assert (ln.norm, ln.norm_eps) == ("layer", 1e-5)  # the official code's nn.LayerNorm default
    assert not O.official_to_config({**raw, "tie_word_embeddings": False}).tie_embeddings
    # and back: the official fields of A's config, as the official code wrote them
    back = O.config_to_official(cfg)
    assert back == {k: v for k, v in raw.items() if k != "transformers_version"}


@pytest.mark.parametrize("field,value", [
    ("bias", True), ("hidden_dim", 64), ("linear_use_lrpe_list", [0, 1, 0]), ("linear_act_fun", "gelu"),
    ("decoder_attention_heads", 5), ("decoder_layers", 1), ("some_new_field", 3),
])
def test_unsupported_config_value_is_refused(tmp_path, field, value):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(DATA, "A"), d)
    raw = json.loads((d / "config.json").read_text())
    raw[field] = value
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{field}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        O.load_official(str(d))


def _rewrite_safetensors(d, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_shard(tmp_path):
    d = tmp_path / "B"
    shutil.copytree(os.path.join(DATA, "B"), d)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        O.load_official(str(d))


def test_wrong_shape(tmp_path):
    d = tmp_path / "A"
    shutil.copytree(os.path.join(DATA, "A"), d)
    key = "model.layers.1.channel_mixer.l3.weight"
    _rewrite_safetensors(d, lambda sd: sd.__setitem__(key, sd[key][:, :100].contiguous()))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \[128, 100\], expected \[128, 352\]"):
        O.load_official(str(d))


def test_unknown_and_missing_keys(tmp_path):
    d = tmp_path / "A"
    shutil.copytree(os.path.join(DATA, "A"), d)
    _rewrite_safetensors(d, lambda sd: sd.__setitem__("model.layers.0.token_mixer.bias_u", torch.zeros(3)))
    with pytest.raises(ValueError, match="unknown key 'model.layers.0.token_mixer.bias_u'"):
        O.load_official(str(d))
    shutil.copyfile(os.path.join(DATA, "A", "model.safetensors"), d / "model.safetensors")
    _rewrite_safetensors(d, lambda sd: sd.pop("model.layers.2.token_mixer.out_proj.weight"))
    with pytest.raises(ValueError, match="lacks.*layers.2.token_mixer.out_proj.weight"):
        O.load_official(str(d))


def test_tied_head_must_equal_embedding(tmp_path):
    d = tmp_path / "A"
    shutil.copytree(os.path.join(DATA, "A"), d)
    _rewrite_safetensors(d, lambda sd: sd["lm_head.weight"].mul_(2))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        O.load_official(str(d))
    # untied in the config: both load, and the head is used
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    m = O.load_official(str(d))
    assert torch.equal(m.lm_head.weight, 2 * m.embed.weight)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_tied_head_in_an_earlier_shard(tmp_path, scale):
    """A tied head read before its embedding is held until the embedding arrives, then compared."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "A"
    d.mkdir()
    shutil.copyfile(os.path.join(DATA, "A", "config.json"), d / "config.json")
    sd = load_file(os.path.join(DATA, "A", "model.safetensors"))
    head = {"lm_head.weight": sd.pop("lm_head.weight") * scale}
    save_file(head, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(sd, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00002-of-00002.safetensors" for k in sd}
    weight_map["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if scale == 1.0:
        assert _state_equal(O.load_official(str(d)), O.load_official(os.path.join(DATA, "A")))
    else:
        with pytest.raises(ValueError, match="lm_head.weight differs"):
            O.load_official(str(d))


def test_no_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        O.load_official(str(tmp_path))
    shutil.copyfile(os.path.join(DATA, "A", "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no official weights"):
        O.load_official(str(tmp_path))


def test_padding_row_and_theta_copied_verbatim():
    from safetensors.torch import load_file

    sd = load_file(os.path.join(DATA, "A", "model.safetensors"))
    m = O.load_official(os.path.join(DATA, "A"))
    assert sd["model.embed_tokens.weight"][0].abs().max() > 0  # row 0 (padding id) is non-zero on purpose
    assert torch.equal(m.embed.weight, sd["model.embed_tokens.weight"])
    assert torch.equal(m.layers[0].token_mixer.lrpe.theta, sd["model.layers.0.token_mixer.lrpe.theta"][:, 0])


def test_built_on_meta_and_streamed_per_shard(monkeypatch):
    """The model starts with every parameter on the meta device and each shard is read only after the
    previous one was assigned: at most one copy of the weights plus the tensor being converted."""
    built, at_shard_start = [], []
    empty, tensors = O._empty_model, O._Shard.tensors

    def spy_empty(cfg, impl=None):
        built.append(empty(cfg, impl))
        assert all(p.is_meta for p in built[-1].parameters()), "parameters were allocated"
        return built[-1]

    def spy_tensors(shard, keys):
        at_shard_start.append((os.path.basename(shard.path),
                               sorted(n for n, p in built[0].named_parameters() if not p.is_meta)))
        yield from tensors(shard, keys)

    monkeypatch.setattr(O, "_empty_model", spy_empty)
    monkeypatch.setattr(O._Shard, "tensors", spy_tensors)
    path = os.path.join(DATA, "B")
    model = O.load_official(path)
    assert model is built[0]
    (f1, before1), (f2, before2) = at_shard_start
    assert (f1, f2) == ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    assert before1 == []
    with open(os.path.join(path, "pytorch_model.bin.index.json")) as f:
        in_shard1 = {O._tnlib_key(k) for k, v in json.load(f)["weight_map"].items() if v == f1} - {"lm_head.weight"}
    assert set(before2) == in_shard1
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("name", ["A", "B"])
def test_round_trip_official(tmp_path, name):
    m = O.load_official(os.path.join(DATA, name))
    out = O.save_official(m, str(tmp_path / "out"), max_shard_size="500KB")
    assert out == str(tmp_path / "out")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # sharded
    with open(os.path.join(DATA, name, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == {k: v for k, v in raw.items() if k != "transformers_version"}
    m2 = O.load_official(out)
    assert _state_equal(m, m2)
    ids = torch.tensor([golden(name)["sequences"][2]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, norm="layer", norm_eps=1e-5,
                                                    positional="lrpe-d", qk_act="1+elu", scale_embedding=False)])
def test_round_trip_tnlib_model(tmp_path, overrides):
    torch.manual_seed(0)
    impl = tnlib.Implementation(packed_attention=False, decode_gemv=False, checkpointing=True)
    m = create_model("tnl-tiny", vocab_size=300, n_layers=3, impl=impl, **overrides)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # every parameter, norms and theta included, off its init
    out = O.save_official(m, str(tmp_path / "o"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))  # fits one file: no index
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "config.json")) as f:  # how the model computed is not part of the checkpoint
        assert not {"packed_attention", "decode_gemv", "checkpointing"} & set(json.load(f))
    assert O.load_official(out).impl == tnlib.Implementation() and O.load_official(out, impl=impl).impl == impl
    m2 = O.load_official(out)
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "glu_dim", "positional", "qk_act", "norm",
                  "norm_eps", "scale_embedding", "tie_embeddings", "init_std"):
        assert getattr(m2.config, field) == getattr(m.config, field), field
    assert _state_equal(m, m2)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_dtype_and_device_arguments():
    m = O.load_official(os.path.join(DATA, "A"), dtype=torch.bfloat16, device="cpu")
    theta = m.layers[0].token_mixer.lrpe.theta
    assert all(p.dtype == torch.bfloat16 for p in m.parameters() if p is not theta)
    assert m.layers[0].token_mixer.slope.dtype == torch.float32  # recomputed from the config, not stored
    # theta kept in fp32: a bf16 theta moves the angles theta*t by up to 0.4% (max_rel 0.30 at T=200)
    theta32 = O.load_official(os.path.join(DATA, "A")).layers[0].token_mixer.lrpe.theta
    assert theta.dtype == torch.float32 and torch.equal(theta, theta32)
    s = golden("A")["sequences"][3]
    with torch.no_grad():
        rel = max_rel(m(torch.tensor([s["input_ids"]]))[0, s["logits_first_row"]:], s["logits"])
    assert rel < 0.05, rel  # bf16 weights and activations: 0.022 measured
    m = O.load_official(os.path.join(DATA, "A"), dtype="float64")
    assert m.embed.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        O.load_official(os.path.join(DATA, "A"), dtype="int8")


@pytest.mark.parametrize("overrides,field", [(dict(gate=False), "gate"), (dict(decay_formula="paper"), "decay_formula"),
                                             (dict(norm="rms"), "norm"), (dict(positional="ape"), "positional")])
def test_save_refuses_what_the_official_code_cannot_compute(tmp_path, overrides, field):
    m = create_model("tnl-tiny", vocab_size=64, n_layers=2, **overrides)
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        O.save_official(m, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")  # refused before writing


def test_top_level_exports():
    assert tnlib.load_official is O.load_official and tnlib.save_official is O.save_official


def test_cli_convert_both_ways(tmp_path, capsys):
    from tnlib.__main__ import main

    a = os.path.join(DATA, "B")
    main(["convert", "--from-official", a, "--out", str(tmp_path / "tn")])
    mt = load_model(str(tmp_path / "tn"))
    mo = O.load_official(a)
    assert _state_equal(mt, mo)
    main(["convert", "--to-official", str(tmp_path / "tn"), "--out", str(tmp_path / "off"), "--max-shard-size", "1MB"])
    assert O.is_official_dir(str(tmp_path / "off")) and not O.is_official_dir(str(tmp_path / "tn"))
    assert _state_equal(O.load_official(str(tmp_path / "off")), mo)
    capsys.readouterr()
    for argv, message in ((["--to-official", a], "did you mean --from-official"),
                          (["--from-official", str(tmp_path / "tn")], "did you mean --to-official"),
                          (["--from-official", str(tmp_path / "nowhere")], "nowhere does not exist"),
                          (["--from-official", str(tmp_path / "tn" / "config.json")], "is a file, not a checkpoint")):
        with pytest.raises(SystemExit) as e:
            main(["convert", *argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_cli_generate_from_official_dir(tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from tnlib.__main__ import main

    d = tmp_path / "A"
    shutil.copytree(os.path.join(DATA, "A"), d)
    words = [f"w{i}" for i in range(512)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))  # found inside the checkpoint directory
    prompt = " ".join(f"w{i}" for i in golden("A")["greedy"]["prompt_ids"])
    main(["generate", "--checkpoint", str(d), "--prompt", prompt, "--max-new-tokens", "3", "--temperature", "0"])
    printed = capsys.readouterr().out
    tokens = golden("A")["greedy"]["tokens"][:3]
    assert printed.startswith(prompt) and "".join(f"w{t}" for t in tokens) in printed.replace(" ", "")
