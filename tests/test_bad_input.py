"""Each kind of bad input: a one-line error naming the file (and line), exit != 0, no output left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from helpers import site_dump
from http_server import FileServer
from stackrlhf.cli import cli

SITE = site_dump().name


def run_build(dump: str, out: Path, *extra: str):
    result = CliRunner().invoke(cli, ["data", "build", "--dump", dump, "--out", str(out), "--no-progress",
                                      "--cache", str(out.parent / "cache"), *extra])
    return result


def assert_clean_failure(result, out: Path, *needles: str) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ")
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return message


def dump_with_posts(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / SITE
    folder.mkdir()
    (folder / "Posts.xml").write_bytes(data)
    return folder


def test_truncated_xml(tmp_path):
    data = (site_dump() / "Posts.xml").read_bytes()
    folder = dump_with_posts(tmp_path, data[: len(data) * 2 // 3])
    msg = assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out",
                               str(folder / "Posts.xml"), "line ", "truncated")
    assert "line ?" not in msg


def test_malformed_xml(tmp_path):
    lines = (site_dump() / "Posts.xml").read_bytes().splitlines(keepends=True)
    lines[100] = b'  <row Id="99999" PostTypeId="1" Body=oops />\n'
    folder = dump_with_posts(tmp_path, b"".join(lines))
    assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out",
                         "Posts.xml", "line 101", "malformed XML")


def test_entities_are_refused_with_the_reason(tmp_path):
    xxe = (b'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE posts [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
           b'<posts>\n  <row Id="1" PostTypeId="1" Body="&xxe;" Score="1" CreationDate="2020-01-01T00:00:00.000" />\n'
           b'</posts>\n')
    folder = dump_with_posts(tmp_path, xxe)
    assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out", "Posts.xml",
                         "DTDs and entity declarations are not allowed")


def test_non_utf8_bytes(tmp_path):
    lines = (site_dump() / "Posts.xml").read_bytes().splitlines(keepends=True)
    lines[50] = lines[50].replace(b'Body="', b'Body="b\xff\xfe', 1)
    assert b"\xff" in lines[50]
    folder = dump_with_posts(tmp_path, b"".join(lines))
    assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out",
                         "Posts.xml", "line 51", "UTF-8")


def test_missing_posts_xml(tmp_path):
    folder = tmp_path / SITE
    folder.mkdir()
    shutil.copy(site_dump() / "Votes.xml", folder / "Votes.xml")
    assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out", str(folder), "no Posts.xml")


def test_empty_dump(tmp_path):
    folder = dump_with_posts(tmp_path, b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n</posts>\n')
    assert_clean_failure(run_build(str(folder), tmp_path / "out"), tmp_path / "out",
                         "Posts.xml", "no questions")


def test_corrupt_7z(tmp_path):
    archive = tmp_path / f"{SITE}.7z"
    archive.write_bytes(b"7z\xbc\xaf\x27\x1c" + b"\x00garbage" * 100)
    assert_clean_failure(run_build(str(archive), tmp_path / "out"), tmp_path / "out",
                         str(archive), "7z archive")


def test_url_404(tmp_path):
    with FileServer(tmp_path) as srv:
        result = run_build(f"{srv.url}/nosuch.stackexchange.com.7z", tmp_path / "out")
    assert_clean_failure(result, tmp_path / "out", "nosuch.stackexchange.com.7z", "404")


def test_nonexistent_path_and_bad_settings(tmp_path):
    assert_clean_failure(run_build(str(tmp_path / "nope" / "x.7z"), tmp_path / "out"), tmp_path / "out",
                         "no such file")
    assert_clean_failure(run_build(str(site_dump()), tmp_path / "out", "--rl-fraction", "0.9"), tmp_path / "out",
                         "sum to 1")


def test_failed_rebuild_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    assert run_build(str(site_dump()), out).exit_code == 0
    before = (out / "stats.json").read_text()
    data = (site_dump() / "Posts.xml").read_bytes()
    folder = dump_with_posts(tmp_path, data[: len(data) // 2])
    result = run_build(str(folder), out)
    assert result.exit_code != 0
    assert (out / "stats.json").read_text() == before


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_build(str(site_dump()), out)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_console_script_exits_non_zero(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "stackrlhf.cli", "data", "build", "--dump",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in proc.stderr


def test_ask_says_when_the_answer_ends_at_once(tiny_lm, tmp_path):
    """A model that puts all its mass on EOS: `ask` says it answered nothing, and exits 0."""
    import torch

    from stackrlhf.models.loading import load_causal_lm

    lm, tok = load_causal_lm(str(tiny_lm))
    with torch.no_grad():
        direction = torch.randn(lm.config.n_embd)
        for weight in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):  # tied or not
            weight.zero_()
            weight[tok.eos_token_id] = 10 * direction
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.copy_(direction)  # every final hidden state points at EOS
    lm.save_pretrained(tmp_path / "eos-only")
    tok.save_pretrained(tmp_path / "eos-only")
    result = CliRunner().invoke(cli, ["ask", str(tmp_path / "eos-only"), "Which hops for a stout?", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "ended its answer immediately" in result.output


def test_bad_yaml_values_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  max_pairs_per_question: lots\n")
    result = CliRunner().invoke(cli, ["data", "build", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert f"config file {bad}: max_pairs_per_question must be an integer, got 'lots'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    bad.write_bytes(b"data:\n  out: \xff\xfe\n")
    result = CliRunner().invoke(cli, ["data", "build", "--config", str(bad)])
    assert result.exit_code != 0 and f"{bad} is not UTF-8" in result.output
    result = CliRunner().invoke(cli, ["data", "build", "--max-pairs-per-question", "-5", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "max_pairs_per_question must be -1 (all pairs) or >= 0" in result.output
