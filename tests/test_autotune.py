"""Optional autotuning: off by default, picks the fastest candidate by its timer, persists to disk, never tunes during capture."""
import dataclasses
import json

import pytest
import torch

import simple_moe as sm
from simple_moe import autotune
from simple_moe.grouped_gemm_tiles import TileConfig
from simple_moe.pipeline import triton_runs_on


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE", "1")
    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE_CACHE", str(tmp_path / "tiles.json"))
    autotune.clear_memory_cache()
    yield tmp_path / "tiles.json"
    autotune.clear_memory_cache()


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("SIMPLE_MOE_AUTOTUNE", raising=False)
    assert not autotune.enabled()


def test_picks_fastest_and_persists(tuning, monkeypatch):
    default = TileConfig(16, 64, 128, 1, 4, 4)
    fastest = TileConfig(16, 128, 256, 1, 4, 3)
    ran = []
    # A fake clock: every config costs 1 ms except `fastest`; the run callback records what was tried.
    monkeypatch.setattr(autotune, "time_config", lambda run: (run(), 0.5 if ran[-1] == fastest else 1.0)[1])
    chosen = autotune.tuned_config("k1", ran.append, default, gated=True)
    assert chosen == fastest
    assert default in ran and len(ran) == len(set(ran)) > 2
    assert {dataclasses.replace(default, weights_left=True), dataclasses.replace(default, fused_gate_up=True)} <= set(ran)
    saved = json.loads(tuning.read_text())["k1"]
    # Every field of the tile is persisted (a field added to TileConfig later must not be dropped on the way to disk).
    assert set(saved) == {field.name for field in dataclasses.fields(TileConfig)}
    assert TileConfig(**saved) == fastest and (saved["block_n"], saved["block_k"], saved["num_stages"]) == (128, 256, 3)
    # A new process reads the file and times nothing.
    autotune.clear_memory_cache()
    monkeypatch.setattr(autotune, "time_config", lambda run: pytest.fail("tuned twice"))
    assert autotune.tuned_config("k1", ran.append, default, gated=True) == fastest


def test_entry_from_another_version_is_tuned_again(tuning, monkeypatch):
    """A cached entry whose fields are not TileConfig's (written by another version) is replaced, not a TypeError."""
    tuning.write_text(json.dumps({"k3": {"block_m": 16, "tile_shape_from_the_future": 1}}))
    default = TileConfig(16, 64, 128, 1, 4, 4)
    monkeypatch.setattr(autotune, "time_config", lambda run: (run(), 1.0)[1])
    assert autotune.tuned_config("k3", lambda cfg: None, default, gated=True) == default
    assert TileConfig(**json.loads(tuning.read_text())["k3"]) == default


def test_failing_candidates_are_skipped(tuning, monkeypatch):
    default = TileConfig(128, 128, 64, 8, 8, 4)

    def run(cfg):
        if cfg.num_warps == 4:
            raise RuntimeError("out of resources")

    monkeypatch.setattr(autotune, "time_config", lambda fn: (fn(), 2.0)[1])
    assert autotune.tuned_config("k2", run, default, gated=False) == default


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_layer_uses_tuned_configs_and_stays_correct(tuning, monkeypatch):
    """End to end through fused_moe_simple: both GEMMs get tuned keys, and the result still matches float64."""
    timed = []
    monkeypatch.setattr(autotune, "candidate_configs", lambda block_m, gated: [TileConfig(block_m, 32, 32, 1, 4, 2)])
    monkeypatch.setattr(autotune, "time_config", lambda run: (run(), timed.append(1), 1.0 / len(timed))[2])
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    w1 = torch.randn(4, 96, 64) / 8
    w2 = torch.randn(4, 64, 48) / 7
    scales, ids = sm.route(torch.randn(5, 4), 2)
    out = sm.fused_moe_simple(x, ids, scales, w1, w2)
    ref = sm.reference_moe(x, ids, scales, w1, w2)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5
    assert len(json.loads(tuning.read_text())) == 2  # GEMM1 and GEMM2
    assert all(cfg["block_n"] == 32 for cfg in json.loads(tuning.read_text()).values())  # the later (faster) candidate


DEFAULT = TileConfig(16, 64, 128, 1, 4, 4)


def constant_clock(monkeypatch):
    monkeypatch.setattr(autotune, "time_config", lambda run: (run(), 1.0)[1])


@pytest.mark.parametrize("content", ["[]", "null", '"x"', "42", "{", ""])
def test_cache_file_not_an_object_is_replaced(tuning, monkeypatch, content):
    tuning.write_text(content)
    constant_clock(monkeypatch)
    assert autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True) == DEFAULT
    assert set(json.loads(tuning.read_text())) == {"k"}


@pytest.mark.parametrize("change", [dict(group_m=0), dict(programs_per_sm=-1), dict(block_n=48), dict(block_m=0),
                                    dict(block_k=None), dict(block_m="16"), dict(flatten=1), dict(num_warps=True)])
def test_cached_entry_out_of_range_is_tuned_again(tuning, monkeypatch, change):
    """A hand-edited or foreign entry with the right fields but a value tuning never writes is not launched (group_m 0 gave
    silently wrong output, block_n 48 a crash): the key is tuned again."""
    tuning.write_text(json.dumps({"k": dict(dataclasses.asdict(DEFAULT), **change)}))
    constant_clock(monkeypatch)
    assert autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True) == DEFAULT
    assert TileConfig(**json.loads(tuning.read_text())["k"]) == DEFAULT


def test_unwritable_cache_warns_and_keeps_the_tile_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE_CACHE", str(blocker / "tiles.json"))  # its parent is a file
    autotune.clear_memory_cache()
    try:
        constant_clock(monkeypatch)
        with pytest.warns(UserWarning, match="cannot write"):
            assert autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True) == DEFAULT
        monkeypatch.setattr(autotune, "time_config", lambda run: pytest.fail("tuned twice"))
        assert autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True) == DEFAULT
    finally:
        autotune.clear_memory_cache()


def test_writers_merge_with_the_file(tuning, monkeypatch):
    """Two processes tuning side by side: one that loaded the file before the other saved keeps the other's entries."""
    constant_clock(monkeypatch)
    autotune.tuned_config("mine", lambda cfg: None, DEFAULT, gated=True)  # this process has loaded and saved the file
    other = TileConfig(16, 128, 256, 1, 4, 3)  # a candidate tuning could keep
    on_disk = json.loads(tuning.read_text())
    tuning.write_text(json.dumps(dict(on_disk, theirs=dataclasses.asdict(other))))  # another process's save
    autotune.tuned_config("mine too", lambda cfg: None, DEFAULT, gated=True)
    assert set(json.loads(tuning.read_text())) == {"mine", "theirs", "mine too"}
    monkeypatch.setattr(autotune, "time_config", lambda run: pytest.fail("tuned twice"))
    assert autotune.tuned_config("theirs", lambda cfg: None, DEFAULT, gated=True) == other


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without a CUDA device")
def test_no_gpu_to_time_on_keeps_the_heuristic(tuning):
    ran = []
    assert autotune.tuned_config("k", ran.append, DEFAULT, gated=True) == DEFAULT
    assert not ran and not tuning.exists()  # nothing launched, nothing written


def test_cached_entry_tuning_could_not_have_kept_is_tuned_again(tuning, monkeypatch):
    """In range but outside the search space (a 256 x 256 x 256 tile at 16 warps, which ptxas refuses for sm_90): tuned again
    rather than launched."""
    foreign = TileConfig(256, 256, 256, 8, 16, 4)
    assert autotune.tile_from_entry(dataclasses.asdict(foreign)) == foreign  # the ranges alone would take it
    tuning.write_text(json.dumps({"k": dataclasses.asdict(foreign)}))
    constant_clock(monkeypatch)
    assert autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True) == DEFAULT
    assert TileConfig(**json.loads(tuning.read_text())["k"]) == DEFAULT


def _tune_keys(cache_file, prefix, count, ready, start):
    import os
    import time

    os.environ["SIMPLE_MOE_AUTOTUNE_CACHE"] = cache_file
    autotune.clear_memory_cache()
    autotune.time_config = lambda run: (run(), 1.0)[1]
    dump = autotune.json.dump

    def slow_dump(*args, **kwargs):  # widens the window between reading the file and replacing it
        time.sleep(0.005)
        return dump(*args, **kwargs)

    autotune.json.dump = slow_dump
    ready.put(prefix)
    start.wait(120)  # every process imported, then all at once
    for i in range(count):
        autotune.tuned_config(f"{prefix}{i}", lambda cfg: None, DEFAULT, gated=True)


def test_processes_tuning_side_by_side_keep_every_entry(tmp_path):
    """Four processes save 15 keys each into one file at once: the lock around read-merge-replace keeps all 60 (without it a
    helper's run of 8 x 40 kept 268 of 320)."""
    import multiprocessing

    cache_file = str(tmp_path / "tiles.json")
    context = multiprocessing.get_context("spawn")
    ready, start = context.Queue(), context.Event()
    workers = [context.Process(target=_tune_keys, args=(cache_file, f"p{p}-", 15, ready, start)) for p in range(4)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=120)  # each has imported torch and simple_moe
    start.set()
    for worker in workers:
        worker.join(120)
    assert all(worker.exitcode == 0 for worker in workers)
    assert len(json.loads((tmp_path / "tiles.json").read_text())) == 60


def test_cache_file_mode_follows_the_umask(tuning, monkeypatch):
    import os

    constant_clock(monkeypatch)
    old = os.umask(0o022)
    try:
        autotune.tuned_config("k", lambda cfg: None, DEFAULT, gated=True)
    finally:
        os.umask(old)
    assert tuning.stat().st_mode & 0o777 == 0o644  # readable by others, as a shared cache must be (was 0600)


def test_cache_path_expands_the_home_directory(monkeypatch):
    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE_CACHE", "~/tiles.json")
    assert autotune.cache_path() == autotune.Path.home() / "tiles.json"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False),
                                             ("false", False), ("off", False), ("No", False)])
def test_switches_read_every_spelling(value, expected, monkeypatch):
    from simple_moe._host import env_flag

    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE", value)
    assert autotune.enabled() is expected
    monkeypatch.setenv("SIMPLE_MOE_SOME_SWITCH", value)
    assert env_flag("SIMPLE_MOE_SOME_SWITCH", not expected) is expected


def test_switch_with_an_unknown_value_is_named(monkeypatch):
    monkeypatch.setenv("SIMPLE_MOE_AUTOTUNE", "2")
    with pytest.raises(ValueError, match="^SIMPLE_MOE_AUTOTUNE='2'"):
        autotune.enabled()
