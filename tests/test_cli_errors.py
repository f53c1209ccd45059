"""Command-line mistakes a newcomer makes: each is refused at once with a message that says what to fix, and
leaves no output behind. None of these needs the shared dumps."""

from __future__ import annotations

import re

import yaml
from click.testing import CliRunner

from helpers import REPO
from stackrlhf.cli import cli

DEMO = REPO / "configs" / "demo.yaml"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_a_stage_given_a_pipeline_file_without_its_section_is_refused(tmp_path):
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "sft": {"learning_rate": 1e-5}}))
    result = invoke("dpo", "--config", str(pipeline), "--model", "m", "--data", "d")
    assert result.exit_code != 0
    assert "no `dpo:` section" in result.output and "stackrlhf run" in result.output, result.output
    assert not (tmp_path / "run").exists()  # the file's top-level `out:` is never taken as the stage's output
    result = invoke("dpo", "--config", str(DEMO), "--model", "m", "--data", "d")
    assert result.exit_code != 0 and "no `dpo:` section" in result.output


def test_run_refuses_until_and_force_for_stages_the_file_does_not_run(tmp_path):
    out = tmp_path / "run"
    for option, stage, needle in (("--until", "dpo", "does not run that stage"),
                                  ("--force", "dpo", "does not run that stage"),
                                  ("--until", "nonsense", "unknown stage")):
        result = invoke("run", str(DEMO), "--out", str(out), option, stage)
        assert result.exit_code != 0 and needle in result.output, result.output
        assert f"{option} {stage}" in result.output
        assert not out.exists()


def test_debug_shows_the_traceback_of_an_error(tmp_path, monkeypatch):
    """Without --debug an error is one line with a non-zero exit; with it (or STACKRLHF_DEBUG=1) the exception
    is raised as it is, so its traceback shows where it came from."""
    from stackrlhf.errors import StackRLHFError

    monkeypatch.setenv("STACKRLHF_DEBUG", "0")  # restored after the test: --debug sets it for child processes
    plain = invoke("run", str(DEMO), "--out", str(tmp_path / "run"), "--until", "nonsense")
    assert plain.exit_code == 1 and "unknown stage" in plain.output and "--debug shows where" in plain.output
    assert "Traceback" not in plain.output and isinstance(plain.exception, SystemExit)
    debug = invoke("--debug", "run", str(DEMO), "--out", str(tmp_path / "run"), "--until", "nonsense")
    assert debug.exit_code != 0 and isinstance(debug.exception, StackRLHFError)
    assert "unknown stage" in str(debug.exception) and debug.exc_info[2] is not None


def test_rm_with_missing_data_leaves_no_output_directory(tmp_path):
    out = tmp_path / "rm"
    result = invoke("rm", "--data", str(tmp_path / "nonexistent"), "--out", str(out))
    assert result.exit_code != 0 and "nonexistent" in result.output
    assert not out.exists()


def test_bad_settings_say_it_once(tmp_path):
    result = invoke("data", "build", "--dump", "beer", "--out", str(tmp_path / "d"), "--max-pairs-per-question", "-5")
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert "max_pairs_per_question must be -1" in line and line.count("DataConfig") == 0, line


def test_generation_shows_a_progress_bar_over_its_batches(capsys):
    from helpers import tiny_chat_llama
    from stackrlhf.models.answerer import Answerer
    from stackrlhf.models.sampling import SamplingConfig

    model, tok = tiny_chat_llama(["how long does beer keep", "a cold stout", "hops and malt"] * 20)
    answerer = Answerer.from_model(model, tok, name="tiny")
    out = answerer.generate([f"question {i}" for i in range(6)], SamplingConfig(max_new_tokens=3), batch_size=2,
                            seed=0)
    assert len(out.texts) == 6
    err = capsys.readouterr().err
    assert "tiny: answering" in err and "/3 " in err, err  # a bar over the 3 batches of 2


def every_command(command=cli, path=()):
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from every_command(sub, (*path, name))


def test_help_on_every_command_and_subcommand():
    import re

    paths = list(every_command())
    assert len(paths) > 25 and ["feedback", "serve"] in paths and ["loop", "status"] in paths
    listed = re.findall(r"^  (\S+)", invoke("--help").output.split("Commands:")[1], re.M)
    assert listed.index("data") < listed.index("sft") < listed.index("rm") < listed.index("ppo") < listed.index("eval")
    for path in paths:
        result = CliRunner().invoke(cli, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)
        assert not re.search(r"\[default: (''|None|\(\)|\[\])\]", result.output), (path, result.output)
        assert not DEVELOPMENT_WORDING.search(result.output), (path, result.output)


def test_old_option_names_still_work_with_a_warning_and_are_hidden(tmp_path, capsys):
    from stackrlhf.config import load_config
    from stackrlhf.evaluate.config import ReportConfig
    from stackrlhf.rl.config import PPOConfig
    from stackrlhf.train.config import RMConfig

    cfg = load_config(PPOConfig, policy="outputs/sft", data="outputs/data")  # what --policy gives
    assert cfg.model == "outputs/sft"
    assert "`policy` (--policy) is the old name of `model` (--model)" in capsys.readouterr().err
    settings = tmp_path / "rm.yaml"
    settings.write_text("backbone: outputs/sft\ndata: [outputs/data]\n")
    assert load_config(RMConfig, settings).model == "outputs/sft"
    assert "`backbone`" in capsys.readouterr().err
    result = invoke("report", "--rm", "a", "--reward", "b", "--out", str(tmp_path / "r.html"))
    assert result.exit_code != 0 and "given twice" in result.output
    assert load_config(ReportConfig, gold_rm="g", reward="r").gold_reward == "g"
    for command, old in (("ppo", "--policy"), ("rm", "--backbone"), ("report", "--gold-rm")):
        assert old not in invoke(command, "--help").output  # hidden: one name per concept in --help


def test_one_meaning_per_option_name():
    """Across every command, an option name in --help has one meaning: the batch sizes say what they count, and
    `--cache` is the download cache wherever it appears. The old names still parse, with a warning."""
    import re

    meanings: dict[str, set[str]] = {}
    for path in every_command():
        text = CliRunner().invoke(cli, [*path, "--help"], terminal_width=300).output
        for name in re.findall(r"^\s+(--[a-z0-9-]+)", text, re.M):
            meanings.setdefault(name, set()).add(" ".join(path))
    assert "--batch-size" not in meanings
    assert {"--generation-batch-size", "--prompts-per-step", "--per-device-train-batch-size",
            "--answer-cache"} <= set(meanings)
    assert meanings["--answer-cache"] == {"eval"}
    assert meanings["--prompts-per-step"] == {"ppo"}
    for path in meanings["--cache"]:
        text = CliRunner().invoke(cli, [*path.split(), "--help"], terminal_width=300).output
        line = next(line for line in text.splitlines() if line.strip().startswith("--cache"))
        assert re.search("download|fetch|unpack|cache dir|models", line, re.I), (path, line)
    from stackrlhf.config import load_config
    from stackrlhf.evaluate.config import EvalConfig
    from stackrlhf.rl.config import ILQLConfig, PPOConfig

    assert load_config(PPOConfig, model="m", data="d", batch_size=4, mini_batch_size=4).prompts_per_step == 4
    assert load_config(ILQLConfig, model="m", batch_size=4).per_device_train_batch_size == 4
    old = load_config(EvalConfig, model=("a=b",), data="d", judge="reference", batch_size=4, cache="c")
    assert (old.generation_batch_size, old.answer_cache) == (4, "c")


# the phrases, split so that this file does not spell them itself
DEVELOPMENT_WORDING = re.compile("|".join(["issue [0-9]+", "this" + " session", "no gpu" + " was lent",
                                           r"\bI (stopped|restored|had)\b", "outside" + " review",
                                           "the issue" + " asked"]), re.I)


def test_docs_benchmarks_and_tests_describe_the_tool_not_its_history():
    """User-facing text (README, docs, benchmark and test docstrings, the code) says what the tool does, not how
    it came to be: no issue numbers, no session notes."""
    found = []
    files = [REPO / "README.md"] + [p for d in ("docs", "benchmarks", "tests", "src") for p in (REPO / d).rglob("*")
                                    if p.suffix in (".md", ".py", ".html", ".js", ".yaml") and p.is_file()]
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if DEVELOPMENT_WORDING.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_readme_claims_only_figures_the_results_page_holds():
    """Every decimal figure in the README's summary of what the tool does is on docs/results.md, where it has its
    date, commit, command and machine."""
    readme = (REPO / "README.md").read_text()
    summary = readme[readme.index("What it does today"):readme.index("## Install")]
    results = (REPO / "docs" / "results.md").read_text()
    figures = set(re.findall(r"\d+\.\d+", summary))
    assert len(figures) > 10
    missing = sorted(f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", results))
    assert not missing, missing
