"""A catalogue of the foundation models researchers bring, by name.

Each entry says how to build the model (a `fm_adapt.models.vit.Model` configuration), which
checkpoint layout its published file has (a `fm_adapt.weights.vit_import` format), its
parameter count (the reference library's, and fm_adapt's), its licence and where it is
published.

    entry, path = zoo.parse_spec('zoo:retfound_cfp:/data/RETFound_cfp_weights.pth')
    model, variables, report = zoo.build('zoo:retfound_cfp:/data/RETFound_cfp_weights.pth',
                                         num_classes=5)

`'zoo:PATH'` works too when the file has a published name the catalogue knows (e.g.
'dinov2_vitb14_pretrain.pth'). An unknown name lists the known ones; a file whose shapes do
not fit the named model says which catalogue model it does fit, if any.

Parameter counts. `reference_params` is what the reference library reports for the image
encoder without a classifier head. `params`, fm_adapt's count (`jax.eval_shape` of the entry's
model), is the count of the reference's parameters that its forward pass uses: the reference
count less `unused`, the parameters named there, which no gradient of the reference's output
reaches (Hugging Face Dinov2Model's `embeddings.mask_token`, used only in masked-image
pretraining). tests/fm_adapt/weights/test_zoo.py finds them with each reference library. The
class token's position row is a parameter of its own (`class_posemb=True`) in every family
whose reference has one (all but timm's DINOv2-reg, which has none), so nothing is folded and
fm_adapt's parameters are the used parameters of the reference one for one.
"""
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt.models import vit
from fm_adapt.weights import locate
from fm_adapt.weights import readers
from fm_adapt.weights import vit_import

PREFIX = 'zoo:'
WEIGHTS_ENV = locate.WEIGHTS_ENV
NOT_VERIFIED = 'not verified here: read the model card before use'
# Input normalisation as `data_pipelines.pp` ops, on the [0, 1] scale.
IMAGENET = "normalize('imagenet')"
OPENAI_CLIP = ('normalize((0.48145466, 0.4578275, 0.40821073), '
               '(0.26862954, 0.26130258, 0.27577711))')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One published foundation model.

  Attributes:
    name: the catalogue name ('zoo:<name>:<file>').
    title: what it is, in a few words.
    model: `vit.Model` fields (variant, pooling, family options, position grid).
    layout: the checkpoint format `vit_import.import_vit` reads it with.
    image_size: the pretraining resolution in pixels (square).
    reference: the reference library and architecture the parameter count comes from.
    reference_params: that library's parameter count of the image encoder (no classifier).
    licence: the licence of the weights.
    published: where the weights are published.
    file_names: published file names that identify this model on their own.
    dont_load: fm_adapt paths that keep their initialisation, as the model's own fine-tuning
      code does (RETFound: a fresh fc_norm).
    normalize: the input normalisation of its pretraining as a `data_pipelines.pp` op, or
      None where this catalogue has not verified it (read the model's preprocessing config).
    unused: (name, size) of each reference parameter its forward pass does not use (no
      gradient of its output reaches it); fm_adapt has no counterpart of these.
  """
  name: str
  title: str
  model: dict[str, Any]
  layout: str
  image_size: int
  reference: str
  reference_params: int
  licence: str
  published: str
  file_names: tuple[str, ...] = ()
  dont_load: tuple[str, ...] = ()
  normalize: str | None = IMAGENET
  unused: tuple[tuple[str, int], ...] = ()

  @property
  def params(self) -> int:
    """fm_adapt's parameter count of the encoder (no head): the reference's used parameters."""
    return self.reference_params - sum(size for _, size in self.unused)


def _dinov2(size: str, count: int, *, registers: int = 0, resize: str = 'dinov2') -> dict:
  """DINOv2 at 518 px (37x37 patches of 14), LayerScale; resized as the DINOv2 code does.

  The class token's position row is its own parameter, except with registers: timm's
  DINOv2-reg models have none (no_embed_class; timm's checkpoint filter folds the row of
  facebookresearch's files into the class token, as fm_adapt's importer does).
  """
  model = dict(variant=f'{size}/14', layerscale=1e-5, num_registers=registers,
               class_posemb=not registers, posemb_grid=37, posemb_resize=resize)
  return dict(model=model, image_size=518, reference_params=count)


def _clip(variant: str, grid: int, proj: int, count: int, *, layout: str = 'open_clip',
          resize: str = 'bicubic_antialias') -> dict:
  """An OpenAI CLIP image tower at 224 px: ln_pre, no patch bias, QuickGELU, eps 1e-5."""
  model = dict(variant=variant, pre_norm=True, patch_bias=False, mlp_act='quick_gelu',
               ln_epsilon=1e-5, proj_dim=proj, class_posemb=True, posemb_grid=grid,
               posemb_resize=resize)
  return dict(model=model, image_size=224, layout=layout, reference_params=count,
              normalize=OPENAI_CLIP)


_DINOV2_HOME = ('facebookresearch/dinov2 (GitHub, torch.hub: dl.fbaipublicfiles.com/dinov2/'
                '{n}/{n}_pretrain.pth); timm on Hugging Face: {t}')
_ENTRIES = [
    Entry(name='dinov2_vits14', title='DINOv2 ViT-S/14 (LVD-142M)', layout='timm',
          reference='timm 1.0.29 vit_small_patch14_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vits14_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vits14',
                                        t='timm/vit_small_patch14_dinov2.lvd142m'),
          **_dinov2('S', 22_056_192)),
    Entry(name='dinov2_vitb14', title='DINOv2 ViT-B/14 (LVD-142M)', layout='timm',
          reference='timm 1.0.29 vit_base_patch14_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vitb14_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vitb14',
                                        t='timm/vit_base_patch14_dinov2.lvd142m'),
          **_dinov2('B', 86_579_712)),
    Entry(name='dinov2_vitl14', title='DINOv2 ViT-L/14 (LVD-142M)', layout='timm',
          reference='timm 1.0.29 vit_large_patch14_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vitl14_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vitl14',
                                        t='timm/vit_large_patch14_dinov2.lvd142m'),
          **_dinov2('L', 304_367_616)),
    Entry(name='dinov2_vits14_reg', title='DINOv2 ViT-S/14 with 4 registers', layout='timm',
          reference='timm 1.0.29 vit_small_patch14_reg4_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vits14_reg4_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vits14_reg4',
                                        t='timm/vit_small_patch14_reg4_dinov2.lvd142m'),
          **_dinov2('S', 22_057_344, registers=4)),
    Entry(name='dinov2_vitb14_reg', title='DINOv2 ViT-B/14 with 4 registers', layout='timm',
          reference='timm 1.0.29 vit_base_patch14_reg4_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vitb14_reg4_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vitb14_reg4',
                                        t='timm/vit_base_patch14_reg4_dinov2.lvd142m'),
          **_dinov2('B', 86_582_016, registers=4)),
    Entry(name='dinov2_vitl14_reg', title='DINOv2 ViT-L/14 with 4 registers', layout='timm',
          reference='timm 1.0.29 vit_large_patch14_reg4_dinov2',
          licence='Apache-2.0', file_names=('dinov2_vitl14_reg4_pretrain.pth',),
          published=_DINOV2_HOME.format(n='dinov2_vitl14_reg4',
                                        t='timm/vit_large_patch14_reg4_dinov2.lvd142m'),
          **_dinov2('L', 304_370_688, registers=4)),
    Entry(name='rad_dino', title='RAD-DINO: DINOv2 ViT-B/14 on chest X-rays (Microsoft)',
          layout='hf_dinov2', reference='transformers 5.17.0 Dinov2Model (ViT-B/14, 518 px)',
          licence='MSRLA (Microsoft Research Licence Agreement)',
          published='microsoft/rad-dino (Hugging Face, Dinov2Model safetensors)',
          normalize=None, unused=(('embeddings.mask_token', 768),),
          **_dinov2('B', 86_580_480, resize='bicubic')),
    Entry(name='uni', title='UNI: DINOv2-trained ViT-L/16 on pathology (Mahmood Lab)',
          layout='timm', image_size=224,
          model=dict(variant='L/16', layerscale=1e-5, class_posemb=True, posemb_grid=14,
                     posemb_resize='bicubic_antialias'),
          reference='timm 1.0.29 vit_large_patch16_224 (init_values=1e-5)',
          reference_params=303_350_784, licence='CC-BY-NC-ND-4.0 (gated)',
          published='MahmoodLab/UNI (Hugging Face, gated; timm pytorch_model.bin)'),
    Entry(name='retfound_cfp', title='RETFound MAE ViT-L/16, colour fundus photographs',
          layout='retfound', image_size=224,
          model=dict(variant='L/16', pool_type='gap', class_token=True, class_posemb=True,
                     fc_norm=True, posemb_grid=14, posemb_resize='bicubic_antialias'),
          reference="timm 1.0.29 vit_large_patch16_224 (global_pool='avg')",
          reference_params=303_301_632, licence='CC-BY-NC-4.0',
          published='rmaphoh/RETFound_MAE (GitHub); YukunZhou/RETFound_mae_natureCFP '
                    '(Hugging Face)',
          file_names=('RETFound_cfp_weights.pth', 'RETFound_mae_natureCFP.pth'),
          dont_load=('fc_norm/.*',)),
    Entry(name='retfound_oct', title='RETFound MAE ViT-L/16, optical coherence tomography',
          layout='retfound', image_size=224,
          model=dict(variant='L/16', pool_type='gap', class_token=True, class_posemb=True,
                     fc_norm=True, posemb_grid=14, posemb_resize='bicubic_antialias'),
          reference="timm 1.0.29 vit_large_patch16_224 (global_pool='avg')",
          reference_params=303_301_632, licence='CC-BY-NC-4.0',
          published='rmaphoh/RETFound_MAE (GitHub); YukunZhou/RETFound_mae_natureOCT '
                    '(Hugging Face)',
          file_names=('RETFound_oct_weights.pth', 'RETFound_mae_natureOCT.pth'),
          dont_load=('fc_norm/.*',)),
    Entry(name='biomedclip', title='BiomedCLIP image tower (ViT-B/16, PMC-15M)',
          layout='open_clip', image_size=224,
          model=dict(variant='B/16', proj_dim=512, class_posemb=True, posemb_grid=14,
                     posemb_resize='bicubic_antialias'),
          reference="open_clip 3.3.0 TimmModel('vit_base_patch16_224', pool='', "
                    "proj='linear', embed_dim=512)",
          reference_params=86_191_872, licence='MIT', normalize=OPENAI_CLIP,
          published='microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (Hugging Face, '
                    'open_clip_pytorch_model.bin)'),
    Entry(name='clip_vitb16_openai', title='OpenAI CLIP ViT-B/16 image tower',
          reference='open_clip 3.3.0 ViT-B-16-quickgelu visual',
          licence='MIT', published='openai/CLIP (GitHub; its TorchScript .pt is refused, '
          'use the state dict); timm/vit_base_patch16_clip_224.openai (Hugging Face, '
          'open_clip_pytorch_model.bin)', **_clip('B/16', 14, 512, 86_192_640)),
    Entry(name='clip_vitl14_openai', title='OpenAI CLIP ViT-L/14 image tower',
          reference='open_clip 3.3.0 ViT-L-14-quickgelu visual',
          licence='MIT', published='openai/CLIP (GitHub); timm/vit_large_patch14_clip_224.'
          'openai (Hugging Face, open_clip_pytorch_model.bin)',
          **_clip('L/14', 16, 768, 303_966_208)),
    Entry(name='clip_vitb16_openai_hf', title='OpenAI CLIP ViT-B/16, Hugging Face layout',
          reference='transformers 5.17.0 CLIPVisionModelWithProjection (ViT-B/16)',
          licence='MIT', published='openai/clip-vit-base-patch16 (Hugging Face)',
          **_clip('B/16', 14, 512, 86_192_640, layout='hf_clip', resize='bicubic')),
    Entry(name='plip', title='PLIP: CLIP ViT-B/32 on pathology image-text pairs',
          reference='transformers 5.17.0 CLIPVisionModelWithProjection (ViT-B/32)',
          licence=NOT_VERIFIED, published='vinid/plip (Hugging Face)',
          **_clip('B/32', 7, 512, 87_849_216, layout='hf_clip', resize='bicubic')),
    Entry(name='chexzero', title='CheXzero: OpenAI CLIP ViT-B/32 fine-tuned on chest X-rays',
          reference='open_clip 3.3.0 ViT-B-32-quickgelu visual',
          licence=NOT_VERIFIED,
          published='rajpurkarlab/CheXzero (GitHub; torch.save of the CLIP state dict)',
          **dict(_clip('B/32', 7, 512, 87_849_216), normalize=None)),
]
ENTRIES: dict[str, Entry] = {entry.name: entry for entry in _ENTRIES}


def get(name: str) -> Entry:
  """The catalogue entry of a name; an unknown name lists the known ones."""
  if name not in ENTRIES:
    raise ValueError(f'Unknown foundation model {name!r}; the catalogue (fm_adapt.weights.zoo) '
                     f'knows: {sorted(ENTRIES)}.')
  return ENTRIES[name]


def entry_for_file(path: str | os.PathLike) -> Entry | None:
  """The entry whose published file name is the file's name, if any."""
  base = os.fspath(path).rstrip('/').rpartition('/')[2]
  return next((e for e in _ENTRIES if base in e.file_names), None)


def find_file(entry: Entry, folder: str | os.PathLike) -> epath.Path | None:
  """The entry's checkpoint in a folder: a published file name, or '<name>.<ext>'."""
  names = entry.file_names + tuple(entry.name + ext for ext in readers.SUPPORTED_SUFFIXES)
  folder = epath.Path(folder)
  return next((folder / n for n in names if (folder / n).is_file()), None)


def is_spec(model_init: Any) -> bool:
  """Whether `config.model_init` names a catalogue model ('zoo:...')."""
  return isinstance(model_init, str) and model_init.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[Entry, str]:
  """'zoo:NAME:PATH' or 'zoo:PATH' (a published file name) -> (entry, PATH exactly as written).

  PATH may be a URI ('zoo:retfound_cfp:gs://b/w.pth', 'zoo:gs://b/RETFound_cfp_weights.pth').

  Raises:
    ValueError: not a 'zoo:' spec, an unknown name (listing the known ones), or 'zoo:PATH'
      with a file name the catalogue does not know (listing the names it knows).
  """
  if not is_spec(spec):
    raise ValueError(f"A catalogue model is written 'zoo:NAME:PATH', got {spec!r}.")
  rest = spec[len(PREFIX):]
  name, sep, path = rest.partition(':')
  if sep and name in ENTRIES:
    return ENTRIES[name], path
  is_uri = sep and path.startswith('//')
  if sep and not is_uri and '/' not in name and not os.path.exists(rest):
    get(name)  # Raises, listing the known names.
  entry = entry_for_file(rest)
  if entry is None:
    known = sorted(f for e in _ENTRIES for f in e.file_names)
    raise ValueError(
        f"{spec!r}: the file name {epath.Path(rest).name!r} is not a published name the "
        f"catalogue knows ({known}); name the model: 'zoo:NAME:{rest}' with NAME one of "
        f'{sorted(ENTRIES)}.')
  return entry, rest


def resolve_path(path: str | os.PathLike) -> epath.Path:
  """The file as given (a local path or a URI), else under $FM_ADAPT_WEIGHTS_DIR."""
  return locate.resolve_path(path)


def model_config(entry: Entry | str) -> dict[str, Any]:
  """The `vit.Model` fields of an entry (no num_classes): `models.get_model('vit', ...)`."""
  entry = get(entry) if isinstance(entry, str) else entry
  return dict(entry.model)


def abstract_params(entry: Entry | str, num_classes: int | None = None) -> dict[str, Any]:
  """The entry's parameter tree as ShapeDtypeStructs (jax.eval_shape, nothing allocated)."""
  entry = get(entry) if isinstance(entry, str) else entry
  model = vit.Model(num_classes=num_classes, **entry.model)
  image = jax.ShapeDtypeStruct((1, entry.image_size, entry.image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), image)['params']


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def load_params(entry: Entry, path: str | os.PathLike, target_params: Any,
                dont_load: Sequence[str] = ()) -> tuple[dict[str, Any],
                                                        vit_import.ImportReport]:
  """Imports an entry's checkpoint into `target_params` (strict), the entry's dont_load added.

  Args:
    entry: the catalogue entry.
    path: the checkpoint file.
    target_params: the model's freshly initialised params (values needed for dont_load
      paths, e.g. RETFound's fc_norm and a new head).
    dont_load: more regexes (e.g. 'head/.*' for a new head).

  Raises:
    vit_import.CheckpointMismatchError: the file does not fit; the message names the
      catalogue models whose shapes it does fit, if any.
  """
  try:
    return vit_import.import_vit(path, format=entry.layout, target_params=target_params,
                                 dont_load=tuple(entry.dont_load) + tuple(dont_load))
  except vit_import.CheckpointMismatchError as e:
    fits = [other.name for other in looks_like(path) if other.name != entry.name]
    hint = (f'It fits the catalogue model(s) {fits}: write zoo:{fits[0]}:{path}.' if fits else
            'It fits no catalogue model.')
    raise vit_import.CheckpointMismatchError(
        f'{path} is not a {entry.name!r} checkpoint ({entry.title}). {hint}\n{e}') from None


def looks_like(path: str | os.PathLike) -> list[Entry]:
  """The catalogue entries whose parameter shapes a checkpoint fits exactly."""
  arrays = readers.read_arrays(path)
  fits = []
  for entry in _ENTRIES:
    target = _flat_shapes(abstract_params(entry))
    try:
      converted = vit_import.CONVERTERS[entry.layout](
          arrays, num_patches=target['pos_embedding'][1],
          class_posemb='cls_pos_embedding' in target)
    except ValueError:  # Keys of two layouts mapping to one parameter.
      continue
    if converted.leftovers:
      continue
    keep = lambda shapes: {p: s for p, s in shapes.items()
                           if not _matches(entry.dont_load, p)}
    shapes = {p: tuple(v.shape) for p, v in converted.params.items()}
    if keep(shapes) == keep(target):
      fits.append(entry)
  return fits


def _flat_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  return {'/'.join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def build(spec: str, *, num_classes: int | None = None, seed: int = 0,
          dont_load: Sequence[str] = ()) -> tuple[vit.Model, dict[str, Any],
                                                  vit_import.ImportReport]:
  """Builds a catalogue model and imports its checkpoint.

  Args:
    spec: 'zoo:NAME:PATH' or 'zoo:PATH' (see `parse_spec`); PATH as given or under
      $FM_ADAPT_WEIGHTS_DIR.
    num_classes: a new head of this size (initialised, not loaded), or None for features.
    seed: initialisation of the parameters the checkpoint does not give (head, dont_load).
    dont_load: more regexes of parameters to keep initialised.

  Returns:
    (model, {'params': params}, report).
  """
  entry, path = parse_spec(spec)
  path = resolve_path(path)
  model = vit.Model(num_classes=num_classes, **entry.model)
  image = jnp.zeros((1, entry.image_size, entry.image_size, 3), jnp.float32)
  init = jax.jit(model.init)(jax.random.key(seed), image)['params']
  extra = ('head/.*',) if num_classes else ()
  params, report = load_params(entry, path, init, tuple(dont_load) + extra)
  return model, {'params': params}, report


def table() -> str:
  """The catalogue as a markdown table (name, model, layout, parameters, licence, source).

  'params' is fm_adapt's count, that of the reference's parameters its forward pass uses;
  'reference' gives the library's own count, and the unused parameters where there are any.
  """
  rows = ['| name | model | layout | params | reference (its count) | licence | published |',
          '| --- | --- | --- | ---: | --- | --- | --- |']
  for e in _ENTRIES:
    unused = ''.join(f'; unused: {name} ({size:,})' for name, size in e.unused)
    rows.append(f'| `{e.name}` | {e.title} | {e.layout} | {e.params:,} | {e.reference} '
                f'({e.reference_params:,}{unused}) | {e.licence} | {e.published} |')
  return '\n'.join(rows)
