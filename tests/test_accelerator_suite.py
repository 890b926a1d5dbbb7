"""experiments/accelerator_suite.py on the CPU, so the GPU suite cannot rot: its dry run writes
every phase's JSON and the summary; a phase cut by its budget is recorded as cut and the next
phase still runs; a rerun of phase c keeps finished rows and continues from the workdirs.

No assertion depends on how fast the machine is: the dry run's budgets cannot be reached, and
the cut phase is a stub whose child sleeps far past its budget.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import process_env

REPO = pathlib.Path(__file__).parents[1]
SUITE = REPO / "experiments" / "accelerator_suite.py"
PHASE_FILES = {f"phase_{p}.json" for p in "abcde"}
# Budgets that no phase of a dry run comes near, on any machine.
UNREACHABLE = ["--budget_s=100000", "--phase_budgets=a=9000,b=9000,c=9000,d=9000,e=9000"]
STUB_CHILD = "time.sleep(100000)"  # The stub phase's child (accelerator_suite.phase_stub).


def suite(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True, text=True,
    timeout=1200, env=process_env(),
  )  # fmt: skip


def read(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  """One dry run of every phase; returns its out_dir and work_dir."""
  out, work = tmp_path_factory.mktemp("suite_out"), tmp_path_factory.mktemp("suite_work")
  result = suite("--dry_run", f"--out_dir={out}", f"--work_dir={work}", *UNREACHABLE)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, work


def test_dry_run_writes_every_phase_and_the_summary(dry_run):
  out, _ = dry_run
  # Six files and no folders: what comes back from a device machine's $OUT (8 files at most).
  assert {p.name for p in out.iterdir()} == PHASE_FILES | {"suite.json"}
  s = read(out / "suite.json")
  assert s["dry_run"] is True
  assert s["machine"]["backend"] == "cpu" and s["machine"]["jax"] and s["machine"]["device_kinds"]
  assert "XLA_FLAGS" in s["environment"]
  for p in "abcde":
    phase = s["phases"][p]
    assert phase["status"] == "ok", (p, read(out / f"phase_{p}.json").get("error"))
    assert phase["wall_s"] > 0 and phase["allotted_s"] >= 9000
    record = read(out / f"phase_{p}.json")
    assert record["phase"] == p and record["status"] == "ok" and record["wall_s"] > 0
    assert all(c["status"] == "ok" for c in record["children"]), record["children"]
  assert s["wall_s"] >= sum(s["phases"][p]["wall_s"] for p in "abcde")
  # The goals are computed from the phase files, and a dry run claims none of them.
  goals = {g["goal"]: g for g in s["goals"]}
  assert len(goals) == 5 and all(g["met"] is None for g in goals.values())
  (vamp,) = [g for g in goals.values() if g["goal"].startswith("VAE, VampPrior")]
  assert (
    vamp["value"] == read(out / "phase_c.json")["results"]["rows"]["VAE, VampPrior"]["nll_nats"]
  )


def test_dry_run_phase_results(dry_run):
  out, _ = dry_run
  a = read(out / "phase_a.json")["results"]
  assert list(a) == ["batch_256"]  # The dry run's one batch size (the large one).
  large = a["batch_256"]
  assert large["batch_size"] == 256 and large["examples_per_sec"]["median"] > 0
  # The anchor ran at that batch, side by side with the project's command.
  assert large["end_to_end"]["anchor_command"].endswith(" 1 256")
  speedup = large["speedup_over_anchor"]["warm"]
  assert speedup == pytest.approx(1 / large["end_to_end"]["median_warm_ratio"])

  b = read(out / "phase_b.json")["results"]
  one, three = b["models_1"], b["models_3"]
  assert one["sequential"] is True and three["sequential"] is False
  assert len(set(three["betas"])) == 3 and three["betas"][0] == 0.25 and three["betas"][-1] == 64
  assert one["compiles_during_timing"] == 0 and three["compiles_during_timing"] == 0
  assert three["sweep_compiles"] == 1
  summary = b["summary"]["3"]
  assert summary["one_model_step_s"] == one["per_model_step_s_median"]["sequential"]
  assert summary["sweep_step_over_one_model_step"] == pytest.approx(
    three["sweep_step_s_median"] / summary["one_model_step_s"]
  )

  c = read(out / "phase_c.json")["results"]["rows"]
  vamp, iwae = c["VAE, VampPrior"], c["IWAE k=5 fine-tuning of the best row"]
  assert vamp["status"] == "finished" and math.isfinite(vamp["nll_nats"])
  assert vamp["num_importance_samples"] == 3 and vamp["paper_nll"] == 227.35
  assert iwae["status"] == "finished" and iwae["base_row"] == "VAE, VampPrior"
  assert iwae["epochs_completed"] == vamp["epochs_completed"] + 1  # One more, on the IWAE bound.

  d = read(out / "phase_d.json")["results"]
  assert d["finished"] is True and d["latest_checkpoint_step"] > 0

  e = read(out / "phase_e.json")["results"]
  assert e["identical_runs_bit_identical"] is True
  assert e["resume_bit_exact"] is True and e["resume_state_bit_exact"] is True
  assert e["xla_flags_in_effect"] == "" and e["backend"] == "cpu"
  assert e["runs"]["first"]["step"] == e["steps"] == 8
  # On a CPU float32 products are full precision at any setting: "highest" is not run.
  precision = e["matmul_precision"]
  assert precision["default_test_neg_elbo"] > 0 and precision["highest_test_neg_elbo"] is None
  assert "highest" not in e["runs"] and "deterministic_ops" not in e


def _sleeping_stubs() -> list[int]:
  pids = []
  for entry in os.listdir("/proc"):
    try:
      cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
    except OSError:
      continue
    if STUB_CHILD.encode() in cmdline and b"-c" in cmdline:
      pids.append(int(entry))
  return pids


@pytest.mark.parametrize("stub", ["stub_sleep", "stub_hang"])
def test_a_cut_phase_is_recorded_and_the_next_phase_runs(stub, tmp_path):
  """Phase a is a stub that runs past its 6 s: its child sleeps (the worker stops it at the
  phase's deadline), or the worker itself hangs (the suite kills its whole tree). Either
  way it is recorded as cut, nothing of it is left running, and phase d still runs (and,
  with no dSprites file in the data root, says why it cannot)."""
  out, empty = tmp_path / "out", tmp_path / "data"
  empty.mkdir()
  result = suite(
    f"--out_dir={out}", f"--work_dir={tmp_path / 'work'}", f"--data_root={empty}",
    "--phases=a,d", f"--{stub}=a", "--phase_budgets=a=6,d=9000", "--budget_s=100000",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  s = read(out / "suite.json")
  assert s["phases"]["a"]["status"] == "cut"
  a = read(out / "phase_a.json")
  assert a["status"] == "cut" and a["allotted_s"] == 6
  if stub == "stub_hang":
    assert a["error"] == "the worker was stopped at the end of its 6 s"
  assert not _sleeping_stubs(), "the cut phase's child outlived its phase"
  d = read(out / "phase_d.json")
  assert s["phases"]["d"]["status"] == d["status"] == "skipped"
  # The reason is the worker's own (not the suite's "no time left").
  assert "dsprites_ndarray" in d["reason"] and "--phases=d" in d["reason"]
  assert "b" not in s["phases"] and {p.name for p in out.iterdir()} == {
    "suite.json", "phase_a.json", "phase_d.json"
  }  # fmt: skip


def test_rerun_of_phase_c_keeps_finished_rows_and_continues_from_the_workdirs(dry_run, tmp_path):
  """A row missing from the table (as after a call cut during its evaluation) is finished
  from its workdir without training; a row in the table is kept without a process."""
  first_out, work = dry_run
  table_path = work / "c" / "table" / "table.json"
  table = read(table_path)
  before = table.pop("VAE, VampPrior")
  table_path.write_text(json.dumps(table))
  runs = work / "c" / "runs"
  checkpoints = {d.name: sorted(p.name for p in (d / "checkpoints").iterdir()) for d in
                 runs.iterdir() if d.is_dir()}  # fmt: skip

  out = tmp_path / "out"
  result = suite("--dry_run", "--phases=c", f"--out_dir={out}", f"--work_dir={work}", *UNREACHABLE)
  assert result.returncode == 0, result.stderr[-3000:]
  c = read(out / "phase_c.json")
  assert c["status"] == "ok", c.get("error")
  rows = c["results"]["rows"]
  vamp, iwae = rows["VAE, VampPrior"], rows["IWAE k=5 fine-tuning of the best row"]
  assert vamp["status"] == "finished" and vamp["epochs_this_call"] == 0
  assert vamp["nll_nats"] == before["nll_nats"]
  assert vamp["checkpoint_step"] == before["checkpoint_step"]
  first = read(first_out / "phase_c.json")["results"]["rows"][
    "IWAE k=5 fine-tuning of the best row"
  ]
  assert iwae["status"] == "kept" and iwae["nll_nats"] == first["nll_nats"]
  assert [child["name"] for child in c["children"]] == ["VAE_VampPrior"]  # The IWAE row: none.
  log = pathlib.Path(c["children"][0]["log"]).read_text()
  assert "This run is finished" in log and "is evaluated already" in log
  after = {d.name: sorted(p.name for p in (d / "checkpoints").iterdir()) for d in
           runs.iterdir() if d.is_dir()}  # fmt: skip
  assert after == checkpoints
  assert set(read(table_path)) == {"VAE, VampPrior", "IWAE k=5 fine-tuning of the best row"}
