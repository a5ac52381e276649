"""Tests of the model registry fm_adapt.models: names, fields, errors, the shared contract."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fm_adapt import models

# A tiny configuration per registered model for the shared-contract test. A model added to
# MODELS should get an entry here.
TINY = {
    'vit': (dict(num_classes=3, variant='mu/4'), (2, 8, 8, 3)),
    'resnet': (dict(num_classes=3, width=4), (2, 8, 8, 3)),
    'efficientnet': (dict(num_classes=3), (2, 32, 32, 3)),
    'vit_mim': (dict(num_classes=None, variant='mu/4'), (2, 8, 8, 3)),  # No head.
}


def test_registry_contents():
  assert models.MODELS['vit'] is models.vit.Model
  assert models.MODELS['resnet'] is models.resnet.Model
  assert all(issubclass(cls, nn.Module) for cls in models.MODELS.values())
  assert set(TINY) == set(models.MODELS)  # Every registered model keeps the contract.


def test_get_model_builds_configured_module():
  model = models.get_model('vit', num_classes=10, variant='Ti/16', pool_type='gap')
  assert isinstance(model, models.vit.Model)
  assert (model.num_classes, model.variant, model.pool_type) == (10, 'Ti/16', 'gap')
  model = models.get_model('resnet', num_classes=2, depth=50, stem='imagenet')
  assert isinstance(model, models.resnet.Model) and model.depth == 50


def test_model_fields():
  assert list(models.model_fields(models.resnet.Model))[:4] == [
      'num_classes', 'depth', 'stem', 'width']
  vit_fields = models.model_fields(models.vit.Model)
  # Architecture options only (the foundation-model families are configuration of one ViT);
  # no adaptation fields: prompts and adapters attach from fm_adapt.adapt by interception.
  assert {'num_classes', 'variant', 'pool_type', 'posemb', 'dropout', 'head_zeroinit',
          'dtype', 'remat', 'class_token', 'class_posemb', 'num_registers', 'layerscale',
          'pre_norm', 'patch_bias', 'mlp_act', 'ln_epsilon', 'fc_norm', 'proj_dim',
          'posemb_grid', 'posemb_resize'} == set(vit_fields)
  assert not {'prompt', 'prompts', 'adapter', 'adapters', 'lora'} & set(vit_fields)
  assert not {'prompt', 'adapter'} & set(models.model_fields(models.efficientnet.Model))


def test_unknown_name():
  valid = r"\[.*'resnet'.*'vit'.*\]"
  with pytest.raises(ValueError, match=rf"Unknown model 'vgg'; valid names: {valid}"):
    models.get_model('vgg', num_classes=3)


@pytest.mark.parametrize('kwargs', [dict(num_classes=3, varient='B/16'),
                                    dict(num_classes=3, name='x'), dict(num_classes=3, parent=None)])
def test_unknown_field(kwargs):
  with pytest.raises(ValueError, match=r"Unknown field.*'vit'.*valid fields: \['num_classes', "
                                       r"'variant', 'pool_type'"):
    models.get_model('vit', **kwargs)


def test_missing_required_field():
  with pytest.raises(ValueError, match=r"needs field\(s\) \['num_classes'\]; valid fields"):
    models.get_model('resnet', depth=18)


@pytest.mark.parametrize('name', sorted(TINY))
def test_shared_contract(name):
  kwargs, shape = TINY[name]
  model = models.get_model(name, **kwargs)
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  (logits, out), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), image)
  width = kwargs['num_classes'] or out['pre_logits'].shape[-1]  # Headless: the features.
  assert logits.shape == (shape[0], width) and logits.dtype == jnp.float32
  assert {'pre_logits', 'logits'} <= set(out)
  assert out['logits'].shape == logits.shape and out['pre_logits'].ndim == 2
  assert 'params' in variables
  (train_logits, _), _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}), variables, image)
  assert train_logits.shape == logits.shape
