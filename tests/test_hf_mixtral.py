"""jmp.hf with Mixtral (a mixture of experts on every block) against transformers, the oracle.

A tiny random ``MixtralForCausalLM`` (4 experts, 2 per token, a sliding window shorter than the
sequence), built locally and saved by ``save_pretrained`` in both of transformers 5's layouts:
the Hub's one tensor per expert (``block_sparse_moe.experts.{j}.w1.weight``, the default) and
the fused 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` (``save_original_format=False``).

- Logits after ``jmp.hf.load`` equal transformers' within 1e-4 on one device, under expert
  parallelism (``dp_ep``: each device reads only its experts), tensor parallelism over the
  experts' width (``ep_tp``) and ``fsdp_tp``; every device block of the router and experts
  equals the HF tensor sliced by plain NumPy (a permutation of the experts would leave the
  logits equal, so the blocks are checked too).
- Save: the folder has the Hub's per-expert names; transformers loads it and its logits equal
  jmp's, for a loaded model and for one born in jmp; the config round-trips.
- Each config jmp cannot represent (router jitter, top-k above the experts, missing keys,
  pipelines, shared experts, experts saved as Llama) is one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import jmp
import jmp.hf
from jmp.hf import files
from tests import hf_models

BATCH = 8
TOL = 1e-4
TOKENS = hf_models.tokens(BATCH)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(hub folder, fused folder, transformers model, its logits of TOKENS), built once."""
    hub = str(tmp_path_factory.mktemp("mixtral_hub"))
    fused = str(tmp_path_factory.mktemp("mixtral_fused"))
    model = hf_models.build("mixtral", hub)
    hf_models.save(model, fused, save_original_format=False)
    return hub, fused, model, hf_models.logits(model, TOKENS)


def _logits(model, mesh, rules):
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        with jmp.activate(mesh, rules):
            return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(forward)(state, TOKENS))


def _expert_reference(hf_model, n_layers):
    """jmp's router and expert parameters from transformers' fused state dict, by NumPy."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    layers = [f"model.layers.{i}.mlp." for i in range(n_layers)]
    f = sd[layers[0] + "experts.down_proj"].shape[-1]
    per_layer = {
        "router": lambda p: sd[p + "gate.weight"].T,  # (E, d) -> (d, E)
        "gate": lambda p: sd[p + "experts.gate_up_proj"][:, :f].swapaxes(1, 2),  # (E, d, F)
        "up": lambda p: sd[p + "experts.gate_up_proj"][:, f:].swapaxes(1, 2),
        "down": lambda p: sd[p + "experts.down_proj"].swapaxes(1, 2),  # (E, F, d)
    }
    return {f"blocks.mlp.{k}": np.stack([get(p) for p in layers]) for k, get in per_layer.items()}


def _one_device():
    mesh = jmp.make_mesh("data=1", devices=jax.devices()[:1])
    return mesh, jmp.rules.preset("dp", mesh)


def test_files_hold_both_layouts(mixtral):
    """What transformers 5.24 writes: per-expert tensors by default, fused ones when asked."""
    hub, fused, _, _ = mixtral
    with safe_open(os.path.join(hub, files.SINGLE), "np") as f:
        hub_names = set(f.keys())
    with safe_open(os.path.join(fused, files.SINGLE), "np") as f:
        fused_names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hub_names
    assert "model.layers.1.block_sparse_moe.gate.weight" in hub_names
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused_names
    assert not any("block_sparse_moe" in n for n in fused_names)


@pytest.mark.parametrize(
    "strategy,spec,layout",
    [
        ("dp", "one device", "hub"),
        ("dp_ep", "data=2,expert=4", "hub"),
        ("dp_ep", "data=2,expert=4", "fused"),
        ("ep_tp", "expert=2,model=4", "fused"),
        ("fsdp_tp", "data=2,model=4", "hub"),
    ],
)
def test_logits_equal_transformers(make_mesh, mixtral, strategy, spec, layout):
    hub, fused, hf_model, want = mixtral
    if spec == "one device":
        mesh, rules = _one_device()
    else:
        mesh = make_mesh(spec)
        rules = jmp.rules.preset(strategy, mesh)
    loaded = jmp.hf.load(hub if layout == "hub" else fused, mesh, rules)
    cfg = loaded.config
    read = (loaded.architecture, cfg.n_experts, cfg.top_k, cfg.sliding_window)
    assert read == ("MixtralForCausalLM", 4, 2, 5)
    diff = float(np.abs(_logits(loaded.model, mesh, rules) - want).max())
    print(f"max |logits - transformers| {strategy} {spec} {layout}: {diff:.2e}")
    assert diff < TOL
    gate = loaded.model.blocks.mlp.gate[...]
    if "ep" in strategy:  # the experts split over 'expert': each device holds its own
        assert gate.sharding.spec[1] == "expert", gate.sharding.spec
    reference = _expert_reference(hf_model, cfg.n_layers)
    params = {
        ".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(loaded.model))
    }
    for path, want_value in reference.items():
        value = params[path]
        assert value.shape == want_value.shape, path
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want_value[shard.index])


def test_save_loads_in_transformers(make_mesh, mixtral, tmp_path):
    hub, _, _, want = mixtral
    mesh = make_mesh("data=2,expert=4")
    rules = jmp.rules.preset("dp_ep", mesh)
    loaded = jmp.hf.load(hub, mesh, rules)
    out = jmp.hf.save(loaded.model, str(tmp_path / "out"), like=loaded)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["router_aux_loss_coef"] == 0.02 and config["intermediate_size"] == 32
    # the same config back (to_hf writes the head dim that config.json left implicit)
    assert jmp.hf.from_hf(config) == dataclasses.replace(loaded.config, head_dim=8)
    with safe_open(os.path.join(out, files.SINGLE), "np") as f:
        with safe_open(os.path.join(hub, files.SINGLE), "np") as g:
            assert set(f.keys()) == set(g.keys())  # the Hub's names, as save_pretrained's
    got = hf_models.logits(hf_models.load(out), TOKENS)
    assert np.abs(got - want).max() == 0  # the same f32 weights, read back by transformers


def test_save_a_mixtral_born_in_jmp(make_mesh, tmp_path):
    """No HF origin: a Llama with experts is written as MixtralForCausalLM, several files."""
    from jmp.models.llama import Llama, LlamaConfig

    mesh = make_mesh("data=2,model=4")
    rules = jmp.rules.preset("fsdp_tp", mesh)
    cfg = LlamaConfig.named("tiny", vocab_size=128, n_experts=4, top_k=2, moe_d_ff=48)
    model = jmp.shard_init(lambda r: Llama(cfg, rngs=r, mesh=mesh, rules=rules), mesh, rules)
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # norms away from one
        if key[-1] == "scale":
            value = var.get_value()
            noise = jax.random.normal(jax.random.key(len(key)), value.shape)
            var.set_value(jax.device_put(1 + 0.2 * noise, value.sharding))
    out = jmp.hf.save(model, str(tmp_path / "born"), max_shard_bytes=200_000)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["intermediate_size"] == 48  # the experts' width
    assert files.INDEX in os.listdir(out)
    got = hf_models.logits(hf_models.load(out), TOKENS)
    assert np.abs(got - _logits(model, mesh, rules)).max() < TOL


# --- what jmp cannot represent: one line each --------------------------------------------------


def _edited(mixtral, tmp_path, **changes):
    folder = str(tmp_path / "bad")
    shutil.copytree(mixtral[0], folder)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    json.dump(config, open(path, "w"))
    return folder


BAD = {
    "jitter": (dict(router_jitter_noise=0.1), ["router_jitter_noise=0.1", "0.0"]),
    "top_k": (dict(num_experts_per_tok=5), ["num_experts_per_tok=5", "num_local_experts=4"]),
    "missing": (dict(num_local_experts=None), ["lacks num_local_experts"]),
    "activation": (dict(hidden_act="gelu"), ["'gelu'", "silu"]),
    "experts shape": (
        dict(num_local_experts=8),
        ["lacks tensor", ".block_sparse_moe.experts.4.", "and 23 more"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_mixtral_config_is_one_line(mixtral, tmp_path, case):
    changes, words = BAD[case]
    folder = _edited(mixtral, tmp_path, **changes)
    mesh = jmp.make_mesh("data=8")
    with pytest.raises(jmp.ConfigError) as err:
        jmp.hf.load(folder, mesh, jmp.rules.preset("dp", mesh))
    message = str(err.value)
    assert "\n" not in message and "Fix" in message, message
    for word in words:
        assert word in message, (word, message)


def test_refusals_on_load_and_save(make_mesh, mixtral, tmp_path):
    from jmp.models.llama import Llama, LlamaConfig

    mesh = make_mesh("stage=2,data=4")
    with pytest.raises(jmp.ConfigError, match="does not run in a pipeline") as err:
        jmp.hf.load(mixtral[0], mesh, jmp.rules.preset("pp_dp", mesh))
    assert "\n" not in str(err.value)
    moe = LlamaConfig.named("tiny", n_experts=4, top_k=2)
    with pytest.raises(jmp.ConfigError, match="Cannot save as LlamaForCausalLM: n_experts=4"):
        jmp.hf.to_hf(moe, architecture="LlamaForCausalLM")
    with pytest.raises(jmp.ConfigError, match="n_experts=0 but MixtralForCausalLM is a mixture"):
        jmp.hf.to_hf(LlamaConfig.named("tiny"), architecture="MixtralForCausalLM")
    shared = LlamaConfig.named("tiny", n_experts=4, n_shared_experts=1)
    with pytest.raises(jmp.ConfigError, match="n_shared_experts=1 but MixtralForCausalLM"):
        jmp.hf.save(Llama(shared, rngs=nnx.Rngs(0)), str(tmp_path / "shared"))
    assert not os.path.exists(tmp_path / "shared")  # refused before anything is written
    gelu = LlamaConfig.named("tiny", n_experts=4, expert_activation="gelu")
    with pytest.raises(jmp.ConfigError, match="expert_activation='gelu' but MixtralForCausalLM"):
        jmp.hf.save(Llama(gelu, rngs=nnx.Rngs(0)), str(tmp_path / "gelu"))
    assert not os.path.exists(tmp_path / "gelu")
