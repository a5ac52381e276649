"""Tests of fm_adapt.adapt.compose: registry errors, schedules, composed LoRA + VPT training."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fm_adapt import models
from fm_adapt.adapt import compose, lora
from fm_adapt import param_paths
from fm_adapt.train import model_fns, optim, state as state_lib, step as step_lib

QV = '.*attn/(query|value)/kernel'
LORA_VPT = [dict(name='lora', rank=2, alpha=4, targets=QV),
            dict(name='vpt', mode='deep', num_tokens=2)]
IMAGE_SHAPE = (6, 8, 8, 3)


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _abstract_params(model, shape=IMAGE_SHAPE):
  return jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))['params']


def _random_params(model, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32),
                      _abstract_params(model))


def _trainable_paths(params, schedule):
  return {p for p, m in param_paths.flatten(optim.trainable_mask(params, schedule)).items() if m}


@pytest.mark.parametrize('cfgs, model_name, match', [
    ([dict(name='prefix')], 'vit', r"Unknown adaptation name 'prefix'; valid names: \['adapter', "
                                   r"'bitfit', 'ept', 'lora', 'vpt'\]"),
    ([dict(kind='lora', rank=4, targets=QV)], 'vit',
     r"the word is now 'name', not 'kind'\): write dict\(name='lora', ...\)"),
    ([dict(name='lora', rank=4, targets=QV, dropout=0.1)], 'vit',
     r"unknown keys \['dropout'\]; valid keys: \['name', 'rank', 'targets'"),
    ([dict(name='lora', rank=4)], 'vit', r"missing keys \['targets'\]"),
    ([dict(name='lora', rank=0, targets=QV)], 'vit', 'positive int'),
    ([dict(name='vpt', mode='deep', num_tokens=2)] * 2, 'vit', "'vpt' given twice"),
    ([dict(name='vpt', mode='deep', num_tokens=2), dict(name='ept', num_tokens=2)], 'vit',
     r"'vpt' and 'ept' both make the prompt"),
    ([dict(name='vpt', mode='middle', num_tokens=2)], 'vit', r"\['shallow', 'deep'\]"),
    ([dict(name='adapter', mode='parallel', dim=8)], 'efficientnet', "mode='sequential'"),
    ([dict(name='adapter', dim=8)], 'resnet', r"\['efficientnet', 'vit'\]"),
    ([dict(name='adapter', mode='parallel', dim=8, depth=(1,))], 'vit',
     r"\['depth'\].*valid keys"),
])
def test_config_errors(cfgs, model_name, match):
  with pytest.raises(ValueError, match=match):
    compose.apply_transforms(cfgs, model_name, dict(variant='mu/4'))


def test_prompts_on_a_model_without_the_vit_layout_fail_at_init():
  adaptation = compose.apply_transforms([dict(name='vpt', mode='deep', num_tokens=2)], 'resnet')
  params = _abstract_params(models.get_model('resnet', num_classes=3, depth=18), (1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"ViT-layout model .*'embedding/kernel'"):
    jax.eval_shape(adaptation.init_extra, params, _key())


def test_one_mistyped_lora_target_of_several_is_an_error():
  adaptation = compose.apply_transforms(
      [dict(name='lora', rank=2, targets=['.*attn/query/kernel', '.*atn/value/kernel'])], 'vit')
  params = _abstract_params(models.get_model('vit', num_classes=3, variant='mu/4'))
  with pytest.raises(ValueError, match=r"LoRA target '\.\*atn/value/kernel' matches no "
                                       r"parameter.*Closest paths: \['encoder/block_\d/attn/"):
    jax.eval_shape(adaptation.init_extra, params, _key())


def test_adaptation_fields_and_schedule():
  kwargs = dict(variant='mu/4')
  adaptation = compose.apply_transforms(
      [*LORA_VPT, dict(name='adapter', mode='sequential', dim=4, where='mlp'),
       dict(name='bitfit')], 'vit', kwargs)
  assert kwargs == adaptation.model_kwargs == dict(variant='mu/4')  # No model fields added.
  model = models.get_model('vit', num_classes=3, **kwargs)
  params = jax.eval_shape(adaptation.init_extra, _abstract_params(model), _key())
  extra = set(param_paths.flatten(params)) - set(param_paths.flatten(_abstract_params(model)))
  assert {p.split('/')[0] for p in extra} == {'lora', 'prompt', 'encoder'}
  assert {p for p in extra if p.startswith('encoder/')} == {
      f'encoder/block_{i}/adapter_mlp/{layer}/{leaf}' for i in range(2)
      for layer in ('down', 'up') for leaf in ('kernel', 'bias')}
  assert adaptation.trainable_patterns == ['lora/.*', 'prompt/.*', '.*adapter.*', '.*bias',
                                           'head/.*']
  rules = compose.schedule_for(adaptation, dict(decay_type='cosine'))
  assert rules == [('(?:lora/.*)|(?:prompt/.*)|(?:.*adapter.*)|(?:.*bias)|(?:head/.*)',
                    dict(decay_type='cosine')), ('.*', None)]
  no_head = compose.apply_transforms(LORA_VPT, 'vit', kwargs, train_head=False)
  assert no_head.trainable_patterns == ['lora/.*', 'prompt/.*']
  assert compose.apply_transforms(None, 'vit').trainable_patterns == ['head/.*']


def test_schedule_for_user_rules_come_first():
  adaptation = compose.apply_transforms(LORA_VPT, 'vit', dict(variant='mu/4'))
  model = models.get_model('vit', num_classes=3, variant='mu/4')
  params = jax.eval_shape(adaptation.init_extra, _abstract_params(model), _key())
  head = dict(lr_mult=10.0)
  rules = compose.schedule_for(
      adaptation, [('head/.*', head), ('encoder/norm/.*', {}), ('prompt/.*', None), ('.*', None)],
      default=dict(decay_type='cosine'))
  assert rules[:3] == [('head/.*', head), ('encoder/norm/.*', {}), ('prompt/.*', None)]
  assert rules[3][1] == dict(decay_type='cosine') and rules[-1] == ('.*', None)
  trainable = _trainable_paths(params, rules)
  assert trainable == {p for p in param_paths.flatten(params)
                       if p.startswith(('lora/', 'head/', 'encoder/norm/'))}


def _config(schedule):
  return ml_collections.ConfigDict(dict(lr=0.05, optax_name='adam', optax={}, wd=0.0,
                                        grad_clip_norm=None, schedule=schedule))


def test_lora_vpt_training_leaves_frozen_params_bitwise_unchanged():
  adaptation = compose.apply_transforms(LORA_VPT, 'vit', dict(variant='mu/4'))
  model = models.get_model('vit', num_classes=3, variant='mu/4')
  params = adaptation.init_extra(_random_params(model), _key(1))
  schedule = compose.schedule_for(adaptation, dict(decay_type='cosine'))
  trainable, frozen, model_state = state_lib.split_variables(
      {'params': params}, optim.trainable_mask(params, schedule))
  assert {p.split('/')[0] for p in param_paths.flatten(trainable)} == {'lora', 'prompt', 'head'}
  tx, schedules = optim.make_optimizer(_config(schedule), trainable, total_steps=10)
  opt = tx.init(trainable)
  state_paths = {'/'.join(str(getattr(k, 'key', k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(opt)[0]}
  frozen_paths = set(param_paths.flatten(frozen))
  assert not any(p.endswith('/' + f) for p in state_paths for f in frozen_paths)
  for path in param_paths.flatten(trainable):
    assert any(p.endswith('/' + path) for p in state_paths), path
  loss_fn = lambda logits, labels, mask: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()
  apply_fn = adaptation.wrap_apply(model_fns.make_apply_fn(model))
  update = jax.jit(step_lib.make_update_fn(apply_fn, loss_fn, tx, schedules[0]))
  state = dict(params=trainable, frozen=frozen, model_state=model_state, opt=opt,
               step=jnp.zeros((), jnp.int32))
  frozen_before = jax.tree.map(np.array, frozen)
  trainable_before = jax.tree.map(np.array, trainable)
  batch = dict(image=jax.random.normal(jax.random.key(2), IMAGE_SHAPE),
               label=jnp.arange(6) % 3, mask=jnp.ones(6, bool))
  losses = []
  for _ in range(3):
    state, measurements = update(state, jax.random.key(3), batch)
    losses.append(float(measurements['loss']))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), frozen_before,
               state['frozen'])
  for path, before in param_paths.flatten(trainable_before).items():  # Every trainable leaf moved.
    assert not np.array_equal(before, param_paths.flatten(state['params'])[path]), path
  assert losses[-1] < losses[0]
  exported = adaptation.merge(param_paths.merge(state['params'], state['frozen']))
  assert 'lora' not in exported and 'prompt' in exported
  assert not np.array_equal(exported['encoder']['block_0']['attn']['query']['kernel'],
                            frozen_before['encoder']['block_0']['attn']['query']['kernel'])


def test_vit_b16_counts():
  adaptation = compose.apply_transforms(
      [dict(name='lora', rank=4, targets=QV), dict(name='vpt', mode='deep', num_tokens=10)],
      'vit', dict(variant='B/16'))
  model = models.get_model('vit', num_classes=1000, variant='B/16')
  params = jax.eval_shape(adaptation.init_extra, _abstract_params(model, (1, 224, 224, 3)),
                          _key())
  assert lora.num_params(params['lora']) == 147_456
  trainable, total = compose.count_params(params, adaptation.trainable_patterns)
  head, prompt = 768 * 1000 + 1000, 12 * 10 * 768
  assert trainable == 147_456 + prompt + head
  assert total == 86_566_888 + 147_456 + prompt  # Base count from test_vit.


def test_schedule_presets_select_the_documented_sets():
  params = _abstract_params(models.get_model('vit', num_classes=3, variant='mu/4'))
  paths = set(param_paths.flatten(params))
  sched = dict(decay_type='cosine')
  assert _trainable_paths(params, compose.preset('full', sched)) == paths
  assert _trainable_paths(params, compose.preset('linear_probe', sched)) == {
      'head/kernel', 'head/bias'}
  assert _trainable_paths(params, compose.preset('bitfit', sched)) == {
      p for p in paths if p.endswith('bias')} | {'head/kernel'}
  assert _trainable_paths(params, compose.preset('last_k', sched, k=1, depth=2)) == {
      p for p in paths if p.startswith(('encoder/block_1/', 'encoder/norm/', 'head/'))}
  assert _trainable_paths(params, compose.preset('layernorm', sched)) == {
      p for p in paths if '/ln_' in p or p.startswith(('encoder/norm/', 'head/'))}
  cnn = _abstract_params(models.get_model('resnet', num_classes=3, depth=18), (1, 32, 32, 3))
  norm = _trainable_paths(cnn, compose.preset('layernorm', sched))
  assert norm and all('bn' in p or p.startswith('head/') for p in norm)


def test_preset_errors():
  with pytest.raises(ValueError, match=r"Unknown schedule preset 'probe'; valid: \['bitfit'"):
    compose.preset('probe')
  with pytest.raises(ValueError, match=r"'last_k' takes .*k.*depth"):
    compose.preset('last_k', {}, k=2)
  with pytest.raises(ValueError, match='0 < k <= depth'):
    compose.preset('last_k', {}, k=3, depth=2)


def test_efficientnet_adapter_and_lora_through_compose():
  adaptation = compose.apply_transforms(
      [dict(name='adapter', dim=8, blocks=(0, 15)),
       dict(name='lora', rank=2, targets=['block_15/project_conv/kernel', 'head/kernel'])],
      'efficientnet', dict(dropout=0.0))
  model = models.get_model('efficientnet', num_classes=3, dropout=0.0)
  params = jax.eval_shape(adaptation.init_extra, _abstract_params(model, (1, 32, 32, 3)), _key())
  rules = compose.schedule_for(adaptation, ml_collections.ConfigDict(dict(decay_type='cosine')))
  assert {p.split('/')[0] for p in _trainable_paths(params, rules)} == {
      'lora', 'block_0', 'block_15', 'head'}
  assert all('adapter' in p for p in _trainable_paths(params, rules)
             if p.startswith('block_'))
  assert params['lora']['block_15']['project_conv']['lora_a'].shape == (1152, 2)
