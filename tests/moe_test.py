"""DeepSeekMoE: the gates against transformers' (and a numpy re-implementation on ties), the
dropless ragged_dot path against the all-experts reference, and an MoE model that trains and
decodes through its cache."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config, tiny_model, tiny_run
from flax import nnx

import mla_jax
from mla_jax import moe
from mla_jax import workdir as wd
from mla_jax.model import active_param_count, param_count, train_flops_per_token, with_config
from mla_jax.training.step import train_step

# The three gates of the released checkpoints, at toy sizes: V2-Lite (softmax, greedy), V2
# (softmax, group-limited), V3 (sigmoid, noaux_tc, normalised and scaled).
GATES = {
    'v2_greedy': dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                      routed_scaling_factor=1.0),
    'v2_group': dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                     topk_method='group_limited_greedy', n_group=4, topk_group=2,
                     routed_scaling_factor=16.0),
    'v3': dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
               scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
               norm_topk_prob=True, routed_scaling_factor=2.5),
}
MODEL = dict(attention='mla', kv_lora_rank=32, moe_intermediate_size=32, first_k_dense_replace=1,
             n_layers=3)


def _moe(gate: str, seed=0, **overrides) -> moe.MoE:
  module = moe.MoE(tiny_config(**{**GATES[gate], **MODEL, **overrides}), nnx.Rngs(seed))
  if gate == 'v3':  # a bias that changes choices (zero would test nothing)
    module.e_score_correction_bias[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (8,))
  return module


def _x(seed=0, b=2, t=10):
  return jax.random.normal(jax.random.key(seed), (b, t, 64))


def _dense_twin(module: moe.MoE) -> moe.MoE:
  """The same module on the all-experts reference path."""
  graphdef, state = nnx.split(module)
  twin = nnx.merge(graphdef, state)
  twin.cfg = dataclasses.replace(module.cfg, moe_impl='dense')
  return twin


def _assert_ragged_equals_dense(module, x):
  """Outputs, and gradients as to x and every parameter, at float32 rounding."""
  def loss(m, x):  # weighs every output element differently; a mean keeps gradients O(1)
    y = m(x)
    return jnp.mean(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape))

  grad = nnx.grad(loss, argnums=(0, 1))
  dense = _dense_twin(module)
  np.testing.assert_allclose(module(x), dense(x), rtol=1e-5, atol=1e-5)
  (g_ragged, gx_ragged), (g_dense, gx_dense) = grad(module, x), grad(dense, x)
  np.testing.assert_allclose(gx_ragged, gx_dense, rtol=1e-5, atol=1e-5)
  flat_r, flat_d = nnx.to_flat_state(g_ragged), nnx.to_flat_state(g_dense)
  assert [p for p, _ in flat_r] == [p for p, _ in flat_d]
  for (path, a), (_, b) in zip(flat_r, flat_d, strict=True):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-5, err_msg=str(path))
  return g_ragged


@pytest.mark.parametrize('impl', ['ragged', 'blocked'])
@pytest.mark.parametrize('gate', sorted(GATES))
def test_ragged_equals_dense_reference_in_outputs_and_gradients(gate, impl):
  module = _moe(gate, moe_impl=impl)
  grads = _assert_ragged_equals_dense(module, _x())
  # The router learns through the weights of its choices; every expert was used here.
  assert np.abs(grads['router'][...]).max() > 1e-4
  assert np.all(np.abs(grads['w_down'][...]).max(axis=(1, 2)) > 0)


@pytest.mark.parametrize('impl', ['ragged', 'blocked'])
@pytest.mark.parametrize('gate', sorted(GATES))
def test_every_token_on_one_expert_and_experts_without_tokens(gate, impl):
  """A router that sends all 20 tokens to expert 5 first and 2 next: half the experts or more
  get no row, two get all of them (k = 2: ragged groups [0, 0, 20, 0, 0, 20, 0, 0])."""
  module = _moe(gate, moe_impl=impl)
  x = _x(1).at[..., 0].set(3.0)  # one feature every token has, that the router reads
  router = 0.01 * np.asarray(module.router[...])
  # logits 3, 1.8, 1.5 for experts 5, 2, 6, near 0 for the rest (sigmoid stays unsaturated)
  router[0, 5], router[0, 2], router[0, 6] = 1.0, 0.6, 0.5
  module.router[...] = jnp.asarray(router)
  if gate == 'v3':
    module.e_score_correction_bias[...] = jnp.zeros((8,))
  weights, experts = module.gate(x)
  k = module.cfg.num_experts_per_tok
  np.testing.assert_array_equal(np.asarray(experts)[:, :2], [[5, 2]] * 20)  # in score order
  # k = 3 (v2_group): expert 6's group loses to 5's and 2's, the third is 3 or 4 by token
  assert set(np.unique(experts)) <= ({2, 5} if k == 2 else {2, 3, 4, 5})
  assert np.all(np.asarray(weights) > 0)
  grads = _assert_ragged_equals_dense(module, x)
  unused = [e for e in range(8) if e not in np.unique(experts)]
  np.testing.assert_array_equal(grads['w_up'][...][np.asarray(unused)], 0)


@pytest.mark.parametrize('block', [1, 3, 16])
@pytest.mark.parametrize('foreign', [False, True])
def test_blocks_equal_ragged_dot_across_block_edges(block, foreign):
  """experts_blocked with blocks smaller than an expert's rows (several blocks an expert, the
  last one partly padding), an expert with no row, and rows past the last expert's block:
  outputs and every gradient equal ragged_dot's. foreign: some choices are another device's
  experts (index E, weight 0, as experts_local passes them), which neither computes."""
  rng = np.random.default_rng(0)
  n, k, e, d, f = 13, 3, 6, 8, 5
  experts = np.stack([rng.choice([0, 1, 2, 4, 5], k, replace=False) for _ in range(n)])
  weights = rng.random((n, k))
  if foreign:
    away = rng.random((n, k)) < 0.4
    experts, weights = np.where(away, e, experts), np.where(away, 0.0, weights)
  args = (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(weights, jnp.float32), jnp.asarray(experts, jnp.int32),
          *(jnp.asarray(rng.normal(size=shape) / 3, jnp.float32)
            for shape in ((e, d, f), (e, d, f), (e, f, d))))
  loss = lambda fn: lambda x, w, *ws: jnp.sum(jnp.sin(fn(x, w, args[2], *ws)))
  diff = (0, 1, 3, 4, 5)
  blocked = functools.partial(moe.experts_blocked, block=block)
  np.testing.assert_allclose(blocked(*args), moe.experts_ragged(*args), rtol=1e-5, atol=1e-5)
  for fn_grad, ref_grad in zip(
      jax.grad(loss(blocked), argnums=(0, 1, 2, 3, 4))(*(args[i] for i in diff)),
      jax.grad(loss(moe.experts_ragged), argnums=(0, 1, 2, 3, 4))(*(args[i] for i in diff)),
      strict=True):
    np.testing.assert_allclose(fn_grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_block_rows_are_a_quarter_of_an_experts_mean_rows_within_64_to_512():
  assert moe.block_rows(32768, 16) == 512  # configs/mla_moe.py: 8192 tokens x 4
  assert moe.block_rows(8192, 16) == 128 and moe.block_rows(12288, 64) == 64
  assert moe.block_rows(40, 8) == 64 and moe.block_rows(10**7, 8) == 512


def test_auto_takes_blocks_on_a_cpu():
  cfg = tiny_config(**GATES['v3'], **MODEL)
  assert cfg.moe_impl == 'auto'
  expected = moe.experts_blocked if jax.default_backend() == 'cpu' else moe.experts_ragged
  assert moe.expert_compute(cfg) is expected


def test_v3_bias_chooses_experts_but_never_weighs_them():
  module = _moe('v3')
  x = _x(2)
  module.e_score_correction_bias[...] = jnp.zeros((8,)).at[7].set(10.0)
  weights, experts = module.gate(x)
  assert np.all(np.any(np.asarray(experts) == 7, axis=1))  # every token takes expert 7
  logits = np.asarray(x.reshape(-1, 64)) @ np.asarray(module.router[...])
  scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = np.take_along_axis(scores, np.asarray(experts), axis=1)
  want = 2.5 * want / want.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(weights, want, rtol=1e-6)
  grads = nnx.grad(lambda m: jnp.mean(m(x)))(module)  # over nnx.Param only
  assert 'e_score_correction_bias' not in grads and 'router' in grads


@pytest.mark.parametrize('gate', sorted(GATES))
def test_no_token_is_dropped(gate):
  """With every expert the same, routed(x) = (sum of x's gate weights) * expert(x): each
  token's K rows were all computed and all combined, whatever the load."""
  module = _moe(gate, n_shared_experts=0)
  for name in ('w_gate', 'w_up', 'w_down'):
    w = getattr(module, name)
    w[...] = jnp.broadcast_to(w[...][3], w[...].shape)
  x = _x(3, b=4, t=16)
  weights, _ = module.gate(x)
  total = np.asarray(weights).sum(axis=1)
  if module.cfg.norm_topk_prob:
    np.testing.assert_allclose(total, module.cfg.routed_scaling_factor, rtol=1e-6)
  x_nd = x.reshape(-1, 64)
  one = jax.nn.silu(x_nd @ module.w_gate[...][3]) * (x_nd @ module.w_up[...][3])
  want = (one @ module.w_down[...][3]) * total[:, None]
  np.testing.assert_allclose(module(x).reshape(-1, 64), want, rtol=1e-5, atol=1e-5)


# --- the gates, against transformers' and against numpy -----------------------------------
def _np_route(logits, bias, cfg):
  """transformers' routers in float64 numpy; top-k takes the lower index on ties (a stable
  sort of the negated scores), as jax.lax.top_k documents."""
  n, e = logits.shape
  j, k = cfg.n_group, cfg.num_experts_per_tok
  topk = lambda a, m: np.argsort(-a, axis=-1, kind='stable')[..., :m]
  if cfg.scoring_func == 'softmax':
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores = z / z.sum(axis=1, keepdims=True)
  else:
    scores = 1 / (1 + np.exp(-logits))
  choice = scores + bias if cfg.topk_method == 'noaux_tc' else scores.copy()
  if cfg.topk_method != 'greedy':
    grouped = choice.reshape(n, j, e // j)
    if cfg.topk_method == 'noaux_tc':
      group = np.take_along_axis(grouped, topk(grouped, 2), axis=-1).sum(-1)
    else:
      group = grouped.max(-1)
    keep = np.zeros((n, j), bool)
    np.put_along_axis(keep, topk(group, cfg.topk_group), True, axis=1)
    choice = np.where(np.repeat(keep, e // j, axis=1), choice,
                      -np.inf if cfg.topk_method == 'noaux_tc' else 0.0)
  experts = topk(choice, k)
  source = scores if cfg.topk_method == 'noaux_tc' else choice
  weights = np.take_along_axis(source, experts, axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(axis=1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, experts


@pytest.mark.parametrize('gate', sorted(GATES))
def test_gate_equals_numpy_on_ties_and_near_ties(gate):
  """Logits with exact ties (within and across groups) and ties broken by one float32 ulp:
  the same experts as the numpy gate, in the same order, and the same weights."""
  cfg = tiny_config(**GATES[gate], **MODEL)
  rng = np.random.default_rng(0)
  base = rng.normal(size=(6, 8)).astype(np.float32)
  base[0] = 0.5  # all eight tied
  base[1] = [1, 1, 0, 0, 1, 1, 0, 0]  # tied groups
  base[2] = [0.25, 0.75, 0.75, 0.25, 0.5, 0.5, 0.75, 0.75]
  base[3] = np.float32(0.5) + np.float32(0.5) * np.finfo(np.float32).eps * np.arange(8)[::-1]
  base[4, :] = base[4, 3]  # ties at one random value
  base[4, 6] = np.nextafter(base[4, 3], np.float32(1))  # one ulp above the rest
  logits = np.asarray(base, np.float32)
  bias = np.zeros(8, np.float32)
  weights, experts = moe.route(jnp.asarray(logits), jnp.asarray(bias), cfg)
  # numpy in float32 for the choices (float64 would break the float32 ties differently)...
  want_w, want_e = _np_route(logits, bias, cfg)
  np.testing.assert_array_equal(experts, want_e)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6)
  # ...and the same on random logits, where float64 agrees
  logits = rng.normal(size=(64, 8)).astype(np.float32)
  bias = (0.2 * rng.normal(size=8)).astype(np.float32) if gate == 'v3' else np.zeros(8, np.float32)
  weights, experts = moe.route(jnp.asarray(logits), jnp.asarray(bias), cfg)
  want_w, want_e = _np_route(logits.astype(np.float64), bias.astype(np.float64), cfg)
  np.testing.assert_array_equal(experts, want_e)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6)


@pytest.mark.parametrize('gate', sorted(GATES))
def test_gate_and_moe_equal_transformers(gate):
  """The router's choices and weights, and the whole layer's output, against transformers'
  DeepseekV2Moe / DeepseekV3MoE holding the same weights."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
  module = _moe(gate)
  cfg = module.cfg
  hf_cfg = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                n_routed_experts=8, n_shared_experts=cfg.n_shared_experts,
                num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
                topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor, num_attention_heads=4,
                num_hidden_layers=1)
  if gate == 'v3':
    layer = v3.DeepseekV3MoE(v3.DeepseekV3Config(**hf_cfg))
  else:
    layer = v2.DeepseekV2Moe(v2.DeepseekV2Config(**hf_cfg, topk_method=cfg.topk_method))
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    layer.gate.weight.copy_(t(module.router[...]).T)
    if gate == 'v3':
      layer.gate.e_score_correction_bias.copy_(t(module.e_score_correction_bias[...]))
    # [E, 2f, d]: gate rows then up rows; [E, d, f]; nn.Linear stores [out, in]
    layer.experts.gate_up_proj.copy_(torch.cat([t(module.w_gate[...]).transpose(1, 2),
                                                t(module.w_up[...]).transpose(1, 2)], dim=1))
    layer.experts.down_proj.copy_(t(module.w_down[...]).transpose(1, 2))
    shared = layer.shared_experts
    shared.gate_proj.weight.copy_(t(module.shared.w_gate[...]).T)
    shared.up_proj.weight.copy_(t(module.shared.w_up[...]).T)
    shared.down_proj.weight.copy_(t(module.shared.w_down[...]).T)
    x = _x(4)
    _, hf_weights, hf_experts = layer.gate(t(x))
    hf_y = layer(t(x)).numpy()
  weights, experts = module.gate(x)
  # transformers' top-k is unsorted: compare (expert, weight) pairs by expert
  order, hf_order = np.argsort(experts, axis=1), np.argsort(hf_experts.numpy(), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(experts), order, 1),
                                np.take_along_axis(hf_experts.numpy(), hf_order, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, 1),
                             np.take_along_axis(hf_weights.numpy(), hf_order, 1), rtol=1e-6)
  np.testing.assert_allclose(module(x), hf_y, rtol=1e-5, atol=1e-5)


# --- an MoE transformer -------------------------------------------------------------------
def _moe_model(gate='v3', seed=0, **overrides):
  model = tiny_model(seed, **{**GATES[gate], **MODEL, **overrides})
  for block in model.blocks:
    if isinstance(block.mlp, moe.MoE) and gate == 'v3':
      block.mlp.e_score_correction_bias[...] = 0.1 * jax.random.normal(jax.random.key(9), (8,))
  return model


def test_layers_follow_first_k_dense_replace_and_moe_layer_freq():
  model = _moe_model(n_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
  assert [type(b.mlp).__name__ for b in model.blocks] == ['MLP', 'MLP', 'MoE', 'MLP', 'MoE',
                                                           'MLP']
  dense = tiny_model()
  assert all(type(b.mlp).__name__ == 'MLP' for b in dense.blocks)


@pytest.mark.parametrize('gate', sorted(GATES))
def test_model_ragged_equals_dense_in_logits_and_gradients(gate):
  model = _moe_model(gate)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  reference = with_config(model, moe_impl='dense')
  np.testing.assert_allclose(model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 7])
  g, g_ref = nnx.grad(loss)(model), nnx.grad(loss)(reference)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref), strict=True):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-5, err_msg=str(path))
  assert np.abs(g['blocks'][1]['mlp']['router'][...]).max() > 0


def test_moe_model_trains_and_leaves_the_router_bias_alone():
  """The project's train_step on one repeated batch: the loss falls; the bias is no parameter
  of the optimizer, so it stays as it was."""
  model = _moe_model('v3')
  bias = np.asarray(model.blocks[1].mlp.e_score_correction_bias[...])
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  tokens = jax.random.randint(jax.random.key(2), (1, 4, 17), 0, 256)
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
           'weights': jnp.ones((1, 4, 16), jnp.float32)}
  step = jax.jit(lambda s: train_step(graphdef, s, batch))
  losses = []
  for _ in range(8):
    state, metrics = step(state)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.5, losses
  model, _ = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(model.blocks[1].mlp.e_score_correction_bias[...], bias)


def test_moe_decode_through_the_absorbed_cache_equals_full_forward():
  """prefill + decode_step on the absorbed MLA path, padded prompts of different lengths: the
  padding's tokens reach the experts too, but dropless routing has no capacity they could
  take from the real tokens."""
  model = _moe_model('v3', mla_decode='absorbed')
  lengths = [9, 4, 6]
  text = np.asarray(jax.random.randint(jax.random.key(3), (3, 14), 1, 256))
  graphdef, state = nnx.split(model)
  full = np.asarray(model(jnp.asarray(text)))
  caches = model.init_cache(3, 32)
  logits, caches = mla_jax.prefill(graphdef, state, caches, jnp.asarray(text[:, :9]),
                                   jnp.asarray(lengths))
  np.testing.assert_allclose(logits, full[np.arange(3), np.asarray(lengths) - 1], atol=1e-5)
  for step in range(5):
    positions = jnp.asarray(lengths) + step
    tokens = jnp.asarray(text[np.arange(3), positions])
    logits, caches = mla_jax.decode_step(graphdef, state, caches, tokens, positions)
    np.testing.assert_allclose(logits, full[np.arange(3), positions], atol=1e-5)


def test_dense_default_has_no_moe_and_unchanged_parameters():
  """n_routed_experts=0 (the default) builds the dense model, parameter for parameter."""
  cfg = tiny_config()
  assert cfg.n_routed_experts == 0 and not any(cfg.is_moe_layer(i) for i in range(4))
  shapes = mla_jax.model.param_shapes(cfg)
  assert shapes[('blocks', 0, 'mlp', 'w_gate')] == (64, 128)
  assert not any('router' in path for path in shapes)


@pytest.mark.parametrize('overrides, message', [
    (dict(num_experts_per_tok=9), 'num_experts_per_tok=9 exceeds n_routed_experts=8'),
    (dict(n_group=3), 'n_routed_experts=8 is not divisible by n_group=3'),
    (dict(topk_method='group_limited_greedy', n_group=2, topk_group=3),
     'topk_group=3 exceeds n_group=2'),
    (dict(topk_method='group_limited_greedy', n_group=4, topk_group=1, num_experts_per_tok=3),
     'num_experts_per_tok=3 exceeds the 2 experts'),
    (dict(topk_method='noaux_tc'), "topk_method='noaux_tc' routes sigmoid scores"),
    (dict(scoring_func='sigmoid'), "topk_method='greedy' routes softmax scores"),
    (dict(scoring_func='sigmoid', topk_method='noaux_tc', n_group=8, topk_group=8),
     'top-2 experts: n_routed_experts=8 / n_group=8 must be >= 2'),
    (dict(scoring_func='tanh'), "scoring_func='tanh' is unknown"),
    (dict(topk_method='top1'), "topk_method='top1' is unknown"),
    (dict(moe_impl='loop'), "moe_impl='loop' is unknown"),
    (dict(routed_scaling_factor=0.0), 'routed_scaling_factor=0.0 must be > 0'),
    (dict(first_k_dense_replace=2), 'leave no MoE layer of n_layers=2'),
    (dict(n_routed_experts=-1), 'n_routed_experts=-1 must be >= 0'),
    (dict(num_experts_per_tok=0), 'num_experts_per_tok=0 must be >= 1'),
    (dict(moe_layer_freq=0), 'moe_layer_freq=0 must be >= 1'),
    (dict(norm_topk_prob=1), 'norm_topk_prob=1 must be true or false'),
    (dict(aux_loss_alpha=-0.1), 'aux_loss_alpha=-0.1 must be >= 0 (0: off)'),
    (dict(bias_update_speed=1e-3), "bias_update_speed=0.001 moves the noaux_tc bias; "
                                   "topk_method='greedy' has none"),
])
def test_moe_config_errors_are_one_line(overrides, message):
  with pytest.raises(mla_jax.ConfigError) as e:
    tiny_config(**{'n_routed_experts': 8, 'num_experts_per_tok': 2, **overrides})
  assert '\n' not in str(e.value) and message in str(e.value)


# --- training: balance losses, V3's bias step, metrics, checkpoints -------------------------
def test_routing_stats_equal_a_hand_computation_of_the_balance_losses():
  """V2's expert-level loss E * sum_i f_i P_i (f_i: share of the N * K choices, P_i: mean
  score) and V3's sequence-wise one, from numpy loops over a fixed routing."""
  cfg = tiny_config(**GATES['v2_greedy'])
  logits = np.asarray(jax.random.normal(jax.random.key(4), (12, 8)))  # b=3 sequences of 4
  scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = np.argsort(-scores, axis=-1, kind='stable')[:, :2]
  stats = moe.routing_stats(jnp.asarray(scores), jnp.asarray(experts), cfg, seq_len=4)

  def balance(s, chosen):
    t, e = s.shape
    f = np.array([sum(i in row for row in chosen) for i in range(e)]) / (t * 2)
    return e * sum(f[i] * s[:, i].mean() for i in range(e))

  np.testing.assert_allclose(stats['aux'], balance(scores, experts), rtol=1e-6)
  seq = np.mean([balance(scores[4 * j:4 * j + 4], experts[4 * j:4 * j + 4]) for j in range(3)])
  np.testing.assert_allclose(stats['seq_aux'], seq, rtol=1e-6)
  np.testing.assert_array_equal(stats['counts'], np.bincount(experts.ravel(), minlength=8))
  entropy = -np.mean(np.sum(scores * np.log(scores), axis=-1))
  np.testing.assert_allclose(stats['entropy'], entropy, rtol=1e-6)


def _step(model, tokens, lr=1e-3):
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:],
           'weights': jnp.ones(tokens[..., 1:].shape, jnp.float32)}
  return graphdef, jax.jit(lambda s: train_step(graphdef, s, batch)), state


def test_aux_losses_enter_the_objective_as_alpha_times_the_layers_sum():
  """The step logs alpha * the sum over MoE layers of routing_stats' aux (and seq_aux) of its
  forward pass, and the balance term changes the update (the router's gradient)."""
  tokens = jax.random.randint(jax.random.key(2), (1, 4, 17), 0, 256)
  model = _moe_model('v2_greedy', aux_loss_alpha=0.5, seq_aux_loss_alpha=0.25)
  with moe.collect() as routed:
    model(tokens[0, :, :-1])
  assert len(routed) == 2  # layers 1 and 2
  graphdef, step, state = _step(model, tokens)
  new, m = step(state)
  np.testing.assert_allclose(m['moe_aux_loss'], 0.5 * sum(r['aux'] for r in routed), rtol=1e-6)
  np.testing.assert_allclose(m['moe_seq_aux_loss'], 0.25 * sum(r['seq_aux'] for r in routed),
                             rtol=1e-6)
  _, plain_step, plain_state = _step(_moe_model('v2_greedy'), tokens)
  plain, m_plain = plain_step(plain_state)
  assert float(m_plain['loss']) == float(m['loss'])  # 'loss' is the cross-entropy alone
  router = lambda s: np.asarray(nnx.merge(graphdef, s)[0].blocks[1].mlp.router[...])
  assert np.abs(router(new) - router(plain)).max() > 1e-6


def test_v3_bias_step_moves_a_skewed_router_towards_balance():
  """bias_update_speed: after each step every expert's bias moves by the speed towards the
  mean load (exactly +-speed, 0 at the mean), and a router skewed to experts 0 and 1 (by a
  bias that makes them every token's choice) is balanced by the bias alone (lr 0: the weights
  do not move)."""
  speed = 0.05
  model = _moe_model('v3', bias_update_speed=speed)
  for block in model.blocks[1:]:
    block.mlp.e_score_correction_bias[...] = jnp.zeros((8,)).at[:2].set(1.0)
  tokens = jax.random.randint(jax.random.key(2), (1, 8, 17), 0, 256)
  graphdef, step, state = _step(model, tokens, lr=0.0)
  imbalance = []
  for i in range(30):
    before = np.asarray(nnx.merge(graphdef, state)[0].blocks[1].mlp.e_score_correction_bias[...])
    state, metrics = step(state)
    imbalance.append(float(metrics['moe_imbalance']))
    after = np.asarray(nnx.merge(graphdef, state)[0].blocks[1].mlp.e_score_correction_bias[...])
    moved = np.round((after - before) / speed, 4)
    assert set(moved) <= {-1.0, 0.0, 1.0}
    if i == 0:  # the overloaded experts go down
      assert moved[0] == moved[1] == -1.0
  assert imbalance[0] > 2.5 and max(imbalance[-5:]) < 1.6, imbalance


def test_moe_metrics_are_fractions_of_the_load():
  model = _moe_model('v3')
  tokens = jax.random.randint(jax.random.key(2), (2, 2, 17), 0, 256)
  _, step, state = _step(model, tokens)
  _, m = step(state)
  assert set(m) == {'loss', 'grad_norm', 'moe_load_max', 'moe_load_min', 'moe_imbalance',
                    'moe_imbalance_max', 'moe_entropy'}
  assert 0 <= float(m['moe_load_min']) <= 1 / 8 <= float(m['moe_load_max']) <= 1
  np.testing.assert_allclose(m['moe_imbalance_max'], 8 * m['moe_load_max'], rtol=1e-6)
  assert 0 < float(m['moe_entropy']) <= np.log(8) + 1e-6


def _moe_run(corpus, **train):
  config = tiny_run(corpus, **train)
  config.model.update({**GATES['v3'], 'moe_intermediate_size': 32, 'bias_update_speed': 1e-2,
                       'seq_aux_loss_alpha': 1e-3})
  return config


def test_v3_run_resumes_bit_for_bit_with_its_router_bias(corpus, tmp_path):
  """A V3 MoE run stopped at step 5 and resumed equals the run done in one go, losses and
  routing metrics bit for bit: the bias is in the checkpoint; load_checkpoint (evaluate,
  generate) restores the trained bias, not zeros."""
  whole, split = tmp_path / 'whole', tmp_path / 'split'
  mla_jax.training.train_and_evaluate(_moe_run(corpus, deterministic=True), str(whole),
                                      final_eval=False)
  mla_jax.training.train_and_evaluate(_moe_run(corpus, stop_after_steps=5, deterministic=True),
                                      str(split), final_eval=False)
  mla_jax.training.train_and_evaluate(_moe_run(corpus, deterministic=True), str(split),
                                      final_eval=False)
  rows = lambda w: [r for r in map(json.loads, (w / 'metrics.jsonl').open()) if 'loss' in r]
  strip = lambda r: {k: v for k, v in r.items() if k != 'tokens_per_s'}
  assert [strip(r) for r in rows(split)] == [strip(r) for r in rows(whole)]
  assert len(rows(whole)) == 10 and 'moe_imbalance' in rows(whole)[0]
  model, _, step = wd.load_checkpoint(whole)
  assert step == 10
  bias = np.asarray(model.blocks[0].mlp.e_score_correction_bias[...])
  assert np.abs(bias).max() > 0  # it moved, and was restored
  resumed, _, _ = wd.load_checkpoint(split)
  np.testing.assert_array_equal(resumed.blocks[0].mlp.e_score_correction_bias[...], bias)


def test_active_parameters_count_k_of_e_routed_experts():
  """A token passes through K of the E routed experts of each MoE layer and every other
  parameter; a dense model's active count is its count."""
  common = dict(vocab_size=256, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=64,
                attention='mla', kv_lora_rank=16, qk_rope_head_dim=4)
  dense = mla_jax.ModelConfig(**common)
  moe = mla_jax.ModelConfig(**common, n_routed_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=16, n_shared_experts=1,
                            first_k_dense_replace=1)
  routed = 2 * 3 * 8 * 32 * 16  # two MoE layers of w_gate, w_up, w_down [E, d, f]
  assert active_param_count(dense) == param_count(dense)
  assert param_count(moe) - active_param_count(moe) == routed * (8 - 2) // 8
  # MFU's flops count the active ones: two more experts per token add 6 x theirs, and a dense
  # model's are 6 x its parameters less the embedding, plus attention's 12 L T d
  more = dataclasses.replace(moe, num_experts_per_tok=4)
  assert train_flops_per_token(more, 64) - train_flops_per_token(moe, 64) == 6 * routed * 2 // 8
  assert train_flops_per_token(dense, 64) == 6 * (param_count(dense) - 256 * 32) + 12 * 3 * 64 * 32


def test_fine_tuning_may_set_its_own_balancing_but_not_another_model(tmp_path, corpus):
  """--init_from accepts a source that balanced its experts otherwise (training settings), and
  refuses one with another number of experts (another model)."""
  from configs import mla as mla_config
  from mla_jax.config import ConfigError
  from mla_jax.run_config import RunConfig
  from mla_jax.training import state as training_state

  def config(**model):
    c = mla_config.get_config('tiny')
    c.data.files = corpus
    c.model.update({**dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                           scoring_func='sigmoid', topk_method='noaux_tc', n_group=2,
                           topk_group=1), **model})
    return RunConfig.from_dict(c)

  source = config(bias_update_speed=1e-3)
  wd.write_new(tmp_path / 'source', '--init_from', source,
               mla_jax.Transformer(source.model, rngs=nnx.Rngs(0)), 'test')
  tuned = training_state.resolve_init_from(config(aux_loss_alpha=1e-2), None, False,
                                           str(tmp_path / 'source'))
  assert tuned.init_from == str(tmp_path / 'source') and tuned.model.aux_loss_alpha == 1e-2
  with pytest.raises(ConfigError, match=r'holds another model: n_routed_experts \(4 there, 8'):
    training_state.resolve_init_from(config(n_routed_experts=8), None, False,
                                     str(tmp_path / 'source'))


def test_the_moe_config_trains_and_balances(tmp_path, corpus):
  """configs/mla_moe.py:tiny trains through the command line: its loss falls, the routing
  metrics are logged, and the start-up line gives total and active parameters."""
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  r = subprocess.run([sys.executable, '-m', 'mla_jax.train', '--config=configs/mla_moe.py:tiny',
                      f'--workdir={tmp_path}', f'--config.data.files={corpus}'],
                     cwd=root, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = wd.read_config(tmp_path).model
  flops = train_flops_per_token(cfg, wd.read_config(tmp_path).data.seq_len)
  assert (f'{param_count(cfg):,} parameters, {active_param_count(cfg):,} active per token; '
          f'{flops / 1e6:,.1f} MFLOP per token per train step') in r.stderr
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').open()]
  losses = [row['loss'] for row in rows if 'loss' in row]
  assert losses[-1] < losses[0] - 0.3
  assert all(1 <= row['moe_imbalance'] <= 16 / 4 for row in rows if 'loss' in row)
