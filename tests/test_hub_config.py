"""--from-hub input (lvwerra/stack-exchange-paired schema) and YAML config + CLI overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from helpers import TINY_DUMP, read_parquet_rows
from stackrlhf.cli import cli
from stackrlhf.config import load_config
from stackrlhf.data.config import DataConfig
from stackrlhf.errors import StackRLHFError


def paired_parquet(path: Path, questions: int = 60) -> Path:
    """A small file in stack-exchange-paired's schema: per question answers a > b > c, all three pairs."""
    rows = []
    for q in range(questions):
        link = f"https://example.stackexchange.com/questions/{q}"
        for j, k in (("a", "b"), ("a", "c"), ("b", "c")):
            rows.append({"qid": q, "question": f"How do I do thing {q}?", "date": "2020/01/01",
                         "metadata": [link, "https://example.stackexchange.com"],
                         "response_j": f"answer {j} to {q}", "response_k": f"answer {k} to {q}"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_build_from_local_paired_parquet(tmp_path):
    src = paired_parquet(tmp_path / "paired.parquet")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["data", "build", "--from-hub", str(src), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    site = stats["sites"]["example.stackexchange.com"]
    assert site["questions"] == 60 and site["answers"] == 180
    pairs = read_parquet_rows(out, "reward", "train") + read_parquet_rows(out, "reward", "eval")
    assert pairs and all(r["chosen"] == r["response_j"] and r["prompt"].startswith("Question: How do I")
                         for r in pairs)
    assert all(r["score_j"] > r["score_k"] for r in pairs)
    ft = read_parquet_rows(out, "finetune", "train") + read_parquet_rows(out, "finetune", "eval")
    assert ft and all(r["completion"].startswith("answer a") for r in ft)  # the answer that wins most
    rl = read_parquet_rows(out, "rl", "train")
    assert rl and {r["site"] for r in rl} == {"example.stackexchange.com"}


def test_hub_id_goes_through_the_hub_download(tmp_path, monkeypatch):
    src = paired_parquet(tmp_path / "paired.parquet", questions=10)
    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns, cache_dir):
        calls.append((repo_id, repo_type))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from stackrlhf.data.build import build_dataset

    stats = build_dataset(DataConfig(from_hub="lvwerra/stack-exchange-paired", out=str(tmp_path / "o"),
                                     progress=False))
    assert calls == [("lvwerra/stack-exchange-paired", "dataset")]
    assert stats["totals"]["questions"] == 10 and src.exists()


def test_hub_schema_is_checked(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"qid": [1], "question": ["q"]}), bad)
    result = CliRunner().invoke(cli, ["data", "build", "--from-hub", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "missing column(s) date, metadata, response_j, response_k" in result.output
    assert not (tmp_path / "o").exists()


def test_yaml_config_then_cli_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  dump: [beer]\n  max_pairs_per_question: 3\n  seed: 7\n  tags: [hops]\n")
    cfg = load_config(DataConfig, cfg_file, section="data")
    assert (cfg.dump, cfg.max_pairs_per_question, cfg.seed, cfg.tags) == (["beer"], 3, 7, ["hops"])
    cfg = load_config(DataConfig, cfg_file, section="data", seed=9, tags=("ipa", "stout"), max_pairs_per_question=None)
    assert (cfg.seed, cfg.tags, cfg.max_pairs_per_question) == (9, ["ipa", "stout"], 3)


def test_yaml_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_pairs: 3\n")
    with pytest.raises(StackRLHFError, match="unknown setting.*max_pairs"):
        load_config(DataConfig, bad)
    bad.write_text("dump: [beer\n")
    with pytest.raises(StackRLHFError, match="not valid YAML"):
        load_config(DataConfig, bad)
    with pytest.raises(StackRLHFError, match="does not exist"):
        load_config(DataConfig, tmp_path / "none.yaml")


def test_cli_config_file_and_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    out = tmp_path / "o"
    cfg_file.write_text(f"dump: [{TINY_DUMP}]\nout: {out}\nmax_pairs_per_question: 1\nprogress: false\n")
    result = CliRunner().invoke(cli, ["data", "build", "--config", str(cfg_file), "--max-pairs-per-question", "2"])
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_pairs_per_question"] == 2 and saved["dump"] == [str(TINY_DUMP)]
    per_q = {}
    for r in read_parquet_rows(out, "reward", "train"):
        per_q[r["qid"]] = per_q.get(r["qid"], 0) + 1
    assert max(per_q.values()) == 2
