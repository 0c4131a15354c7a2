"""Every private DeepSpeed API prime_scale relies on, exercised at the version constraints.txt pins.

These are not DeepSpeed's public interface, so an upgrade may change them without notice; each test here fails
with a message that says which of our functions depends on the changed part and what to re-check, so a version
bump breaks CI instead of a user's resume:

- ``param.ds_tensor``, a ZeRO-3 rank's partition of a parameter (``ema._held``: the EMA averages partitions);
- the bf16 ZeRO-0 optimizer's priming step (``trainer.forget_priming_step`` clears the state it leaves);
- the engine's ``checkpoint_engine.save(state_dict, path)`` and ``.load(path, map_location)``
  (``CheckpointStore.save`` notes the files it writes; ``weights_only_engine`` makes its loads safe);
- ``deepspeed.checkpoint.ds_to_universal.main(args)``, a script's main (``checkpoint.universal_arguments``);
- ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (``export.consolidated_state_dict``);
- ``deepspeed.utils.groups._WORLD_GROUP``, DeepSpeed's clone of the world group (``run_context.destroy_process_group``
  clears it when a one-rank group is destroyed, so that the next training in the process can start);
- the non-torch types inside checkpoint files (``checkpoint.deepspeed_types``, the restricted unpickler's allowlist).

One rank (gloo on CPU) in the pytest process, engines of the tiny config; the group is made for this module and
destroyed afterwards with DeepSpeed's cached copy of it (the last check below), so later tests build engines afresh.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from prime_scale import trainer as trainer_module
from prime_scale.checkpoint import CheckpointStore, deepspeed_types, universal_arguments

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_rank_group")]  # builds and steps engines


def trainer(*overrides: str):
    from bench.common import bench_config, make_trainer

    torch.manual_seed(0)
    cfg = bench_config("tiny", ("train.device=cpu", "data.seq_len=32", *overrides))
    made = make_trainer(cfg, "deepspeed", seed=0)
    return cfg, made


def test_zero3_parameters_hold_their_partition_in_ds_tensor():
    from prime_scale.ema import EMA

    _, t = trainer("engine.zero_stage=3")
    params = list(t.model.parameters())
    assert params and all(hasattr(p, "ds_tensor") for p in params), (
        "ZeRO-3 parameters no longer carry ds_tensor: prime_scale/ema.py averages each rank's partition through it")
    ema = EMA(t.model, 0.5)
    assert ema.partitioned
    assert sum(s.numel() for s in ema.shadow) == sum(p.ds_tensor.numel() for p in params)
    t.step(0)
    before = [s.clone() for s in ema.shadow]
    ema.update()  # the shadow moves halfway to the trained partitions
    for s, b, p in zip(ema.shadow, before, params):
        torch.testing.assert_close(s, 0.5 * b + 0.5 * p.ds_tensor.float())


def test_bf16_zero0_optimizer_still_takes_the_priming_step_that_forget_priming_step_clears(monkeypatch):
    cleared = []
    real = trainer_module.forget_priming_step
    monkeypatch.setattr(trainer_module, "forget_priming_step", lambda e: cleared.append(real(e)) or cleared[-1])
    _, t = trainer("engine.zero_stage=0", "train.dtype=bfloat16")
    assert cleared == [True], (
        "DeepSpeed's bf16 ZeRO-0 optimizer no longer leaves the zero-gradient priming step's AdamW state at "
        "engine.optimizer.optimizer.state (deepspeedai/DeepSpeed#5104): check whether the bug is fixed (then drop "
        "trainer.forget_priming_step) or moved (then follow it)")
    inner = t.engine.optimizer.optimizer
    assert not inner.state  # cleared: AdamW makes it afresh at the first real step
    t.step(0)
    assert all(float(s["step"]) == 1 for s in inner.state.values())


def test_checkpoint_engine_save_and_load_take_the_arguments_the_store_wraps(tmp_path):
    from prime_scale.checkpoint import weights_only_engine

    _, t = trainer("engine.zero_stage=1")
    ckpt = t.engine.checkpoint_engine
    save = list(inspect.signature(ckpt.save).parameters)
    load = list(inspect.signature(ckpt.load).parameters)
    assert save[:2] == ["state_dict", "path"], f"checkpoint_engine.save{save}: CheckpointStore.save wraps (state_dict, path)"
    assert load[:2] == ["path", "map_location"], f"checkpoint_engine.load{load}: weights_only_engine replaces it"
    t.step(0)
    store = CheckpointStore(str(tmp_path / "ckpt"))
    tag = store.save(t.engine, 1, {"step": 1}, {"rng": torch.zeros(2)})
    weights_only_engine(t.engine)
    shared, own = store.load(t.engine, tag)  # DeepSpeed's own load, through the restricted unpickler
    assert shared["step"] == 1 and own is not None


def test_ds_to_universal_reads_exactly_the_arguments_we_give_it(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"])
    expected = vars(ds_to_universal.parse_arguments())
    ours = vars(universal_arguments("in", "out"))
    assert sorted(ours) == sorted(expected), (
        "ds_to_universal's command line changed: update checkpoint.universal_arguments "
        f"(ours {sorted(ours)}, DeepSpeed's {sorted(expected)})")
    assert ours["strict"] is True and expected["strict"] is True  # its default, which we keep

    _, t = trainer("engine.zero_stage=2")
    t.step(0)
    store = CheckpointStore(str(tmp_path / "ckpt"))
    tag = store.save(t.engine, 1, {"step": 1}, {"rng": torch.zeros(2)})
    store.to_universal(tag)  # the real conversion of a ZeRO-2 checkpoint
    assert (tmp_path / "ckpt" / "universal" / tag).is_dir()
    assert any((tmp_path / "ckpt" / "universal" / tag).rglob("fp32.pt"))


def test_zero3_checkpoint_consolidates_and_holds_only_allowlisted_types(tmp_path):
    from prime_scale.config import config_to_dict
    from prime_scale.export import consolidated_state_dict

    cfg, t = trainer("engine.zero_stage=3")
    t.step(0)
    store = CheckpointStore(str(tmp_path / "ckpt"))
    shared = {"step": 1, "config": config_to_dict(cfg), "world_size": 1}
    tag = store.save(t.engine, 1, shared, {"rng": torch.zeros(2)})
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_types()}
    for f in (tmp_path / "ckpt" / tag).glob("*.pt"):
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        assert unsafe <= allowed, (f"{f.name} holds types outside checkpoint.deepspeed_types(): {unsafe - allowed}; "
                                   "add them only after checking they run no code when unpickled")
    state, _, weights = consolidated_state_dict(store, tag)  # its ZeRO-1..3 path is zero_to_fp32's function
    assert weights == "trained"
    for name, p in t.model.named_parameters():  # one rank: its partition is the whole parameter, flat and padded
        full = state[name]
        assert full.shape == p.ds_shape, f"{name}: zero_to_fp32 gave {tuple(full.shape)}, expected {p.ds_shape}"
        torch.testing.assert_close(full.flatten(), p.ds_tensor.float()[: full.numel()])


def test_deepspeed_caches_its_clone_of_the_world_group_where_destroy_process_group_clears_it():
    from deepspeed.utils import groups

    trainer("engine.zero_stage=0")
    assert isinstance(getattr(groups, "_WORLD_GROUP", None), torch.distributed.ProcessGroup), (
        "DeepSpeed no longer keeps its clone of the world group in deepspeed.utils.groups._WORLD_GROUP: check how "
        "it caches process groups now and follow it in prime_scale/run_context.py (destroy_process_group), or "
        "drop the reset there if a destroyed group no longer breaks the next deepspeed.initialize")
