"""Reading collectives out of HLO text: group formats, tuple ops, loop trip counts."""

import jmp
from jmp.inspect import collectives, count, summary


def test_iota_groups_map_to_mesh_axes(make_mesh):
    mesh = make_mesh("data=2,model=4")
    line = "  %ar = f32[16]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add"
    assert collectives(line, mesh)[0].axes == ("model",)
    line = "  %ar = f32[16]{0} all-reduce(%x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add"
    assert collectives(line, mesh)[0].axes == ("data",)


def test_listed_groups_and_bytes(make_mesh):
    mesh = make_mesh("data=2,model=4")
    line = (
        "  %ag = bf16[8,32]{1,0} all-gather(%x), replica_groups={{0,4},{1,5},{2,6},{3,7}}, "
        "dimensions={0}"
    )
    (found,) = collectives(line, mesh)
    assert (found.kind, found.axes, found.bytes, found.group_size) == (
        "all-gather",
        ("data",),
        8 * 32 * 2,
        2,
    )


def test_mesh_groups_with_device_ids(make_mesh):
    mesh = make_mesh("data=2,model=4")
    line = (
        "  %ar = f32[64]{0} all-reduce(%x), channel_id=1, replica_groups=mesh['axis_0'=4,"
        "'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, to_apply=%add"
    )
    assert collectives(line, mesh)[0].axes == ("data",)
    line = (
        "  %ar = f32[64]{0} all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] "
        "{'axis_1'}, to_apply=%add"
    )
    assert collectives(line, mesh)[0].axes == ("model",)


def test_combined_tuple_all_reduce_counts_each_operand(make_mesh):
    mesh = make_mesh("model=8")
    line = (
        "  %ar = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(%a, %b), replica_groups=[1,8]<=[8], "
        "to_apply=%add"
    )
    found = collectives(line, mesh)
    assert [c.bytes for c in found] == [16, 16]
    assert count(found, "all-reduce", ("model",)) == 2


def test_loop_bodies_count_once_per_iteration_even_with_tuple_headers(make_mesh):
    mesh = make_mesh("data=8")
    params = ", ".join(["f32[]"] * 5 + ["/*index=5*/f32[]"])
    text = "\n".join(
        [
            f"%body (p: (s32[], {params})) -> (s32[], {params}) {{",
            "  %ar = f32[8]{0} all-reduce(%x), replica_groups=[1,8]<=[8], to_apply=%add",
            "}",
            "ENTRY %main (a: f32[]) -> f32[] {",
            "  %w = (s32[]) while(%t), condition=%cond, body=%body, "
            'backend_config={"known_trip_count":{"n":"3"}}',
            "}",
        ]
    )
    (found,) = collectives(text, mesh)
    assert found.count == 3 and found.total_bytes == 3 * 32
    assert summary([found]) == {("all-reduce", ("data",)): {"count": 3, "bytes": 96}}


def test_collective_permute_pairs(make_mesh):
    mesh = make_mesh("data=2,model=4")
    line = (
        "  %cp = f32[4]{0} collective-permute(%x), "
        "source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}"
    )
    assert collectives(line, mesh)[0].axes == ("model",)


def test_microbatch_loop_in_a_real_step_is_multiplied(make_mesh):
    """The gradient all-reduces inside the accumulation scan run once per microbatch."""
    import numpy as np

    from jmp.models import GPT, GPTConfig
    from jmp.train import TrainConfig, make_optimizer, make_step
    from jmp.train.data import TextData

    mesh = make_mesh("model=8")
    rules = jmp.rules.preset("tp", mesh)
    cfg = GPTConfig.named("tiny", n_layers=1)
    model = jmp.shard_init(lambda rngs: GPT(cfg, rngs=rngs), mesh, rules)
    data = TextData.from_tokens(np.arange(5000, dtype=np.uint8))
    totals = {}
    for micro in (1, 2):
        step = make_step(model, make_optimizer(TrainConfig()), mesh, rules, microbatches=micro)
        batch = data.batch(0, batch_size=8, seq_len=cfg.seq_len, mesh=mesh, rules=rules)
        found = collectives(step.lower(step.init_state(), batch).compile(), mesh)
        totals[micro] = sum(c.total_bytes for c in found if c.bytes >= 1024)
    # the same activation all-reduces, on half-size microbatches, twice
    assert totals[2] == totals[1]
