"""`loraprune bench` end to end on a tiny model (2 criteria x 1 ratio x 2 steps), its table and plot,
resuming, bad input; and oneshot scoring working for every criterion."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "loraprune", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def bench_args(model, text, out, *extra):
    return ["bench", "--model", model, "--data", text, "--eval", text, "--eval-ctx", 32, "--eval-windows", 2,
            "--seq-len", 32, "--batch-size", 2, "--steps", 2, "--prune-every", 1, "--threads", 1,
            "--skip-layers", "none", "--save-every", 0, "--out", out, *extra]


def test_bench_two_criteria_writes_table_and_plot(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "bench"
    r = cli(*bench_args(tiny_model_dir(), text_file, out, "--ratios", "0.5", "--criteria", "lora,mask-taylor",
                        "--schedules", "iterative"))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == "loraprune.results/1" and doc["bench_schema"] == "loraprune.bench/1" and doc["complete"]
    # the shared results format: one perplexity record per model, labelled by row id
    recs = doc["results"]
    assert [x["model"] for x in recs] == ["dense", "plain-lora-r0", "lora-iterative-r0.5",
                                          "mask-taylor-iterative-r0.5"]
    assert all(x["kind"] == "perplexity" and x["windows"] == 2 and x["max_windows"] == 2 for x in recs)
    assert set(doc["models"]) == {x["model"] for x in recs}
    assert [x["id"] for x in doc["rows"]] == ["plain-lora-r0", "lora-iterative-r0.5", "mask-taylor-iterative-r0.5"]
    assert all(x["status"] == "ok" for x in doc["rows"])
    name = str(text_file)
    assert list(doc["dense"]["eval"]) == [name]
    dense = doc["dense"]["eval"][name]
    assert dense["windows"] == 2 and dense["ctx"] == 32 and dense["ppl"] > 1
    plain, lora, mt = doc["rows"]
    assert plain["params_kept_frac"] == 1.0 and plain["step_time_rel"] == pytest.approx(1.0)
    for row in (lora, mt):
        assert row["steps"] == 2 and row["ratio"] == 0.5
        assert 0.3 < row["params_kept_frac"] < 1.0
        assert row["eval"][name]["ppl"] > 1 and row["peak_rss_mb"] > 0 and row["step_time_rel"] > 0
        assert row["step_time_basis"] == "cpu" and row["mean_step_cpu_s"] > 0 and row["step_time_rel_wall"] > 0
        run = out / row["run_dir"]
        assert (run / "report.json").is_file() and (run / "masks.json").is_file()
        assert not (run / "adapter").exists()  # deleted after evaluation
        cfg = json.loads((run / "report.json").read_text())["config"]
        assert (cfg["steps"], cfg["seq_len"], cfg["batch_size"], cfg["seed"], cfg["export"]) == (2, 32, 2, 0, False)
    md = (out / "results.md").read_text()
    main_md, versus_md = md.split("Against dense")
    table = [ln for ln in main_md.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| criterion | schedule | ratio | params kept |")
    assert "peak RSS (MB)" in table[0] and "step time vs plain LoRA" in table[0]
    assert len(table) == 2 + 1 + 3  # header, rule, dense, 3 rows
    # the second table: every row's perplexity as a multiple of the dense model's
    vs = [ln for ln in versus_md.splitlines() if ln.startswith("|")]
    assert vs[0] == "| row | ratio | train.txt PPL vs dense |" and len(vs) == 2 + 1 + 3
    assert vs[2] == "| dense (no fine-tuning) | 0 | 1.00x |"
    assert f"| mask-taylor iterative | 0.5 | {mt['eval'][name]['ppl'] / dense['ppl']:.2f}x |" in vs
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    assert any(ln.startswith("| mask-taylor | iterative | 0.5 |") for ln in table)
    png = (out / "ppl_vs_ratio.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "mask-taylor" in r.stdout  # the table is printed too

    # --resume reuses every finished row (no new prune run: the logs stay as they are)
    log = out / "logs" / "lora-iterative-r0.5.log"
    mtime = log.stat().st_mtime_ns
    r2 = cli(*bench_args(tiny_model_dir(), text_file, out, "--ratios", "0.5", "--criteria", "lora,mask-taylor",
                         "--schedules", "iterative", "--resume"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert log.stat().st_mtime_ns == mtime
    doc2 = json.loads((out / "results.json").read_text())
    assert [x["eval"] for x in doc2["rows"]] == [x["eval"] for x in doc["rows"]]

    # --jobs 2: rows train side by side; the table keeps row order and the same numbers
    out3 = tmp_path / "bench-jobs"
    r3 = cli(*bench_args(tiny_model_dir(), text_file, out3, "--ratios", "0.5", "--criteria", "lora,mask-taylor",
                         "--schedules", "iterative", "--jobs", 2))
    assert r3.returncode == 0, r3.stderr[-3000:]
    doc3 = json.loads((out3 / "results.json").read_text())
    assert doc3["complete"] and [x["id"] for x in doc3["rows"]] == [x["id"] for x in doc["rows"]]
    nll = lambda d: [{k: v["nll"] for k, v in x["eval"].items()} for x in d["rows"]]  # noqa: E731
    assert nll(doc3) == nll(doc)


@pytest.mark.parametrize("extra, msg", [
    (["--ratios", "0.5,1.2"], "--ratios"),
    (["--criteria", "lora,nope"], "--criteria"),
    (["--schedules", "sometimes"], "--schedules"),
    (["--jobs", "0"], "--jobs"),
    (["--lr", "-1"], "--lr"),
])
def test_bench_bad_input_exit_2_before_any_run(extra, msg, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "b"
    r = cli(*bench_args(tiny_model_dir(), text_file, out, *extra))
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert not (out / "runs").exists()


def test_bench_refuses_non_empty_out(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "x").write_text("keep me")
    r = cli(*bench_args(tiny_model_dir(), text_file, out))
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (out / "x").read_text() == "keep me"


@pytest.mark.parametrize("criterion", ["lora", "mask-taylor", "taylor", "magnitude", "activation", "random"])
def test_oneshot_works_for_every_criterion(criterion, tiny_model_dir, text_file, tmp_path):
    import torch

    from loraprune.core.config import PruneConfig
    from loraprune.run import prune

    torch.set_num_threads(1)
    cfg = PruneConfig(model=str(tiny_model_dir()), data=str(text_file), eval_windows=0, seq_len=32, batch_size=2,
                      steps=2, calib_batches=2, ratio=0.5, criterion=criterion, schedule="oneshot",
                      skip_layers="none", export=False, save_every=0, out=str(tmp_path / criterion))
    rep = prune(cfg)
    assert all(l["ffn"] == 48 and l["heads"] == 4 for l in rep["layers"])
    assert rep["mask_history"][0]["step"] == 0  # pruned once, before fine-tuning
    assert len(rep["losses"]) == 2


def test_bench_memory_tiny_shape_every_mode(tmp_path):
    out = tmp_path / "mem"
    r = cli("bench-memory", "--shape", "tiny", "--seq", 32, "--repeats", 1, "--threads", 1, "--dtypes", "fp32",
            "--checkpointing", "both", "--malloc", "default", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "memory.json").read_text())
    rows = {(x["mode"], x["checkpointing"]): x for x in doc["summary"]}
    assert set(rows) == {("inference", False), ("lora", False), ("lora", True), ("mask-taylor", False),
                         ("mask-taylor", True), ("taylor", False), ("taylor", True)}
    for x in doc["summary"]:
        assert x["peak_rss_mb"] > 0 and x["repeats"] == 1 and not x["errors"]
    assert rows[("taylor", False)]["vs_taylor"] == pytest.approx(1.0)
    # only taylor holds gradients of frozen weights
    runs = {(x["case"]["mode"], x["case"]["checkpointing"]): x for x in doc["runs"]}
    assert runs[("taylor", False)]["base_grad_bytes"] > 0
    assert runs[("lora", False)]["base_grad_bytes"] == 0 and runs[("mask-taylor", True)]["base_grad_bytes"] == 0
    assert "| default | fp32 | off | lora |" in (out / "memory.md").read_text()


def test_bench_recipes_at_equal_cpu_time(tiny_model_dir, text_file, tmp_path):
    """--recipes rows (named flag sets) x ratios, --time-budget steps from each row's probe, resumable."""
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("recipes:\n"
                       "  - {name: plain-ce, label: 'lora, CE', flags: {criterion: lora, distill_alpha: 0.0}}\n"
                       "  - {name: distill, label: 'lora + distillation', flags: {criterion: lora, distill_alpha: 0.5,"
                       " allocation: global}}\n")
    out = tmp_path / "bench"
    args = bench_args(tiny_model_dir(), text_file, out, "--ratios", "0.5", "--recipes", recipes,
                      "--time-budget", 1.0, "--probe-steps", 3)
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = {x["id"]: x for x in doc["rows"]}
    assert list(rows) == ["plain-lora-r0", "plain-ce-r0.5", "distill-r0.5"]
    for rec in rows.values():
        p = rec["probe"]
        assert rec["steps"] == max(3, int(1.0 // p["cpu_per_step_s"])) == p["steps"]
        assert rec["tokens_seen"] == rec["steps"] * 2 * 32 and rec["train_cpu_s"] > 0
        assert (out / "probes" / f"{rec['id']}.json").is_file()
    cfg = json.loads((out / rows["distill-r0.5"]["run_dir"] / "loraprune_config.json").read_text())
    assert (cfg["distill_alpha"], cfg["allocation"], cfg["steps"]) == (0.5, "global", rows["distill-r0.5"]["steps"])
    assert json.loads((out / rows["plain-lora-r0"]["run_dir"] / "loraprune_config.json").read_text())["distill_alpha"] == 0
    md = (out / "results.md").read_text()
    assert "| lora + distillation | - | 0.5 |" in md and "tokens seen" in md and "Recipe `distill`" in md
    stamps = {f: f.stat().st_mtime_ns for f in (out / "logs").iterdir()}
    r = cli(*args, "--resume")   # everything reused: no probe and no prune subprocess runs again
    assert r.returncode == 0, r.stderr[-2000:]
    assert {f: f.stat().st_mtime_ns for f in (out / "logs").iterdir()} == stamps
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipes:\n  - {name: x, flags: {ratio: 0.3}}\n")
    r = cli(*bench_args(tiny_model_dir(), text_file, tmp_path / "b2", "--recipes", bad))
    assert r.returncode == 2 and "cannot set" in r.stderr


@pytest.mark.parametrize("pattern", ["structured", "2:4"])
def test_row_flags_name_every_field_and_parse_back_to_the_row_config(pattern):
    """A row's subprocess must not fill any field from its own defaults: every set field is a flag,
    and the prune parser turns the flags back into the same config even if its defaults differ."""
    from loraprune.bench.options import config_flags
    from loraprune.cli import build_parser
    from loraprune.cli.prune import config_from_args
    from loraprune.core.config import PruneConfig

    cfg = PruneConfig(pattern=pattern, criterion="lora", distill_alpha=0.5, export=False, out="x", lr=1e-3)
    flags = config_flags(cfg)
    named = {f.lstrip("-").removeprefix("no-").replace("-", "_") for f in flags if f.startswith("--")}
    assert named == {k for k, v in cfg.to_dict().items() if v is not None}
    # so no default of the child is consulted; and the flags parse back to the same config
    args = build_parser().parse_args(["prune", *flags])
    assert config_from_args(args).to_dict() == cfg.to_dict()


def test_against_dense_table_has_each_task_and_the_mean_difference_in_points():
    from loraprune.bench import versus

    def ev(ppl, piqa, boolq):
        return {"ptb": {"ppl": ppl}, "zeroshot": {"mean": (piqa + boolq) / 2, "per_task": {
            "piqa": {"acc": 0.0, "acc_norm": piqa}, "boolq": {"acc": boolq, "acc_norm": None}}}}

    doc = {"options": {"evals": ["ptb"], "zero_shot": ["boolq", "piqa"]}, "dense": {"eval": ev(40.0, 0.70, 0.60)},
           "rows": [{"status": "ok", "plain_lora": False, "label": "r", "ratio": 0.5, "eval": ev(100.0, 0.64, 0.62)},
                    {"status": "failed", "plain_lora": False, "label": "x", "ratio": 0.5}]}
    lines = [ln for ln in versus.render(doc) if ln.startswith("|")]
    assert lines[0] == ("| row | ratio | PTB PPL vs dense | BoolQ | PIQA | zero-shot mean | vs dense (points) "
                        "| mean w/o BoolQ | vs dense w/o BoolQ (points) |")
    assert lines[2] == "| dense (no fine-tuning) | 0 | 1.00x | 0.600 | 0.700 | 0.6500 | +0.0 | 0.7000 | +0.0 |"
    # BoolQ has acc only; without it the mean is PIQA's alone
    assert lines[3] == "| r | 0.5 | 2.50x | 0.620 | 0.640 | 0.6300 | -2.0 | 0.6400 | -6.0 |"
    assert len(lines) == 4   # the failed row is left out


def test_bench_zero_shot_columns_batch_size_and_resume(tiny_model_dir, text_file, tmp_path):
    """--zero-shot with a seeded sample and a batch size: per-task records carry the batch size, the
    against-dense table has the task's column, and --resume re-evaluates only when the batch size differs."""
    out = tmp_path / "bench"
    args = bench_args(tiny_model_dir(), text_file, out, "--ratios", "0.5", "--criteria", "lora", "--schedules",
                      "oneshot", "--no-plain", "--zero-shot", "piqa", "--zero-shot-sample", 3,
                      "--zero-shot-batch-size", 2)
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    for ev in (doc["dense"]["eval"], doc["rows"][0]["eval"]):
        rec = ev["zeroshot"]["per_task"]["piqa"]
        assert rec["batch_size"] == 2 and rec["docs"] == 3 and rec["subset"] == "random 3 (seed 0)"
    md = (out / "results.md").read_text()
    assert "| row | ratio | train.txt PPL vs dense | PIQA | zero-shot mean | vs dense (points) |" in md
    assert "lm_eval batch size 2" in md
    before = (out / "dense_eval.json").stat().st_mtime_ns
    assert cli(*args, "--resume").returncode == 0
    assert (out / "dense_eval.json").stat().st_mtime_ns == before      # same protocol: reused
    r = cli(*args[:-1], 1, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["dense"]["eval"]["zeroshot"]["per_task"]["piqa"]["batch_size"] == 1   # re-measured
