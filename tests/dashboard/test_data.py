"""Readers of the dashboard: the recipe's JSONL, TensorBoard event files,
trackio's SQLite store; incremental reading, bad input, merging, mismatch."""
from __future__ import annotations

import json
import math
import sqlite3
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onpolicy.dashboard import tfevents
from onpolicy.dashboard.data import JsonlSource, Run, load_token_file, resolve_runs
from onpolicy.dashboard.metrics import canonical_key, step_mismatch

from .make_runs import (encode_event, f32, tfrecord, write_onpolicy_run, write_tfevents, write_trl_tensorboard_run,
                        write_trl_trackio_run)

CANON = ("bitwise_equal_frac", "logp_abs_diff_mean", "logp_abs_diff_max", "kl_k1", "kl_k3",
         "is_ratio_min", "is_ratio_mean", "is_ratio_max", "reward_mean", "reward_std")


def one(path) -> Run:
    (r,) = resolve_runs([path])
    return r


def assert_rows_equal(run: Run, truth: dict[int, dict], keys=CANON):
    assert run.table.steps == sorted(truth)
    for step, want in truth.items():
        row = run.table.rows[step]
        for k in keys:
            if k in want:
                assert row[k] == want[k], (step, k, row[k], want[k])   # exact: nothing may be rounded


# --- names and the mismatch rule --------------------------------------------------

def test_canonical_names_of_trl_verl_slime():
    assert canonical_key("train/sampling/sampling_logp_difference/max") == "logp_abs_diff_max"
    assert canonical_key("sampling/importance_sampling_ratio/min") == "is_ratio_min"
    assert canonical_key("rollout_corr/k3_kl") == "kl_k3"
    assert canonical_key("rollout_corr/kl") == "kl_k1"
    assert canonical_key("train/train_rollout_logprob_abs_diff") == "logp_abs_diff_mean"
    assert canonical_key("train/reward") == "reward_mean"
    assert canonical_key("eval/reward") == "eval/reward"        # evaluation never maps onto training metrics
    assert canonical_key("train/loss") == "train/loss"          # unknown names are kept as they are


def test_step_mismatch_rule():
    assert step_mismatch({}) is None
    assert step_mismatch({"reward_mean": 1.0}) is None
    assert step_mismatch({"bitwise_equal_frac": 1.0, "kl_k3": 0.0}) is False
    assert step_mismatch({"bitwise_equal_frac": 1.0, "kl_k3": 1e-30}) is True
    assert step_mismatch({"is_ratio_min": 1.0, "is_ratio_max": 1.0}) is False
    assert step_mismatch({"is_ratio_min": 0.999}) is True
    assert step_mismatch({"logp_abs_diff_max": math.nan}) is True   # a diverged step must not look clean
    assert step_mismatch({"first_mismatch": None}) is False
    assert step_mismatch({"first_mismatch": {"seq": 0, "pos": 3}}) is True


# --- metrics.jsonl ----------------------------------------------------------------

def test_onpolicy_run_reads_exact_values(tmp_path):
    truth = write_onpolicy_run(tmp_path / "on", steps=60, seed=5, mismatch=False)
    r = one(tmp_path / "on")
    assert_rows_equal(r, truth)
    s = r.summary()
    assert (s.status, s.steps, s.mismatch_steps, s.equal_steps) == ("equal", 60, 0, 60)
    assert r.onpolicy is True and not r.warnings and r.message is None
    assert r.token_steps() == [1] + list(range(10, 61, 10))


def test_mismatch_run_summary(tmp_path):
    truth = write_onpolicy_run(tmp_path / "off", steps=60, seed=6, mismatch=True)
    r = one(tmp_path / "off")
    assert_rows_equal(r, truth)
    s = r.summary()
    assert (s.status, s.mismatch_steps, s.first_mismatch_step) == ("mismatch", 60, 1)
    worst = max(truth, key=lambda k: truth[k]["logp_abs_diff_max"])
    assert s.worst["logp_abs_diff_max"] == {"step": worst, "value": truth[worst]["logp_abs_diff_max"]}
    low = min(truth, key=lambda k: truth[k]["bitwise_equal_frac"])
    assert s.worst["bitwise_equal_frac"]["step"] == low
    assert r.onpolicy is False
    assert r.first_mismatch[1] == truth[1]["first_mismatch"]


def test_token_file_metrics_match_the_step_line(tmp_path):
    """The fixture computes token steps' metrics from the token file; the
    drill-down recomputes them in the browser: both must read the same numbers."""
    truth = write_onpolicy_run(tmp_path / "off", steps=20, seed=7, mismatch=True)
    r = one(tmp_path / "off")
    f = r.token_file(10)
    pairs = [(a, b) for s in f["samples"] for a, b in zip(s["sampler_logp"], s["trainer_logp"])]
    assert sum(a == b for a, b in pairs) / len(pairs) == truth[10]["bitwise_equal_frac"]
    assert max(abs(b - a) for a, b in pairs) == truth[10]["logp_abs_diff_max"]
    assert r.token_file(11) is None


def test_corrupt_and_partial_lines_are_skipped_with_warnings(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    p = d / "metrics.jsonl"
    p.write_text('{"step": 1, "kl_k3": 0.0}\n'
                 '{"step": 2, "kl_k3": 0.5\n'          # corrupt (newline-terminated)
                 '[1, 2]\n'                             # not an object
                 '{"kl_k3": 0.1}\n'                     # no step
                 '\n'
                 '{"step": 3, "kl_k3": 0.0}\n'
                 '{"step": 4, "kl_')                    # being written
    r = one(d)
    assert r.table.steps == [1, 3]
    ws = "\n".join(r.warnings)
    assert "line 2: not valid JSON" in ws and "line 3: not a JSON object" in ws and "line 4: no integer 'step'" in ws
    assert r.notes and "line 7 is incomplete" in r.notes[0]
    with open(p, "a") as fh:
        fh.write('k3": 0.25}\n{"step": 5, "kl_k3": 0.0}\n')
    r.refresh(force=True)
    assert r.table.steps == [1, 3, 4, 5] and r.table.rows[4]["kl_k3"] == 0.25
    assert not r.notes
    assert r.summary().mismatch_steps == 1


def test_non_finite_values_as_python_json_writes_them(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "kl_k3": math.nan, "is_ratio_max": math.inf}) + "\n" +
                                     json.dumps({"step": 2, "kl_k3": "NaN", "is_ratio_max": "Infinity"}) + "\n")
    r = one(d)
    assert not r.warnings and r.table.steps == [1, 2]
    for s in (1, 2):
        assert math.isnan(r.table.rows[s]["kl_k3"]) and r.table.rows[s]["is_ratio_max"] == math.inf
    assert r.summary().mismatch_steps == 2 and r.summary().nonfinite == {"kl_k3": 2, "is_ratio_max": 2}
    assert any("kl_k3 is NaN or infinite at 2 steps" in n for n in r.notes)


def test_unterminated_complete_last_line_is_read_once(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "kl_k3": 0.0}\n{"step": 2, "kl_k3": 0.0}')
    r = one(d)
    assert r.table.steps == [1, 2] and not r.notes
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write('\n{"step": 3, "kl_k3": 0.0}\n{"step": 4, "kl_k3": "x"\n')
    r.refresh(force=True)
    assert r.table.steps == [1, 2, 3]
    assert any("line 4: not valid JSON" in w for w in r.warnings)   # numbering survives the early read


def _chunked_read(content: bytes, cuts: list[int], tmp_path) -> JsonlSource:
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b"")
    src = JsonlSource(p)
    rows = []
    prev = 0
    for c in sorted(set(cuts)) + [len(content)]:
        with open(p, "ab") as fh:
            fh.write(content[prev:c])
        prev = c
        rows += src.read_new()
    return rows, src


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.builds(lambda s, v: json.dumps({"step": s, "kl_k3": v}), st.integers(0, 10**6),
              st.floats(allow_nan=False, allow_infinity=False)),
    st.sampled_from(['{"step": 1, "kl', "not json", "[]", '{"no_step": 1}', ""])), max_size=25),
    data=st.data())
def test_incremental_reading_equals_one_shot_reading(tmp_path_factory, lines, data):
    """However the writer's bytes arrive (any split points), the rows and the
    warnings are those of reading the finished file at once."""
    tmp = tmp_path_factory.mktemp("jsonl")
    content = ("\n".join(lines) + "\n").encode()
    cuts = data.draw(st.lists(st.integers(0, len(content)), max_size=8))
    inc_rows, inc = _chunked_read(content, cuts, tmp)
    (tmp / "one").mkdir()
    one_rows, whole = _chunked_read(content, [], tmp / "one")
    assert inc_rows == one_rows
    assert inc.warnings == whole.warnings
    assert inc.offset == whole.offset == len(content)


def test_truncated_file_is_reread(tmp_path):
    write_onpolicy_run(tmp_path / "run", steps=30, seed=1)
    r = one(tmp_path / "run")
    v = r.version
    truth = write_onpolicy_run(tmp_path / "run", steps=10, seed=2)   # a restarted run rewrites the file
    r.refresh(force=True)
    assert_rows_equal(r, truth)
    assert r.version > v and any("re-read" in w for w in r.warnings)
    assert r.columns(v)["from_step"] is None                           # clients must reload everything


def test_missing_and_empty_run_dirs_have_a_clear_message(tmp_path):
    missing, empty = tmp_path / "not-yet", tmp_path / "empty"
    empty.mkdir()
    rm, re_ = resolve_runs([missing, empty])
    assert "does not exist" in rm.message and str(missing) in rm.message
    assert "No metrics" in re_.message and "metrics.jsonl" in re_.message
    assert rm.summary().status == "empty" and rm.columns(0)["steps"] == []
    # the run starts writing later: the dashboard picks it up (live)
    truth = write_onpolicy_run(missing, steps=5, seed=3)
    rm.refresh(force=True)
    assert_rows_equal(rm, truth)
    assert rm.message is None


# --- versions: what a polling client receives ----------------------------------------

def test_columns_since_version(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    p = d / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "kl_k3": 0.0}) + "\n" for s in range(1, 6)))
    r = one(d)
    v1 = r.version
    full = r.columns(0)
    assert full["from_step"] is None and full["steps"] == [1, 2, 3, 4, 5] and full["mismatch"] == [0] * 5
    assert r.columns(v1) is None
    with open(p, "a") as fh:
        fh.write(json.dumps({"step": 6, "kl_k3": 0.5}) + "\n")
    r.refresh(force=True)
    inc = r.columns(v1)
    assert inc["from_step"] == 6 and inc["steps"] == [6] and inc["mismatch"] == [1] and inc["cols"]["kl_k3"] == [0.5]
    v2 = r.version
    with open(p, "a") as fh:                                   # a late line for an earlier step
        fh.write(json.dumps({"step": 3, "kl_k3": 0.25}) + "\n")
    r.refresh(force=True)
    inc = r.columns(v2)
    assert inc["from_step"] == 3 and inc["steps"] == [3, 4, 5, 6] and inc["cols"]["kl_k3"][0] == 0.25
    both = r.columns(v1)                                       # two change sets at once: lowest step wins
    assert both["from_step"] == 3


# --- TensorBoard ------------------------------------------------------------------

def test_trl_tensorboard_run(tmp_path):
    truth = write_trl_tensorboard_run(tmp_path / "trl", steps=40, seed=3)
    r = one(tmp_path / "trl")
    assert_rows_equal(r, truth)                        # float32-rounded, as TensorBoard stores them
    assert r.sources_label() == ["TensorBoard (1 event file)"]
    assert "train/loss" in r.table.numeric_keys and "train/entropy" in r.table.numeric_keys
    s = r.summary()
    assert s.status == "mismatch" and s.mismatch_steps == 40
    assert r.token_steps() == [] and r.onpolicy is None


def test_tfevents_partial_record_is_read_when_complete(tmp_path):
    p = tmp_path / "events.out.tfevents.1.host"
    recs = [tfrecord(encode_event(1.0, s, {"train/reward": s / 10})) for s in range(1, 4)]
    blob = b"".join(recs)
    cut = len(recs[0]) + 7
    p.write_bytes(blob[:cut])
    rd = tfevents.EventFileReader(str(p))
    assert [e[1] for e in rd.read_new()] == [1]
    with open(p, "ab") as fh:
        fh.write(blob[cut:])
    got = list(rd.read_new())
    assert [e[1] for e in got] == [2, 3] and got[1][2] == {"train/reward": f32(0.3)}
    assert not rd.warnings


def test_tfevents_corrupt_header_stops_with_a_warning(tmp_path):
    p = tmp_path / "events.out.tfevents.1.host"
    recs = [tfrecord(encode_event(1.0, s, {"x": 1.0})) for s in range(1, 4)]
    bad = bytearray(recs[1])
    bad[0] ^= 0xFF                                   # length no longer matches its checksum
    p.write_bytes(recs[0] + bytes(bad) + recs[2])
    rd = tfevents.EventFileReader(str(p))
    assert [e[1] for e in rd.read_new()] == [1]
    assert rd.warnings and "corrupt record header" in rd.warnings[0]


def test_tfevents_undecodable_record_is_skipped(tmp_path):
    p = tmp_path / "events.out.tfevents.1.host"
    junk = b"\x0a\xff\xff\xff\xff\x0f"             # a length-delimited field longer than the record
    p.write_bytes(tfrecord(encode_event(1.0, 1, {"x": 1.0})) + tfrecord(junk) + tfrecord(encode_event(1.0, 3, {"x": 2.0})))
    rd = tfevents.EventFileReader(str(p))
    assert [e[1] for e in rd.read_new()] == [1, 3]
    assert len(rd.warnings) == 1 and ("does not decode" in rd.warnings[0] or "checksum" in rd.warnings[0])


def test_masked_crc_matches_known_value():
    assert tfevents.crc32c(b"123456789") == 0xE3069283          # the CRC-32C check value (RFC 3720)
    # against a bit-by-bit CRC-32C written from the definition (reflected polynomial 0x82F63B78)
    def crc_bitwise(data: bytes) -> int:
        c = 0xFFFFFFFF
        for b in data:
            c ^= b
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        return c ^ 0xFFFFFFFF
    for data in (bytes(8), struct.pack("<Q", 1234), b"brain.Event:2" * 7):
        assert tfevents.crc32c(data) == crc_bitwise(data)
    c = crc_bitwise(bytes(8))                                   # the length field of an empty record
    assert tfevents.masked_crc32c(bytes(8)) == ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def test_tfevents_flipped_data_byte_fails_the_checksum(tmp_path):
    """Issue 34 defect 8: a flipped byte in a record's data (here in the float of
    a scalar, so the record still decodes) must be caught by the CRC, always."""
    p = tmp_path / "events.out.tfevents.1.host"
    recs = [tfrecord(encode_event(1.0, s, {"train/reward": 0.1})) for s in range(1, 4)]
    bad = bytearray(recs[1])
    bad[-6] ^= 0x40                                  # the float's top byte, inside the data
    p.write_bytes(recs[0] + bytes(bad) + recs[2])
    rd = tfevents.EventFileReader(str(p))
    got = list(rd.read_new())
    assert [(e[1], e[2]) for e in got] == [(1, {"train/reward": f32(0.1)}), (3, {"train/reward": f32(0.1)})]
    assert len(rd.warnings) == 1 and "record 2 fails its CRC-32C checksum" in rd.warnings[0]
    # and it reaches the run's warnings
    (tmp_path / "run" / "runs").mkdir(parents=True)
    (tmp_path / "run" / "runs" / p.name).write_bytes(p.read_bytes())
    r = one(tmp_path / "run")
    assert r.table.steps == [1, 3] and any("checksum" in w for w in r.warnings)


def test_reader_agrees_with_tensorboardx(tmp_path):
    """Cross-check against a real writer: tensorboardX (one of the two writers
    transformers' TensorBoardCallback uses), simple_value and tf2-style tensor scalars."""
    tbx = pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.tensor_pb2 import TensorProto

    w = tbx.SummaryWriter(logdir=str(tmp_path / "runs" / "x"))
    want = {}
    for step in range(1, 30):
        for tag, v in {"train/sampling/sampling_logp_difference/max": 0.1 * step + 1e-7,
                       "train/reward": 1.0 / step}.items():
            w.add_scalar(tag, v, step)
            want.setdefault(step, {})[canonical_key(tag)] = f32(v)
        # tf2-style scalar: a DT_DOUBLE tensor, and a DT_FLOAT one in tensor_content
        s = Summary(value=[
            Summary.Value(tag="rollout_corr/k3_kl", tensor=TensorProto(dtype=2, double_val=[step * 1e-9]),
                          metadata=SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))),
            Summary.Value(tag="train/rollout_corr/kl", tensor=TensorProto(dtype=1, tensor_content=struct.pack("<f", -step / 7))),
        ])
        w.file_writer.add_event(Event(summary=s, step=step, wall_time=1.0))
        want[step]["kl_k3"] = step * 1e-9
        want[step]["kl_k1"] = f32(-step / 7)
    w.add_histogram("train/hist", [1.0, 2.0, 3.0], 5)      # not a scalar: ignored
    w.add_text("train/text", "hello", 5)
    w.close()
    r = one(tmp_path)
    assert r.table.steps == sorted(want)
    for step, vals in want.items():
        for k, v in vals.items():
            assert r.table.rows[step][k] == v, (step, k)
    assert "train/hist" not in r.table.numeric_keys and "train/text" not in r.table.numeric_keys
    assert not r.warnings


def test_jsonl_wins_over_tensorboard_for_the_same_metric(tmp_path):
    d = tmp_path / "run"
    truth = write_onpolicy_run(d, steps=5, seed=4, mismatch=True)
    write_tfevents(d / "runs" / "a" / "events.out.tfevents.1.h",
                   [(1.0, s, {"train/sampling/sampling_logp_difference/max": 99.0, "train/entropy": 0.5})
                    for s in range(1, 8)])
    r = one(d)
    assert r.table.steps == list(range(1, 8))
    for s in range(1, 6):
        assert r.table.rows[s]["logp_abs_diff_max"] == truth[s]["logp_abs_diff_max"]
    assert r.table.rows[7]["logp_abs_diff_max"] == 99.0             # only TensorBoard has step 7
    assert r.table.rows[3]["train/entropy"] == 0.5
    assert set(r.sources_label()) == {"metrics.jsonl", "TensorBoard (1 event file)"}


# --- trackio --------------------------------------------------------------------------

def test_trackio_store(tmp_path, monkeypatch):
    db = tmp_path / "trackio" / "grpo.db"
    t_a = write_trl_trackio_run(db, "run-a", steps=25, seed=1, eval_every=10)
    t_b = write_trl_trackio_run(db, "run-b", steps=12, seed=2, every=3)
    runs = resolve_runs([db])
    assert [r.name for r in runs] == ["run-a", "run-b"]
    assert_rows_equal(runs[0], t_a)                    # step = train/global_step, eval rows left out
    assert_rows_equal(runs[1], t_b)
    assert "eval/reward" not in runs[0].table.numeric_keys
    assert runs[0].summary().status == "mismatch"
    (only_b,) = resolve_runs([f"{db}#run-b"])
    assert only_b.table.steps == [3, 6, 9, 12]
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    (via_store,) = resolve_runs(["trackio:grpo#run-a"])
    assert via_store.table.steps == runs[0].table.steps
    (missing,) = resolve_runs(["trackio:nope"])
    assert "does not exist" in missing.message
    # live: rows appended later are read from the last row id on
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO metrics (run_id, timestamp, run_name, step, metrics) VALUES (?,?,?,?,?)",
                     ("run-b-id", "2025-11-27T12:00:00+00:00", "run-b", 99,
                      json.dumps({"train/global_step": 15, "train/sampling/sampling_logp_difference/max": "Infinity"})))
    conn.close()
    runs[1].refresh(force=True)
    assert runs[1].table.steps[-1] == 15 and runs[1].table.rows[15]["logp_abs_diff_max"] == math.inf
    assert runs[1].columns(0)["cols"]["logp_abs_diff_max"][-1] is None     # JSON-safe
    assert runs[1].summary().nonfinite == {"logp_abs_diff_max": 1}


def test_trackio_db_inside_a_run_dir_merges(tmp_path):
    d = tmp_path / "out"
    t = write_trl_trackio_run(d / "trackio" / "p.db", "only", steps=6, seed=3)
    r = one(d)
    assert_rows_equal(r, t)


# --- per-token files --------------------------------------------------------------------

def test_token_file_checks(tmp_path):
    p = tmp_path / "step_000001.json"
    p.write_text(json.dumps({"step": 1, "samples": [
        {"seq": 0, "text": ["a", "b"], "token_ids": [5, 6], "sampler_logp": [-0.5, -1.0], "trainer_logp": [-0.5, "-Infinity"]},
        {"seq": 1, "sampler_logp": [-0.5], "trainer_logp": [-0.5, -0.1]},
        {"seq": 2, "text": ["only one"], "token_ids": [7, 8], "sampler_logp": [-1.0, -2.0], "trainer_logp": [-1.0, -2.0]},
        "junk"]}))
    f = load_token_file(p)
    assert [s["seq"] for s in f["samples"]] == [0, 2]
    assert f["samples"][0]["trainer_logp"] == [-0.5, "-inf"]           # non-finite travels as a string
    assert f["samples"][1]["text"] == ["⟨7⟩", "⟨8⟩"]
    assert len(f["warnings"]) == 3
    p.write_text('{"step": 1, "samples": [')
    assert "not valid JSON" in load_token_file(p)["warnings"][0]


# --- issue 34: defects found in use ------------------------------------------------------

def test_a_file_path_names_its_run_directory(tmp_path):
    """Defect 3: metrics.jsonl or an event file instead of the run dir reads the
    run dir; any other file is a clear error, not a NotADirectoryError."""
    from onpolicy.dashboard.data import RunSpecError

    truth = write_onpolicy_run(tmp_path / "on", steps=8, seed=1)
    r = one(tmp_path / "on" / "metrics.jsonl")
    assert r.name == "on" and r.path == str(tmp_path / "on") and r.token_steps() == [1]
    assert_rows_equal(r, truth)
    tb = write_trl_tensorboard_run(tmp_path / "trl", steps=5, seed=2)
    (ev,) = (tmp_path / "trl").rglob("events.out.tfevents.*")
    assert_rows_equal(one(ev), tb)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RunSpecError, match="is a file, not a run directory: pass the directory"):
        resolve_runs([tmp_path / "notes.txt"])
    (tmp_path / "junk.db").write_text("not sqlite")
    with pytest.raises(RunSpecError, match="not a trackio project database"):
        resolve_runs([tmp_path / "junk.db"])


def test_unreadable_source_is_reported_and_the_rest_goes_on(tmp_path):
    """Defect 2: an OSError on one file (here a directory named metrics.jsonl)
    is that source's error; the run's other sources are still read."""
    d = tmp_path / "x"
    (d / "metrics.jsonl").mkdir(parents=True)
    write_tfevents(d / "runs" / "a" / "events.out.tfevents.1.h", [(1.0, s, {"train/reward": 0.5}) for s in (1, 2)])
    r = one(d)
    assert r.table.steps == [1, 2]
    assert any("cannot read" in n and "metrics.jsonl" in n and "Is a directory" in n for n in r.notes)
    (tmp_path / "y" / "metrics.jsonl").mkdir(parents=True)      # nothing else to read: the error is the message
    (e,) = resolve_runs([tmp_path / "y"])
    assert "cannot read" in e.message and "Is a directory" in e.message


def test_a_step_written_again_is_warned(tmp_path):
    """Defect 7: a resumed run rewrites steps; the later value wins, with a warning
    (same values again, e.g. TRL's epoch in its final log, are not warned)."""
    d = tmp_path / "run"
    d.mkdir()
    lines = [{"step": s, "kl_k3": 0.0, "reward_mean": v} for s, v in ((1, 0.1), (2, 0.2), (3, 0.3))]
    lines += [{"step": 2, "kl_k3": 0.0, "reward_mean": 9.0}, {"step": 3, "kl_k3": 0.0, "reward_mean": 0.3}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = one(d)
    assert r.table.rows[2]["reward_mean"] == 9.0
    (w,) = [w for w in r.warnings if "written again" in w]
    assert w.startswith("metrics.jsonl: 1 step written again with other values (step 2;")
    # TensorBoard: a resumed TRL run writes a second event file over the same steps
    tb = tmp_path / "tb"
    write_tfevents(tb / "runs" / "a" / "events.out.tfevents.1.h", [(1.0, s, {"train/loss": 1.0}) for s in (1, 2, 3)])
    write_tfevents(tb / "runs" / "b" / "events.out.tfevents.2.h", [(2.0, s, {"train/loss": 2.0}) for s in (2, 3, 4)])
    r = one(tb)
    assert r.table.rows[3]["train/loss"] == 2.0
    assert any("TensorBoard (2 event files): 2 steps written again" in w and "step 2, 3;" in w for w in r.warnings)


def test_nan_is_the_worst_value_and_negative_steps_are_skipped(tmp_path):
    """Defect 10: a run flagged for a NaN shows NaN as its worst, not the largest
    finite value; negative and fractional steps are skipped with a warning."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "logp_abs_diff_max": 0.0}) + "\n" +
        json.dumps({"step": 2, "logp_abs_diff_max": math.nan}) + "\n" +
        json.dumps({"step": -3, "logp_abs_diff_max": 0.0}) + "\n" +
        json.dumps({"step": 4.5, "logp_abs_diff_max": 0.0}) + "\n")
    r = one(d)
    s = r.summary()
    assert r.table.steps == [1, 2] and s.mismatch_steps == 1
    assert math.isnan(s.worst["logp_abs_diff_max"]["value"]) and s.worst["logp_abs_diff_max"]["step"] == 2
    assert s.as_dict()["worst"]["logp_abs_diff_max"] == {"value": "NaN", "step": 2}     # JSON-safe
    ws = "\n".join(r.warnings)
    assert "line 3: negative step -3; skipped" in ws and "line 4: step 4.5 is not an integer" in ws
    # TensorBoard: a negative step is skipped with a warning too
    write_tfevents(tmp_path / "tb" / "events.out.tfevents.1.h", [(1.0, -1, {"x": 1.0}), (1.0, 1, {"x": 2.0})])
    r = one(tmp_path / "tb")
    assert r.table.steps == [1] and any("1 record with a negative step (first: -1); skipped" in w for w in r.warnings)


def test_run_state_running_stopped_finished(tmp_path):
    """Defect 11: each run's state, from its files' last write and the end record."""
    import os
    import time as _time

    d = tmp_path / "run"
    write_onpolicy_run(d, steps=3, seed=1)
    r = one(d)
    assert r.state() == "running" and abs(r.last_write() - _time.time()) < 60
    old = _time.time() - 3600
    os.utime(d / "metrics.jsonl", (old, old))
    r.refresh(force=True)
    assert r.state() == "stopped" and r.last_write() == pytest.approx(old)
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "finished", "time": 1234.5}) + "\n")
    r.refresh(force=True)
    assert r.state() == "finished" and r.finished() == 1234.5 and not r.warnings
    with open(d / "metrics.jsonl", "a") as fh:              # the run was resumed after all
        fh.write(json.dumps({"step": 4, "kl_k3": 0.0}) + "\n")
    r.refresh(force=True)
    assert r.state() == "running" and r.finished() is None
    assert resolve_runs([tmp_path / "nope"])[0].state() == "waiting"


def test_onpolicy_metrics_logged_through_trl_are_ours():
    """Defect 13: onpolicy's TRL integration logs onpolicy/<key>; they are our
    charts' keys, not extra metrics named train/onpolicy/*."""
    assert canonical_key("train/onpolicy/bitwise_equal_frac") == "bitwise_equal_frac"
    assert canonical_key("onpolicy/kl_k3") == "kl_k3"
    assert canonical_key("train/onpolicy/something_else") == "train/onpolicy/something_else"


def test_nul_bytes_line_is_named_as_such(tmp_path):
    """Defect 13: a line of NUL bytes (a crash, a zero-filled block) gets a warning
    that says so, not a 'utf-32-be' codec error."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_bytes(b'{"step": 1, "kl_k3": 0.0}\n\x00\x00\x00\x00{"step": 2}\n{"step": 3, "kl_k3": 0.0}\n')
    r = one(d)
    assert r.table.steps == [1, 3]
    (w,) = r.warnings
    assert "line 2: contains NUL bytes" in w and "utf-32" not in w
    from onpolicy.dashboard.jsonio import JSONError, loads
    with pytest.raises(JSONError) as e:
        loads(b'{"a": "\xff"}')
    assert "utf-8" in str(e.value)
