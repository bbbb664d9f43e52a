"""The same training step in PyTorch + transformers, timed alongside ours in one process
(`python -m experiments.bench_train --peer`; experiments/cpu_profile.py uses the parts).

The peer is the model hf.config_to_hf exports to: LlamaForCausalLM (MHA / GQA / MQA) or
DeepseekV3ForCausalLM with every layer dense (MLA), built from its config class (no weights
are downloaded), sdpa attention, eager, with torch.optim.AdamW (fused; no weight decay on
1-D parameters, as ours) after clip_grad_norm_. On a CPU it runs in float32; on a GPU, on the
GPU with bfloat16 autocast when our compute dtype is bfloat16 (float32 parameters, as ours).
Both steps run in this process, alternately in blocks (timing.compare), so load from other
processes on a shared machine hits both alike; each side's step time is its median over all
timed steps, and the ratio is ours / theirs in tokens/s. torch and transformers are imported
inside the functions: they are in the dev extra only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import common, timing
from experiments.timing import Step
from mla_jax import hf, platform, sharding, training
from mla_jax.config import ModelConfig

MISSING = ("torch and transformers are not installed (pip install -e '.[dev]'): the torch "
           'peer is left out')


def available() -> bool:
  """Whether the peer can run here: torch and transformers are the dev extra's."""
  return all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))


def torch_step(model_cfg: ModelConfig, batch: int, seq_len: int, lr: float = 3e-3,
               b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
               clip_norm: float = 1.0, threads: int | None = None, seed: int = 0,
               weights: pathlib.Path | None = None, windows: np.ndarray | None = None,
               experts: str | None = None) -> Step:
  """One transformers training step (forward, loss, backward, clip, AdamW) on a fixed batch.

  weights: a folder hf.save wrote (the model holds its weights, not a random init of its own);
  windows: the batch's token windows [batch, seq_len + 1] (default: drawn from `seed`);
  experts: transformers' experts_implementation for an MoE model (None: its default)."""
  import torch
  import transformers

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  gpu = platform.current() == 'gpu' and torch.cuda.is_available()
  device = 'cuda' if gpu else 'cpu'
  hf_json = hf.config_to_hf(model_cfg)
  config_class = (transformers.DeepseekV3Config if 'Deepseek' in hf_json['architectures'][0]
                  else transformers.LlamaConfig)
  model_class = getattr(transformers, hf_json['architectures'][0])
  chosen = {'experts_implementation': experts} if experts else {}
  if weights is not None:
    model = model_class.from_pretrained(weights, dtype=torch.float32, attn_implementation='sdpa',
                                        **chosen)
  else:
    config = config_class(**{k: v for k, v in hf_json.items()
                             if k not in ('dtype', 'torch_dtype')}, **chosen)
    config._attn_implementation = 'sdpa'
    model = model_class(config)
  model = model.float().train().to(device)
  autocast = (torch.autocast('cuda', dtype=torch.bfloat16)
              if gpu and model_cfg.compute_dtype == jax.numpy.bfloat16
              else contextlib.nullcontext())
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}]
  # fused=True: one kernel over all tensors (fused vs foreach was not timed: the whole update
  # is under 1% of the step, see experiments/results/cpu_profile.md).
  opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), fused=True)
  if windows is None:
    windows = np.random.default_rng(seed).integers(0, model_cfg.vocab_size, (batch, seq_len + 1))
  tokens = torch.from_numpy(np.asarray(windows, np.int64)).to(device)
  inputs, labels = tokens[:, :-1], tokens[:, 1:].reshape(-1)

  clip = lambda: torch.nn.utils.clip_grad_norm_(params, clip_norm)

  def loss():
    with autocast:
      logits = model(input_ids=inputs).logits
      return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               labels)

  def step():
    loss().backward()
    clip()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if gpu:
      torch.cuda.synchronize()

  step.parts = (loss, opt, clip)  # for cpu_profile's phase timings
  step.model = model  # for moe_layer_steps: its layers, holding the weights the step trains
  return step


def jax_step(config) -> Step:
  """The trainer's own jitted step (training.jit_train_step, state donated) on a fixed batch of
  config.data.batch_size windows."""
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state, fn, batch = timing.fixed_batch_step(config, mesh)
  return timing.carried(fn, state, batch, mesh=mesh)


def opt_kwargs(config) -> dict:
  """torch_step's optimizer arguments from a trainer config's opt section."""
  o = config.opt
  return dict(lr=o.lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def time_side_by_side(config, steps: int, blocks: int = 0) -> dict:
  """Our trainer step and the transformers peer on config's model and batch, alternately in
  one process (bench_train --peer): tokens/s of each, the compile time of ours, and ours /
  theirs with its spread over the blocks."""
  batch, seq_len = config.data.batch_size, config.data.seq_len
  start = time.perf_counter()
  ours = jax_step(config)
  ours()  # compiles
  compile_s = time.perf_counter() - start
  model_cfg = ModelConfig.from_dict(config.model)
  theirs = torch_step(model_cfg, batch, seq_len, **opt_kwargs(config))
  blocks = blocks or max(2, steps // 3)
  result = timing.compare({'jax': ours, 'torch': theirs}, batch * seq_len, blocks,
                   max(1, steps // blocks))
  ratio = result['ratio_jax_over_torch']
  return {'jax_step_s': result['jax']['step_s'], 'jax_compile_s': compile_s,
          'torch_tokens_per_s': result['torch']['tokens_per_s'],
          'ratio_vs_torch': ratio['ratio'], 'ratio_block_min': ratio['block_min'],
          'ratio_block_max': ratio['block_max'], 'cpu_s_jax': result['jax']['cpu_s'],
          'cpu_s_torch': result['torch']['cpu_s']}


def peer_config(variant: str, batch: int, seq_len: int, arg: str = ''):
  """configs/<variant>.py:<arg> at batch x seq_len."""
  config = common.load_config(variant, arg)
  config.data.update(batch_size=batch, seq_len=seq_len)
  return config


# transformers' ways to run the routed experts (its experts_implementation), both timed beside
# ours: 'grouped_mm' (its default: the tokens sorted by expert, one torch grouped matmul per
# projection) and 'eager' (a Python loop over the experts that received tokens).
EXPERTS = ('grouped_mm', 'eager')


def same_weights_peers(config, tmp: pathlib.Path,
                       our_loss: float) -> tuple[dict[str, Step], float]:
  """({'torch_<impl>': step}, its loss at init): the transformers step under each of EXPERTS,
  holding our initial weights (config.seed, as the trainer draws them, exported by hf.save
  into `tmp`) and training on our fixed batch (timing.fixed_windows). Raises unless its loss at
  init equals `our_loss` (ours on that batch, before any update) within LOSS_ATOL: else the
  two would not be the same model on the same batch, and timing them side by side would
  compare nothing."""
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    graphdef, state, _ = training.init_state(config, mesh)
    model = nnx.merge(graphdef, state)[0]
  hf.save(model, tmp / 'init')
  shape = training.batch_layout(config, mesh)[1]
  windows = timing.fixed_windows(shape).reshape(-1, shape[-1] + 1)
  batch, seq_len = config.data.batch_size, config.data.seq_len
  steps = {f'torch_{impl}': torch_step(model.cfg, batch, seq_len, weights=tmp / 'init',
                                       windows=windows, experts=impl, **opt_kwargs(config))
           for impl in EXPERTS}
  losses = {name: step.parts[0]().item() for name, step in steps.items()}
  if not all(abs(loss - our_loss) <= LOSS_ATOL for loss in losses.values()):
    raise AssertionError(f'the losses at init differ: ours {our_loss}, transformers {losses} '
                         f'(> {LOSS_ATOL} apart): the peer is not the same model')
  return steps, losses[f'torch_{EXPERTS[0]}']


def moe_layer_steps(config, peers: dict[str, Step], impls: dict[str, str],
                    layer: int) -> dict[str, Step]:
  """One MoE layer alone, forward and backward (the gradients of sum(y * g) for the layer's
  weights and its input, g a fixed random cotangent), on b x t tokens of unit-variance input (an
  RMSNorm's output): {ours under each of `impls` (name -> moe_impl): the layer of our model at
  init; each peer: its model's layer, holding the same weights}. Raises unless every layer's
  output equals ours (the first of impls) within LAYER_ATOL: else the timings would compare
  different layers."""
  import torch
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    graphdef, state, _ = training.init_state(config, mesh)
  mlp = nnx.merge(graphdef, state)[0].blocks[layer].mlp
  rng = np.random.default_rng(0)
  x, g = rng.standard_normal((2, config.data.batch_size, config.data.seq_len,
                              mlp.cfg.d_model)).astype(np.float32)
  steps, outputs = {}, {}
  for name, impl in impls.items():
    mlp.cfg = dataclasses.replace(mlp.cfg, moe_impl=impl)  # static: each split keeps its own
    layer_def, params = nnx.split(mlp)
    grad = jax.jit(jax.value_and_grad(
        lambda p, x, layer_def=layer_def: jnp.sum(nnx.merge(layer_def, p)(x) * g),
        argnums=(0, 1)))
    steps[name] = lambda grad=grad, params=params: jax.block_until_ready(grad(params, x))
    outputs[name] = np.asarray(nnx.merge(layer_def, params)(x))
  for name, peer in peers.items():
    module = peer.model.model.layers[layer].mlp
    device = next(module.parameters()).device  # the peer's: cuda where it trains on a GPU
    x_t = torch.from_numpy(x).to(device).requires_grad_(True)
    g_t = torch.from_numpy(g).to(device)

    def step(module=module, x_t=x_t, g_t=g_t, device=device):
      (module(x_t) * g_t).sum().backward()
      module.zero_grad(set_to_none=True)
      x_t.grad = None
      if device.type == 'cuda':
        torch.cuda.synchronize()

    steps[name] = step
    with torch.no_grad():
      outputs[name] = module(x_t).cpu().numpy()
  first, *rest = outputs
  far = {n: float(np.max(np.abs(outputs[n] - outputs[first]))) for n in rest}
  if any(d > LAYER_ATOL for d in far.values()):
    raise AssertionError(f'layer {layer} differs from ours ({first}) by {far} (> {LAYER_ATOL})')
  return steps


# One MoE layer's outputs, ours and the peer's, float32 on the same weights and an input of unit
# variance: the same sums in another order (~1e-6 apart).
LAYER_ATOL = 1e-4

# Our loss at init and the peer's, float32 on the same weights and batch: a sum over the
# batch's tokens in another order (~1e-6 here); a wrong weight moves it by ~1e-2 or more.
LOSS_ATOL = 1e-4
