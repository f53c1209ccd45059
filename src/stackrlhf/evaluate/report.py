"""``stackrlhf report``: one self-contained HTML file (plots inlined as PNG) from the artifacts of a run.

It reads only what the stages wrote: ``eval.json`` and ``samples.jsonl``, the RL stages' ``history.jsonl``, the
reward models' ``metrics.json``, the feedback export's ``ratings.parquet`` (or the store itself), and the run's
``pipeline.json``. A missing artifact leaves its section with a note saying which command makes it. Every text
that came from a dump or a model is escaped: the report never runs what it shows.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stackrlhf.config import read_json, write_text_atomic  # noqa: E402
from stackrlhf.data.attribution import http_url  # noqa: E402
from stackrlhf.evaluate.config import ReportConfig  # noqa: E402
from stackrlhf.stats import below_chance, gain_text, history_length_analysis  # noqa: E402

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:36px;border-bottom:2px solid #dde2ea;padding-bottom:4px}
.meta{color:#5b6577}.note{color:#6b7280;font-style:italic}
table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border:1px solid #dde2ea;padding:4px 10px;text-align:right}th{background:#eef1f6}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;background:#fff;border:1px solid #dde2ea;border-radius:6px;margin:8px;padding:8px}
figure img{display:block;max-width:100%;height:auto}figcaption{color:#5b6577;font-size:13px}
.question{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:12px 16px;margin:16px 0}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:10px}
.answer{border:1px solid #e3e7ee;border-radius:6px;padding:8px;background:#fbfcfe}
.answer h4{margin:0 0 4px;font-size:14px}.answer .r{color:#5b6577;font-size:12px}
pre{white-space:pre-wrap;word-wrap:break-word;font:13px/1.45 ui-monospace,Menlo,Consolas,monospace;margin:4px 0;
max-height:22em;overflow:auto}
footer{margin-top:40px;color:#6b7280;font-size:13px}
"""


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _figure(fig, name: str, caption: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img class="plot" data-plot="{_e(name)}" alt="{_e(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>')


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def rl_curves(rl_histories: dict[str, list[dict]], ilql_history: list[dict]) -> str:
    """Each on-policy run's reward and KL over its steps (PPO, RLOO, RAFT: ``{name: history}``), and ILQL's."""
    parts = []
    for name, history in rl_histories.items():
        if not history:
            continue
        label = name.upper()
        steps = [h["step"] for h in history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.2))
        a.plot(steps, [h["reward/score_mean"] for h in history], label="RM score (normalised)")
        a.plot(steps, [h["reward/total_mean"] for h in history], label="score - beta*KL", alpha=0.7)
        a.set_xlabel(f"{label} step"), a.set_ylabel("mean reward"), a.legend(fontsize=8), a.grid(alpha=0.3)
        b.plot(steps, [h["kl/mean"] for h in history], color="C3", label="KL to reference")
        b.set_xlabel(f"{label} step"), b.set_ylabel("KL per response"), b.grid(alpha=0.3)
        b2 = b.twinx()
        b2.plot(steps, [h["kl/beta"] for h in history], color="C2", ls="--", label="beta")
        b2.set_ylabel("beta")
        lines = b.get_lines() + b2.get_lines()
        b.legend(lines, [line.get_label() for line in lines], fontsize=8)
        parts.append(_figure(fig, name, f"{label}: reward and KL to the frozen reference over the steps"))
        parts.append(rl_length(history, name))
    if not any(rl_histories.values()):
        parts.append(_note("No PPO, RLOO or RAFT history: run `stackrlhf ppo` (or a pipeline with a `ppo:` or "
                           "`rloo:` section)."))
    if ilql_history:
        steps = [h["step"] for h in ilql_history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.2))
        for key in ("loss/q", "loss/v", "loss/awac"):
            a.plot(steps, [h[key] for h in ilql_history], label=key)
        a.set_xlabel("ILQL step"), a.set_ylabel("loss"), a.legend(fontsize=8), a.grid(alpha=0.3)
        for key in ("values/q_mean", "values/v_mean", "values/advantage_mean"):
            b.plot(steps, [h[key] for h in ilql_history], label=key)
        b.set_xlabel("ILQL step"), b.legend(fontsize=8), b.grid(alpha=0.3)
        parts.append(_figure(fig, "ilql", "ILQL: losses and mean Q, V and advantage over the steps"))
    return "".join(parts)


def rl_length(history: list[dict], name: str = "ppo") -> str:
    """Answer length over an RL run's steps beside the reward, and how much of the reward gain length explains."""
    if not history or "response/words" not in history[0]:
        return ""
    label = name.upper()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    ax.plot(steps, [h["response/words"] for h in history], color="C4", label="answer words")
    ax.set_xlabel(f"{label} step"), ax.set_ylabel("mean answer words"), ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["reward/score_mean"] for h in history], color="C0", alpha=0.6, label="RM score")
    ax2.set_ylabel("mean RM score")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    a = history_length_analysis(history)
    text = "Too few steps to compare." if a["reward_gain"] is None else (
        f"From the first {a['steps_compared']} steps to the last {a['steps_compared']}: answers "
        f"{a['words_early']:.1f} -> {a['words_late']:.1f} words, reward gain {a['reward_gain']:+.3f} overall and "
        f"{(a['reward_gain_within_length_bins'] or 0):+.3f} within length bins"
        + ("" if a["length_explained_share"] is None else
           f": length explains {a['length_explained_share']:.0%} of the gain (Singhal et al. 2023)") + ".")
    return (_figure(fig, f"{name}_length", f"{label}: answer length and reward over the steps (a reward that rises "
                                           "only with length is length hacking)") + f"<p>{_e(text)}</p>")


def method_of(name: str, m: dict) -> str:
    """Which method made a model, for the frontier's colours: from eval.json's record of it."""
    if m.get("best_of"):
        return "best-of-n"
    if m.get("beta") is not None:
        return "ILQL"
    for method in ("rloo", "dpo", "ppo", "sft", "base"):
        if name.lower().startswith(method) or Path(str(m.get("path", ""))).name.lower().startswith(method):
            return method.upper() if method != "base" else "base"
    return "other"


def frontier(ev: dict | None) -> str:
    """Reward against KL to the reference, one point per model with standard-error bars, per judge; best-of-n
    from the baseline drawn as a line from it: the frontier that any RL method must beat at equal KL."""
    if not ev:
        return _note("No evaluation: run `stackrlhf eval` (or a pipeline with an `eval:` section).")
    models, n = ev["models"], max(ev.get("questions", 1), 1)
    judges = [j for j in ("proxy", "gold", "judge") if any(m.get(f"reward_{j}") is not None for m in models.values())]
    fig, axes = plt.subplots(1, len(judges), figsize=(5.2 * len(judges), 3.8), squeeze=False)
    colours = {}
    for ax, judge in zip(axes[0], judges):
        pts = {name: m for name, m in models.items()
               if m.get("kl_to_reference") is not None and m.get(f"reward_{judge}") is not None}
        for name, m in pts.items():
            method = method_of(name, m)
            colour = colours.setdefault(method, f"C{len(colours)}")
            ax.errorbar(m["kl_to_reference"], m[f"reward_{judge}"], yerr=m.get(f"reward_{judge}_std", 0) / n ** 0.5,
                        xerr=m.get("kl_to_reference_se") or 0, fmt="o", color=colour, capsize=3, ms=5,
                        label=method if method not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(name, (m["kl_to_reference"], m[f"reward_{judge}"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        base = models.get(ev.get("baseline"), {})
        bon = sorted((m["kl_to_reference"], m[f"reward_{judge}"]) for m in pts.values() if m.get("best_of"))
        if bon and base.get(f"reward_{judge}") is not None:
            line = [(base.get("kl_to_reference") or 0.0, base[f"reward_{judge}"]), *bon]
            ax.plot([p[0] for p in line], [p[1] for p in line], "--", color=colours.get("best-of-n", "grey"), lw=1)
        ax.set_title({"proxy": "proxy reward model (optimised)", "gold": "gold reward model (held out)",
                      "judge": f"judge {ev.get('judges', {}).get('judge', '')} (fixed)"}[judge], fontsize=9)
        ax.set_xlabel("KL to the reference (nats per answer)"), ax.set_ylabel("mean normalised reward")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    return _figure(fig, "frontier", "Reward against KL for every method (bars: one standard error). A method is "
                                    "better only above the best-of-n line at the same KL; a gold reward that falls "
                                    "while the proxy rises is over-optimisation")


def loop_versions(registry: Path) -> list[dict]:
    """One row per version after v0 and per best-of-n of its turn, from each turn's ``eval.json``: the score of
    the fixed judge (else the gold, else the proxy RM), its gain over v0, KL to v0, labels used so far."""
    reg = read_json(registry / "registry.json") or {}
    rows, labels = [], 0
    for v in reg.get("versions", [])[1:]:
        n, labels = v["version"], labels + v.get("labels", 0)
        ev = read_json(registry / f"v{n}" / "eval" / "eval.json")
        if not ev:
            continue
        judge = judge_of(ev)
        for name, m in ev["models"].items():
            if name == f"v{n}" or m.get("best_of") or (name == "v0" and n == 1):
                rows.append({"name": name if not m.get("best_of") else f"{name} (RM of v{n})", "turn": n,
                             "kind": "best-of-n" if m.get("best_of") else "version", "judge_name": judge,
                             "labels": 0 if name == "v0" else labels, **judged_row(m, judge, ev.get("questions", 1))})
    return rows


def judge_of(ev: dict) -> str:
    """The judge an ``eval.json``'s rows are read by: the fixed judge, else the gold RM, else the proxy RM."""
    return next((j for j in ("judge", "gold", "proxy") if j in ev.get("judges", {})), "proxy")


def judged_row(m: dict, judge: str, questions: int) -> dict:
    """One model of an ``eval.json`` by ``judge``, against v0: score ± SE, gain ± SE, win rate, KL, words."""
    return {"score": m[f"reward_{judge}"], "se": m[f"reward_{judge}_std"] / max(questions, 1) ** 0.5,
            "gain": m.get(f"gain_{judge}_vs_v0"), "gain_se": m.get(f"gain_{judge}_vs_v0_se"),
            "win": m.get(f"win_rate_{judge}_vs_v0"),
            "gain_length_adjusted": m.get(f"gain_{judge}_vs_v0_length_adjusted"),
            "kl": m.get("kl_to_reference"), "kl_se": m.get("kl_to_reference_se"), "words": m.get("length_words")}


def loop_section(registry: Path | None) -> str:
    if registry is None:
        return ""
    rows = loop_versions(registry)
    if not rows:
        return "<h2>Feedback loop</h2>" + _note(f"{registry} has no evaluated version yet: run `stackrlhf loop`.")
    judge = rows[0]["judge_name"]
    head = "".join(f"<th>{h}</th>" for h in ("model", "labels used", f"{judge} score ± SE", "gain vs v0 ± SE",
                                             "win vs v0", "KL to v0", "words"))
    def cell(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    body = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{r['labels']}</td><td>{r['score']:+.3f} ± {r['se']:.3f}</td>"
        f"<td>{cell(r['gain'], '+.3f')}{'' if r['gain_se'] is None else ' ± ' + cell(r['gain_se'], '.3f')}</td>"
        f"<td>{cell(r['win'], '.2f')}</td><td>{cell(r['kl'], '.2f')}</td><td>{cell(r['words'], '.1f')}</td></tr>"
        for r in rows)
    fig, (by_labels, by_kl) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    versions = [r for r in rows if r["kind"] == "version"]
    for ax, x in ((by_labels, "labels"), (by_kl, "kl")):
        pts = [r for r in versions if r[x] is not None]
        ax.errorbar([r[x] for r in pts], [r["score"] for r in pts], yerr=[r["se"] for r in pts], fmt="o-",
                    color="C0", capsize=3, label="loop versions")
        for r in pts:
            ax.annotate(r["name"], (r[x], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        bon = [r for r in rows if r["kind"] == "best-of-n" and r[x] is not None]
        if bon:
            ax.errorbar([r[x] for r in bon], [r["score"] for r in bon], yerr=[r["se"] for r in bon], fmt="s",
                        color="C1", capsize=3, ms=4, label="best-of-n from v0 (each turn's RM)")
        ax.set_ylabel(f"{judge} score"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    by_labels.set_xlabel("labels used (cumulative)"), by_kl.set_xlabel("KL to v0 (nats per answer)")
    return ("<h2>Feedback loop</h2>" + f"<table><tr>{head}</tr>{body}</table>"
            + _figure(fig, "loop", f"Each version's {judge} score on held-out questions (bars: one standard error) "
                                   "against the labels it learnt from and against its KL to v0; best-of-n from v0 "
                                   "under each turn's RM is the baseline at equal KL"))


def rm_accuracy(rms: dict[str, dict]) -> str:
    rms = {k: v for k, v in rms.items() if v and "accuracy" in v}
    if not rms:
        return _note("No reward-model metrics: run `stackrlhf rm`.")
    bars = [("RM", "accuracy"), ("longer wins", "baseline_longer_wins"), ("earlier wins", "baseline_earlier_wins"),
            ("random", "baseline_random"), ("RM, shorter\nis better", "accuracy_shorter_better")]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    width = 0.8 / len(rms)
    for i, (name, m) in enumerate(rms.items()):
        which = "test" if m.get("test") else "held-out"
        m = m.get("test") or m  # the test pairs picked no epoch: the fairer figure when the data has them
        xs = [j + i * width for j in range(len(bars))]
        ax.bar(xs, [m.get(key) or 0.0 for _, key in bars], width,
               label=f"{name} ({m.get('eval_pairs', '?')} {which} pairs)")
        if m.get("accuracy_ci95"):  # 95% interval from resampling questions
            lo, hi = m["accuracy_ci95"]
            ax.errorbar([xs[0]], [m["accuracy"]], yerr=[[m["accuracy"] - lo], [hi - m["accuracy"]]], color="black",
                        capsize=3, lw=1)
    ax.set_xticks([j + width * (len(rms) - 1) / 2 for j in range(len(bars))], [b for b, _ in bars], fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1), ax.set_ylabel("held-out pairwise accuracy"), ax.legend(fontsize=8)
    return _figure(fig, "rm_accuracy", "Reward models against the length, time and random baselines on the test "
                                        "pairs (else the held-out pairs); the bar on the RM is a 95% interval")


def rm_confounders(rms: dict[str, dict]) -> str:
    """Per RM, on the test pairs: what it knows beyond answer length and posting time."""
    rows = []
    for name, m in rms.items():
        t = (m or {}).get("test") or {}
        if "incremental_log_loss_gain" not in t:
            continue
        ci = t.get("incremental_log_loss_gain_ci95") or [None, None]
        weights = ", ".join(f"{k} {v:+.2f}" for k, v in (m.get("confounder_weights") or {}).items()) or "none"

        def f(v, spec=".3f"):
            return "n/a" if v is None else format(v, spec)

        cells = [name, weights, f(t["covariates_accuracy"]), f(t["covariates_log_loss"], ".4f"),
                 f"{f(t['incremental_log_loss_gain'], '+.4f')} [{f(ci[0], '+.4f')}, {f(ci[1], '+.4f')}]",
                 f(t["length_spearman"], "+.3f"), f"{f(t['length_matched_accuracy'])} ({t['length_matched_pairs']})",
                 f"{f(t['close_in_time_accuracy'])} ({t['close_in_time_pairs']})"]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    head = ["reward model", "adjusted for (learnt w)", "length+time model accuracy", "its log-loss",
            "RM's log-loss gain beyond it [95% CI]", "reward~length Spearman", "accuracy, length-matched pairs",
            "accuracy, posted within 24 h"]
    return ("<p>On the test pairs. The length+time model is a Bradley-Terry fit on log words and log hours after "
            "the question; the gain is how much adding the RM's score lowers its log-loss (nats per pair): above "
            "zero, the RM knows something about the votes that length and time do not.</p><table><tr>"
            + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def feedback_distribution(source: str) -> str:
    dist = load_rating_distribution(source) if source else None
    if not dist:
        return _note("No human feedback yet: `stackrlhf feedback queue`, `serve`, then `export`.")
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2), sharey=True)
    for ax, kind in zip(axes, ("usefulness", "accuracy")):
        models = sorted(dist[kind])
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            counts = dist[kind][model]
            total = max(sum(counts.values()), 1)
            ax.bar([r + i * width for r in range(1, 6)], [counts.get(r, 0) / total for r in range(1, 6)], width,
                   label=model)
        ax.set_xticks([r + width * (len(models) - 1) / 2 for r in range(1, 6)], [str(r) for r in range(1, 6)])
        ax.set_xlabel(f"{kind} (1-5)"), ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("share of ratings"), axes[0].legend(fontsize=8)
    return _figure(fig, "feedback", "Human ratings by model")


def load_rating_distribution(source: str) -> dict | None:
    """{kind: {model: {rating: count}}} from a feedback export directory (a store's URL is exported to one first:
    :func:`stackrlhf.pipeline.report_stage`)."""
    path = Path(source) / "ratings.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if not rows or "usefulness" not in rows[0]:
        return None
    return {kind: {m: dict(Counter(r[kind] for r in rows if (r["model"] or "human answer") == m))
                   for m in {r["model"] or "human answer" for r in rows}} for kind in ("usefulness", "accuracy")}


def eval_table(ev: dict | None) -> str:
    if not ev:
        return ""
    base = ev["baseline"]
    judges = list(ev["judges"])
    head = ["model", *[f"{j} reward" for j in judges], *[f"{j} win vs {base}" for j in judges],
            *[f"{j} gain vs {base} / length-adjusted" for j in judges], "KL", "human-answer ppl", "length",
            "ended", "distinct-2"]
    rows = []
    for name, m in ev["models"].items():
        kl = m.get("kl_to_reference")
        cells = [name, *[f"{m[f'reward_{j}']:.3f} ± {m[f'reward_{j}_std']:.2f}" for j in judges],
                 *[f"{m[f'win_rate_{j}_vs_{base}']:.2f}" for j in judges],
                 *[gain_text(m, j, base, missing="") for j in judges], "" if kl is None else f"{kl:.2f}",
                 "-" if m.get("human_answer_perplexity") is None else f"{m['human_answer_perplexity']:.1f}",
                 f"{m['length_tokens']:.1f}", f"{m['ended']:.2f}",
                 f"{m['distinct_2']:.3f}"]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (f"<p>{ev['questions']} held-out questions, temperature {ev['sampling']['temperature']}, "
            f"{ev['sampling']['max_new_tokens']} new tokens at most. Rewards are normalised by each judge's "
            f"training-answer mean and std.</p><table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
            + "</tr>" + "".join(rows) + "</table>")


def _link(url: str, text: str) -> str:
    """An escaped link for an http(s) URL; the bare text for anything else (javascript:, data:, ...)."""
    href = http_url(url)
    return f'<a href="{_e(href)}">{_e(text)}</a>' if href else _e(text)


def samples_section(samples: list[dict], n: int) -> str:
    if not samples:
        return _note("No samples: run `stackrlhf eval`.")
    out = []
    for q in samples[:n]:
        answers = "".join(
            f'<div class="answer"><h4>{_e(name)}</h4><div class="r">'
            + " · ".join(f"{k} {a[k]:.2f}" for k in ("proxy", "gold", "kl") if isinstance(a.get(k), (int, float)))
            + f"</div><pre>{_e(a['text'])}</pre></div>" for name, a in q["answers"].items())
        human = (f'<div class="answer"><h4>best human answer (the dump)</h4><pre>{_e(q["best_answer"])}</pre>'
                 f"</div>")
        out.append(
            f'<div class="question"><h3>{_link(q["question_link"], q["title"])}</h3>'
            f'<div class="meta">{_e(q["site"])} · asked by {_e(q["question_author"])} · {_e(q["license"])}</div>'
            f'<pre>{_e(q["prompt"])}</pre><div class="answers">{answers}{human}</div></div>')
    return "".join(out)


def rl_name(folder: Path) -> str:
    """An on-policy run's algorithm, from its metrics (ppo when they do not say)."""
    return (read_json(folder / "metrics.json") or {}).get("algorithm") or "ppo"


def pipeline_table(run: dict | None) -> str:
    if not run:
        return ""
    rows = "".join(f"<tr><td>{_e(n)}</td><td>{_e(s['status'])}</td><td>{_e(s.get('seconds') or '')}</td></tr>"
                   for n, s in run["stages"].items())
    return f"<h2>Pipeline</h2><table><tr><th>stage</th><th>status</th><th>seconds</th></tr>{rows}</table>"


def write_report(cfg: ReportConfig) -> Path:
    """Write the report; returns its path."""
    run = Path(cfg.run) if cfg.run else None

    def pick(explicit: str, name: str) -> Path | None:
        if explicit:
            return Path(explicit)
        return run / name if run and (run / name).exists() else None

    eval_dir, ilql_dir = pick(cfg.eval, "eval"), pick(cfg.ilql, "ilql")
    # every on-policy run: the one given, else each of the run's ppo/, rloo/ and raft/ folders
    rl_dirs = ({rl_name(Path(cfg.ppo)): Path(cfg.ppo)} if cfg.ppo else
               {name: run / name for name in ("ppo", "rloo", "raft") if run and (run / name / "history.jsonl").exists()})
    rm_dir, gold_dir = pick(cfg.reward, "rm"), pick(cfg.gold_reward, "rm-gold")
    feedback = cfg.feedback or (str(run / "feedback") if run and (run / "feedback").exists() else "")
    ev = read_json(eval_dir / "eval.json") if eval_dir else None
    samples = _read_jsonl(eval_dir / "samples.jsonl") if eval_dir else []
    rms = {name: read_json(d / "metrics.json") for name, d in (("proxy RM", rm_dir), ("gold RM", gold_dir)) if d}
    refusals = [read_json(run / n / "refused.json") for n in ("ppo", "rloo") if run and (run / n / "refused.json").exists()]
    body = [
        f"<h1>{_e(cfg.title)}</h1><p class='meta'>{_e(dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}"
        + (f" · run {_e(run)}" if run else "") + "</p>",
        *[_note(f"Warning: the {name} is below chance ({why}): a policy that gains on it moves against the held-out "
                "preferences.") for name, why in ((n, below_chance(m)) for n, m in rms.items()) if why],
        *[_note(f"The {r['stage']} stage did not run: its reward model has {r['why']}.") for r in refusals],
        "<h2>Held-out evaluation</h2>", eval_table(ev) or _note("No evaluation yet."), frontier(ev),
        "<h2>Training</h2>", rl_curves({name: _read_jsonl(d / "history.jsonl") for name, d in rl_dirs.items()},
                                       _read_jsonl(ilql_dir / "history.jsonl") if ilql_dir else []),
        loop_section(Path(cfg.registry) if cfg.registry else None),
        "<h2>Reward models</h2>", rm_accuracy(rms), rm_confounders(rms),
        "<h2>Human feedback</h2>", feedback_distribution(feedback),
        pipeline_table(read_json(run / "pipeline.json") if run else None),
        "<h2>Sample answers</h2>", samples_section(samples, cfg.samples),
        "<footer>Questions and human answers come from Stack Exchange data dumps and are licensed CC BY-SA "
        "(the version each row names); each sample links its question and names its author.</footer>",
    ]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(cfg.title)}</title><style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>")
    out = Path(cfg.out)
    write_text_atomic(out, page, mode=0o644)  # a report is for sharing (mkstemp alone would leave it 0600)
    return out
