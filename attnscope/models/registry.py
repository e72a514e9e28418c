"""Which ViT a name means: aliases, their timm names and training families."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from attnscope.errors import AttnscopeError
from attnscope.models.preprocessing import CLIP_MEAN, CLIP_STD, DataConfig, imagenet_eval

FAMILIES = ("MIM", "MIM (fine-tuned)", "JEA", "supervised", "language-supervised", "unknown")


@dataclass(frozen=True)
class ModelSpec:
    """One registered alias: the timm name it stands for and what kind of training made it.

    `converter` names the checkpoint layout of the family's release files
    (`attnscope.models.converters`), `arch_kwargs` the architecture settings the weights
    need beyond the timm name (MoCo v3's 12 heads, BEiT's final norm, ...), `data_config`
    the family's published eval preprocessing (None: the timm tag's). `weights_url` is set
    when the weights are a file on the project's page rather than on a hub; `sha256` only
    when the project publishes one. `path` is set for a model given as its weights (a file
    or a Hugging Face folder, `attnscope.models.source`): those are its checkpoint, and
    `alias` is the short name it is shown under.
    """

    alias: str
    timm_name: str
    family: str
    notes: str = ""
    converter: str | None = None
    arch_kwargs: tuple[tuple[str, Any], ...] = ()
    data_config: DataConfig | None = None
    weights_url: str | None = None
    sha256: str | None = None
    weights_page: str | None = None  # where a file without a public link can be asked for
    # how the family's own code resizes its position terms (`attnscope.models.positions.RULES`);
    # None: the architecture's, which for a timm model is timm's loader
    positions: str | None = None
    path: Path | None = None  # a model given as a folder or weights file (`models.source`)

    @property
    def arch(self) -> str:
        return self.timm_name.split(".", 1)[0]

    @property
    def file_weights(self) -> bool:
        """Weights come as a file the user downloads (or obtains) and passes as a checkpoint."""
        return self.weights_url is not None or self.weights_page is not None


def _eval(source: str, interpolation: str = "bicubic") -> DataConfig:
    return imagenet_eval(interpolation, source)


_MAE_EVAL = _eval("MAE main_finetune eval: resize 256, centre crop 224, bicubic, ImageNet mean/std")
_DINO_EVAL = _eval("DINO eval_linear: resize 256, centre crop 224, bicubic, ImageNet mean/std")
_DINOV2_EVAL = _eval(
    "DINOv2 make_classification_eval_transform (eval/linear, knn): resize 256, centre crop 224, bicubic, "
    "ImageNet mean/std"
)
_DINOV3_EVAL = _eval(
    "DINOv3 make_classification_eval_transform (eval/linear, knn): resize 256, centre crop 224, bicubic, "
    "ImageNet mean/std"
)
# I-JEPA's repository has no eval transform: the papers' (Beyond [cls]) and CAPI's baseline
# evaluation both use resize 256 / crop 224, bicubic, ImageNet mean/std (timm's tag: crop 0.9)
_IJEPA_EVAL = _eval(
    "I-JEPA has no eval transform; Beyond [cls]'s code and CAPI's I-JEPA baseline: resize 256, centre "
    "crop 224, bicubic, ImageNet mean/std"
)
_EVA02_EVAL = DataConfig(
    CLIP_MEAN,
    CLIP_STD,
    224 / 256,
    "bicubic",
    "center",
    "EVA-02 datasets.build_transform at 224 px: crop_pct 224/256, bicubic, OpenAI CLIP mean/std",
)
_CLIP_EVAL = DataConfig(
    CLIP_MEAN,
    CLIP_STD,
    1.0,
    "bicubic",
    "center",
    "OpenAI CLIP clip._transform: resize 224 (shorter side), centre crop 224, bicubic, CLIP mean/std",
)
_BEITV2_FT_EVAL = _eval(
    "BEiT-v2 fine-tuning eval (--imagenet_default_mean_and_std, crop_pct 224/256): resize 256, centre "
    "crop 224, bicubic, ImageNet mean/std"
)
_BEIT_PT = (("global_pool", "token"), ("use_abs_pos_emb", False), ("use_rel_pos_bias", True))
_BEIT_URL = "https://conversationhub.blob.core.windows.net/beit-share-public/beitv2/"
_CAPI_URL = "https://dl.fbaipublicfiles.com/capi/"
_IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/"
_MOCO_URL = "https://dl.fbaipublicfiles.com/moco-v3/"


def _capi(alias: str, data: str, file: str) -> ModelSpec:
    return ModelSpec(
        alias,
        "capi_vitl14",
        "MIM",
        f"CAPI ViT-L/14 pre-trained on {data}; 16 registers, no [cls]; RMSNorm, rotary positions",
        converter="capi",
        data_config=_eval(
            "CAPI eval_classification: resize 256, centre crop 224, bicubic, ImageNet mean/std"
        ),
        weights_url=_CAPI_URL + file,
    )


# The models of "Beyond [cls]" and LUT that timm does not carry: release files, converted.
_FILE_SPECS = [
    ModelSpec(
        "simmim_vit_base",
        "beit_base_patch16_224",
        "MIM",
        "SimMIM ViT-B/16 800 ep; shared relative position bias, LayerScale, no absolute positions",
        converter="simmim",
        positions="beit",
        arch_kwargs=(*_BEIT_PT, ("init_values", 0.1)),
        data_config=_eval(
            "SimMIM data_finetune eval: resize 256, centre crop 224, bicubic, ImageNet mean/std"
        ),
        weights_url="https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw/view?usp=sharing",
    ),
    ModelSpec(
        "beitv2_vit_base_pt",
        "beitv2_base_patch16_224",
        "MIM",
        "BEiT-v2 ViT-B/16 pre-training only (1600 ep, IN-1k); shared relative position bias",
        converter="beitv2",
        positions="beit",
        arch_kwargs=(*_BEIT_PT, ("init_values", 0.1)),
        data_config=_eval("BEiT-v2 eval: crop_pct 224/256, bicubic, --imagenet_default_mean_and_std"),
        weights_url=_BEIT_URL + "beitv2_base_patch16_224_pt1k.pth",
    ),
    ModelSpec(
        "beitv2_vit_large_pt",
        "beitv2_large_patch16_224",
        "MIM",
        "BEiT-v2 ViT-L/16 pre-training only (1600 ep, IN-1k); shared relative position bias",
        converter="beitv2",
        positions="beit",
        arch_kwargs=(*_BEIT_PT, ("init_values", 1e-5)),
        data_config=_eval("BEiT-v2 eval: crop_pct 224/256, bicubic, --imagenet_default_mean_and_std"),
        weights_url=_BEIT_URL + "beitv2_large_patch16_224_pt1k.pth",
    ),
    _capi("capi_vit_large", "LVD-142M", "capi_vitl14_lvd.pth"),
    _capi("capi_vit_large_in22k", "ImageNet-22k", "capi_vitl14_i22k.pth"),
    _capi("capi_vit_large_in1k", "ImageNet-1k", "capi_vitl14_in1k.pth"),
    _capi("capi_vit_large_p205", "Places205", "capi_vitl14_p205.pth"),
    ModelSpec(
        "lut_vit_base",
        "vit_base_patch16_224",
        "MIM",
        "LUT ViT-B/16 (MAE encoder layout); the repository publishes no weights link",
        converter="lut",
        positions="mae",
        data_config=_eval("LUT eval (MAE's): resize 256, centre crop 224, bicubic, ImageNet mean/std"),
        weights_page="https://github.com/naver-ai/lut",
    ),
    ModelSpec(
        "ibot_vit_small",
        "vit_small_patch16_224",
        "JEA",
        "iBOT ViT-S/16 teacher backbone",
        converter="ibot",
        positions="dino",
        data_config=_eval("iBOT eval_linear: resize 256, centre crop 224, bicubic, ImageNet mean/std"),
        weights_url=_IBOT_URL + "vits_16/checkpoint_teacher.pth",
    ),
    ModelSpec(
        "ibot_vit_base",
        "vit_base_patch16_224",
        "JEA",
        "iBOT ViT-B/16 teacher backbone",
        converter="ibot",
        positions="dino",
        data_config=_eval("iBOT eval_linear: resize 256, centre crop 224, bicubic, ImageNet mean/std"),
        weights_url=_IBOT_URL + "vitb_16/checkpoint_teacher.pth",
    ),
    ModelSpec(
        "ibot_vit_large",
        "vit_large_patch16_224",
        "JEA",
        "iBOT ViT-L/16 teacher backbone",
        converter="ibot",
        positions="dino",
        data_config=_eval("iBOT eval_linear: resize 256, centre crop 224, bicubic, ImageNet mean/std"),
        weights_url=_IBOT_URL + "vitl_16/checkpoint_teacher.pth",
    ),
    ModelSpec(
        "mocov3_vit_small",
        "vit_small_patch16_224",
        "JEA",
        "MoCo v3 ViT-S/16 300 ep; 12 heads (timm's ViT-S has 6); fixed sin-cos positions",
        converter="mocov3",
        positions="mocov3",
        arch_kwargs=(("num_heads", 12),),
        data_config=_eval(
            "MoCo v3 main_lincls: resize 256, centre crop 224, bilinear, ImageNet mean/std", "bilinear"
        ),
        weights_url=_MOCO_URL + "vit-s-300ep/vit-s-300ep.pth.tar",
    ),
    ModelSpec(
        "mocov3_vit_base",
        "vit_base_patch16_224",
        "JEA",
        "MoCo v3 ViT-B/16 300 ep; fixed sin-cos positions",
        converter="mocov3",
        positions="mocov3",
        arch_kwargs=(("num_heads", 12),),
        data_config=_eval(
            "MoCo v3 main_lincls: resize 256, centre crop 224, bilinear, ImageNet mean/std", "bilinear"
        ),
        weights_url=_MOCO_URL + "vit-b-300ep/vit-b-300ep.pth.tar",
    ),
]


_SPECS = [
    ModelSpec(
        "mae_vit_base",
        "vit_base_patch16_224.mae",
        "MIM",
        "MAE pre-training, no fine-tuning",
        converter="mae",
        positions="mae",
        data_config=_MAE_EVAL,
    ),
    ModelSpec(
        "mae_vit_large",
        "vit_large_patch16_224.mae",
        "MIM",
        "MAE pre-training",
        converter="mae",
        positions="mae",
        data_config=_MAE_EVAL,
    ),
    ModelSpec(
        "mae_vit_huge",
        "vit_huge_patch14_224.mae",
        "MIM",
        "MAE pre-training",
        converter="mae",
        positions="mae",
        data_config=_MAE_EVAL,
    ),
    ModelSpec(
        "ijepa_vit_huge",
        "vit_huge_patch14_gap_224.in1k_ijepa",
        "MIM",
        "I-JEPA; no class token",
        positions="ijepa",
        data_config=_IJEPA_EVAL,
    ),
    ModelSpec(
        "eva02_mim_vit_base",
        "eva02_base_patch14_224.mim_in22k",
        "MIM",
        "EVA-02 MIM; rotary positions",
        positions="eva02",
        data_config=_EVA02_EVAL,
    ),
    ModelSpec(
        "beitv2_vit_base",
        "beitv2_base_patch16_224.in1k_ft_in22k_in1k",
        "MIM (fine-tuned)",
        "only fine-tuned BEiT-v2 weights are public; relative position bias",
        positions="beit",
        data_config=_BEITV2_FT_EVAL,
    ),
    ModelSpec(
        "dino_vit_small",
        "vit_small_patch16_224.dino",
        "JEA",
        "DINO",
        converter="dino",
        positions="dino",
        data_config=_DINO_EVAL,
    ),
    ModelSpec(
        "dino_vit_base",
        "vit_base_patch16_224.dino",
        "JEA",
        "DINO",
        converter="dino",
        positions="dino",
        data_config=_DINO_EVAL,
    ),
    ModelSpec(
        "dino_vit_small8",
        "vit_small_patch8_224.dino",
        "JEA",
        "DINO, patch 8",
        converter="dino",
        positions="dino",
        data_config=_DINO_EVAL,
    ),
    ModelSpec(
        "dino_vit_base8",
        "vit_base_patch8_224.dino",
        "JEA",
        "DINO, patch 8",
        converter="dino",
        positions="dino",
        data_config=_DINO_EVAL,
    ),
    ModelSpec(
        "dinov2_vit_small",
        "vit_small_patch14_dinov2.lvd142m",
        "JEA",
        "DINOv2; LayerScale; 518 px",
        positions="dinov2",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov2_vit_base",
        "vit_base_patch14_dinov2.lvd142m",
        "JEA",
        "DINOv2; LayerScale; 518 px",
        positions="dinov2",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov2_vit_large",
        "vit_large_patch14_dinov2.lvd142m",
        "JEA",
        "DINOv2; LayerScale; 518 px",
        positions="dinov2",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov2_reg_vit_small",
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "JEA",
        "DINOv2 + 4 registers; 518 px",
        positions="dinov2-reg",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov2_reg_vit_base",
        "vit_base_patch14_reg4_dinov2.lvd142m",
        "JEA",
        "DINOv2 + 4 registers; 518 px",
        positions="dinov2-reg",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov2_reg_vit_large",
        "vit_large_patch14_reg4_dinov2.lvd142m",
        "JEA",
        "DINOv2 + 4 registers; 518 px",
        positions="dinov2-reg",
        data_config=_DINOV2_EVAL,
    ),
    ModelSpec(
        "dinov3_vit_small",
        "vit_small_patch16_dinov3.lvd1689m",
        "JEA",
        "DINOv3; 4 registers; rotary",
        data_config=_DINOV3_EVAL,
    ),
    ModelSpec(
        "dinov3_vit_base",
        "vit_base_patch16_dinov3.lvd1689m",
        "JEA",
        "DINOv3; 4 registers; rotary",
        data_config=_DINOV3_EVAL,
    ),
    ModelSpec(
        "clip_vit_base",
        "vit_base_patch16_clip_224.openai",
        "language-supervised",
        "OpenAI CLIP image tower",
        data_config=_CLIP_EVAL,
    ),
    ModelSpec(
        "supervised_vit_base",
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "supervised",
        "ImageNet-21k -> 1k supervised (AugReg2)",
    ),
    *_FILE_SPECS,
]

MODEL_REGISTRY: dict[str, ModelSpec] = {s.alias: s for s in _SPECS}

# Short names researchers type; each points at a registry entry.
SHORT_ALIASES: dict[str, str] = {
    "mae": "mae_vit_base",
    "ijepa": "ijepa_vit_huge",
    "eva02": "eva02_mim_vit_base",
    "eva02_mim": "eva02_mim_vit_base",
    "beitv2": "beitv2_vit_base",
    "dino": "dino_vit_base",
    "dinov2": "dinov2_vit_base",
    "dinov2_reg": "dinov2_reg_vit_base",
    "dinov3": "dinov3_vit_base",
    "clip": "clip_vit_base",
    "supervised": "supervised_vit_base",
    "simmim": "simmim_vit_base",
    "beitv2_pt": "beitv2_vit_base_pt",
    "capi": "capi_vit_large",
    "lut": "lut_vit_base",
    "ibot": "ibot_vit_base",
    "mocov3": "mocov3_vit_base",
}


# timm's tiny ViTs (about 0.3-0.8 M parameters, 160 px): what tests, examples and a first
# offline try run on. Listed for `attnscope models`; they resolve as plain timm names.
TEST_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("test_vit", "test_vit", "test", "tiny ViT: [cls], 160 px; use with --random-init offline"),
    ModelSpec("test_vit2", "test_vit2", "test", "tiny ViT, another layout; use with --random-init offline"),
    ModelSpec("test_vit3", "test_vit3", "test", "tiny ViT, wider; use with --random-init offline"),
)


def list_model_specs() -> list[ModelSpec]:
    """Registered aliases in display order."""
    return list(_SPECS)


def aliases_of(spec: ModelSpec) -> list[str]:
    return [short for short, full in SHORT_ALIASES.items() if full == spec.alias]


def check_family(family: str | None) -> None:
    if family is not None and family not in FAMILIES:
        raise AttnscopeError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")


def resolve_model_spec(name: str, family: str | None = None) -> ModelSpec:
    """Map an alias or any timm model name to a ModelSpec.

    Unknown names are checked against timm so a typo fails here, with suggestions,
    instead of deep inside model construction.
    """
    import timm

    check_family(family)
    key = SHORT_ALIASES.get(name, name)
    spec = MODEL_REGISTRY.get(key)
    if spec is None:
        arch = name.split(".", 1)[0]
        if not timm.is_model(arch):
            choices = list(MODEL_REGISTRY) + list(SHORT_ALIASES) + timm.list_models()
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise AttnscopeError(
                f"unknown model {name!r}{hint}; see `attnscope models`, any timm model name, "
                "or the path of a checkpoint file or Hugging Face folder"
            )
        spec = ModelSpec(alias=name, timm_name=name, family="unknown")
    if family is not None:
        spec = replace(spec, family=family)
    return spec
